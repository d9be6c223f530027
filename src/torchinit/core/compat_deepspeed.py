"""DeepSpeed's ZeRO-3 parameter internals, read in one place.

`deepspeed.zero.Init` (and `zero.Init(module=...)`) turns each parameter into an empty tensor that carries its
partition and bookkeeping as attributes (`ds_id`, `ds_shape`, `ds_numel`, `ds_tensor`, `ds_process_group`,
`ds_status`) and methods (`partition_numel`, `partition`). None of them is a public API; the names here are those
of DeepSpeed 0.19.8 (`deepspeed/runtime/zero/partition_parameters.py`, `Init._convert_to_deepspeed_param`), the
version the tests run. Nothing is gated by version: no other version is tested. This module never imports
deepspeed at import time (only `zero3_gathered` does, when called), so it costs nothing where DeepSpeed is absent.
"""

from __future__ import annotations

import torch

__all__ = ["full_shape", "is_zero3_param", "zero3_gathered", "zero3_group", "zero3_local", "zero3_numel",
           "zero3_partition_range", "zero3_release"]


def is_zero3_param(t: object) -> bool:
    """Whether `t` is a ZeRO-3 partitioned parameter (its own data empty, its elements in `zero3_local`)."""
    return hasattr(t, "ds_id")


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The full shape of `t`, also of a ZeRO-3 partitioned parameter (whose own shape is empty)."""
    return tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)


def zero3_numel(p: torch.Tensor) -> int:
    """The number of elements of the full (unpartitioned) parameter."""
    return p.ds_numel


def zero3_local(p: torch.Tensor) -> torch.Tensor:
    """This rank's partition of `p`: a flat tensor of `p.partition_numel()` elements, the last rank's padded."""
    return p.ds_tensor


def zero3_group(p: torch.Tensor):
    """The process group `p` is partitioned over."""
    return p.ds_process_group


def zero3_partition_range(p: torch.Tensor) -> tuple[int, int]:
    """This rank's elements [start, end) of the flattened parameter, as DeepSpeed partitions: the flattened
    tensor cut into `partition_numel()` pieces, one per rank, the last one padded (so [start, end) may be shorter
    than the partition, or empty). The strategy writes its init through it; checkpoint/ (partitions.py,
    export.py) reads and writes partitions through it."""
    size = p.partition_numel()
    start = min(size * torch.distributed.get_rank(zero3_group(p)), zero3_numel(p))
    return start, min(start + size, zero3_numel(p))


def zero3_gathered(p: torch.Tensor) -> bool:
    """Whether a full copy of `p` is gathered now (a forward left it so, or it is being fetched)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status != ZeroParamStatus.NOT_AVAILABLE


def zero3_release(params: list[torch.Tensor]) -> None:
    """Free the gathered full copies of `params` (partitioning them again; the partitions are kept)."""
    if params:
        params[0].partition(params)
