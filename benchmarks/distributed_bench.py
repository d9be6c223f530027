"""Benchmark sharded set-up: per-rank peak memory and time of init_module + setup with FSDP, against building the
full model first, and against single-process meta materialization.

Each case is one `Fabric(...).launch(fn)` (fresh processes). Per rank it reports the wall time of construction +
setup and the peak RSS growth during it (host memory; on CUDA the device peak). The target line is
model / world + the largest wrap unit + 10 %.

    python benchmarks/distributed_bench.py --size 1b --devices 2
    python benchmarks/distributed_bench.py --size 7b --device cuda --devices 1
    python benchmarks/distributed_bench.py --larger-than-the-machine [--layers 26 --world 8]

The last is one rank of a model larger than this machine: rank 0 of 8 under the fake process group (the others'
collectives do nothing), 26 x nn.Linear(16384, 16384) in fp32 = 26 GiB, set up with FSDP from
init_module(empty_init=True); its peak RSS next to the goal "shards + largest full tensor + 10 %".
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time

import psutil
import torch
from common import emit

import torchinit
from torchinit.demo import DTYPES, SIZES, resolve_device, run_isolated
from torchinit.models import Llama, config_for, num_parameters

MiB = 2**20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(fabric, build) -> dict:
    """Time and peak memory growth of `build()` on this rank; returns every rank's numbers."""
    cuda = fabric.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = psutil.Process().memory_info().rss
    fabric.barrier()
    start = time.perf_counter()
    model = build()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grown = max(0, _peak_rss() - base) / MiB
    device = torch.cuda.max_memory_allocated() / MiB if cuda else None
    shard_mib = sum(_local(p).numel() * p.element_size() for p in model.parameters()) / MiB
    out = [None] * fabric.world_size
    torch.distributed.all_gather_object(out, (seconds, grown, device, shard_mib))
    return out


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part: an FSDP shard, a ZeRO-3 partition, or the whole tensor."""
    return p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)


def torchinit_fsdp(fabric, size: str):
    """The sharded path (FSDP or ZeRO-3, as the fabric says): nothing is built in full."""
    def build():
        with fabric.init_module(empty_init=True):
            model = Llama(config_for(size))
        return fabric.setup(model)
    return _measure(fabric, build)


def full_model_first(fabric, size: str):
    """What happens without init_module: every rank builds the whole model, then shards it."""
    def build():
        torch.manual_seed(0)
        with torch.device(fabric.device):
            model = Llama(config_for(size)).to(fabric.plan.param_dtype)
        return fabric.setup(model)
    return _measure(fabric, build)


def single_process_materialize(size: str, device: str, precision: str) -> float:
    """The reference: one process, meta construction + materialize, best of two (the first pays warm-up)."""
    dtype, times = DTYPES[precision], []
    for _ in range(2):
        start = time.perf_counter()
        with torchinit.InitContext(device, dtype, meta=True):
            model = Llama(config_for(size))
        torchinit.materialize(model, device, dtype)
        times.append(time.perf_counter() - start)
        del model
    return min(times)


def _largest_unit_mib(size: str, dtype: torch.dtype) -> float:
    with torch.device("meta"):
        model = Llama(config_for(size))
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("layers."))
    return max(block, root) * dtype.itemsize / MiB


def one_rank_of_a_model_larger_than_the_machine(layers: int, world: int) -> dict:
    """Rank 0 of `world` (fake process group): FSDP setup of `layers` x Linear(16384, 16384) fp32 from
    init_module(empty_init=True) (the default record path: each rank replays each full weight once)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchinit.launch import Ranks

    fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=world, precision="32-true", seed=0)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    fabric._ranks, fabric._launched = Ranks(0, 0, 0, world), True
    with fabric.init_module(empty_init=True):
        model = torch.nn.Sequential(*[torch.nn.Linear(16384, 16384, bias=False) for _ in range(layers)])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    model = fabric.setup(model)
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    shards = sum(p.to_local().nbytes for p in model.parameters())
    dist.destroy_process_group()
    return {"seconds": seconds, "peak": peak - base, "shards": shards, "full": 16384 * 16384 * 4,
            "model": layers * 16384 * 16384 * 4}


