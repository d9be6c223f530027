"""A DeepSpeed ZeRO folder (stages 1, 2, 3; any world size), read from its files alone: the model's full fp32
values and the optimizer's state, per parameter, as lazy checkpoints that load into any model and strategy.

Layout (DeepSpeed 0.1x, `save_checkpoint(folder, tag)`; `latest` names the tag):
- ZeRO 1/2: `mp_rank_00_model_states.pt` holds the module's state dict (buffers, frozen parameters) and
  `param_shapes` (per param group, the trainable parameters in flat order); rank r's
  `zero_pp_rank_{r}_mp_rank_00_optim_states.pt` holds, per group, its equal slice of the group's flat fp32 vector
  (`single_partition_of_fp32_groups`) and the base optimizer's state over that slice (`base_optimizer_state`).
  In the flat vector each parameter follows the last, plus `param_alignment_paddings`.
- ZeRO 3: every parameter is cut on its own into ceil(numel / world) elements per rank (the last padded); rank r's
  `fp32_flat_groups` (and the optimizer state over them) are its pieces of the parameters in `param_shapes`
  order. Buffers are in every rank's `zero_pp_rank_{r}_mp_rank_00_model_states.pt`.

The files are read with `weights_only=True` and mmap: DeepSpeed's few bookkeeping classes in them (its loss
scaler, a stage enum, fragment addresses) are read as inert stand-ins, never imported. A value is assembled only
when it is loaded, from the pieces a destination needs (a rank's rows read only those elements).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchinit.checkpoint.base import Checkpoint, local_rows
from torchinit.checkpoint.header import CheckpointError
from torchinit.checkpoint.optim_state import SEP, SavedOptimizer

_DEEPSPEED_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


class _Inert:
    """Stands in for a DeepSpeed class in its pickles: keeps the arguments, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def load_file(path: Path) -> dict:
    """One of DeepSpeed's files, with `weights_only=True`; its own classes become `_Inert`."""
    try:
        with torch.serialization.safe_globals([(_Inert, name) for name in _DEEPSPEED_CLASSES]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - unpickling and zip errors alike mean "unreadable"
        raise CheckpointError(f"{path}: cannot read this DeepSpeed file ({type(error).__name__}: {error}).") from None


@dataclass(frozen=True)
class Flat:
    """A parameter (or its optimizer state) spread over flat tensors: `pieces` are (tensor key, offset in that
    tensor, first element of the parameter, count), in element order."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[tuple[Any, int, int, int], ...]


class FlatCheckpoint(Checkpoint):
    """A `Checkpoint` whose entries may be `Flat`: read piece by piece, only the elements a destination holds."""

    def __init__(self, path: Path, entries: dict, flats: dict[Any, torch.Tensor], files: list[Path]):
        super().__init__(path, entries, files, {"format": "deepspeed"})
        self.flats = flats

    def renamed(self, names: dict[str, str]) -> FlatCheckpoint:
        return FlatCheckpoint(self.path, {new: self.entries[old] for new, old in names.items()}, self.flats,
                              self.files)

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        if not isinstance(entry, Flat):
            return entry
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self._read(entry, 0, out.numel(), out.reshape(-1))
        return out

    def nbytes(self, key: str) -> int:
        entry = self.entries[key]
        return math.prod(entry.shape) * entry.dtype.itemsize

    def _read(self, entry: Flat, start: int, end: int, out: torch.Tensor) -> int:
        """Elements [start, end) of the flattened value into the 1-D `out` (cast as `copy_` casts)."""
        with torch.no_grad():
            for key, offset, first, count in entry.pieces:
                a, b = max(start, first), min(end, first + count)
                if a < b:
                    out[a - start:b - start].copy_(self.flats[key][offset + a - first:offset + b - first])
        return (end - start) * entry.dtype.itemsize

    def load_into(self, pairs: list[tuple[str, torch.Tensor]]) -> int:
        """Each value into its tensor; a dim-0 sharded DTensor gets only its rows (only their elements read)."""
        items = []
        for key, t in pairs:
            rows = local_rows(t)
            local = t.to_local() if rows is not None else t
            if not local.is_contiguous():
                raise CheckpointError(f"{self.path}: cannot load {key!r} into a non-contiguous tensor.")
            row = math.prod(t.shape[1:]) if rows is not None else 0
            start, end = (rows[0] * row, rows[1] * row) if rows is not None else (0, local.numel())
            items.append((key, start, end, local.view(-1)))
        return self.load_slices(items)

    def load_slices(self, items: list[tuple[str, int, int, torch.Tensor]]) -> int:
        done = 0
        with torch.no_grad():
            for key, start, end, out in items:
                entry = self.entries[key]
                if isinstance(entry, Flat):
                    done += self._read(entry, start, end, out)
                else:
                    value = entry.reshape(-1)[start:end]
                    out.copy_(value.reshape(out.shape))
                    done += value.numel() * value.element_size()
        self.bytes_read += done
        return done


@dataclass
class ZeroFolder:
    """What a DeepSpeed folder holds: the model's values, the optimizer's per-parameter state, the layout."""

    path: Path
    stage: int
    world_size: int
    model: FlatCheckpoint  # trainable parameters in fp32 (the master copies), frozen ones and buffers as saved
    optimizer: SavedOptimizer


def tag_folder(path: Path) -> Path:
    latest = path / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{path}: not a DeepSpeed checkpoint folder (no 'latest' file naming its checkpoint).")
    folder = path / latest.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{path}: 'latest' names {folder.name!r}, which is not a folder in it.")
    return folder


def saved_layout(path: Path) -> tuple[int, int]:
    """(ZeRO stage, world size) of the folder, from its file names (nothing is unpickled)."""
    folder = tag_folder(path)
    ranks = _optim_files(folder)
    stage3 = (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    if not stage3 and not (folder / "mp_rank_00_model_states.pt").is_file():
        raise CheckpointError(f"{folder}: has no model states file (mp_rank_00_model_states.pt, or "
                              "zero_pp_rank_0_mp_rank_00_model_states.pt for ZeRO-3): the save is incomplete.")
    if not stage3:  # 1 or 2: the same layout; the file says which
        return int(_stage(load_file(ranks[0]), ranks[0])), len(ranks)
    return 3, len(ranks)


def _optim_files(folder: Path) -> list[Path]:
    found = {}
    for file in folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"):
        match = re.fullmatch(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", file.name)
        if match is not None:  # "bf16_" when the run was bf16
            found[int(match.group(2))] = file
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{folder}: the optimizer partition files are missing or incomplete (found ranks "
                              f"{sorted(found)}).")
    return [found[r] for r in range(len(found))]


def _stage(saved: dict, file: Path) -> int:
    stage = saved.get("optimizer_state_dict", {}).get("zero_stage")
    value = stage.args[0] if isinstance(stage, _Inert) and stage.args else stage
    if not isinstance(value, int):
        raise CheckpointError(f"{file}: no ZeRO stage recorded in it.")
    return value


def open_zero(path: Path) -> ZeroFolder:
    """Read the folder's layout; tensors are assembled only when loaded."""
    folder = tag_folder(path)
    files = _optim_files(folder)
    optim = [load_file(f).get("optimizer_state_dict", {}) for f in files]
    if not all("single_partition_of_fp32_groups" in o or "fp32_flat_groups" in o for o in optim):
        raise CheckpointError(f"{folder}: its optimizer files ({files[0].name}, ...) hold neither ZeRO 1/2 nor ZeRO-3 "
                              "fp32 partitions (DeepSpeed's BF16_Optimizer, used for ZeRO-1 with bf16 parameters and "
                              "fp32 gradient accumulation, is not read): save under ZeRO 2 or 3.")
    stage, world = _stage({"optimizer_state_dict": optim[0]}, files[0]), len(files)
    counts = optim[0].get("partition_count")
    saved_by = max(counts) if isinstance(counts, list) and counts else counts
    if isinstance(saved_by, int) and saved_by != world:
        raise CheckpointError(f"{folder}: the optimizer partition files are missing or incomplete: saved by "
                              f"{saved_by} ranks, {world} file(s) found.")
    model_files = [folder / "mp_rank_00_model_states.pt"] if stage < 3 else \
        [folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    missing = [f.name for f in model_files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: model states file(s) missing: {', '.join(missing)}.")
    states = [load_file(f) for f in model_files]
    shapes = [{name: tuple(shape) for name, shape in group.items()} for group in states[0]["param_shapes"]]
    if stage < 3:
        layout, base = _zero12_layout(folder, optim, shapes, world)
    else:
        layout, base = _zero3_layout(folder, optim, shapes, world)
    flats, entries = {}, {}
    for rank, groups in enumerate(base):
        for g, group in enumerate(groups):
            for key, tensor in group.items():
                flats[(key, rank, g)] = tensor
    module = states[0]["module"]
    frozen = states[0].get("frozen_param_shapes") or {}
    for name in [*(states[0].get("buffer_names") or []), *frozen]:
        if stage == 3 and name in frozen:
            shape = tuple(frozen[name])
            entries[name] = torch.cat([s["frozen_param_fragments"][name] for s in states])[:math.prod(shape)] \
                .view(shape)
        elif name in module:
            entries[name] = module[name]
    entries.update({name: Flat(flats[pieces[0][0]].dtype, shape, tuple(pieces))
                    for name, (shape, pieces) in layout.items()})
    for alias, name in (states[0].get("shared_params") or {}).items():  # a tied parameter under its other name
        if name in entries:
            entries[alias] = entries[name]
    model = FlatCheckpoint(path, entries, flats, files + model_files)
    optimizer = _saved_optimizer(path, optim, stage, layout, flats, [list(g) for g in shapes])
    return ZeroFolder(path, stage, world, model, optimizer)


def _zero12_layout(folder: Path, optim: list[dict], shapes: list[dict], world: int):
    """{name: (shape, pieces)} with pieces keyed ("fp32", rank, group); and per rank, per group, its flat tensors
    by kind ("fp32" and each base optimizer state key)."""
    layout, base = {}, []
    for rank, sd in enumerate(optim):
        groups = sd["single_partition_of_fp32_groups"]
        state = sd["base_optimizer_state"]
        if not isinstance(state, dict) or "state" not in state:
            raise CheckpointError(f"{folder}: rank {rank}'s optimizer state has an elastic layout, which is not read.")
        base.append([{"fp32": flat, **{k: v for k, v in state["state"].get(g, {}).items()
                                       if isinstance(v, torch.Tensor) and v.shape == flat.shape}}
                     for g, flat in enumerate(groups)])
    for g, names in enumerate(shapes):
        size = optim[0]["single_partition_of_fp32_groups"][g].numel()
        paddings = optim[0].get("param_alignment_paddings", [[0] * len(names)] * len(shapes))[g]
        offset = 0
        for i, (name, shape) in enumerate(names.items()):
            numel, pieces, at = math.prod(shape), [], offset
            while at < offset + numel:
                rank, local = divmod(at, size)
                count = min(size - local, offset + numel - at)
                if rank >= world:
                    raise CheckpointError(f"{folder}: {name!r} lies beyond the saved partitions: the files do not "
                                          "match their own layout.")
                pieces.append((("fp32", rank, g), local, at - offset, count))
                at += count
            layout[name] = (shape, pieces)
            offset += numel + paddings[i]
    return layout, base


def _zero3_layout(folder: Path, optim: list[dict], shapes: list[dict], world: int):
    layout, base = {}, []
    for sd in optim:
        flats = sd["fp32_flat_groups"]
        state = sd["optimizer_state_dict"]["state"]
        base.append([{"fp32": flat, **{k: v for k, v in state.get(g, {}).items()
                                       if isinstance(v, torch.Tensor) and v.shape == flat.shape}}
                     for g, flat in enumerate(flats)])
    sizes = [t.numel() for t in optim[0]["fp32_flat_groups"]]
    g, offset = 0, 0
    for name, shape in (item for group in shapes for item in group.items()):
        numel = math.prod(shape)
        part = -(-numel // world)
        while g < len(sizes) and offset + part > sizes[g]:  # the next sub-group's flat
            g, offset = g + 1, 0
        if g == len(sizes):
            raise CheckpointError(f"{folder}: {name!r} lies beyond the saved partitions.")
        pieces = [(("fp32", r, g), offset, r * part, min(part, numel - r * part))
                  for r in range(world) if r * part < numel]
        layout[name] = (shape, pieces)
        offset += part
    return layout, base


def _saved_optimizer(path: Path, optim: list[dict], stage: int, layout: dict, flats: dict,
                     names: list[list[str]]) -> SavedOptimizer:
    """The optimizer state per parameter, over the same pieces as its fp32 values (the base optimizer steps the
    flat partitions); rank 0's scalars (Adam's step) and hyperparameters stand for all ranks."""
    base = optim[0]["base_optimizer_state"] if stage < 3 else optim[0]["optimizer_state_dict"]
    state, entries, extras = base.get("state", {}), {}, {}
    for name, (shape, pieces) in layout.items():
        g = pieces[0][0][2]
        for key, value in state.get(g, {}).items():
            if isinstance(value, torch.Tensor) and (key, 0, g) in flats:
                entries[f"{name}{SEP}{key}"] = Flat(value.dtype, shape, tuple(((key, r, gg), *rest)
                                                                               for (_, r, gg), *rest in pieces))
            elif isinstance(value, torch.Tensor):
                entries[f"{name}{SEP}{key}"] = value
            else:
                extras.setdefault(name, {})[key] = value
    if stage < 3:
        groups = [{**g, "params": names[i]} for i, g in enumerate(base["param_groups"])]
    else:  # a param group's "params" are its sub-groups' indices
        by_sub: dict[int, list[str]] = {}
        for name, (_, pieces) in layout.items():
            by_sub.setdefault(pieces[0][0][2], []).append(name)
        groups = [{**g, "params": [n for s in g["params"] for n in by_sub.get(s, [])]} for g in base["param_groups"]]
    return SavedOptimizer(path, groups, FlatCheckpoint(path, entries, flats, []), extras)
