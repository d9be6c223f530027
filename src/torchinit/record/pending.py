"""Parameters (and buffers whose recorded value is uninitialized memory) that empty init left uninitialized,
until something writes them (G5).

A parameter counts as written once its version counter or its data pointer moved since construction:
`load_state_dict` copies in place (version), `assign=True` or `.data =` swaps the memory (pointer). Writes
through `.data` (a fresh version counter) are invisible: write with `copy_` under `torch.no_grad()`. So the tensors
tracked are made as normal tensors also under `torch.inference_mode()` (`trackable`): inference tensors have no
version counter.

Three guards keep garbage from being used:
1. after any `load_state_dict` into a model built with empty init, what the checkpoint missed is initialized
   through the materialization chain (its module's init) and named in a warning, or, where no init exists,
   named in one error;
2. `fabric.setup` materializes, which does the same for a model that was never loaded;
3. a forward pass through a module whose parameters are still unwritten replays their recorded init (a model
   built by `fabric.init_module(empty_init=True)`), or, without a record, raises, naming all of them.

The guards fill tensors through the materialization chain, which lives a layer above (materialize/): it
registers itself here as the filler (`set_filler`) when it is imported, so this layer never imports it.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from torchinit.core.errors import UsageError
from torchinit.record.recording import records_of

__all__ = ["Filler", "fill", "is_pending", "mark_written", "pending_restorer", "set_filler", "track", "trackable",
           "unwritten_names"]


class Filler(Protocol):
    """What gives pending (and meta) tensors of a module their values: `torchinit.materialize`."""

    def __call__(self, module: nn.Module, device: Any = None, dtype: torch.dtype | None = None, *,
                 check_values: bool = True) -> Any:
        """Fill `module`'s tensors that need a value; return a report with `from_record` / `from_init` names."""


_FILLER: list[Filler] = []


def set_filler(filler: Filler) -> None:
    """Install the materialization chain (done once, by materialize/materialize.py when it is imported)."""
    _FILLER[:] = [filler]


def fill(module: nn.Module, device: Any = None, dtype: torch.dtype | None = None, *, check_values: bool = True) -> Any:
    """Give every tensor of `module` that needs a value one, through the installed filler."""
    if not _FILLER:
        raise UsageError("No materializer is installed: import torchinit (its materialize layer registers itself).")
    return _FILLER[0](module, device, dtype, check_values=check_values)


@dataclass
class _Stamp:
    version: int
    data_ptr: int
    name: str
    owner: weakref.ref
    root: weakref.ref


_PENDING = WeakIdKeyDictionary()  # Parameter -> _Stamp


@contextmanager
def trackable() -> Iterator[None]:
    """Tensors made inside are normal tensors, also under `torch.inference_mode()`: an inference tensor has no
    version counter, so a write into it (`load_state_dict` under inference mode) could not be seen. Grad mode
    stays as it was."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def is_pending(param: torch.Tensor) -> bool:
    """Whether empty init left `param` unwritten and nothing has written it since."""
    stamp = _PENDING.get(param)
    if stamp is None:
        return False
    # the pointer first: `.data =` an inference tensor (a swap: a write) leaves no version counter to read
    if param.data_ptr() != stamp.data_ptr or param._version != stamp.version:
        del _PENDING[param]
        return False
    return True


def track(roots: list[nn.Module], is_unwritten) -> None:
    """Record every parameter and buffer under `roots` for which `is_unwritten(tensor)` holds, and install the
    guards."""
    for root in roots:
        owners: dict[int, nn.Module] = {}
        for owner_name, owner in root.named_modules(remove_duplicate=True):
            for local, param in _own_tensors(owner):
                if param.device.type == "meta" or param in _PENDING or not is_unwritten(param):
                    continue
                name = f"{owner_name}.{local}" if owner_name else local
                _PENDING[param] = _Stamp(
                    param._version, param.data_ptr(), name, weakref.ref(owner), weakref.ref(root)
                )
                owners[id(owner)] = owner
        if owners:
            root.register_load_state_dict_post_hook(_after_load)
            for owner in owners.values():
                _guard_forward(owner)


def unwritten_names(module: nn.Module) -> list[str]:
    """Qualified names (relative to `module`) of parameters and buffers that nothing has written yet."""
    return [name for name, p in _tensors(module) if is_pending(p)]


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def mark_written(param: torch.Tensor) -> None:
    """For writers that bypass the version counter (reads straight into a tensor's memory)."""
    _PENDING.pop(param, None)


def pending_restorer(param: torch.Tensor) -> Callable[[], None]:
    """For a pending `param` about to be written: a function that marks it pending again (used to undo)."""
    stamp = _PENDING[param]

    def restore() -> None:
        _PENDING[param] = dataclasses.replace(stamp, version=param._version, data_ptr=param.data_ptr())

    return restore


def _after_load(module: nn.Module, incompatible_keys) -> None:
    if not unwritten_names(module):
        return
    report = fill(module, check_values=False)
    warnings.warn(
        f"load_state_dict did not provide {len(report.from_record) + len(report.from_init)} parameter(s) of a model "
        f"built with empty_init=True; instead of being left as uninitialized memory they were initialized: "
        + _sources(report),
        stacklevel=3,
    )


def _sources(report) -> str:
    said = []
    if report.from_record:
        said.append(f"with eager's values (the recorded init replayed): {', '.join(report.from_record)}")
    if report.from_init:
        said.append(f"with their module's init: {', '.join(report.from_init)}")
    return "; ".join(said)


def _guard_forward(owner: nn.Module) -> None:
    handles = []

    def check(module: nn.Module, args) -> None:
        own = [t for _, t in _own_tensors(module) if is_pending(t)]
        if not own:
            handles[0].remove()
            return
        root = _PENDING[own[0]].root()
        pending = [(name, p) for name, p in _tensors(root) if is_pending(p)] if root is not None else []
        recorded = records_of(root) if root is not None else None
        if pending and recorded is not None and all(recorded.covers(p) for _, p in pending):
            report = fill(root, check_values=False)
            warnings.warn(f"forward() of {type(module).__name__} found {len(pending)} parameter(s) built with "
                          "empty_init=True that nothing wrote; they were initialized " + _sources(report), stacklevel=3)
            handles[0].remove()
            return
        names = [name for name, _ in pending]
        raise UsageError(
            f"forward() of {type(module).__name__} would read uninitialized memory: these tensors were built "
            f"with empty_init=True and nothing wrote them since: {', '.join(names)}. Load a checkpoint "
            "(model.load_state_dict), or call fabric.setup(model) / torchinit.materialize(model) "
            "to initialize them."
        )

    handles.append(owner.register_forward_pre_hook(check))
