"""Sharded strategies budget what THIS rank holds (its shards plus one full tensor of the replay), not the
model's global size: a model larger than the machine fits as long as its shards do (issue 11, part 1)."""

import subprocess
import sys
import textwrap

import pytest

GiB = 2**30

# Rank 0 of 8 under the fake process group: 26 x (16384 x 16384) fp32 = 26 GiB, more than this machine (24 GiB).
# A constant init (a fill) keeps the test fast; its replay still computes each full 1 GiB tensor once.
SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import torchinit

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.full((16384, 16384), 0.5))

    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

    def peak():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

    world, layers = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=world, precision="32-true")
    fabric.launch()  # joins the group made above
    with fabric.init_module(empty_init=True):
        model = nn.Sequential(*[Wide() for _ in range(layers)])
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM starts again from the current RSS
    before = rss()
    try:
        model = fabric.setup(model)
    except torchinit.InsufficientMemoryError as exc:
        print(json.dumps({"refused": str(exc), "grew": rss() - before}))
        sys.exit(0)
    local = [p.to_local() for p in model.parameters()]
    print(json.dumps({"local": sum(t.nbytes for t in local), "peak": peak() - before,
                      "values": all(bool((t == 0.5).all()) for t in local)}))
""")


def _run(world: int, layers: int) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", SCRIPT, str(world), str(layers)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_takes_a_model_larger_than_the_machine_when_its_shards_fit():
    got = _run(world=8, layers=26)
    assert got["local"] == 26 * GiB // 8 and got["values"]
    # shards + the largest full tensor a replay computes + 10 %
    assert got["peak"] <= (26 * GiB // 8 + GiB) * 1.1, got["peak"] / GiB


def test_fsdp_refuses_before_allocating_when_the_shards_do_not_fit():
    import psutil

    # the shards of 2 ranks (+ one full tensor, less its own half) are more than this machine has
    layers = int(psutil.virtual_memory().total // GiB) * 2 + 2
    got = _run(world=2, layers=layers)
    assert f"needs {layers / 2 + 0.5:.2f} GiB on cpu" in got["refused"], got["refused"]
    assert got["grew"] < 256 * 2**20


@pytest.mark.parametrize("world", [2, 4])
def test_the_budget_and_the_report_count_the_ranks_local_bytes(world):
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.conftest import on_fake_ranks
    from torchinit import materialize
    from torchinit.materialize.memory import Need, budget, local_nbytes, work_nbytes
    from torchinit.record.recording import records_of

    def rank_view(fabric):
        with fabric.init_module(empty_init=True):
            model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 30))
        recorded, before = records_of(model), dict(model.named_parameters())
        fully_shard(model, mesh=init_device_mesh("cpu", (fabric.world_size,)))
        for name, p in model.named_parameters():
            recorded.rebind(before[name], p)
        needs = [Need(n, torch.device("cpu"), local_nbytes(p, torch.bfloat16), work_nbytes(p, torch.bfloat16))
                 for n, p in model.named_parameters()]
        planned = budget(needs)[torch.device("cpu")]
        report = materialize(model, "cpu", torch.bfloat16, recorded=recorded)
        held = sum(p.to_local().nbytes for p in model.parameters())
        return planned, report.allocated_bytes, held, sum(local_nbytes(p) for p in model.parameters())

    for planned, allocated, held, local in on_fake_ranks(world, rank_view):
        assert allocated == held == local < (64 * 32 + 32 + 32 * 30 + 30) * 2
        assert planned == held + 64 * 32 * 4 - (64 * 32 * 2) // world  # + the fp32 64x32 weight, less its own rows
