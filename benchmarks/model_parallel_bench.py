"""Benchmark tensor parallel x FSDP2 set-up: torchinit.ModelParallelStrategy against Lightning's
ModelParallelStrategy (when installed), same model (the bundled Llama), same mesh, same parallelize_fn.

Each case runs in fresh processes (one per rank, torchrun-style environment, gloo on CPU / nccl on CUDA). Per rank:
seconds of `init_module()` + model construction + `setup()`, and the peak memory growth during it (host RSS; on
CUDA the device peak). Then, on rank 0, against the eager model (`manual_seed(s); Llama(cfg).to(dtype)`): whether
the gathered parameters and buffers are bit-for-bit eager's, whether the tie survived, and whether forward on
fixed ids matches eager's (largest difference over the largest logit: under 1e-4 in fp32, 5e-2 in bf16).

    python benchmarks/model_parallel_bench.py --size tiny --dp 2 --tp 2
    python benchmarks/model_parallel_bench.py --size 0.3b --dp 1 --tp 2 --dtype bf16

Lightning's row is printed when `lightning.fabric` or `lightning_fabric` imports (with lightning_utilities).
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import time

import psutil
import torch
import torch.multiprocessing as mp

from torchinit.launch import free_port
from torchinit.models import Llama, config_for
from torchinit.models.llama import parallelize

MiB = 2**20
SEED = 0
PRECISIONS = {"fp32": ("32-true", torch.float32), "bf16": ("bf16-true", torch.bfloat16)}


def _fabric(lib: str, args):
    precision = PRECISIONS[args.dtype][0]
    if lib == "torchinit":
        import torchinit

        strategy = torchinit.ModelParallelStrategy(parallelize, args.dp, args.tp)
        return torchinit.Fabric(accelerator=args.device, devices=args.dp * args.tp, strategy=strategy,
                                precision=precision)
    Fabric, ModelParallelStrategy = _lightning()
    strategy = ModelParallelStrategy(parallelize, data_parallel_size=args.dp, tensor_parallel_size=args.tp)
    return Fabric(accelerator=args.device, devices=args.dp * args.tp, strategy=strategy, precision=precision)


def _lightning():
    """Lightning Fabric's classes: from `lightning` or the standalone `lightning_fabric` (same code; `lightning`
    imports its Trainer's dependencies too, torchmetrics and torchvision), or None when neither imports."""
    for package in ("lightning.fabric", "lightning_fabric"):
        try:
            module = importlib.import_module(package)
            return module.Fabric, importlib.import_module(f"{package}.strategies").ModelParallelStrategy
        except (ImportError, RuntimeError):  # torchvision built for another torch raises RuntimeError
            continue
    return None


def _rank(rank: int, lib: str, args, port: int, results) -> None:
    world = args.dp * args.tp
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", GROUP_RANK="0", LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fabric = _fabric(lib, args)
    fabric.launch()
    cuda = fabric.device.type == "cuda"
    cfg = config_for(args.size)
    base = psutil.Process().memory_info().rss
    torch.distributed.barrier()
    start = time.perf_counter()
    torch.manual_seed(SEED)
    with fabric.init_module(empty_init=lib == "lightning"):  # Lightning's documented use: meta, then reset
        model = Llama(cfg)
    model = fabric.setup(model)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grown = (torch.cuda.max_memory_allocated() if cuda else max(0, _peak_rss() - base)) / MiB
    inner = model.module
    full = {n: p.full_tensor().cpu() for n, p in inner.named_parameters()}
    buffers = {n: b.cpu() for n, b in inner.named_buffers()}
    tied = inner.lm_head.weight is inner.embed.weight
    ids = (torch.arange(64).reshape(2, 32) * 7) % cfg.vocab_size
    with torch.no_grad():
        logits = model(ids.to(fabric.device)).float().cpu()
    numbers = [None] * world
    torch.distributed.all_gather_object(numbers, (seconds, grown))
    if rank == 0:
        results.put(_compare(cfg, args, full, buffers, tied, logits, ids, numbers))
    torch.distributed.barrier()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _compare(cfg, args, full, buffers, tied, logits, ids, numbers) -> dict:
    dtype = PRECISIONS[args.dtype][1]
    torch.manual_seed(SEED)
    eager = Llama(cfg).to(dtype)
    exact = all(torch.equal(full[n], p) for n, p in eager.named_parameters())
    buffers_exact = all(torch.equal(buffers[n], b) for n, b in eager.named_buffers())
    with torch.no_grad():
        want = eager(ids).float()
    relative = float((logits - want).abs().max() / want.abs().max())  # NaN for NaN logits
    close = relative < (1e-4 if dtype == torch.float32 else 5e-2)  # reductions are reordered across ranks
    return {"seconds": max(s for s, _ in numbers), "peak_mib": max(m for _, m in numbers), "exact": exact,
            "buffers": buffers_exact, "tied": tied, "forward": close, "relative": relative}


def run_case(lib: str, args) -> dict:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_rank, args=(lib, args, free_port(), results), nprocs=args.dp * args.tp,
                       start_method="spawn")
    return results.get()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    libs = ["torchinit"] + (["lightning"] if _lightning() else [])
    print(f"Llama {args.size}, {args.dtype}, mesh {args.dp}x{args.tp} (data x tensor parallel), {args.device}")
    print(f"{'':<10} {'setup s':>8} {'peak MiB/rank':>14} {'values exact':>13} {'buffers':>8} {'tied':>5} "
          f"{'forward ok':>11} {'max diff/max':>13}")
    for lib in libs:
        r = run_case(lib, args)
        print(f"{lib:<10} {r['seconds']:>8.2f} {r['peak_mib']:>14.1f} {str(r['exact']):>13} {str(r['buffers']):>8} "
              f"{str(r['tied']):>5} {str(r['forward']):>11} {r['relative']:>13.2e}")


if __name__ == "__main__":
    main()
