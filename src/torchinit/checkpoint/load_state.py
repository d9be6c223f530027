"""`fabric.load` for any saved state into any strategy: a one-file save (torch or safetensors), a safetensors
folder, an FSDP DCP folder and a DeepSpeed ZeRO 1/2/3 folder, each from any world size, into one device / DDP,
FSDP2 or DeepSpeed ZeRO 1/2/3 at any world size. Modules through `load_into` (each rank reads its shards or
partition slices only); optimizers through `optim_state.py` (each rank fills only the state it holds).

A same-layout folder goes the native way (DCP into FSDP: `load_fsdp`; DeepSpeed at the same stage and
world size: the engine's own loader, which also restores its counters). Everything is checked (keys, shapes,
optimizer parameters and groups) before anything changes. What cannot be carried is an error, not a guess:
optimizer state from a safetensors checkpoint (the format holds none), and into DeepSpeed a per-partition value
(Adam's `step`) that differs between parameters of one partition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchinit.checkpoint import zero
from torchinit.checkpoint.base import Checkpoint
from torchinit.checkpoint.dcp import dcp_metadata, dcp_paths
from torchinit.checkpoint.header import CheckpointError
from torchinit.checkpoint.load_model import LoadReport, load_into, match
from torchinit.checkpoint.opener import open_checkpoint
from torchinit.checkpoint.optim_state import SavedOptimizer, param_groups, restore_flat, restore_fsdp, restore_plain
from torchinit.checkpoint.partitions import load_masters
from torchinit.checkpoint.sharded_state import (
    engine_for,
    keep_held,
    load_deepspeed,
    load_fsdp,
    optimizer_owner,
    read_values,
    restore_values,
    split_state,
)
from torchinit.strategies import deepspeed as ds
from torchinit.strategies.base import Layout


@dataclass
class Source:
    modules: dict[str, Checkpoint] = field(default_factory=dict)
    optimizers: dict[str, SavedOptimizer] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # every key the checkpoint has an entry for
    no_optimizer: str = ""  # why the source cannot hold optimizer state, if it cannot


def load(path: str | os.PathLike, state: dict[str, Any], strict: bool, target: Layout, device: torch.device,
         dtype: torch.dtype | None, engine: ds.Engine | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Load `path` into the modules, optimizers and values of `state` laid out as `target` (the strategy's
    layout); returns the saved values that `state` lacks. `allow_nonfinite` loads NaN / +-inf module values
    instead of raising."""
    path = Path(path)
    if target is Layout.DEEPSPEED:
        engine_for(path, state, engine, "load")
    if path.is_dir() and (path / ".metadata").is_file() and target.sharded:
        return load_fsdp(path, state, strict, device, dtype)
    if path.is_dir() and (path / "latest").is_file() and target is Layout.DEEPSPEED:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if zero.saved_layout(path) == (engine.options.stage, world):
            return load_deepspeed(path, state, strict, engine)
    source = _open(path, state)
    wanted = split_state(state)[1] if strict and source.no_optimizer else {}
    present = {**keep_held(path, {k: v for k, v in state.items() if k not in wanted}, source.held, strict),
               **wanted}
    modules, optimizers, _ = split_state(present)
    for key in optimizers:
        if key not in source.optimizers:
            raise CheckpointError(f"{path}: holds no optimizer state for {key!r}{source.no_optimizer}. Load the "
                                  f"model alone (drop {key!r} from the state, or strict=False). Nothing was loaded.")
    all_modules = split_state(state)[0]
    plans = []  # everything checked before anything changes
    for key, module in modules.items():
        names, _ = match(module, source.modules[key], strict=strict)
        plans.append((module, source.modules[key], names))
    restorers = [_restorer(path, key, opt, all_modules, source.optimizers[key], target, engine)
                 for key, opt in optimizers.items()]
    for module, checkpoint, names in plans:
        load_into(module, checkpoint, strict=strict, device=device, dtype=dtype, allow_nonfinite=allow_nonfinite)
        if target is Layout.DEEPSPEED:
            engine.weights_loaded()  # fp32 masters from the loaded values, then overwritten with the saved ones
            load_masters(engine, checkpoint.renamed(names))
    for restore in restorers:
        restore()
    return restore_values(state, source.values)