def _larger_than_the_machine(layers: int, world: int) -> int:
    GiB = 2**30
    r = run_isolated(one_rank_of_a_model_larger_than_the_machine, layers, world)
    goal = (r["shards"] + r["full"]) * 1.1
    print(f"FSDP rank 0 of {world}: {layers} x Linear(16384, 16384) fp32 = {r['model'] / GiB:.2f} GiB "
          f"(this machine: {psutil.virtual_memory().total / GiB:.1f} GiB)")
    print(f"{'setup s':>8}{'shards GiB':>12}{'peak RSS +GiB':>15}{'goal GiB':>10}{'/ goal':>8}")
    print(f"{r['seconds']:>8.1f}{r['shards'] / GiB:>12.2f}{r['peak'] / GiB:>15.2f}{goal / GiB:>10.2f}"
          f"{r['peak'] / goal:>7.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="torchinit-fsdp,torchinit-zero3,full-first")
    parser.add_argument("--larger-than-the-machine", action="store_true")
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--size", default="1b", choices=SIZES)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="bf16-true", choices=list(DTYPES))
    args = parser.parse_args(argv)
    if args.larger_than_the_machine:
        return _larger_than_the_machine(args.layers, args.world)
    device, dtype = resolve_device(args.device), DTYPES[args.precision]
    model_mib = num_parameters(config_for(args.size)) * dtype.itemsize / MiB
    unit_mib = _largest_unit_mib(args.size, dtype)
    target = (model_mib / args.devices + unit_mib) * 1.1
    print(f"Llama {args.size}: {model_mib:,.0f} MiB in {args.precision}; {args.devices} rank(s) on {device}; "
          f"largest wrap unit {unit_mib:,.0f} MiB; per-rank target {target:,.0f} MiB", flush=True)

    reference = run_isolated(single_process_materialize, args.size, device, args.precision)
    print(f"single-process meta + materialize: {reference:.2f} s", flush=True)
    rows, keys = {}, {}
    for key, name, strategy, fn in (
        ("torchinit-fsdp", "torchinit FSDP init_module(empty_init) + setup", "fsdp", torchinit_fsdp),
        ("torchinit-zero3", "torchinit ZeRO-3 init_module(empty_init) + setup", "deepspeed_stage_3", torchinit_fsdp),
        ("full-first", "full model first, then FSDP setup", "fsdp", full_model_first),
    ):
        if key not in args.cases.split(","):
            continue
        keys[name] = key
        if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            print(f"skipped {name}: deepspeed is not installed")
            continue
        print(f"{name} ...", flush=True)
        fabric = torchinit.Fabric(accelerator=device, strategy=strategy, devices=args.devices,
                                  precision=args.precision, seed=0)
        rows[name] = fabric.launch(fn, args.size)

    emit([{"key": keys[name], "case": f"{name} (rank 0)", "seconds": ranks[0][0], "rss_mib": ranks[0][1],
           "device_mib": ranks[0][2]} for name, ranks in rows.items()])
    print()
    print(f"{'case':<50}{'rank':>5}{'s':>9}{'/ 1-proc':>10}{'peak MiB':>11}{'/ target':>10}{'dev MiB':>10}"
          f"{'shard MiB':>11}")
    for name, ranks in rows.items():
        for rank, (seconds, grown, dev, shard) in enumerate(ranks):
            peak = dev if dev is not None else grown
            print(f"{name:<50}{rank:>5}{seconds:>9.2f}{seconds / reference:>9.2f}x{grown:>11,.0f}"
                  f"{peak / target:>9.2f}x{'-' if dev is None else f'{dev:,.0f}':>10}{shard:>11,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
