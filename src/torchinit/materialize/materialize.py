"""Meta → real, in place: the one routine that setup, every strategy and the checkpoint loader call.

1. Collect every parameter and buffer once (a tied weight is one tensor with several names). A tensor
   *needs a value* when it is on meta, or when empty init left it pending.
2. Choose one source per tensor: a checkpoint value › a recorded init › its owner's init (an init function
   passed in or registered for its class, `reset_parameters()`, `_reset_parameters()`) › error. Every tensor
   that has none, and every shape mismatch, is named in ONE error before anything changes.
3. Pre-flight: the bytes each device will receive, against what is free there (memory.py).
4. Allocate: fresh memory swapped into the same Parameter / buffer objects (`.data =`), so ties, optimizers
   and every other reference stay valid (G4).
5. Fill: owner inits run once each, children before parents (eager construction order), under a write
   watch that lets each one write only the tensors it is the source for (inits.py); then the recorded init replays;
   then checkpoint values are copied. Tensors that were already real are then moved / cast as
   `Module.to` would.
6. Verify (verify.py): nothing meta, nothing unwritten, ties as before, values finite.
If anything fails after step 4, the allocated tensors get their old (meta) data back: the model is unchanged.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from torchinit.core.dtypes import module_dtype, own_apply
from torchinit.core.errors import MaterializeError
from torchinit.core.flags import poison_enabled
from torchinit.core.text import shorten
from torchinit.materialize.inits import InitFn, init_for, run_inits
from torchinit.materialize.memory import Need, check_fits, local_nbytes, release_freed_host_memory, warm_up, work_nbytes
from torchinit.materialize.slot import Slot
from torchinit.materialize.verify import tie_groups, verify
from torchinit.record import pending
from torchinit.record.recording import RecordedInit, records_of

__all__ = ["MaterializeReport", "materialize", "swap_in"]


@dataclass
class MaterializeReport:
    """Where each tensor's value came from (first qualified name of each tensor), bytes and time."""

    from_checkpoint: list[str] = field(default_factory=list)
    from_record: list[str] = field(default_factory=list)
    from_init: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    allocated_bytes: int = 0
    seconds: float = 0.0


def materialize(
    module: nn.Module,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    checkpoint: Mapping[str, torch.Tensor] | None = None,
    recorded: RecordedInit | None = None,
    init_fns: Mapping[type, InitFn] | None = None,
    check_values: bool = True,
) -> MaterializeReport:
    """Give every meta or unwritten parameter and buffer of `module` real memory and exactly one value source.

    Args:
        device: where tensors end up; None keeps real tensors where they are and puts meta ones on the
            module's one real device (the default device if it has none).
        dtype: floating tensors are cast to it as `Module.to(dtype)` would; integer tensors keep theirs.
        checkpoint: state-dict-keyed values; they win over every other source, also for real tensors.
        recorded: a recorded init to replay for the tensors it covers; by default the record kept for modules
            built in record mode (`torchinit.RecordContext`, `fabric.init_module()` under FSDP / ZeRO-3).
        init_fns: `{module class: fn(module)}`, looked up along the class's MRO before `register_init`
            registrations and the module's own `reset_parameters()` / `_reset_parameters()`.
        check_values: verify that parameters are finite and buffers NaN-free (one pass over the model).

    The same Parameter objects come out (ties, optimizers and hooks keep working). Raises
    `MaterializeError` / `InsufficientMemoryError` / `VerificationError` with the model unchanged.
    """
    start = time.perf_counter()
    if recorded is None:
        recorded = records_of(module)
    ties = tie_groups(module)
    slots = _collect(module)
    target = _resolve_device(device, slots)
    _choose_sources(slots, checkpoint, recorded, init_fns)
    _preflight(slots, target, dtype)
    report = MaterializeReport()
    undo: list[Callable[[], None]] = []
    try:
        report.allocated_bytes = _allocate(slots, target, dtype, undo)
        run_inits(module, slots, init_fns)
        _replay(slots, recorded)
        checked = _copy_checkpoint(slots, checkpoint)
        _move_kept(slots, target, dtype)
        own_apply(list(module.modules()), dtype if dtype is not None else getattr(recorded, "dtype", None))
        verify(module, ties, check_values=check_values, checked=checked)
    except BaseException:
        for step in reversed(undo):
            step()
        raise
    for slot in slots:
        {"checkpoint": report.from_checkpoint, "recorded": report.from_record, "init": report.from_init,
         "kept": report.kept}[slot.source].append(slot.name)
    report.seconds = time.perf_counter() - start
    if report.from_init and not init_fns and hasattr(module, "config") and hasattr(module, "_init_weights"):
        warnings.warn(
            f"{len(report.from_init)} tensor(s) of this {type(module).__name__} got their modules' own default init "
            "(reset_parameters), not the model's _init_weights scheme. To use that scheme, pass "
            "init_fns={torch.nn.Module: model._init_weights} (per module), or load a checkpoint.",
            stacklevel=2,
        )
    return report


