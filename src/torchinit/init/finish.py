"""The end of a record context: fake tensors on the modules become placeholders bound to their recorded values.

Placeholders are meta tensors (FSDP, ZeRO-3, `RecordContext`), or, for empty init, real uninitialized memory on
the device: `load_state_dict` then works as usual, the buffers get their values at once (a replay of only the ops
they depend on), and the parameters are handed to the pending registry, which replays the record into exactly
the ones nothing wrote (after a partial load, at `setup`, or at the first forward). One placeholder per tensor
object, so ties stay ties. A value the record knows to be uninitialized (eager leaves `torch.empty` memory
there too) is not bound: such a tensor needs another source (a checkpoint, its module's init) or is an error.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from torchinit.core.compat import FakeTensor, tree_leaves, tree_map
from torchinit.core.dtypes import module_dtype, own_apply
from torchinit.core.flags import poison_enabled
from torchinit.init.escaped import make_real, user_attributes, watch
from torchinit.init.recorder import OpRecorder
from torchinit.record import pending, recording
from torchinit.record.data import Alias, Record, Ref
from torchinit.record.recording import Recording

__all__ = ["finish", "replay_now"]


def finish(recorder: OpRecorder, modules: list[nn.Module], dtype: torch.dtype | None,
           device: torch.device | None, keep_garbage: bool = False,
           dtype_of: Callable[[torch.Tensor, int], torch.dtype] | None = None) -> None:
    """Fake tensors on `modules` -> placeholders (meta, or empty memory on `device`); the record is kept. Other fakes
    still reachable become real (escaped.py), in `dtype_of(fake, node)` (default: their own).
    `keep_garbage`: bind uninitialized values too (replayed at once: eager's uninitialized memory, as eager)."""
    watched = watch(recorder)
    bound, owned, placeholders = _place(recorder, modules, dtype, device, keep_garbage)
    recorder.keep.clear()
    recorder.node_of.clear()
    make_real(recorder.record, watched, owned, modules, dtype_of or (lambda fake, node: fake.dtype))
    recording.register(modules, bound)
    if device is not None:
        params = {id(t) for t in placeholders if isinstance(t, nn.Parameter)}
        garbage = {id(t) for t in placeholders if id(t) not in params and id(t) not in bound.targets}
        _finish_empty(bound, modules, params, garbage)
        own_apply(modules, dtype)


def _place(recorder: OpRecorder, modules: list[nn.Module], dtype: torch.dtype | None, device: torch.device | None,
           keep_garbage: bool) -> tuple[Recording, dict[int, str], list[torch.Tensor]]:
    """Put placeholders where the modules hold fakes; returns the bound record, where each fake replaced was
    (id -> "Module.attribute"), and the placeholders."""
    record = recorder.record
    placeholders: dict[int, torch.Tensor] = {}
    owned: dict[int, str] = {}
    targets: dict[int, tuple[torch.Tensor, Ref | Alias]] = {}
    loose: dict[int, tuple[weakref.ref, str]] = {}
    poison = device is not None and poison_enabled()

    def placeholder(fake: FakeTensor, as_param: bool, where: str, cast: bool = True) -> torch.Tensor:
        made = placeholders.get(id(fake))
        if made is None:
            want = module_dtype(fake, dtype if cast else None)
            data = torch.empty_strided(fake.shape, fake.stride(), dtype=want, device=device or "meta")
            if poison and data.is_floating_point():
                data.fill_(float("nan"))
            made = nn.Parameter(data, fake.requires_grad) if as_param else data.requires_grad_(fake.requires_grad)
            made.__dict__.update(user_attributes(fake))
            placeholders[id(fake)], owned[id(fake)] = made, where
            ref = recorder.ref(fake)
            if keep_garbage or not fake.numel() or record.memory_of[ref.node] not in record.garbage:
                targets[id(made)] = (made, ref)
        return made

    for module in modules:
        for table, as_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if isinstance(t, FakeTensor):
                    table[name] = placeholder(t, as_param, f"{type(module).__name__}.{name}")
    for module in modules:  # containers of references to parameters (RNN's _flat_weights) follow them; other
        for name, value in list(vars(module).items()):  # fakes in them are made real in place (escaped.py)
            if isinstance(value, (list, tuple, dict)) and any(id(x) in placeholders for x in tree_leaves(value)):
                object.__setattr__(module, name, tree_map(lambda x: placeholders.get(id(x), x), value))
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, FakeTensor):
                known = id(value) in placeholders
                made = placeholder(value, isinstance(value, nn.Parameter), f"{type(module).__name__}.{name}",
                                   cast=known)
                object.__setattr__(module, name, made)
                if not known and id(made) in targets:  # a plain attribute: set to its value when replayed
                    loose[id(made)] = (weakref.ref(module), name)
    bound = Recording(record, targets, loose, dtype, sliced=device is not None)
    return bound, owned, list(placeholders.values())


def _finish_empty(bound: Recording, modules: list[nn.Module], params: set[int], garbage: set[int]) -> None:
    """Empty init: buffers and plain tensor attributes get their values now (only the ops they depend on run);
    every parameter placeholder is pending until something writes it, and so is a buffer whose recorded value
    is uninitialized memory (`garbage`: a checkpoint may fill it; otherwise `setup` names it in an error)."""
    now = {f"buffer{i}": t for i, (t, _) in enumerate(bound.targets.values()) if id(t) not in params}
    if now:
        bound.replay(now)
    children = {id(c) for m in modules for c in m._modules.values() if c is not None}
    roots = [m for m in modules if id(m) not in children]
    pending.track(roots, lambda t: id(t) in params or id(t) in garbage)


def replay_now(record: Record, built: list[nn.Module], device: torch.device, dtype: torch.dtype | None) -> None:
    """Materialize what was built (the record replayed) and leave the random streams where eager leaves them."""
    children = {id(c) for m in built for c in m._modules.values() if c is not None}
    roots = [m for m in built if id(m) not in children]
    bound = recording.kept_for(roots[0]) if roots else None
    for root in roots:
        pending.fill(root, device, dtype, check_values=False)
    own_apply(built, dtype)
    final = getattr(bound, "final_rng", None)
    if final is not None:
        for i, state in final.items():
            record.generators[i].set_state(state)
