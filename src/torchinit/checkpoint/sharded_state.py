"""Sharded training states: every rank saves and loads its own part, into and from one folder.

- FSDP2: a `torch.distributed.checkpoint` (DCP) folder. Modules (`get_model_state_dict`) and optimizers
  (`get_optimizer_state_dict`, keyed by parameter name) are written as each rank's shards; loading reads on
  each rank only the saved chunks that overlap its own shards, so the folder also loads into another world size.
- DeepSpeed (ZeRO 1-3): the engine's own folder (`save_checkpoint` / `load_checkpoint`: per-rank partition
  files holding the optimizer state).
- Values that are neither modules nor optimizers go to `values.pt`, written by rank 0 and read back with
  `weights_only=True`, with the list of what the folder holds.

What the other saves and loads share lives here too: `split_state` (a state's modules, optimizers and values),
`values.pt` (`read_values`, `restore_values`), `save_folder` and `agree` (the atomic all-ranks folder save that
export.py also writes through).

Saving is atomic: all ranks write into a hidden temporary folder next to `path`; when every rank succeeded,
rank 0 moves an existing folder aside, renames the new one into place, then deletes the old one. A failure on
any rank is raised on every rank (none waits for one that gave up) and leaves `path` as it was.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchinit.checkpoint.dcp import dcp_failures, dcp_metadata, dcp_paths, read_dcp
from torchinit.checkpoint.header import CheckpointError
from torchinit.checkpoint.load_model import load_into, match
from torchinit.checkpoint.opener import open_checkpoint
from torchinit.checkpoint.save import exchange, fsync_folder, save_failure
from torchinit.core.errors import ConfigurationError, MissingKeyError, RankError, UsageError
from torchinit.core.text import shorten
from torchinit.strategies import deepspeed as ds
from torchinit.strategies.wrappers import FabricModule

VALUES = "values.pt"
TAG = "state"  # DeepSpeed's sub-folder name for the one checkpoint a folder holds


def split_state(state: dict[str, Any]) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, Any]]:
    """Modules (a Fabric wrapper as its original module), optimizers and plain values, by key."""
    modules, optimizers, values = {}, {}, {}
    for key, obj in state.items():
        if isinstance(obj, nn.Module):
            modules[key] = obj.module if isinstance(obj, FabricModule) else obj
        elif isinstance(obj, (torch.optim.Optimizer, ds.EngineOptimizer)):
            optimizers[key] = obj
        else:
            values[key] = obj
    return modules, optimizers, values


# ---- FSDP: torch.distributed.checkpoint -------------------------------------------------------------
def save_fsdp(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Each rank writes its shards of every module and optimizer in `state`; rank 0 the plain values."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    modules, optimizers, values = split_state(state)
    tensors: dict[str, Any] = {name: get_model_state_dict(module) for name, module in modules.items()}
    for name, optimizer in optimizers.items():
        tensors[name] = get_optimizer_state_dict(optimizer_owner(path, name, optimizer, modules), optimizer)

    def write(folder: Path) -> None:
        try:
            dcp_save(tensors, storage_writer=FileSystemWriter(folder))
        except CheckpointException as error:  # a BaseException: it would pass through `except Exception`
            raise RankError(f"Saving {path} failed while writing the shards ({dcp_failures(error)}); nothing "
                            "was written there.") from None

    save_folder(Path(path), write, values, state)


def load_fsdp(path: str | os.PathLike, state: dict[str, Any], strict: bool, device: torch.device,
              dtype: torch.dtype | None) -> dict[str, Any]:
    """Load a DCP folder into the (sharded or plain) modules and optimizers of `state`; each rank reads only
    its shards. Everything is checked before anything changes. Returns the values not in `state`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a folder that fabric.save wrote under FSDP (no .metadata: it is not a "
                              f"torch.distributed.checkpoint){_hint(path)}")
    paths = dcp_paths(dcp_metadata(path))
    values, kinds = read_values(path)
    held = set(kinds) or {p[0] for p in paths.values()}
    modules, optimizers, _ = split_state(keep_held(path, state, held, strict))
    checkpoints = {name: open_checkpoint(path, select=name) for name in modules}
    for name, module in modules.items():
        match(module, checkpoints[name], strict=strict)
    every = split_state(state)[0]  # also the modules not loaded
    owners = {name: optimizer_owner(path, name, opt, every) for name, opt in optimizers.items()}
    for name, optimizer in optimizers.items():
        _check_optimizer(path, name, optimizer, owners[name], paths)
    for name, module in modules.items():
        load_into(module, checkpoints[name], strict=strict, device=device, dtype=dtype)
    for name, optimizer in optimizers.items():
        tensors = {name: get_optimizer_state_dict(owners[name], optimizer)}
        read_dcp(path, tensors)
        set_optimizer_state_dict(owners[name], optimizer, tensors[name])
    return restore_values(state, values)


