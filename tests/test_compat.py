"""core/compat.py (every private torch API torchinit uses) and core/compat_deepspeed.py (DeepSpeed's ZeRO-3
parameter attributes), function by function. CI runs this file on the declared torch floor too (.ci/run's floor
smoke), so each version gate is tested on both sides: torch 2.7 takes the fallbacks, the pin the newer APIs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from torchinit.core import compat
from torchinit.core.compat_deepspeed import (
    full_shape,
    is_zero3_param,
    zero3_group,
    zero3_local,
    zero3_numel,
    zero3_partition_range,
)
from torchinit.core.placement import local_box


@pytest.fixture
def fake_ranks():
    """Run a body once per rank of a `world`-rank fake process group (collectives do nothing)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def each(world: int):
        for rank in range(world):
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            try:
                yield rank
            finally:
                dist.destroy_process_group()

    yield each
    if dist.is_initialized():  # a failed body left its rank's group open
        dist.destroy_process_group()


def test_torch_version_is_the_installed_one():
    assert compat.TORCH_VERSION == tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def test_tree_map_and_leaves():
    tree = {"a": [1, 2], "b": (3, {"c": 4})}
    assert compat.tree_leaves(tree) == [1, 2, 3, 4]
    assert compat.tree_map(lambda x: x * 10, tree) == {"a": [10, 20], "b": (30, {"c": 40})}


def test_is_op_overload():
    assert compat.is_op_overload(torch.ops.aten.add.Tensor)
    assert not compat.is_op_overload(torch.ops.aten.add)  # the packet, not an overload
    assert not compat.is_op_overload(torch.add)


def test_fake_tensors_and_unset_fake_temporarily():
    with compat.FakeTensorMode():
        fake = torch.ones(2, 3)
        with compat.unset_fake_temporarily():
            real = torch.ones(2)
    assert isinstance(fake, compat.FakeTensor) and tuple(fake.shape) == (2, 3)
    assert not isinstance(real, compat.FakeTensor) and real.tolist() == [1.0, 1.0]


def test_storage_id_is_shared_by_views_and_differs_between_storages():
    t = torch.zeros(4, 4)
    assert compat.storage_id(t) == compat.storage_id(t[1:]) == compat.storage_id(t.view(16)) == \
        compat.storage_id(t.t())
    assert compat.storage_id(t) != compat.storage_id(torch.zeros(4, 4))
    with compat.FakeTensorMode():
        f = torch.zeros(4, 4)
        assert compat.storage_id(f) == compat.storage_id(f[1:]) == compat.storage_id(f.view(16))
        assert compat.storage_id(f) != compat.storage_id(torch.zeros(4, 4))


