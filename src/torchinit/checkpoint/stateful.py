"""Lightning's rule for what a saved state holds: modules and optimizers as their state dicts (the strategy's
layout decides how), and any other object with `state_dict` / `load_state_dict` (an LR scheduler, a sampler, your
own) as its state, restored in place on load. Plain values are saved as they are and replaced on load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchinit.core.errors import ArgumentTypeError, ConfigurationError
from torchinit.strategies.deepspeed import EngineOptimizer
from torchinit.strategies.wrappers import unwrap

__all__ = ["check_filter", "load_stateful", "saved_form"]


def is_stateful(obj: Any) -> bool:
    """An object saved as its state: not a module or optimizer (the layouts handle those), but it has both methods."""
    if isinstance(obj, (nn.Module, torch.optim.Optimizer, EngineOptimizer, type)):
        return False
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def check_filter(state: dict[str, Any], filter: dict[str, Callable[[str, Any], bool]] | None) -> None:
    if filter is None:
        return
    if not isinstance(filter, dict):
        raise ArgumentTypeError(f"Filter should be a dictionary, given {filter!r}")
    if not set(filter).issubset(state):
        raise ConfigurationError(f"The filter keys {sorted(filter.keys() - state.keys())} are not present in the "
                                 f"state keys {sorted(state)}.")
    for key, fn in filter.items():
        if not callable(fn):
            raise ArgumentTypeError(f"Expected `fabric.save(filter=...)` for key {key!r} to be a callable, "
                                    f"given {fn!r}")


def saved_form(state: dict[str, Any], filter: dict[str, Callable[[str, Any], bool]] | None = None) -> dict[str, Any]:
    """`state` as it is handed to the layouts: Fabric wrappers unwrapped, stateful objects as their state dicts. A key
    with a filter keeps only the entries `filter[key](name, value)` accepts (modules and optimizers as their state
    dicts), and is left out when none are."""
    out: dict[str, Any] = {}
    for key, obj in state.items():
        obj = unwrap(obj)
        if is_stateful(obj) or (filter and key in filter and isinstance(obj, (nn.Module, torch.optim.Optimizer))):
            obj = obj.state_dict()
        if filter and key in filter and isinstance(obj, dict):
            kept = {k: v for k, v in obj.items() if filter[key](k, v)}
            if kept:
                out[key] = kept
            continue
        out[key] = obj
    return out


PENDING = object()  # a stateful object's place while the layout loads: replaced by its saved state, if any


def load_stateful(state: dict[str, Any], load: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Run `load(inner)` (the layout's load: modules and optimizers in place, plain values replaced in `inner`), then
    give each stateful object of `state` its saved state (`load_state_dict`) and put the loaded plain values back
    into `state`. Returns what `load` returned (what the checkpoint holds beyond `state`)."""
    stateful = {key for key, obj in state.items() if is_stateful(unwrap(obj))}
    inner = {key: PENDING if key in stateful else unwrap(obj) for key, obj in state.items()}
    rest = load(inner)
    for key, obj in state.items():
        if key in stateful:
            if inner[key] is not PENDING:
                unwrap(obj).load_state_dict(inner[key])
        elif not isinstance(obj, (nn.Module, torch.optim.Optimizer, EngineOptimizer)):
            state[key] = inner[key]
    return rest
