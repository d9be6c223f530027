"""The end of a record context: fake tensors on the modules become placeholders bound to their recorded values.

Placeholders are meta tensors (FSDP, ZeRO-3, `RecordContext`), or, for empty init, real uninitialized memory on
the device: `load_state_dict` then works as usual, the buffers get their values at once (a replay of only the ops
they depend on), and the parameters are handed to the pending registry, which replays the record into exactly
the ones nothing wrote (after a partial load, at `setup`, or at the first forward). One placeholder per tensor
object, so ties stay ties. A value the record knows to be uninitialized (eager leaves `torch.empty` memory
there too) is not bound: such a tensor needs another source (a checkpoint, its module's init) or is an error.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch import nn

from torchinit.core.compat import FakeTensor, FakeTensorMode, tree_leaves, tree_map
from torchinit.core.dtypes import module_dtype, own_apply
from torchinit.core.flags import poison_enabled
from torchinit.init.recorder import OpRecorder
from torchinit.record import pending, recording
from torchinit.record.data import Alias, Record, Ref
from torchinit.record.recording import Recording

__all__ = ["finish", "replay_now"]


def finish(recorder: OpRecorder, modules: list[nn.Module], dtype: torch.dtype | None,
           device: torch.device | None, keep_garbage: bool = False) -> None:
    """Fake tensors on `modules` -> placeholders (meta, or empty memory on `device`); the record is kept.
    `keep_garbage`: bind uninitialized values too (replayed at once: eager's uninitialized memory, as eager)."""
    record = recorder.record
    placeholders: dict[int, torch.Tensor] = {}
    targets: dict[int, tuple[torch.Tensor, Ref | Alias]] = {}
    loose: dict[int, tuple[weakref.ref, str]] = {}
    poison = device is not None and poison_enabled()

    def placeholder(fake: FakeTensor, as_param: bool, cast: bool = True) -> torch.Tensor:
        made = placeholders.get(id(fake))
        if made is None:
            want = module_dtype(fake, dtype if cast else None)
            data = torch.empty_strided(fake.shape, fake.stride(), dtype=want, device=device or "meta")
            if poison and data.is_floating_point():
                data.fill_(float("nan"))
            made = nn.Parameter(data, fake.requires_grad) if as_param else data.requires_grad_(fake.requires_grad)
            made.__dict__.update({k: v for k, v in fake.__dict__.items() if k not in _fake_attributes()})
            placeholders[id(fake)] = made
            ref = recorder.ref(fake)
            if keep_garbage or not fake.numel() or record.memory_of[ref.node] not in record.garbage:
                targets[id(made)] = (made, ref)
        return made

    for module in modules:
        for table, as_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if isinstance(t, FakeTensor):
                    table[name] = placeholder(t, as_param)
    hidden = []
    for module in modules:  # containers of references to parameters (RNN's _flat_weights) follow them
        for name, value in list(vars(module).items()):
            if isinstance(value, (list, tuple, dict)) and any(isinstance(x, FakeTensor)
                                                               for x in tree_leaves(value)):
                object.__setattr__(module, name, tree_map(
                    lambda x: placeholders.get(id(x), x) if isinstance(x, FakeTensor) else x, value))
                if any(isinstance(x, FakeTensor) for x in tree_leaves(getattr(module, name))):
                    hidden.append(f"{type(module).__name__}.{name}")
    if hidden:
        warnings.warn(f"Tensors inside containers ({', '.join(hidden[:5])}) were built in record mode and stay fake "
                      "tensors (no values): register them as buffers, or build them in forward.", stacklevel=4)
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, FakeTensor):
                known = id(value) in placeholders
                made = placeholder(value, isinstance(value, nn.Parameter), cast=known)
                object.__setattr__(module, name, made)
                if not known and id(made) in targets:  # a plain attribute: set to its value when replayed
                    loose[id(made)] = (weakref.ref(module), name)
    bound = Recording(record, targets, loose, dtype, sliced=device is not None)
    recording.register(modules, bound)
    recorder.keep.clear()
    recorder.node_of.clear()
    if device is not None:
        params = {id(t) for t in placeholders.values() if isinstance(t, nn.Parameter)}
        garbage = {id(t) for t in placeholders.values() if id(t) not in params and id(t) not in targets}
        _finish_empty(bound, modules, params, garbage)
        own_apply(modules, dtype)


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


@functools.cache
def _fake_attributes() -> frozenset[str]:
    """What FakeTensor keeps in a tensor's __dict__ (its mode, device, memos): not the user's, not copied."""
    fake = FakeTensorMode().from_tensor(torch.empty(0))
    return frozenset(vars(fake)) | {"_is_param"}


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
