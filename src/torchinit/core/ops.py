"""Facts about aten ops that construction, recording and init watching share: which arguments an op writes, what
an in-place op returns, which ops fill their target without reading it, make uninitialized memory, or read only
metadata; and storage identity."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from torchinit.core import compat

__all__ = ["METADATA_ONLY", "OVERWRITERS", "UNINITIALIZED", "aliased_result", "spans_storage", "storage_key",
           "storage_object_id", "written_args"]

aten = torch.ops.aten

# In-place ops that write every element of their first argument without reading it (packets: every overload).
OVERWRITERS = frozenset({
    aten.uniform_, aten.normal_, aten.fill_, aten.zero_, aten.copy_, aten.random_, aten.exponential_,
    aten.cauchy_, aten.log_normal_, aten.geometric_, aten.bernoulli_,
})
# Ops whose result is uninitialized memory.
UNINITIALIZED = frozenset({aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided})
# Ops that read only their tensor arguments' shape, dtype and device: their result is not computed from the values
# (zeros_like of unwritten memory is zeros).
METADATA_ONLY = frozenset({aten.zeros_like, aten.ones_like, aten.full_like, aten.rand_like, aten.randn_like,
                           aten.randint_like, aten.new_zeros, aten.new_ones, aten.new_full})


def storage_key(t: torch.Tensor) -> int:
    """An id of `t`'s storage that every view of it shares (also a fake tensor's), valid while the storage lives:
    the number to compare storages by. (`storage_object_id` is for tables that watch the storage object die.)"""
    return compat.storage_id(t)


def storage_object_id(t: torch.Tensor) -> int:
    """The id of the Python object of `t`'s storage (`t.untyped_storage()`), for tables that watch that object die
    (`weakref.finalize`, `weakref.ref`) and drop the id with it (`init.construct.ConstructionMode`). For a real
    tensor torch keeps one such object per live storage, shared by every view, so the id is stable while the
    storage lives; a fake tensor's storage object need not be (use `storage_key` there)."""
    return id(t.untyped_storage())


def spans_storage(t: torch.Tensor) -> bool:
    """Whether `t` covers every byte of its storage, in order (writing all of `t` writes all of the storage)."""
    return t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == \
        t.untyped_storage().nbytes()


def _bind(func, args, kwargs) -> dict[str, object]:
    bound = dict(kwargs)
    for arg, value in zip(func._schema.arguments, args, strict=False):
        bound[arg.name] = value
    return bound


def written_args(func, args, kwargs) -> dict[str, torch.Tensor]:
    """The tensor arguments an op writes into (`self` of in-place ops, `out=` of out variants)."""
    if not func._schema.is_mutable:
        return {}
    bound = _bind(func, args, kwargs)
    written = {}
    for arg in func._schema.arguments:
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = bound.get(arg.name)
            for t in pytree.tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    written[f"{arg.name}{len(written)}"] = t
    return written


def aliased_result(func, args, kwargs):
    """What an in-place / out= op returns: the argument(s) it wrote into."""
    bound = _bind(func, args, kwargs)
    by_set = {}
    for arg in func._schema.arguments:
        if arg.alias_info is not None:
            for name in arg.alias_info.before_set:
                by_set[name] = bound.get(arg.name)
    results = [by_set[next(iter(r.alias_info.before_set))] for r in func._schema.returns]
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)
