"""Every private torch API torchinit uses, in one place, each gated by the torch version that has it.

torch's public API does not cover what an exact init needs: fake tensors (record mode), dispatch modes that see
every aten op, storage identity, and a DTensor's split math. Everything here is private to torch and may change
between releases, so each use is a named function here, tested on the declared floor (torch 2.7, CI's floor
smoke) and on the pinned version; the rest of torchinit imports none of torch's private modules.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.utils._pytree as _pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "TORCH_VERSION", "DispatchMode", "FakeTensor", "FakeTensorMode", "compiled_parts", "forget_fake_memos",
    "fsdp1_policy_targets", "is_fsdp1_policy",
    "is_op_overload", "local_shape_and_offset", "shard_placements", "split_part", "storage_id", "tree_leaves",
    "tree_map", "unset_fake_temporarily",
]

TORCH_VERSION: tuple[int, int] = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())

tree_map = _pytree.tree_map
tree_leaves = _pytree.tree_leaves


class DispatchMode(TorchDispatchMode):
    """A `TorchDispatchMode` that torch never wraps in `torch._disable_dynamo`: that wrapper imports all of
    torch._dynamo (sympy included) on first use, about 1 s and 75 MiB, for modes that are never compiled."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


def is_op_overload(func: Any) -> bool:
    """Whether `func` is an aten operator overload (what a dispatch mode receives), not a Python function."""
    return isinstance(func, torch._ops.OpOverload)


def forget_fake_memos(mode: FakeTensorMode) -> None:
    """Drop a finished fake mode's memos of its fake tensors (views, constants): they hold weak references to them,
    which `torch.utils.swap_tensors` refuses, so a fake that escaped could not be made real in place."""
    converter = mode.fake_tensor_converter
    for memo in (getattr(converter.meta_converter, "tensor_memo", None),
                 getattr(converter, "constant_storage_mapping", None)):
        if memo is not None:
            memo.clear()


def storage_id(t: torch.Tensor) -> int:
    """An id of `t`'s storage shared by every view of it (also for fake tensors, whose storages are
    distinct objects per access), valid while the storage lives."""
    return t.untyped_storage()._cdata


def shard_placements() -> tuple[type, ...]:
    """The DTensor placement types that split a dimension: `Shard` and FSDP2-over-TP's `_StridedShard` (whose
    `is_shard()` is False)."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    return Shard, _StridedShard


def split_part(placement: Any, tensor: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """Part `index` of `tensor` split into `parts` as `placement` splits it (torch.chunk layout), as a view."""
    if TORCH_VERSION >= (2, 9):
        return placement._select_split_tensor(tensor, parts, index, with_padding=False, contiguous=False, clone=False)
    return placement._split_tensor(tensor, parts, with_padding=False, contiguous=False)[0][index]


def local_shape_and_offset(target: Any, coordinate: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A DTensor's local shape and global offset at mesh `coordinate` as torch computes them; None before torch 2.9,
    whose helper has another signature (callers then derive the box from the split itself)."""
    if TORCH_VERSION < (2, 9):
        return None
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape, offset = _compute_local_shape_and_global_offset(target.shape, target.device_mesh.shape,
                                                           lambda d: coordinate[d], target.placements)
    return tuple(shape), tuple(offset)


def compiled_parts(module: Any) -> tuple[Any, Any]:
    """(the module inside, a function that compiles a module the same way) for a `torch.compile`d module, else
    (module, None). The compiled wrapper keeps its dynamo context (backend, mode, options), so compiling again
    needs no record of the arguments `torch.compile` was given."""
    import sys

    if "torch._dynamo" not in sys.modules:  # nothing was ever compiled (and importing dynamo costs a second)
        return module, None
    from torch._dynamo.eval_frame import OptimizedModule

    if not isinstance(module, OptimizedModule):
        return module, None
    context = module.dynamo_ctx
    return module._orig_mod, lambda inner: OptimizedModule(inner, context)


def is_fsdp1_policy(policy: Any) -> bool:
    """Whether `policy` is one of FSDP1's policy objects (`ModuleWrapPolicy`, `CustomPolicy`: `_Policy`s)."""
    from torch.distributed.fsdp.wrap import _Policy

    return isinstance(policy, _Policy)


def fsdp1_policy_targets(policy: Any, root: torch.nn.Module) -> dict[int, dict]:
    """{id(module): FSDP1 keyword overrides} for the modules an FSDP1 policy object picks under `root` (its
    `_run_policy`, which `FullyShardedDataParallel` calls the same way)."""
    return {id(module): kwargs for module, kwargs in policy._run_policy(root, set(), {}).items()}
