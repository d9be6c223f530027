"""The construction mode: run a model's constructor as eager code would, store what it makes in the plan's dtype.

Two jobs, both at the aten level (a TorchDispatchMode sees every op, also the `torch.nn.init` functions that
a TorchFunctionMode misses and direct fills such as `w.data.normal_()`):

1. Exact low precision. Eager code builds in the compute dtype (the default dtype at entry, normally fp32)
   and is cast afterwards; building directly in bf16 changes the values (rounding of every intermediate) and,
   on CPU, even the random stream. So every floating tensor the constructor makes without an explicit dtype
   is *promoted*: the user sees a tensor in the target dtype, and the mode keeps an fp32 *shadow* of its
   storage. Every op that reads or writes a promoted tensor runs on the shadows, in fp32, as eager would;
   results are written back (cast) at once, so visible == cast(shadow) always. Shadows are transient: they
   are dropped least-recently-used beyond a byte budget (the model never exists twice in fp32), and a
   dropped shadow is rebuilt by upcasting when the tensor is used again; that upcast is exact for writes
   that overwrite (init functions), which is what a constructor does to parameters.
2. Empty init. Writes into parameter storage are skipped (no work, no random numbers consumed), and
   storage that nothing ever wrote is remembered, so that loading can find what a checkpoint missed.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from torchinit.core.compat import DispatchMode, tree_leaves, tree_map
from torchinit.core.ops import (
    METADATA_ONLY,
    OVERWRITERS,
    UNINITIALIZED,
    aliased_result,
    spans_storage,
    storage_object_id,
    written_args,
)

__all__ = ["ConstructionMode"]

SHADOW_BUDGET_BYTES = 64 * 2**20


class _Entry:
    """A promoted storage: its element count and, while warm, its compute-dtype shadow (flat)."""

    __slots__ = ("numel", "shadow", "ref")

    def __init__(self, numel: int):
        self.numel = numel
        self.shadow: torch.Tensor | None = None
        self.ref: weakref.ref | None = None


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    return t.untyped_storage()


class ConstructionMode(DispatchMode):
    """Promote default-dtype floating tensors to `target` with exact `compute` shadows; optionally skip init."""

    def __init__(self, compute: torch.dtype, target: torch.dtype, skip_param_writes: bool, poison: bool):
        super().__init__()
        self.compute, self.target = compute, target
        self.promote = compute != target
        self.skip_param_writes = skip_param_writes
        self.poison = poison
        self.param_storages: set[int] = set()  # ids of storages owned by registered parameters
        self.unwritten: set[int] = set()  # ids of storages made uninitialized and never fully written
        self._entries: dict[int, _Entry] = {}
        self._warm: OrderedDict[int, int] = OrderedDict()  # key -> shadow bytes, least recently used first
        self._warm_bytes = 0

    # ---- bookkeeping -------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop every shadow (called at context exit): nothing of the mode outlives construction."""
        self._entries.clear()
        self.param_storages.clear()
        self.unwritten.clear()
        self._warm.clear()
        self._warm_bytes = 0

    def mark_parameter(self, param: torch.Tensor) -> None:
        if param.device.type != "meta":
            self._remember(self.param_storages, param)

    def skipped(self, t: torch.Tensor) -> None:
        """Empty init skipped a write into `t` (a `torch.nn.init` call): its value is not eager's."""
        self._remember(self.unwritten, t)

    def is_unwritten(self, t: torch.Tensor) -> bool:
        return storage_object_id(t) in self.unwritten

    def _remember(self, keys: set[int], t: torch.Tensor) -> None:
        """Add t's storage to `keys` until that storage dies, so that a reused id never matches."""
        key = storage_object_id(t)
        keys.add(key)
        weakref.finalize(_storage(t), keys.discard, key)

    def _promoted(self, t: object) -> _Entry | None:
        if not isinstance(t, torch.Tensor) or t.dtype != self.target or t.layout != torch.strided:
            return None
        return self._entries.get(storage_object_id(t))

    def _adopt(self, visible: torch.Tensor, shadow: torch.Tensor | None) -> torch.Tensor:
        """Register `visible` (fresh, target dtype) as promoted, with `shadow` as its flat compute copy."""
        s = _storage(visible)
        key, numel = storage_object_id(visible), s.nbytes() // visible.element_size()
        if numel == 0:
            return visible
        entry = _Entry(numel)
        entry.ref = weakref.ref(s, lambda _, k=key, entries=self._entries: entries.pop(k, None))
        self._entries[key] = entry
        if shadow is not None:
            self._set_shadow(key, entry, shadow)
        return visible

    def _set_shadow(self, key: int, entry: _Entry, flat: torch.Tensor) -> None:
        entry.shadow = flat
        nbytes = flat.numel() * flat.element_size()
        self._warm_bytes += nbytes - self._warm.pop(key, 0)
        self._warm[key] = nbytes
        while self._warm_bytes > SHADOW_BUDGET_BYTES and len(self._warm) > 1:
            old_key, old_bytes = self._warm.popitem(last=False)
            self._warm_bytes -= old_bytes
            old = self._entries.get(old_key)
            if old is not None:
                old.shadow = None

    def _shadow_view(self, t: torch.Tensor, entry: _Entry, overwrite: bool) -> torch.Tensor:
        """The compute-dtype twin of `t` (a view of the storage's shadow), creating the shadow if cold."""
        key = storage_object_id(t)
        if entry.shadow is None:
            if overwrite and t.numel() == entry.numel:
                flat = torch.empty(entry.numel, dtype=self.compute, device=t.device)
            else:
                whole = torch.empty(0, dtype=self.target, device=t.device).set_(_storage(t), 0, (entry.numel,))
                flat = whole.to(self.compute)
            self._set_shadow(key, entry, flat)
        else:
            self._warm.move_to_end(key)
        return entry.shadow.as_strided(t.shape, t.stride(), t.storage_offset())

    # ---- dispatch ----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not leaves:
            return self._factory(func, args, kwargs)
        if schema.returns and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return func(*args, **kwargs)  # views share storage, so they share the shadow: nothing to compute

        written = written_args(func, args, kwargs)
        if self.skip_param_writes and written and all(
            storage_object_id(t) in self.param_storages for t in written.values()
        ):
            for t in written.values():  # empty init: parameter memory untouched, so its value is not eager's
                self.skipped(t)
            return aliased_result(func, args, kwargs)

        packet = func.overloadpacket
        written_ids = {id(t) for t in written.values()}
        reads_unwritten = self.skip_param_writes and packet not in METADATA_ONLY and any(  # garbage in, garbage out
            storage_object_id(x) in self.unwritten
            for x in leaves if id(x) not in written_ids or packet not in OVERWRITERS
        )
        if self.promote and any(self._promoted(t) is not None for t in leaves):
            out = self._run_on_shadows(func, packet, args, kwargs, written)
        else:
            out = func(*args, **kwargs)
            if packet in UNINITIALIZED:
                self._fresh_uninitialized(tree_leaves(out))
        for t in written.values():
            if reads_unwritten:
                self._remember(self.unwritten, t)
            elif spans_storage(t):
                self.unwritten.discard(storage_object_id(t))
        if reads_unwritten:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and id(t) not in written_ids and t.numel():
                    self._remember(self.unwritten, t)
        return out

    def _factory(self, func, args, kwargs):
        explicit = kwargs.get("dtype") is not None
        if func.overloadpacket in UNINITIALIZED:
            out = func(*args, **kwargs)
            self._fresh_uninitialized([out])
            if self.promote and not explicit and out.dtype == self.target:
                self._adopt(out, None)
            return out
        if explicit or not self.promote:
            return func(*args, **kwargs)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.compute)  # eager's dtype; the result is cast below
        try:
            out = func(*args, **kwargs)
        finally:
            torch.set_default_dtype(previous)
        if isinstance(out, torch.Tensor) and out.dtype == self.compute:
            return self._promote_result(out)
        return out

    def _fresh_uninitialized(self, outs: list) -> None:
        for t in outs:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and t.device.type != "meta":
                self._remember(self.unwritten, t)
                if self.poison:
                    t.fill_(float("nan"))

    def _promote_result(self, r: torch.Tensor) -> torch.Tensor:
        """A fresh compute-dtype result becomes a visible target-dtype tensor whose shadow is `r`."""
        dense = r.is_contiguous() or (r.dim() == 4 and r.is_contiguous(memory_format=torch.channels_last))
        if not (dense and r.storage_offset() == 0 and _storage(r).nbytes() == r.numel() * r.element_size()):
            r = r.clone(memory_format=torch.contiguous_format)
        visible = torch.empty_strided(r.shape, r.stride(), dtype=self.target, device=r.device)
        visible.copy_(r)
        flat = torch.empty(0, dtype=self.compute, device=r.device).set_(_storage(r), 0, (r.numel(),))
        return self._adopt(visible, flat)

    def _run_on_shadows(self, func, packet, args, kwargs, written: dict[int, torch.Tensor]):
        overwrite = packet in OVERWRITERS
        written_ids = {id(t) for t in written.values()}
        twins: list[tuple[torch.Tensor, torch.Tensor]] = []

        def twin(x):
            entry = self._promoted(x)
            if entry is None:
                return x
            if id(x) not in written_ids and storage_object_id(x) in self.unwritten:
                return x  # reading memory nothing wrote: garbage either way, so no fp32 twin to build
            view = self._shadow_view(x, entry, overwrite and id(x) in written_ids)
            if id(x) in written_ids:
                twins.append((x, view))
            return view

        shadow_args, shadow_kwargs = tree_map(twin, (args, kwargs))
        if packet in UNINITIALIZED and shadow_kwargs.get("dtype") is None:
            out = func(*args, **kwargs)  # empty_like of a promoted tensor: same dtype, nothing to compute
            self._fresh_uninitialized(tree_leaves(out))
            return tree_map(lambda t: self._adopt(t, None) if isinstance(t, torch.Tensor) else t, out)
        out = func(*shadow_args, **shadow_kwargs)
        for visible, view in twins:
            visible.copy_(view)  # write through: visible == cast(shadow)
        if written and all(r.alias_info is not None for r in func._schema.returns):
            return aliased_result(func, args, kwargs)
        explicit_dtype = kwargs.get("dtype") is not None

        def present(r):
            if isinstance(r, torch.Tensor) and r.dtype == self.compute and not explicit_dtype:
                return self._promote_result(r)
            return r

        return tree_map(present, out)