# ---- 1. collect ------------------------------------------------------------------------------------
def _collect(module: nn.Module) -> list[Slot]:
    slots: dict[int, Slot] = {}
    for path, mod in module.named_modules():
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                slot = slots.get(id(t))
                if slot is None:
                    needs = t.device.type == "meta" or pending.is_pending(t)
                    slot = slots[id(t)] = Slot(t, [], needs)
                slot.homes.append((path, mod, attr, is_param))
    return list(slots.values())


def _resolve_device(device, slots: list[Slot]) -> torch.device | None:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # so that it compares equal to t.device
        return device
    if not any(s.tensor.device.type == "meta" for s in slots):
        return None
    real = {s.tensor.device for s in slots if s.tensor.device.type != "meta"}
    if len(real) > 1:
        raise MaterializeError(
            f"The module's real tensors are on {len(real)} devices ({', '.join(sorted(map(str, real)))}): "
            "pass device= to say where its meta tensors should go."
        )
    return real.pop() if real else torch.get_default_device()


# ---- 2. one source per tensor ------------------------------------------------------------------------
def _choose_sources(slots, checkpoint, recorded, init_fns) -> None:
    mismatched, hopeless = [], {}
    for slot in slots:
        key = next((n for n in slot.names if n in checkpoint), None) if checkpoint is not None else None
        if key is not None:
            shape = tuple(checkpoint.shape(key) if hasattr(checkpoint, "shape") else checkpoint[key].shape)
            if shape != tuple(slot.tensor.shape):
                mismatched.append(f"{key} (checkpoint {shape}, model {tuple(slot.tensor.shape)})")
            slot.source, slot.key = "checkpoint", key
        elif not slot.needs_value:
            slot.source = "kept"
        elif recorded is not None and recorded.covers(slot.tensor):
            slot.source = "recorded"
        elif init_for(slot.owner[1], init_fns) is not None:
            slot.source = "init"
        else:
            path, owner = slot.owner
            hopeless.setdefault(id(owner), (path, owner, []))[2].append(slot.homes[0][2])
    if mismatched:
        raise MaterializeError(
            f"{len(mismatched)} checkpoint tensor(s) do not fit the model's shapes: {shorten(mismatched)}. "
            "Nothing was changed; check that the checkpoint belongs to this model configuration."
        )
    if hopeless:
        listed = shorten([
            f"'{path or '<root>'}' ({type(owner).__name__}: {', '.join(attrs)})"
            for path, owner, attrs in hopeless.values()
        ])
        raise MaterializeError(
            f"{len(hopeless)} module(s) hold tensors with no value source — no checkpoint value, no recorded init "
            f"and no init method: {listed}. Nothing was changed. Load a checkpoint that contains them, give these "
            "classes a reset_parameters(), or register an init with torchinit.register_init(cls, fn) / pass "
            "init_fns={cls: fn}."
        )


# ---- 3. pre-flight -----------------------------------------------------------------------------------
def _final_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return module_dtype(t, dtype)


def _preflight(slots: list[Slot], device: torch.device | None, dtype: torch.dtype | None) -> None:
    """What THIS process will hold: the local part of each tensor that gets memory (a DTensor's shard, not its
    global size), plus the largest full tensor a replay computes before keeping its part."""
    grows = []
    for slot in slots:
        t = slot.tensor
        where = device if device is not None else t.device
        if where != t.device or t.device.type == "meta":
            want = _final_dtype(t, dtype)
            full = work_nbytes(t, want) if slot.source == "recorded" else 0
            grows.append(Need(slot.name, where, local_nbytes(t, want), full))
    check_fits(grows)


