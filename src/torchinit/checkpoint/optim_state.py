"""An optimizer's saved state in one form for every source, restored into every kind of optimizer.

Sources: a torch optimizer's `state_dict()` (from a one-file save; parameters by position), an FSDP DCP folder
(parameters by name, each rank's shards), a DeepSpeed ZeRO folder (flat partitions: each parameter's elements
found in them, see zero.py). All become a `SavedOptimizer`: per parameter and state key one full-shape value,
read lazily; per group its hyperparameters.

Targets, each reading only what it holds: a plain torch optimizer (full values), an FSDP2 optimizer (each rank
its rows of each DTensor state), a DeepSpeed optimizer (each rank the elements of its flat fp32 partitions;
a value kept per flat partition, like Adam's `step`, must then be the same for all its parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchinit.checkpoint.base import Checkpoint
from torchinit.checkpoint.dcp import DcpEntry, read_dcp
from torchinit.checkpoint.header import CheckpointError

SEP = "\x00"  # between a parameter's id and a state key in `SavedOptimizer.tensors`


@dataclass
class SavedOptimizer:
    path: Path
    groups: list[dict]  # hyperparameters; "params": the ids of the group's parameters (names, or positions)
    tensors: Checkpoint  # f"{id}{SEP}{key}" -> the full value (0-dim for per-parameter scalars such as `step`)
    extras: dict[Any, dict] = field(default_factory=dict)  # non-tensor state values by id

    @classmethod
    def from_torch(cls, path: Path, saved: Any) -> SavedOptimizer:
        """A torch optimizer's `state_dict()`."""
        if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or "state" not in saved:
            raise CheckpointError(f"{path}: the optimizer entry is not a torch optimizer state dict.")
        tensors = {f"{i}{SEP}{k}": v for i, st in saved["state"].items() for k, v in st.items()
                   if isinstance(v, torch.Tensor)}
        extras = {i: {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                  for i, st in saved["state"].items()}
        return cls(path, [dict(g) for g in saved["param_groups"]], Checkpoint.from_tensors(path, tensors), extras)

    @classmethod
    def from_dcp(cls, path: Path, name: str, metadata: Any, paths: dict[str, tuple]) -> SavedOptimizer:
        """The optimizer entry `name` of a DCP folder (keyed by parameter name)."""
        tensors, hyper = {}, {}
        for key, where in paths.items():
            if len(where) == 4 and where[0] == name and where[1] == "state":
                meta = metadata.state_dict_metadata[key]
                tensors[f"{where[2]}{SEP}{where[3]}"] = DcpEntry(path, key, meta.properties.dtype, tuple(meta.size))
            elif len(where) == 4 and where[0] == name and where[1] == "param_groups":
                hyper[key] = None
        read_dcp(path, hyper)  # the (small) hyperparameters, pickled in the folder
        groups: dict[int, dict] = {}
        for key, value in hyper.items():
            _, _, index, item = paths[key]
            groups.setdefault(int(index), {})[item] = value
        return cls(path, [groups[i] for i in sorted(groups)], Checkpoint(path, tensors, [path], {}))

    def ids(self) -> set:
        return {i for g in self.groups for i in g["params"]}

    def keys_of(self, pid: Any) -> list[str]:
        prefix = f"{pid}{SEP}"
        return [k[len(prefix):] for k in self.tensors if k.startswith(prefix)]

    def resolve(self, groups: list[list[str]]) -> dict[str, Any]:
        """{parameter name here: its id in the saved state}, for the target's groups of parameter names; raises,
        before anything is loaded, when the saved state is for other parameters or another grouping."""
        saved = [list(g["params"]) for g in self.groups]
        by_name = any(isinstance(i, str) for g in saved for i in g)
        fits = len(saved) == len(groups) and all(
            (set(s) == set(t)) if by_name else len(s) == len(t) for s, t in zip(saved, groups, strict=True))
        if not fits:
            detail = f" ({_diff(saved, groups)})" if by_name else ""
            raise CheckpointError(
                f"{self.path}: the saved optimizer state does not fit this optimizer: saved {len(saved)} param "
                f"group(s) of {[len(s) for s in saved]} parameters{detail}"
                f", here {len(groups)} of {[len(t) for t in groups]}. Build the optimizer over the same model and "
                "parameter groups as the one saved. Nothing was loaded."
            )
        if by_name:
            return {n: n for t in groups for n in t}
        return {n: i for s, t in zip(saved, groups, strict=True) for n, i in zip(t, s, strict=True)}

    def hyperparameters(self, index: int) -> dict:
        return {k: v for k, v in self.groups[index].items() if k != "params"}


def _diff(saved: list[list], groups: list[list[str]]) -> str:
    s, t = {i for g in saved for i in g}, {n for g in groups for n in g}
    return f"saved for parameters not here: {sorted(s - t)[:5]}, here without saved state: {sorted(t - s)[:5]}"


def param_groups(optimizer: torch.optim.Optimizer | list[list[nn.Parameter]], owner: nn.Module) -> list[list[str]]:
    """The optimizer's parameters by group, as the owner module's parameter names."""
    names = {id(p): n for n, p in owner.named_parameters()}
    lists = optimizer if isinstance(optimizer, list) else [g["params"] for g in optimizer.param_groups]
    return [[names[id(p)] for p in params] for params in lists]


def restore_plain(optimizer: torch.optim.Optimizer, owner: nn.Module, saved: SavedOptimizer) -> None:
    """A torch optimizer over full parameters: full values, through its own `load_state_dict`."""
    groups = param_groups(optimizer, owner)
    ids = saved.resolve(groups)
    state, position, out_groups = {}, 0, []
    for index, names in enumerate(groups):
        out_groups.append({**saved.hyperparameters(index), "params": list(range(position, position + len(names)))})
        for name in names:
            pid = ids[name]
            values = {k: saved.tensors[f"{pid}{SEP}{k}"] for k in saved.keys_of(pid)}
            values.update(saved.extras.get(pid, {}))
            if values:
                state[position] = values
            position += 1
    optimizer.load_state_dict({"state": state, "param_groups": out_groups})


def restore_fsdp(optimizer: torch.optim.Optimizer, owner: nn.Module, saved: SavedOptimizer) -> None:
    """An FSDP2 optimizer: its sharded state (made by `get_optimizer_state_dict`) filled rank by rank, each rank
    reading only its rows of each value."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    groups = param_groups(optimizer, owner)
    ids = saved.resolve(groups)
    target = get_optimizer_state_dict(owner, optimizer)
    for name, values in target["state"].items():
        pid = ids[name]
        wanted = saved.keys_of(pid)
        missing = sorted(set(values) - set(wanted) - set(saved.extras.get(pid, {})))
        if missing:
            raise CheckpointError(f"{saved.path}: the saved optimizer state of {name!r} lacks {missing}: it was "
                                  "saved by another kind of optimizer.")
        for key in wanted:
            value = values[key]
            if hasattr(value, "to_local"):
                saved.tensors.load_into([(f"{pid}{SEP}{key}", value)])
            elif isinstance(value, torch.Tensor):
                with torch.no_grad():
                    value.copy_(saved.tensors[f"{pid}{SEP}{key}"])
        values.update(saved.extras.get(pid, {}))
    for index, group in enumerate(target["param_groups"]):
        group.update(saved.hyperparameters(index))
    set_optimizer_state_dict(owner, optimizer, target)


def restore_flat(partitions: list, base: torch.optim.Optimizer, groups: list[list[str]], saved: SavedOptimizer,
                 names: dict[int, str]) -> Callable[[], None]:
    """DeepSpeed: `partitions` are (fp32 flat partition, [(parameter, first element, end, offset in the
    partition)]); each partition's state is assembled from its parameters' saved values. Checks first (raising
    before anything changes); returns the function that loads."""
    ids = saved.resolve(groups)
    plans = []
    for flat, members in partitions:
        pids = [ids[names[id(p)]] for p, *_ in members]
        keys = {tuple(saved.keys_of(pid)) for pid in pids}
        if len(keys) > 1:
            raise CheckpointError(f"{saved.path}: the saved optimizer holds state for some parameters of a DeepSpeed "
                                  "partition but not for others; DeepSpeed keeps one state per partition.")
        scalars, arrays = {}, []
        for key in keys.pop() if keys else ():
            entries = [f"{pid}{SEP}{key}" for pid in pids]
            if all(len(saved.tensors.shape(e)) == 0 for e in entries):  # a per-partition scalar (Adam's step)
                values = {float(saved.tensors[e]) for e in entries}
                if len(values) != 1:
                    raise CheckpointError(
                        f"{saved.path}: the saved {key!r} differs between parameters ({sorted(values)[:4]}) that "
                        "DeepSpeed keeps in one partition with one value: this optimizer state cannot be carried "
                        "into DeepSpeed. Nothing was loaded."
                    )
                scalars[key] = saved.tensors[entries[0]].clone()
            else:
                arrays.append((key, entries))
        plans.append((flat, members, scalars, arrays, saved.extras.get(pids[0], {}) if pids else {}))

    def load() -> None:
        for flat, members, scalars, arrays, extras in plans:
            state = dict(scalars)
            for key, entries in arrays:
                out = torch.zeros_like(flat)
                saved.tensors.load_slices([(e, s, t, out[o:o + t - s])
                                           for e, (_, s, t, o) in zip(entries, members, strict=True)])
                state[key] = out
            base.state[flat] = {**state, **extras}
        for index, group in enumerate(base.param_groups[:len(saved.groups)]):
            group.update(saved.hyperparameters(index))
    return load
