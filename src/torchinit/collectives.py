"""Collectives with Lightning Fabric's semantics (`all_reduce`, `all_gather`, `broadcast`, `barrier`,
`rank_zero_first`): numbers become tensors on the device, collections are reduced element by element, tensors are
reduced in place, and with one process nothing is sent."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from torchinit.core.compat import tree_map
from torchinit.core.errors import ConfigurationError

__all__ = ["all_gather", "all_reduce", "barrier", "broadcast", "rank_zero_first", "to_tensors"]

REDUCE_OPS = ("sum", "mean", "avg", "max", "min", "product")


def running() -> bool:
    return dist.is_available() and dist.is_initialized()


def to_tensors(data: Any, device: torch.device) -> Any:
    """Numbers become tensors, every tensor moves to `device` (Lightning's `convert_to_tensors`)."""
    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return torch.tensor(x, device=device)
        return x
    return tree_map(convert, data)


def _check_op(reduce_op: Any) -> None:
    if isinstance(reduce_op, str) and reduce_op.lower() not in REDUCE_OPS:
        raise ConfigurationError(f"reduce_op={reduce_op!r} is not supported: use one of {', '.join(REDUCE_OPS)} or "
                                 "a torch.distributed.ReduceOp.")


def _op(reduce_op: Any, group: Any) -> tuple[Any, bool]:
    """(the ReduceOp, whether to divide by the world size after a sum: gloo has no AVG)."""
    if not isinstance(reduce_op, str):
        return reduce_op, False
    name = reduce_op.lower()
    if name in ("mean", "avg"):
        if dist.get_backend(group) == "gloo":
            return dist.ReduceOp.SUM, True
        return dist.ReduceOp.AVG, False
    return getattr(dist.ReduceOp, name.upper()), False


def _reduce_one(tensor: torch.Tensor, group: Any, reduce_op: Any) -> torch.Tensor:
    op, divide = _op(reduce_op, group)
    dist.all_reduce(tensor, op=op, group=group)
    if not divide:
        return tensor
    size = dist.get_world_size(group)
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor.div_(size)
    return tensor.copy_(tensor / size)  # in place, as Lightning: integers keep their dtype (truncated)


def all_reduce(data: Any, device: torch.device, group: Any = None, reduce_op: Any = "mean") -> Any:
    """Every tensor in `data` reduced over the processes (default: the mean), in place; numbers become tensors."""
    _check_op(reduce_op)
    data = to_tensors(data, device)
    if not running():
        return data
    return tree_map(lambda t: _reduce_one(t, group, reduce_op) if isinstance(t, torch.Tensor) else t, data)


def _gather_one(tensor: torch.Tensor, group: Any, sync_grads: bool) -> torch.Tensor:
    tensor = tensor.contiguous()
    if sync_grads:
        from torch.distributed.nn.functional import all_gather as gather_with_grads

        with warnings.catch_warnings():  # deprecated in favour of a private API; Lightning uses it too
            warnings.simplefilter("ignore", FutureWarning)
            return torch.stack(gather_with_grads(tensor, group=group or dist.group.WORLD))
    with torch.no_grad():
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor, group=group)
    return torch.stack(parts)


def all_gather(data: Any, device: torch.device, group: Any = None, sync_grads: bool = False) -> Any:
    """Every tensor in `data` gathered from all processes: shape (world_size, *shape); with one process, as it is.
    `sync_grads=True`: the gathered tensors keep the autograd graph (gradients flow back to each rank's input)."""
    data = to_tensors(data, device)
    if not running() or dist.get_world_size(group) == 1:
        return data
    return tree_map(lambda t: _gather_one(t, group, sync_grads) if isinstance(t, torch.Tensor) else t, data)


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src`, in every process (any picklable object)."""
    if not running():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(device: torch.device) -> None:
    """Wait until every process gets here (nccl is told this process's GPU)."""
    if not running():
        return
    if dist.get_backend() == "nccl" and device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first(rank: int, device: torch.device) -> Iterator[None]:
    """Rank 0 (of the job, or `rank` as the caller counts it: local) runs the block first; the others wait for it,
    then run it together."""
    if rank > 0:
        barrier(device)
    try:
        yield
    finally:  # also when the block fails: the others are not left waiting (they run it and see for themselves)
        if rank == 0:
            barrier(device)