def optimizer_owner(path: str | os.PathLike, name: str, optimizer: torch.optim.Optimizer,
           modules: dict[str, nn.Module]) -> nn.Module:
    """The module whose parameters the optimizer updates (its state is saved by their names)."""
    mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules.values():
        if mine <= {id(p) for p in module.parameters()}:
            return module
    raise ConfigurationError(f"{path}: the optimizer {name!r} updates parameters of none of the modules in the state "
                             f"({sorted(modules) or 'there are none'}); put its model in the same state dict.")


def _check_optimizer(path: Path, name: str, optimizer: torch.optim.Optimizer, owner: nn.Module,
                     paths: dict[str, tuple]) -> None:
    """The saved optimizer state must be for the same parameters (by name) and the same number of groups."""
    names = {id(p): n for n, p in owner.named_parameters()}
    mine = {names[id(p)] for group in optimizer.param_groups for p in group["params"]}
    saved = {p[2] for p in paths.values() if len(p) > 2 and p[0] == name and p[1] == "state"}
    groups = {p[2] for p in paths.values() if len(p) > 2 and p[0] == name and p[1] == "param_groups"}
    if saved != mine or len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path}: the saved optimizer state {name!r} does not fit this optimizer (saved for parameters the "
            f"optimizer lacks: {shorten(sorted(saved - mine), 10)}; parameters without saved state: "
            f"{shorten(sorted(mine - saved), 10)}; "
            f"{len(groups)} param group(s) saved, {len(optimizer.param_groups)} here). Build the optimizer over "
            "the same model and parameter groups as the one saved. Nothing was loaded."
        )


# ---- DeepSpeed: the engine's checkpoint ---------------------------------------------------------------
def save_deepspeed(path: str | os.PathLike, state: dict[str, Any], engine: ds.Engine | None) -> None:
    """The engine writes its module and optimizer (each rank its partitions); rank 0 the plain values."""
    _, _, values = split_state(state)
    deepspeed_engine = engine_for(path, state, engine, "save")
    exclude = engine.options.exclude_frozen_parameters
    save_folder(Path(path), lambda folder: deepspeed_engine.save_checkpoint(
        str(folder), tag=TAG, exclude_frozen_parameters=exclude), values, state)


