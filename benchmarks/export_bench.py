"""Benchmark exporting a sharded (FSDP2) model as safetensors: torchinit's `fabric.save(format="safetensors")`, where
every rank writes its own rows into the final files, against gathering to rank 0
(`get_model_state_dict(full_state_dict=True, cpu_offload=True)` + `safetensors.torch.save_file`).

Each case is one `Fabric(...).launch(fn)` (fresh processes) that builds the model with empty init, sets it up and
saves it once. Per rank: the save's wall time and its peak RSS growth over the RSS before the save (sampled every
millisecond; on CUDA the device peak too). Output goes to a temporary folder on the same disk unless --out is given.

    python benchmarks/export_bench.py --size 0.3b --devices 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

import torchinit
from torchinit.demo import DTYPES, SIZES
from torchinit.models import Llama, config_for, num_parameters

MiB = 2**20


class _PeakRss:
    """The largest RSS of this process while inside the `with`, sampled on a thread."""

    def __enter__(self):
        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.grown = max(0, self.peak - self.base)


def _gather_to_rank_zero(fabric, model, path: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if fabric.is_global_zero:
        seen, tensors = set(), {}
        for key, value in state.items():  # tied tensors once, as the export does
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                tensors[key] = value.contiguous()
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    fabric.barrier()


def run(fabric, size: str, case: str, out: str):
    with fabric.init_module(empty_init=True):
        module = Llama(config_for(size))
    model = fabric.setup(module)
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    path = Path(out) / case
    cuda = fabric.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fabric.barrier()
    start = time.perf_counter()
    with _PeakRss() as peak:
        if case == "torchinit":
            fabric.save(path, {"model": model}, format="safetensors")
        else:
            _gather_to_rank_zero(fabric, model, path)
    seconds = time.perf_counter() - start
    device = torch.cuda.max_memory_allocated() / MiB if cuda else None
    result = [None] * fabric.world_size
    torch.distributed.all_gather_object(result, (seconds, peak.grown / MiB, device, shard / MiB))
    if fabric.is_global_zero:
        shutil.rmtree(path, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.3b", choices=SIZES)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="bf16-true", choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="a folder for the exports (default: a temporary one)")
    args = parser.parse_args(argv)
    params = num_parameters(config_for(args.size))
    model_mib = params * DTYPES[args.precision].itemsize / MiB
    print(f"Llama {args.size}: {params / 1e6:,.0f}M parameters, {model_mib:,.0f} MiB in {args.precision}; FSDP2 on "
          f"{args.devices} {args.accelerator} rank(s), torch {torch.__version__}", flush=True)
    out = Path(args.out or tempfile.mkdtemp(prefix="export_bench-"))
    results = {}
    for case in ("torchinit", "gather"):
        fabric = torchinit.Fabric(accelerator=args.accelerator, strategy="fsdp", devices=args.devices,
                                  precision=args.precision, seed=0)
        results[case] = fabric.launch(run, args.size, case, str(out))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{'case':<34}{'seconds':>9}  per-rank peak RSS growth MiB (shard MiB)")
    labels = {"torchinit": "torchinit: every rank writes", "gather": "gather to rank 0 + save_file"}
    for case, ranks in results.items():
        seconds = max(r[0] for r in ranks)
        memory = ", ".join(f"{r[1]:,.0f} ({r[3]:,.0f})" for r in ranks)
        print(f"{labels[case]:<34}{seconds:>9.2f}  {memory}")
    ours, theirs = results["torchinit"], results["gather"]
    time_ratio = max(r[0] for r in theirs) / max(max(r[0] for r in ours), 1e-9)
    ours_mib, theirs_mib = max(r[1] for r in ours), max(r[1] for r in theirs)
    print(f"\ngather / torchinit: {time_ratio:.2f}x the time; largest rank's peak memory growth {theirs_mib:,.0f} MiB "
          f"against {ours_mib:,.0f} MiB ({theirs_mib / max(ours_mib, 1):,.0f}x; the model is {model_mib:,.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
