"""Load a checkpoint into any model (real, empty-init or meta): match keys, check shapes, then let
`materialize` do the rest, with the checkpoint as the first source. The report says what happened.

1. Open the checkpoint (opener.py): keys, shapes, dtypes; no data read yet.
2. Match its keys to the model's state-dict keys: an explicit `key_map` first, then a prefix (`module.`,
   `_orig_mod.`, `model.`) removed or added when that alone makes more keys match and no other choice does as
   well. A tied parameter is loaded when any of its names is in the checkpoint.
3. Every shape mismatch, and under `strict` every missing or unexpected key, is one error that names the
   file, before anything changes.
4. `materialize(..., checkpoint=...)`: the data goes straight into the parameters (for meta ones, into fresh
   memory on the device, in the target dtype, same Parameter objects). What the checkpoint lacks is initialized
   through the chain (never left as uninitialized memory) and reported as missing. A ZeRO-3 model (after
   `deepspeed.zero.Init`) is not materialized: each rank copies its slice into its partitions instead, and what
   the checkpoint lacks keeps its values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from torchinit.checkpoint.base import Checkpoint
from torchinit.checkpoint.header import CheckpointError
from torchinit.checkpoint.opener import open_checkpoint
from torchinit.checkpoint.partitions import load_partitions
from torchinit.core.compat_deepspeed import full_shape, is_zero3_param
from torchinit.core.text import shorten
from torchinit.materialize.materialize import materialize

PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0

    @property
    def gib_per_s(self) -> float:
        return self.bytes / 2**30 / self.seconds if self.seconds else 0.0


def load_checkpoint(
    module: nn.Module,
    path: str | Path,
    *,
    strict: bool = True,
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
    select: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    mmap: bool = True,
    allow_nonfinite: bool = False,
    direct_io: bool = False,
) -> LoadReport:
    """Load `path` into `module` in place and return a `LoadReport`; see the module docstring for the steps.
    `mmap=False`: read torch pickles instead of mapping them (network filesystems). NaN or +-inf values (-inf in
    buffers is fine) are an error naming the file and keys unless `allow_nonfinite`. `direct_io=True`: read
    safetensors past the page cache (O_DIRECT), for a checkpoint read once that is not cached."""
    start = time.perf_counter()
    checkpoint = open_checkpoint(path, select, mmap)
    checkpoint.direct_io = direct_io
    report = load_into(module, checkpoint, strict=strict, key_map=key_map, device=device, dtype=dtype,
                       allow_nonfinite=allow_nonfinite)
    report.seconds = time.perf_counter() - start
    return report


def load_into(
    module: nn.Module,
    checkpoint: Checkpoint,
    *,
    strict: bool = True,
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> LoadReport:
    """`load_checkpoint` for a checkpoint already open (also one made from tensors in memory)."""
    start = time.perf_counter()
    names, report = match(module, checkpoint, strict=strict, key_map=key_map)
    view = checkpoint.renamed(names)  # the checkpoint under the model's key names
    params = {id(p) for p in module.parameters()}
    view.allow_nonfinite, view.direct_io = allow_nonfinite, checkpoint.direct_io
    view.inf_ok = frozenset(k for k, v in module.state_dict(keep_vars=True).items() if id(v) not in params)
    if any(is_zero3_param(p) for p in module.parameters()):  # ZeRO-3 partitions: each rank its slice
        report.bytes = load_partitions(module, view)
    else:
        result = materialize(module, device, dtype, checkpoint=view)
        report.initialized = [*result.from_record, *result.from_init]  # eager's values (the record), or the inits'
        report.bytes = view.bytes_read
    report.seconds = time.perf_counter() - start
    return report


def match(
    module: nn.Module,
    checkpoint: Checkpoint,
    *,
    strict: bool = True,
    key_map: Mapping[str, str] | Callable[[str], str] | None = None,
) -> tuple[dict[str, str], LoadReport]:
    """{model key: checkpoint key} and the report so far. Raises, before anything changes, on every shape
    mismatch and (under `strict`) on missing or unexpected keys: callers loading several entries check all
    of them first."""
    path = checkpoint.path
    report = LoadReport(str(path))
    groups = _name_groups(module)
    names = _match(list(checkpoint), groups, key_map)
    loaded_groups = {groups[k] for k in names}
    report.loaded = sorted(names)
    report.unexpected = sorted(set(checkpoint) - set(names.values()))
    report.missing = sorted(k for k, g in groups.items() if g not in loaded_groups)
    state = module.state_dict(keep_vars=True)
    report.mismatched = [f"{k} (checkpoint {list(checkpoint.shape(c))}, model {list(full_shape(state[k]))})"
                         for k, c in names.items() if tuple(checkpoint.shape(c)) != full_shape(state[k])]
    if report.mismatched:
        raise CheckpointError(f"{path}: {len(report.mismatched)} tensor(s) have other shapes than the model's: "
                              f"{', '.join(report.mismatched[:10])}. Nothing was loaded.")
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(
            f"{path}: does not match the model (strict=True). Missing: {shorten(report.missing, 10)}. "
            f"Unexpected: {shorten(report.unexpected, 10)}. Nothing was loaded; pass strict=False to load what "
            "matches (the rest is initialized by the modules' init), or key_map= to rename."
        )
    return names, report


def _name_groups(module: nn.Module) -> dict[str, int]:
    """State-dict key -> the identity of its tensor (tied names share one)."""
    return {k: id(v) for k, v in module.state_dict(keep_vars=True).items()}


def _match(keys: list[str], groups: dict[str, int], key_map) -> dict[str, str]:
    """model key -> checkpoint key."""
    rename = key_map if callable(key_map) else (lambda k: key_map.get(k, k)) if key_map else (lambda k: k)
    mapped = {rename(k): k for k in keys}
    best, best_count, tie = mapped, sum(k in groups for k in mapped), False
    for prefix in PREFIXES:
        for candidate in ({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in mapped.items()},
                          {prefix + k: v for k, v in mapped.items()}):
            count = sum(k in groups for k in candidate)
            if count > best_count:
                best, best_count, tie = candidate, count, False
            elif count == best_count and count and candidate != best:
                tie = True
    if tie and best is not mapped:
        raise CheckpointError("The checkpoint's keys match the model under several prefixes equally well; pass "
                              "key_map= to say which.")
    return {k: v for k, v in best.items() if k in groups}