def load_deepspeed(path: str | os.PathLike, state: dict[str, Any], strict: bool,
                   engine: ds.Engine | None) -> dict[str, Any]:
    """Load a folder `save_deepspeed` wrote through the engine (same world size and ZeRO stage; load_state.py
    converts the others). The optimizer state is loaded when `state` holds the optimizer. Returns the values not
    in `state`."""
    path = Path(path)
    deepspeed_engine = engine_for(path, state, engine, "load")
    if not (path / "latest").is_file():
        raise CheckpointError(f"{path}: not a folder that fabric.save wrote under DeepSpeed (no 'latest' file "
                              f"naming its checkpoint){_hint(path)}")
    values, kinds = read_values(path)
    modules, optimizers, _ = split_state(state)
    held = set(kinds) or {*modules, *optimizers}  # a folder DeepSpeed wrote alone holds the engine's two
    modules, optimizers, _ = split_state(keep_held(path, state, held, strict))
    _check_deepspeed_folder(path, next(iter(modules.values()), None), engine.options.stage, strict)
    loaded, _ = deepspeed_engine.load_checkpoint(str(path), load_module_strict=strict,
                                                 load_optimizer_states=bool(optimizers),
                                                 load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint to load in it.")
    return restore_values(state, values)


def engine_for(path: str | os.PathLike, state: dict[str, Any], engine: ds.Engine | None, what: str):
    """DeepSpeed's engine, after checking that `state` holds nothing it does not save: the one module set up
    (and its optimizer)."""
    if engine is None or engine.engine is None:
        raise UsageError(f"fabric.{what} under DeepSpeed goes through its engine, which does not exist yet: call "
                         "fabric.setup(model, optimizer) (or setup_optimizers) first.")
    modules, optimizers, _ = split_state(state)
    others = [k for k, m in modules.items() if m is not engine.module]
    others += [k for k, o in optimizers.items() if not isinstance(o, ds.EngineOptimizer) or not o.belongs_to(engine)]
    if others or len(modules) > 1:
        raise ConfigurationError(
            f"{path}: under DeepSpeed the state can hold the model set up and its optimizer only (the "
            f"engine saves those); {sorted(others) or sorted(modules)} are not them.")
    return engine.engine


def _check_deepspeed_folder(path: Path, module: nn.Module | None, stage: int, strict: bool) -> None:
    """The stage's model states file must be there; under `strict` the module keys must match (named)."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    tag = (path / "latest").read_text().strip()
    file = path / tag / name
    if not file.is_file():
        found = sorted(p.name for p in (path / tag).glob("*model_states.pt")) if (path / tag).is_dir() else []
        raise CheckpointError(f"{path}: has no {tag}/{name}, which ZeRO stage {stage} reads (found {found or 'none'}): "
                              "it was saved under another ZeRO stage or is incomplete.")
    saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if module is None:
        return
    keys, mine = set(saved.get("module", {})), set(module.state_dict())
    if strict and keys != mine:
        raise CheckpointError(f"{path}: does not match the model (strict=True). Missing: "
                              f"{shorten(sorted(mine - keys), 10)}. Unexpected: {shorten(sorted(keys - mine), 10)}. "
                              "Nothing was loaded; pass strict=False to load what matches.")


# ---- both: values and the folder ----------------------------------------------------------------------
def keep_held(path: Path, state: dict[str, Any], held: set[str], strict: bool) -> dict[str, Any]:
    """The entries of `state` that the checkpoint holds (`held`: its keys); under `strict` one it lacks is an error."""
    absent = [k for k in state if k not in held]
    if absent and strict:
        raise MissingKeyError(f"{path}: has no {absent}; it holds {sorted(held)}. Pass strict=False to skip them.")
    return {k: v for k, v in state.items() if k in held}


def read_values(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The plain values and {key: "module" | "optimizer" | "value"} (empty for folders others wrote)."""
    file = path / VALUES
    if not file.is_file():
        return {}, {}
    saved = torch.load(file, map_location="cpu", weights_only=True)
    return saved["values"], saved["kinds"]


def restore_values(state: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Plain values are replaced in `state` (as the single-file load does); returns those it lacks."""
    for key, obj in state.items():
        if key in values and not isinstance(obj, (nn.Module, torch.optim.Optimizer, ds.EngineOptimizer)):
            state[key] = values[key]
    return {k: v for k, v in values.items() if k not in state}


def _hint(path: Path) -> str:
    if (path / "latest").is_file():
        return ": it was written under DeepSpeed; load it with a DeepSpeed strategy."
    if (path / ".metadata").is_file():
        return ": it is a torch.distributed.checkpoint folder (FSDP); load it with strategy='fsdp'."
    return ". For a model's weights from a plain checkpoint use fabric.load_raw(path, model)."


def save_folder(path: Path, write: Callable[[Path], None], values: dict[str, Any] | None,
                 state: dict[str, Any]) -> None:
    """Every rank calls `write(temporary folder)`; then rank 0 adds `values.pt` (unless `values` is None) and swaps
    the folder into `path`. Every step ends with all ranks agreeing that it worked, so a failure anywhere is raised
    everywhere."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    blob, error = b"", None
    if rank == 0 and values is not None:
        kinds = {k: "module" if isinstance(v, nn.Module) else "value" if k in values else "optimizer"
                 for k, v in state.items()}
        try:  # before any rank writes: a value that cannot be saved fails the save at once
            buffer = io.BytesIO()
            torch.save({"values": values, "kinds": kinds}, buffer)
            blob = buffer.getvalue()
        except Exception as exc:
            error = exc
    agree(error, path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a crashed process with the same id
    temporary = _from_rank_zero(temporary)  # (also: nobody writes before rank 0 cleared it)
    error = None
    try:
        write(temporary)
        _fsync_files(temporary)
    except Exception as exc:
        error = save_failure(path, exc) or exc  # a full disk said clearly, while the partial files are there
    try:
        agree(error, path)
        error = None
        if rank == 0:
            try:
                if values is not None:
                    with open(temporary / VALUES, "wb") as f:
                        f.write(blob)
                        f.flush()
                        os.fsync(f.fileno())
                _replace_folder(temporary, path)
            except Exception as exc:
                error = exc
        agree(error, path)
    finally:
        if rank == 0 and temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _replace_folder(new: Path, path: Path) -> None:
    """Rename `new` to `path`. An existing `path` is swapped with `new` in one atomic step, where the filesystem
    can, so that a crash at any moment leaves the old or the new folder at `path`; elsewhere it is moved aside
    first (and back if the rename fails). Then the old one is deleted."""
    if path.is_dir() and not path.is_symlink() and exchange(new, path):
        fsync_folder(path.parent)
        shutil.rmtree(new)  # now the old folder
        return
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    fsync_folder(path.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _fsync_files(folder: Path) -> None:
    """Flush what this rank can see of the folder to disk before the rename makes it the checkpoint."""
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _from_rank_zero(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(error: BaseException | None, path: Path) -> None:
    """Raise on every rank if any rank failed: the local error where it happened, a RuntimeError naming the rank
    elsewhere."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
    else:
        outcomes = [None if error is None else str(error)]
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RankError(f"Saving {path} failed on rank {rank} ({message}); nothing was written there.")
