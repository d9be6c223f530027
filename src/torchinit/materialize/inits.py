"""Step 5 of materialize, first half: run each owner's own init (an init function passed in or registered for
its class, `reset_parameters()`, `_reset_parameters()`) once, children before parents as eager construction
does, each allowed to write only the tensors it is the source for; and the registry of init functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from torchinit.core.compat import DispatchMode
from torchinit.core.errors import MaterializeError
from torchinit.core.ops import aliased_result, written_args
from torchinit.core.placement import local_tensor
from torchinit.core.text import shorten
from torchinit.materialize.slot import Slot

__all__ = ["InitFn", "init_for", "post_order", "register_init", "run_inits"]

InitFn = Callable[[nn.Module], None]
_REGISTERED: dict[type, InitFn] = {}


def register_init(cls: type[nn.Module], fn: InitFn | None) -> None:
    """Initialize modules of class `cls` (and its subclasses) with `fn(module)` when materializing.

    It takes precedence over the class's own `reset_parameters()`; `fn=None` removes the registration.
    """
    if fn is None:
        _REGISTERED.pop(cls, None)
    else:
        _REGISTERED[cls] = fn


def init_for(module: nn.Module, init_fns: Mapping[type, InitFn] | None) -> Callable[[], None] | None:
    for table in (init_fns or {}, _REGISTERED):
        for cls in type(module).__mro__:
            if cls in table:
                fn = table[cls]
                return lambda: fn(module)
    for name in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, name, None)
        if callable(method):
            return method
    return None


class _WriteWatch(DispatchMode):
    """Lets an init write only the tensors it is the source for; records what it wrote and what it tried."""

    def __init__(self, guarded: dict[int, Slot], allowed: set[int]):
        super().__init__()
        self.guarded, self.allowed = guarded, allowed
        self.written: set[int] = set()
        self.refused: list[Slot] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = written_args(func, args, kwargs)
        ptrs = [_ptr(t) for t in written.values()]
        refused = [p for p in ptrs if p in self.guarded and p not in self.allowed]
        if refused and len(refused) == len(ptrs):
            self.refused += [self.guarded[p] for p in refused]
            return aliased_result(func, args, kwargs)
        self.written.update(ptrs)
        return func(*args, **kwargs)


def post_order(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    seen: set[int] = set()

    def walk(mod: nn.Module, path: str):
        if id(mod) in seen:
            return
        seen.add(id(mod))
        for name, child in mod._modules.items():
            if child is not None:
                yield from walk(child, f"{path}.{name}" if path else name)
        yield path, mod

    yield from walk(module, "")


def _ptr(t: torch.Tensor) -> tuple[torch.device, int]:
    t = local_tensor(t)  # a DTensor's own memory is its local shard
    return t.device, t.untyped_storage().data_ptr()


def run_inits(module: nn.Module, slots: list[Slot], init_fns: Mapping[type, InitFn] | None) -> None:
    """Run each owner's init once, children first; each may write only tensors it is the source for.

    A parent may also write a descendant's init-sourced tensor (torch's MultiheadAttention zeroes its
    out_proj.bias): eager order, parent last, wins. Outside torch.nn, a tensor written by two inits is
    reported, as are writes to tensors with another source, which are refused. A tensor no init wrote is
    an error.
    """
    init_slots = [s for s in slots if s.source == "init"]
    if not init_slots:
        return
    guarded = {_ptr(s.memory): s for s in slots if s.tensor.numel()}
    by_owner: dict[int, list[Slot]] = {}
    for s in init_slots:
        by_owner.setdefault(id(s.owner[1]), []).append(s)
    writers: dict[tuple, list[nn.Module]] = {}
    foreign = []
    with torch.no_grad():
        for path, owner in post_order(module):
            if id(owner) not in by_owner:
                continue
            allowed = {_ptr(s.memory) for sub in owner.modules() for s in by_owner.get(id(sub), ())}
            watch = _WriteWatch(guarded, allowed)
            try:
                with watch:
                    init_for(owner, init_fns)()
            except Exception as exc:
                raise MaterializeError(
                    f"The init of '{path or '<root>'}' ({type(owner).__name__}) raised {type(exc).__name__}: {exc}. "
                    "Nothing was changed."
                ) from exc
            for ptr in (watch.written | _restore_identity(owner, slots, allowed)) & allowed:
                writers.setdefault(ptr, []).append(owner)
            foreign += [f"{s.name} (by '{path or '<root>'}')" for s in watch.refused
                        if all(home[1] is not owner for home in s.homes)]
    not_written = [s.name for s in init_slots if s.tensor.numel() and _ptr(s.memory) not in writers]
    if not_written:
        raise MaterializeError(
            f"These tensors were left uninitialized: their module's init did not write them: {shorten(not_written)}. "
            "Nothing was changed. Make the init write every parameter and buffer of its own module, or register "
            "an init for the class (torchinit.register_init)."
        )
    twice = []
    for s in init_slots:
        who = writers.get(_ptr(s.memory), [])
        if len(who) > 1 and not type(who[-1]).__module__.startswith("torch.nn"):
            twice.append(s.name)
    if twice or foreign:
        warnings.warn(
            "Init methods reached beyond their own module (the contract: each module initializes only its own "
            "parameters and buffers). "
            + (f"Initialized twice, the parent's value kept: {shorten(twice)}. " if twice else "")
            + (f"Refused writes to tensors with another source: {shorten(foreign)}." if foreign else ""),
            stacklevel=3,
        )


def _restore_identity(owner: nn.Module, slots: list[Slot], allowed: set[int]) -> set[int]:
    """Undo an init that replaced a Parameter object or its `.data`: keep the object and our memory, take the
    value where the init was allowed to write. Returns the storages that got a value this way."""
    got = set()
    for slot in slots:
        for _, mod, attr, is_param in slot.homes:
            if mod is not owner:
                continue
            table = mod._parameters if is_param else mod._buffers
            now = table[attr]
            if now is not slot.tensor:
                table[attr] = slot.tensor
            elif _ptr(now) != _ptr(slot.memory):
                now = now.data
                slot.tensor.data = slot.memory
            else:
                continue
            if _ptr(slot.memory) in allowed and now is not None:
                if tuple(now.shape) != tuple(slot.memory.shape):
                    raise MaterializeError(
                        f"The init of {type(owner).__name__} replaced {slot.name} with shape {tuple(now.shape)}; "
                        f"the module declared {tuple(slot.memory.shape)}."
                    )
                slot.memory.copy_(now.detach())
                got.add(_ptr(slot.memory))
    return got
