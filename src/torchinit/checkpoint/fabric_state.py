"""`fabric.save` / `fabric.load`: Lightning's rule for what a state holds (stateful.py), then the writer or reader of
the strategy's layout — one file from rank 0, DCP shards, one file gathered from shards, or DeepSpeed's folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from torchinit.checkpoint import export, full_save, load_state, sharded_state
from torchinit.checkpoint.save import on_rank_zero, save_state
from torchinit.checkpoint.stateful import check_filter, load_stateful, saved_form
from torchinit.core.errors import ConfigurationError
from torchinit.strategies.base import Layout, Strategy

__all__ = ["load", "save"]


def save(path: str | os.PathLike, state: dict[str, Any], strategy: Strategy,
         filter: dict[str, Callable] | None = None, format: str | None = None) -> None:
    """Write `state` in the strategy's layout (or as a safetensors folder); every rank calls it."""
    check_filter(state, filter)
    if format == "safetensors":
        export.save_safetensors_folder(path, state)
        return
    if format is not None:
        raise ConfigurationError(f"format={format!r} is not supported: use None (the strategy's own) or "
                                 "'safetensors'.")
    layout = strategy.layout
    if filter is not None and layout is not Layout.FILE:
        raise ConfigurationError(f"fabric.save(filter=...) is for one device and DDP: a sharded checkpoint "
                                 f"under strategy={strategy.plan.strategy!r} holds every shard (load it, then save a "
                                 "filtered copy with one process).")
    state = saved_form(state, filter)
    if layout is Layout.DCP:  # each rank its shards, any placement
        sharded_state.save_fsdp(path, state)
    elif layout is Layout.FULL:  # one file from rank 0, gathered one tensor at a time
        full_save.save_full(path, state)
    elif layout is Layout.DEEPSPEED:
        sharded_state.save_deepspeed(path, state, strategy.engine)
    else:
        on_rank_zero(lambda: save_state(path, state), f"{os.fspath(path)}: rank 0 could not save it")


def load(path: str | os.PathLike, state: dict[str, Any] | None, strategy: Strategy, device: torch.device,
         strict: bool = True, allow_nonfinite: bool = False) -> dict:
    """Restore `state` in place from what `save` wrote; returns what the file holds beyond `state`."""
    if state is None:
        return _load(path, None, strategy, device, strict, allow_nonfinite)
    return load_stateful(state, lambda inner: _load(path, inner, strategy, device, strict, allow_nonfinite))


def _load(path: str | os.PathLike, state: dict[str, Any] | None, strategy: Strategy, device: torch.device,
          strict: bool, allow_nonfinite: bool) -> dict:
    layout = strategy.layout
    if layout is not Layout.FILE:
        if allow_nonfinite:
            raise ConfigurationError(f"fabric.load(allow_nonfinite=True) is for one device or DDP; under "
                                     f"strategy={strategy.plan.strategy!r} load the model with "
                                     "fabric.load_raw(path, model, allow_nonfinite=True).")
        if not state:
            raise ConfigurationError(f"fabric.load under strategy={strategy.plan.strategy!r} reads shards into the "
                                     "objects they belong to: pass state={'model': model, 'optimizer': "
                                     "optimizer, ...}.")
        return load_state.load(path, state, strict, layout, device, strategy.param_dtype,
                               getattr(strategy, "engine", None))
    if state is None:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return load_state.load(path, state, strict, layout, device, strategy.param_dtype, allow_nonfinite=allow_nonfinite)
