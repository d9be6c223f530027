"""Parameters that empty init left uninitialized, until something writes them (G5).

A parameter counts as written once its version counter or its data pointer moved since construction:
`load_state_dict` copies in place (version), `assign=True` or `.data =` swaps the memory (pointer). Writes
through `.data` (a fresh version counter) are invisible: write with `copy_` under `torch.no_grad()`.

Three guards keep garbage from being used:
1. after any `load_state_dict` into a model built with empty init, what the checkpoint missed is initialized
   by its module's `reset_parameters()` and named in a warning, or, where no such method exists, named in
   one error;
2. `fabric.setup` does the same for a model that was never loaded;
3. a forward pass through a module whose parameters are still unwritten raises, naming all of them.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class _Stamp:
    version: int
    data_ptr: int
    name: str
    owner: weakref.ref
    root: weakref.ref


_PENDING = WeakIdKeyDictionary()  # Parameter -> _Stamp


def _is_pending(param: torch.Tensor) -> bool:
    stamp = _PENDING.get(param)
    if stamp is None:
        return False
    if param._version != stamp.version or param.data_ptr() != stamp.data_ptr:
        del _PENDING[param]
        return False
    return True


def track(roots: list[nn.Module], is_unwritten) -> None:
    """Record every parameter under `roots` for which `is_unwritten(param)` holds, and install the guards."""
    for root in roots:
        owners: dict[int, nn.Module] = {}
        for owner_name, owner in root.named_modules(remove_duplicate=True):
            for local, param in owner.named_parameters(recurse=False):
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
    """Qualified names (relative to `module`) of parameters that nothing has written yet."""
    return [name for name, p in module.named_parameters() if _is_pending(p)]


def initialize_unwritten(module: nn.Module) -> list[str]:
    """Initialize every unwritten parameter under `module` with its owner's `reset_parameters()`.

    Other tensors of the owner keep their values (they are saved and put back), so a partially loaded
    module keeps what was loaded. If any owner has no init method, raises before changing anything.
    Returns the names it initialized.
    """
    pending = [(name, p) for name, p in module.named_parameters() if _is_pending(p)]
    if not pending:
        return []
    owners: dict[int, nn.Module] = {}
    hopeless = []
    for name, p in pending:
        owner = _PENDING[p].owner()
        if owner is None or _init_method(owner) is None:
            hopeless.append(f"{name} ({type(owner).__name__})")
        else:
            owners.setdefault(id(owner), owner)
    if hopeless:
        raise RuntimeError(
            f"{len(hopeless)} parameter(s) were never written (empty_init=True and no checkpoint value), and "
            f"their modules have no reset_parameters() to initialize them: {', '.join(hopeless)}. Load a "
            "checkpoint that contains them, or give these module classes a reset_parameters() method."
        )
    with torch.no_grad():
        for owner in owners.values():
            keep = [(t, t.detach().clone()) for t in _tensors(owner) if not _is_pending(t)]
            _init_method(owner)()
            for t, saved in keep:
                t.copy_(saved)
    left = unwritten_names(module)
    if left:
        raise RuntimeError(
            f"reset_parameters() did not write these parameters, so they still hold uninitialized memory: "
            f"{', '.join(left)}. Load them from a checkpoint or initialize them explicitly."
        )
    return [name for name, _ in pending]


def _init_method(module: nn.Module):
    return getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *(b for b in module.buffers() if b is not None)]


def _after_load(module: nn.Module, incompatible_keys) -> None:
    names = initialize_unwritten(module)
    if names:
        warnings.warn(
            f"load_state_dict did not provide {len(names)} parameter(s) of a model built with empty_init=True; "
            f"they were initialized with their module's reset_parameters() instead of being left as "
            f"uninitialized memory: {', '.join(names)}",
            stacklevel=3,
        )


def _guard_forward(owner: nn.Module) -> None:
    handles = []

    def check(module: nn.Module, args) -> None:
        if not any(_is_pending(p) for p in module.parameters(recurse=False)):
            handles[0].remove()
            return
        root = _PENDING[next(p for p in module.parameters(recurse=False) if _is_pending(p))].root()
        names = [name for name, p in root.named_parameters() if _is_pending(p)] if root is not None else []
        raise RuntimeError(
            f"forward() of {type(module).__name__} would read uninitialized memory: these parameters were built "
            f"with empty_init=True and nothing wrote them since: {', '.join(names)}. Load a checkpoint "
            "(model.load_state_dict), or call fabric.setup(model) / torchinit.initialize_unwritten(model) "
            "to initialize them."
        )

    handles.append(owner.register_forward_pre_hook(check))
