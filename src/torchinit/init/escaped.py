"""Nothing fake leaves a record context. Fake tensors still reachable at its exit that are not the modules' own — a
loose `x = torch.linspace(...)` the caller kept, tensors in a module's lists or dicts, what `init_tensor()` made
inside — become real in place: the same Python objects, on the record's device, with eager's values (a replay of
only the ops they depend on, the random streams left as they were). A fake parameter or buffer still held outside
its module (an optimizer built inside the context, a variable) cannot become the module's tensor: an error names it.

Which fakes are reachable is known by weak references taken before the recorder lets go of them.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from torchinit.core.compat import FakeTensor, FakeTensorMode, forget_fake_memos, tree_leaves
from torchinit.core.errors import RecordError, UsageError
from torchinit.core.text import shorten
from torchinit.init.recorder import OpRecorder
from torchinit.record.data import Alias, Record, Ref
from torchinit.record.replay import Replayer, backward_slice

__all__ = ["Watched", "make_real", "user_attributes", "watch"]

Watched = list[tuple[weakref.ref, Ref | Alias | None, int]]  # newest first: (fake, its value, its node)


def watch(recorder: OpRecorder) -> Watched:
    """Weak references to every fake tensor the record made, newest first (a view before its base)."""
    seen, out = set(), []
    for t in reversed(recorder.keep):
        if isinstance(t, FakeTensor) and id(t) not in seen:
            seen.add(id(t))
            try:
                ref = recorder.ref(t)
            except RecordError:
                ref = None  # its memory is not the record's: reachable, it is an error below
            out.append((weakref.ref(t), ref, recorder.node_of.get(id(t), -1)))
    return out


def make_real(record: Record, watched: Watched, owned: dict[int, str], modules: list[nn.Module],
              dtype_of: Callable[[torch.Tensor, int], torch.dtype]) -> None:
    """Turn every fake in `watched` that is still alive into a real tensor with its value, in place; `owned` maps
    the fakes that became placeholders (id -> the module attribute) and must be dead by now. `dtype_of(fake, node)`
    is the dtype a value is kept in. Call once the recorder holds no fakes; `watched` is emptied."""
    alive = [(w, ref, node) for w, ref, node in watched if w() is not None and id(w()) not in owned]
    owners = [w for w, _, _ in watched if w() is not None and id(w()) in owned]
    watched.clear()  # (emptied: its weak references must go before a swap)
    if alive:
        values = _replayed(record, [ref for _, ref, _ in alive])
        for i in range(len(alive)):
            w, _, node = alive[i]
            alive[i] = None  # our weak reference goes: swap_tensors refuses a tensor that has one
            fake = w()
            del w
            if fake is not None:  # (a base whose views were made real may have gone with them)
                _swap(fake, values.pop(i, None), dtype_of(fake, node), modules)
            del fake
    held = [owned[id(w())] for w in owners if w() is not None]
    if held:
        raise UsageError(
            f"Tensors of modules built in a record context are still held outside their modules: {shorten(held)}. "
            "At exit the modules got new tensor objects (placeholders), so these references are fake tensors with "
            "no values. Take references (an optimizer, a variable) after the context has closed."
        )


def _replayed(record: Record, refs: list[Ref | Alias | None]) -> dict[int, torch.Tensor]:
    """The current value of each reference, by index (a replay of only the ops they depend on)."""
    by_memory: dict[int, list[int]] = {}
    for i, ref in enumerate(refs):
        if ref is not None:
            by_memory.setdefault(record.memory_of[ref.node], []).append(i)
    replayer, values = Replayer(record, backward_slice(record, set(by_memory))), {}

    def finished(memory: int) -> None:
        for i in by_memory.get(memory, ()):
            values[i] = replayer.value(refs[i]).clone()

    replayer.run(len(record.ops), finished)
    return values


def _swap(fake: torch.Tensor, value: torch.Tensor | None, dtype: torch.dtype, modules: list[nn.Module]) -> None:
    """`fake` becomes a real tensor holding `value` (cast to `dtype`): the same object, its own attributes kept."""
    problem = "its memory is not the record's"
    if value is not None:
        with torch.no_grad():
            real = value.to(dtype) if value.dtype != dtype else value
        if isinstance(fake, nn.Parameter):
            real = nn.Parameter(real, requires_grad=fake.requires_grad)
        else:
            real.requires_grad_(fake.requires_grad and fake.is_leaf)
        real.__dict__ = user_attributes(fake)
        forget_fake_memos(fake.fake_mode)
        try:
            torch.utils.swap_tensors(fake, real)
            return
        except RuntimeError as exc:
            problem = str(exc)
    raise RecordError(f"{_describe(fake, modules)} was made inside a record context and is still reachable, but "
                      f"cannot be given its value in place ({problem}). Make it outside the context, or under "
                      "fabric.init_tensor() after the context has closed.")


def _describe(t: torch.Tensor, modules: list[nn.Module]) -> str:
    """Where a tensor is held: a module attribute that holds it (in a list or dict), else its shape."""
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, (list, tuple, dict)) and any(x is t for x in tree_leaves(value)):
                return f"A tensor in {type(module).__name__}.{name}"
    return f"A tensor of shape {tuple(t.shape)} ({t.dtype})"


def user_attributes(fake: torch.Tensor) -> dict:
    """A fake tensor's own attributes: what the user set, not what FakeTensor keeps (its mode, device, memos)."""
    return {k: v for k, v in vars(fake).items() if k not in _fake_attributes()}


@functools.cache
def _fake_attributes() -> frozenset[str]:
    fake = FakeTensorMode().from_tensor(torch.empty(0))
    return frozenset(vars(fake)) | {"_is_param"}