# ---- 4. allocate -------------------------------------------------------------------------------------
def _allocate(slots, device, dtype, undo: list) -> int:
    """Fresh memory for every tensor that needs a value or a checkpoint copy elsewhere; returns bytes."""
    poison = poison_enabled()
    todo = []
    for slot in slots:
        t = slot.tensor
        where = device if device is not None else t.device
        want = _final_dtype(t, dtype)
        in_place = t.device == where and t.dtype == want and t.device.type != "meta"
        # A buffer that has a value gets fresh memory for the checkpoint's, so a failed load leaves it as it was
        # (buffers are small; a real model's parameters are written in place, to hold one copy of the model).
        valued_buffer = not any(home[3] for home in slot.homes) and not pending.is_pending(t)
        if slot.source == "kept" or in_place and not (slot.source == "checkpoint" and valued_buffer):
            slot.memory = t.data
            if pending.is_pending(t):
                undo.append(pending.pending_restorer(t))
            continue
        todo.append((slot, where, want))
    warm_up([(where, local_nbytes(slot.tensor, want)) for slot, where, want in todo])
    total = 0
    for slot, where, want in todo:
        t = slot.tensor
        fresh = torch.empty_like(t, device=where, dtype=want)
        if poison and fresh.is_floating_point():
            fresh.fill_(float("nan"))
        undo.append(swap_in(t, fresh))
        slot.memory = fresh
        total += local_nbytes(fresh, want)
    return total


def swap_in(t: torch.Tensor, fresh: torch.Tensor) -> Callable[[], None]:
    """Make the object `t` hold `fresh` (same object, attributes kept); return how to undo it.

    Between devices of one kind (cpu <-> cuda) `.data =` does it; meta tensors are another kind of tensor, so
    they swap their whole contents with a new Parameter/tensor (torch.utils.swap_tensors) instead.
    """
    if t.device.type != "meta":
        old = t.data
        t.data = fresh
        return lambda: setattr(t, "data", old)
    if isinstance(t, nn.Parameter):  # (a tensor subclass such as DTensor is a Parameter by a flag, not by type)
        cls = type(t) if issubclass(type(t), nn.Parameter) else nn.Parameter
        replacement = cls(fresh, requires_grad=t.requires_grad)
    else:
        replacement = fresh.detach().requires_grad_(t.requires_grad)
    replacement.__dict__ = dict(t.__dict__)
    try:
        torch.utils.swap_tensors(t, replacement)
    except RuntimeError as exc:
        raise MaterializeError(
            f"Cannot materialize a {type(t).__name__} of shape {tuple(t.shape)} in place: {exc}. Drop weak "
            "references to meta parameters (and autograd graphs through them) before materializing."
        ) from exc
    return lambda: torch.utils.swap_tensors(t, replacement)


# ---- 5. fill -----------------------------------------------------------------------------------------
def _replay(slots: list[Slot], recorded: RecordedInit | None) -> None:
    targets = {s.name: s.tensor for s in slots if s.source == "recorded"}
    if targets:
        with torch.no_grad():
            recorded.replay(targets)
        release_freed_host_memory()  # the replay's freed working tensors, out of the C heap


def _copy_checkpoint(slots: list[Slot], checkpoint: Mapping[str, torch.Tensor] | None) -> frozenset[int]:
    """Copy checkpoint values in; a checkpoint with `load_into(pairs)` (the streaming reader) writes them itself
    and checks their values (naming its file): returns the ids of those tensors, which verify need not check."""
    pairs = [(slot.key, slot.tensor) for slot in slots if slot.source == "checkpoint"]
    if not pairs:
        return frozenset()
    if hasattr(checkpoint, "load_into"):
        checkpoint.load_into([(key, t.data) for key, t in pairs])
        for _, t in pairs:
            pending.mark_written(t)  # written behind autograd's back: its version counter did not move
        return frozenset(id(t) for _, t in pairs)
    with torch.no_grad():
        for key, t in pairs:
            t.copy_(checkpoint[key])
    return frozenset()


def _move_kept(slots: list[Slot], device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Tensors that were real already: to the device and dtype, one at a time, as `Module.to` does."""
    for slot in slots:
        t = slot.tensor
        if slot.source != "kept":
            continue
        where, want = device if device is not None else t.device, _final_dtype(t, dtype)
        if t.device != where or t.dtype != want:
            t.data = t.data.to(device=where, dtype=want)


pending.set_filler(materialize)  # the guards of pending tensors (record/pending.py) fill through this chain
