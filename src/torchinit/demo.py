"""``torchinit demo``: build the same Llama three ways and compare cost and results side by side.

(a) naive: seeded fp32 build on CPU, then ``.to(device).to(dtype)``, the way most code does it;
(b) ``Fabric.init_module()``: same values, built directly on the device in the dtype;
(c) ``Fabric.init_module(empty_init=True)`` + ``load_state_dict`` of the reference's checkpoint, memory-mapped.
(b) and (c) are compared with the eager model built on the device (on the CPU that is (a) itself).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import psutil
import torch

import torchinit
from torchinit.models import Llama, LlamaConfig, config_for, num_parameters

MiB = 2**20
DTYPES = {
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "32-true": torch.float32,
    "64-true": torch.float64,
}
VARIANTS = {
    "naive": "naive: fp32 on CPU, .to(device), .to(dtype)",
    "init_module": "torchinit init_module()",
    "empty_load": "init_module(empty_init=True) + load",
}
SIZES = ["tiny", "0.3b", "1b", "7b"]
T = TypeVar("T")
Result = dict[str, float | None]


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def run_isolated(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` in a fresh spawned interpreter: peak RSS is a per-process high-water mark, so
    each measured case needs a process of its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


class Probe:
    """Measures one process: the best time of its ``timed()`` blocks, and the peak host RSS and device
    memory above the baseline taken at construction, so imports and the CUDA context are not counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._device_base = 0
        if device.type == "cuda":
            torch.zeros(1, device=device)  # create the CUDA context before the baseline
            torch.cuda.reset_peak_memory_stats(device)
            self._device_base = torch.cuda.memory_allocated(device)
        self.rss_base = psutil.Process().memory_info().rss

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def timed(self) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.times.append(time.perf_counter() - start)

    @property
    def seconds(self) -> float:
        return min(self.times)

    def result(self) -> Result:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        device_mib = None
        if self.device.type == "cuda":
            device_mib = (torch.cuda.max_memory_allocated(self.device) - self._device_base) / MiB
        rss_mib = max(0, peak_rss - self.rss_base) / MiB
        return {"seconds": self.seconds, "rss_mib": rss_mib, "device_mib": device_mib}


def fixed_input(cfg: LlamaConfig, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (1, 32), generator=generator).to(device)


def build_naive(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype) -> Llama:
    torch.manual_seed(0)
    return Llama(cfg).to(device).to(dtype)


def _run_variant(variant: str, size: str, device: str, precision: str, workdir: str) -> Result:
    cfg, dtype, checkpoint = config_for(size), DTYPES[precision], Path(workdir) / "naive.pt"
    # The naive variant never touches torchinit, so nothing torchinit does can leak into the reference.
    fabric = None if variant == "naive" else torchinit.Fabric(accelerator=device, precision=precision)
    target = fabric.device if fabric else torch.device(device)
    probe = Probe(target)
    with probe.timed():
        if fabric is None:
            model = build_naive(cfg, target, dtype)
        elif variant == "init_module":
            torch.manual_seed(0)
            with fabric.init_module():
                model = Llama(cfg)
        else:
            with fabric.init_module(empty_init=True):
                model = Llama(cfg)
            model.load_state_dict(torch.load(checkpoint, mmap=True, weights_only=True))
    result = probe.result()
    if variant == "naive":
        reference = model if target.type == "cpu" else build_eager(cfg, target, dtype)
        with torch.no_grad():
            torch.save(reference(fixed_input(cfg, target)).cpu(), Path(workdir) / "reference.logits.pt")
        print("      saving checkpoint for (c) ...", flush=True)
        torch.save(reference.state_dict(), checkpoint)
    with torch.no_grad():
        logits = model(fixed_input(cfg, target))
    torch.save(logits.cpu(), Path(workdir) / f"{variant}.logits.pt")
    return result


def build_eager(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype) -> Llama:
    """The reference for exactness: eager, seeded, built ON the device (CUDA draws other random numbers than the
    CPU, so the naive CPU build is not what `init_module()` on a GPU reproduces), then cast."""
    torch.manual_seed(0)
    with torch.device(device):
        return Llama(cfg).to(dtype)


def _compare(logits: torch.Tensor, reference: torch.Tensor) -> str:
    if torch.equal(logits, reference):
        return "exact"
    return f"DIFFERENT (max abs diff {(logits.float() - reference.float()).abs().max().item():.3g})"


def _format_row(cells: list[str]) -> str:
    return f"{cells[0]:<44}{cells[1]:>9}{cells[2]:>16}{cells[3]:>18}   {cells[4]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchinit demo", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, help="default: 1b on CUDA, 0.3b on CPU")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16-true", choices=list(DTYPES))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    size = args.size or ("1b" if device == "cuda" else "0.3b")

    params = num_parameters(config_for(size))
    print(f"Llama {size} ({params / 1e6:,.0f}M parameters), {args.precision} on {device}", flush=True)
    rows, exact = [], True
    with tempfile.TemporaryDirectory(prefix="torchinit-demo-") as workdir:
        for step, (variant, label) in enumerate(VARIANTS.items(), start=1):
            print(f"[{step}/{len(VARIANTS)}] {label} ...", flush=True)
            r = run_isolated(_run_variant, variant, size, device, args.precision, workdir)
            logits = torch.load(Path(workdir) / f"{variant}.logits.pt", weights_only=True)
            if variant == "naive":
                reference = torch.load(Path(workdir) / "reference.logits.pt", weights_only=True)
                verdict = "(reference)" if device == "cpu" else "(timing only: CPU random stream)"
            else:
                verdict = _compare(logits, reference)
                exact = exact and verdict == "exact"
            device_mib = "-" if r["device_mib"] is None else f"{r['device_mib']:,.0f}"
            rows.append([label, f"{r['seconds']:.2f}", f"{r['rss_mib']:,.0f}", device_mib, verdict])
            print(f"      done in {r['seconds']:.2f} s", flush=True)

    print()
    print(_format_row(["variant", "seconds", "peak RSS +MiB", "peak device MiB", "logits vs eager"]))
    for row in rows:
        print(_format_row(row))
    print("RSS of the last row includes the memory-mapped checkpoint's pages (page cache, reclaimable).")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
