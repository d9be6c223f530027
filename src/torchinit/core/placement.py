"""A rank's part of a full tensor, for any DTensor placement (FSDP2's Shard(0), TP's Shard(0)/Shard(1)/Replicate
and their 2-D combinations, _StridedShard included), computed locally from the full value: no collectives.

`local_part` is what replay writes into a shard; `local_box` is where that part sits in the full tensor (per
dimension: start and length), which is what a checkpoint reader needs to read only those bytes.
"""

from __future__ import annotations

import torch

from torchinit.core import compat
from torchinit.core.errors import ConfigurationError

__all__ = ["is_distributed", "local_box", "local_part", "local_tensor"]


def is_distributed(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a sharded or replicated parameter of FSDP2 / tensor parallel)."""
    return hasattr(t, "placements") and hasattr(t, "device_mesh")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The memory this rank holds for `t`: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if is_distributed(t) else t


def _check(t: torch.Tensor) -> None:
    partial = [p for p in t.placements if p.is_partial()]
    if partial:
        raise ConfigurationError(f"a DTensor with placements {t.placements} holds partial sums: no rank's part is a "
                                 "slice of the full value; use Shard or Replicate placements for parameters.")


def _coordinate(target: torch.Tensor) -> list[int]:
    """This rank's index on each mesh dimension, found from its global rank in the mesh's rank layout (not from
    the mesh object's own rank: the fake process group runs several ranks in one process, and DTensor caches
    specs by mesh equality, which ignores the rank)."""
    import torch.distributed as dist

    layout = target.device_mesh.mesh
    found = (layout == dist.get_rank()).nonzero()
    if found.shape[0] != 1:
        raise ConfigurationError(f"rank {dist.get_rank()} is not in the DTensor's device mesh {layout.tolist()}: "
                                 "only the ranks of its mesh can fill or read it; shard it on a mesh of every rank.")
    return found[0].tolist()


def local_part(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full `value` laid out as `target` (a DTensor) is: mesh dimension by mesh dimension,
    each Shard/_StridedShard split as `distribute_tensor` splits it (torch.chunk layout), Replicate kept whole."""
    _check(target)
    if tuple(value.shape) != tuple(target.shape):
        raise ConfigurationError(f"the full value has shape {tuple(value.shape)}, the DTensor {tuple(target.shape)}: "
                                 "give the full tensor of the DTensor's global shape.")
    mesh, local = target.device_mesh, value.detach()
    for d, (placement, index) in enumerate(zip(target.placements, _coordinate(target), strict=True)):
        if isinstance(placement, compat.shard_placements()):
            local = compat.split_part(placement, local, mesh.size(d), index)
    return local


def local_box(target: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """(start, length) per dimension of this rank's part of `target` (a DTensor) in the full tensor: one block
    (a shard of a shard of one dimension, in either order, is one run of rows)."""
    _check(target)
    computed = compat.local_shape_and_offset(target, _coordinate(target))
    if computed is None:  # torch < 2.9: read the box off the split itself
        return _box_from_indices(target)
    shape, offset = computed
    if tuple(shape) != tuple(target.to_local().shape):
        raise ConfigurationError(f"cannot place this rank's part of a DTensor with placements {target.placements}: its "
                                 f"local shape {tuple(target.to_local().shape)} is not the computed {tuple(shape)}.")
    return tuple(zip(offset, shape, strict=True))


def _box_from_indices(target: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """`local_box` from `local_part` of index grids, one dimension at a time (expanded views: no memory)."""
    box = []
    local = target.to_local().shape
    for d, n in enumerate(target.shape):
        if target.to_local().numel() == 0:  # nothing to read indices off: an empty block at the end, as torch's
            if local[d] not in (0, n):
                raise ConfigurationError(f"this rank holds no element of a DTensor with placements "
                                         f"{target.placements}, yet {local[d]} of {n} along dimension {d}: its box "
                                         "cannot be placed before torch 2.9; use Shard or Replicate on one dimension.")
            box.append((n, 0) if local[d] == 0 else (0, n))
            continue
        shape = [1] * len(target.shape)
        shape[d] = n
        part = local_part(target, torch.arange(n).view(shape).expand(target.shape))
        indices = part[tuple(slice(None) if e == d else 0 for e in range(len(target.shape)))]
        start = int(indices[0]) if len(indices) else 0
        if not torch.equal(indices, torch.arange(start, start + len(indices))):
            raise ConfigurationError(f"this rank's part of a DTensor with placements {target.placements} is not one "
                                     "block, which reading only this rank's bytes needs: use Shard or Replicate "
                                     "placements.")
        box.append((start, len(indices)))
    return tuple(box)