def test_dispatch_mode_sees_ops_without_importing_dynamo():
    """A plain TorchDispatchMode imports torch._dynamo on first use on recent torch; DispatchMode never does.
    (Below torch 2.8 or so, importing torch.distributed.fsdp already imports torch._dynamo: nothing to save there.)"""
    code = (
        "import sys, torch, torch.distributed.fsdp\n"
        "already = 'torch._dynamo' in sys.modules\n"
        "import torchinit\n"
        "from torchinit.core.compat import DispatchMode\n"
        "seen = []\n"
        "class Mode(DispatchMode):\n"
        "    def __torch_dispatch__(self, func, types, args=(), kwargs=None):\n"
        "        seen.append(func)\n"
        "        return func(*args, **(kwargs or {}))\n"
        "with Mode():\n"
        "    torch.ones(3).add_(1)\n"
        "assert torch.ops.aten.add_.Tensor in seen, seen\n"
        "assert already or 'torch._dynamo' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shard_placements():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    kinds = compat.shard_placements()
    assert isinstance(Shard(0), kinds) and isinstance(_StridedShard(0, split_factor=2), kinds)
    assert not isinstance(Replicate(), kinds)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_split_part_is_torch_chunk_as_a_view(dim, parts):
    from torch.distributed.tensor import Shard

    t = torch.arange(35.0).view(7, 5)
    chunks = torch.chunk(t, parts, dim=dim)
    for index in range(parts):
        part = compat.split_part(Shard(dim), t, parts, index)
        want = chunks[index] if index < len(chunks) else t.narrow(dim, 0, 0)
        assert tuple(part.shape) == tuple(want.shape) and torch.equal(part, want)
        if part.numel():
            assert compat.storage_id(part) == compat.storage_id(t)  # a view: nothing copied


def _chunk_box(shape, mesh_shape, placements, coordinate):
    """The box of a Shard/Replicate layout from torch.chunk of index ranges (independent of torchinit)."""
    from torch.distributed.tensor import Shard

    indices = [torch.arange(n) for n in shape]
    for size, placement, index in zip(mesh_shape, placements, coordinate, strict=True):
        if isinstance(placement, Shard):
            chunks = torch.chunk(indices[placement.dim], size)
            indices[placement.dim] = chunks[index] if index < len(chunks) else indices[placement.dim][:0]
    return tuple((int(i[0]) if len(i) else 0, len(i)) for i in indices)


LAYOUTS = [  # (mesh shape, placements by name, tensor shape)
    ((2,), ("S0",), (7, 5)),
    ((2,), ("S1",), (7, 5)),
    ((3,), ("S0",), (2, 5)),  # more ranks than rows: the rank that holds nothing gets an empty block of rows
    ((2, 2), ("S0", "S1"), (7, 5)),
    ((2, 2), ("S0", "S0"), (7, 5)),
    ((2, 2), ("R", "S1"), (7, 5)),
    ((2, 2), ("SS0", "S0"), (7, 5)),  # FSDP2 over TP
    ((2, 2), ("SS0", "S0"), (8, 4)),
]


@pytest.mark.parametrize("mesh_shape, names, shape", LAYOUTS)
def test_local_shape_and_offset_matches_the_fallback_box(fake_ranks, monkeypatch, mesh_shape, names, shape):
    """Torch's own box (2.9 and later) is the one local_box reads off the split itself (the fallback, and the
    only path before 2.9, where local_shape_and_offset is None)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    make = {"S0": lambda: Shard(0), "S1": lambda: Shard(1), "R": Replicate,
            "SS0": lambda: _StridedShard(0, split_factor=2)}
    world = 1
    for n in mesh_shape:
        world *= n
    for rank in fake_ranks(world):
        mesh = init_device_mesh("cpu", mesh_shape)
        placements = [make[n]() for n in names]
        coordinate = (mesh.mesh == rank).nonzero()[0].tolist()
        full = torch.zeros(shape)
        if any(isinstance(p, _StridedShard) for p in placements):  # distribute_tensor cannot lay these out
            if compat.TORCH_VERSION < (2, 9) and shape[0] % world:  # nor can torch's own split before 2.9
                with pytest.raises(AssertionError, match="even sharding"):
                    compat.split_part(placements[0], full, mesh_shape[0], coordinate[0])
                return
            local = full
            for d, (p, index) in enumerate(zip(placements, coordinate, strict=True)):
                if isinstance(p, compat.shard_placements()):
                    local = compat.split_part(p, local, mesh_shape[d], index)
            t = DTensor.from_local(local.contiguous(), mesh, placements, shape=full.shape, stride=full.stride(),
                                   run_check=False)
            expected = None
        else:
            t = distribute_tensor(full, mesh, placements)
            expected = _chunk_box(shape, mesh_shape, placements, coordinate)
        computed = compat.local_shape_and_offset(t, coordinate)
        with monkeypatch.context() as m:
            m.setattr(compat, "local_shape_and_offset", lambda *args: None)
            fallback = local_box(t)
        if expected is not None and t.to_local().numel():
            assert fallback == expected
        elif expected is not None:  # torch.chunk starts an empty part anywhere; torch's box (and ours) at the end
            local_shape = t.to_local().shape
            assert fallback == tuple((n, 0) if n != m else (0, n) for n, m in zip(shape, local_shape, strict=True))
        assert tuple(n for _, n in fallback) == tuple(t.to_local().shape)
        if compat.TORCH_VERSION < (2, 9):
            assert computed is None
        else:
            local_shape, offset = computed
            assert tuple(zip(offset, local_shape, strict=True)) == fallback, (rank, names)
            assert local_box(t) == fallback


# ---- core/compat_deepspeed.py: the ZeRO-3 attribute readers, on stand-ins (DeepSpeed itself: test_deepspeed) ----

def _zero3_param(numel: int, shape: tuple[int, ...], partition: int) -> nn.Parameter:
    """A parameter dressed as `deepspeed.zero.Init` leaves one (the attributes of DeepSpeed 0.19.8)."""
    p = nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_shape, p.ds_numel, p.ds_process_group = 7, torch.Size(shape), numel, None
    p.ds_tensor = torch.zeros(partition)
    p.partition_numel = lambda: partition
    return p


def test_zero3_attribute_readers():
    p = _zero3_param(10, (2, 5), 4)
    plain = torch.zeros(2, 5)
    assert is_zero3_param(p) and not is_zero3_param(plain) and not is_zero3_param(None)
    assert full_shape(p) == (2, 5) and full_shape(plain) == (2, 5) and tuple(p.shape) == (0,)
    assert zero3_numel(p) == 10 and zero3_local(p) is p.ds_tensor and zero3_group(p) is None


def test_zero3_partition_range_cuts_as_deepspeed_does(fake_ranks):
    """10 elements over 3 ranks: partitions of ceil(10 / 3) = 4, the last one holding the 2 left (padded)."""
    ranges = [zero3_partition_range(_zero3_param(10, (2, 5), 4)) for _ in fake_ranks(3)]
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    assert [zero3_partition_range(_zero3_param(2, (2,), 1)) for _ in fake_ranks(3)] == [(0, 1), (1, 2), (2, 2)]