def _restorer(path: Path, key: str, optimizer: Any, modules: dict[str, nn.Module], saved: SavedOptimizer,
              target: Layout, engine: ds.Engine | None):
    """Check that the saved state fits `optimizer`; return the function that loads it."""
    if target is Layout.DEEPSPEED:
        owner = engine.module
        groups = param_groups(engine.groups, owner)
        names = {id(p): n for n, p in owner.named_parameters()}
        return restore_flat(engine.flat_partitions(), engine.engine.optimizer.optimizer, groups, saved, names)
    owner = optimizer_owner(path, key, optimizer, modules)
    saved.resolve(param_groups(optimizer, owner))
    restore = restore_fsdp if target.sharded else restore_plain
    return lambda: restore(optimizer, owner, saved)


def load_module(path: str | os.PathLike, module: nn.Module, strict: bool, device: torch.device,
                dtype: torch.dtype | None, engine: ds.Engine | None, allow_nonfinite: bool = False) -> LoadReport:
    """`fabric.load_raw` of one module under DeepSpeed: the values into the (partitioned) parameters, then the
    optimizer's fp32 master copies straight from the file, so an fp32 checkpoint is not rounded through bf16."""
    checkpoint = open_checkpoint(path)
    names, _ = match(module, checkpoint, strict=strict)
    report = load_into(module, checkpoint, strict=strict, device=device, dtype=dtype, allow_nonfinite=allow_nonfinite)
    if engine is not None:
        engine.weights_loaded()
        load_masters(engine, checkpoint.renamed(names))
    return report


def _open(path: Path, state: dict[str, Any]) -> Source:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    modules, optimizers, _ = split_state(state)
    if path.is_dir() and (path / "latest").is_file():
        return _open_zero(path, state, modules, optimizers)
    if path.is_dir() and (path / ".metadata").is_file():
        return _open_dcp(path, modules, optimizers)
    if path.is_dir() or path.suffix == ".safetensors" or path.name.endswith(".index.json"):
        return _open_weights(path, state, modules)
    return _open_torch(path, state)


def _one(path: Path, things: dict, what: str) -> str | None:
    if len(things) > 1:
        raise CheckpointError(f"{path}: holds one {what}; the state has {sorted(things)}. Load it into a state with "
                              f"one {what}.")
    return next(iter(things), None)


def _open_zero(path: Path, state: dict, modules: dict, optimizers: dict) -> Source:
    folder = zero.open_zero(path)
    values, kinds = read_values(path)
    module_key, optimizer_key = _one(path, modules, "module"), _one(path, optimizers, "optimizer")
    source = Source(values=values, held=set(kinds) or {k for k in (module_key, optimizer_key) if k})
    if module_key:
        source.modules[module_key] = folder.model
    if optimizer_key:
        source.optimizers[optimizer_key] = folder.optimizer
    return source


def _open_dcp(path: Path, modules: dict, optimizers: dict) -> Source:
    metadata = dcp_metadata(path)
    paths = dcp_paths(metadata)
    values, kinds = read_values(path)
    source = Source(values=values, held=set(kinds) or {p[0] for p in paths.values()})
    source.modules = {key: open_checkpoint(path, select=key) for key in modules if key in source.held}
    source.optimizers = {key: SavedOptimizer.from_dcp(path, key, metadata, paths) for key in optimizers
                         if any(p[0] == key for p in paths.values())}
    return source


def _open_weights(path: Path, state: dict, modules: dict) -> Source:
    key = _one(path, modules, "module") or "model"
    return Source(modules={key: open_checkpoint(path)}, held={key},
                  no_optimizer=" (a safetensors checkpoint holds a model's tensors only)")


def _open_torch(path: Path, state: dict) -> Source:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - open_checkpoint names what is wrong with the file
        open_checkpoint(path)
        raise
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: holds a {type(saved).__name__}, not a saved training state.")
    if saved and all(isinstance(v, torch.Tensor) for v in saved.values()) and not set(saved) & set(state):
        return _open_weights(path, state, split_state(state)[0])  # a plain state dict: the one module's
    source = Source(held=set(saved))
    for key, obj in state.items():
        if key not in saved:
            continue
        if isinstance(obj, nn.Module):
            source.modules[key] = Checkpoint.from_tensors(path, saved[key])
        elif isinstance(obj, (torch.optim.Optimizer, ds.EngineOptimizer)):
            source.optimizers[key] = SavedOptimizer.from_torch(path, saved[key])
    source.values = {k: v for k, v in saved.items() if k not in source.modules and k not in source.optimizers}
    return source
