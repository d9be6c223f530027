"""Benchmark building a Llama: naive, torchinit, Lightning Fabric, accelerate, and the hardware floor.

Each case runs in its own spawned process, so peak RSS is that case's alone. The floors are what the
bytes cost at the least: one allocation of the model's size in the target dtype plus one ``normal_`` over
it (for cases that initialize), or the allocation alone (for empty-init cases).

    python benchmarks/init_bench.py --size 1b --device cuda --repeat 3
    python benchmarks/init_bench.py --size 0.3b --device cpu --repeat 0 --cases naive,torchinit,floor-init
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import itertools
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from common import emit, parse_args, run_all
from torch import nn

import torchinit
from torchinit.demo import DTYPES, Probe, build_eager, build_naive
from torchinit.models import Llama, LlamaConfig, config_for, num_parameters

CHEAP_SECONDS = 10.0  # a warm-up slower than this is the measurement; no repeats
_INT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
Build = Callable[[], object]


@dataclass(frozen=True)
class Case:
    label: str
    floor: str | None  # the floor case whose time this one is compared with
    compare: bool = False  # fingerprint its parameters and buffers against the naive model's
    needs: tuple[str, ...] = ()  # any one of these modules must be importable


LIGHTNING = ("lightning", "lightning_fabric")  # Lightning Fabric ships standalone and inside `lightning`
CASES = {
    "eager": Case("eager on the device (fp32, then cast): the reference", "floor-init", compare=True),
    "naive": Case("naive: fp32 on CPU, .to(device), .to(dtype)", "floor-init", compare=True),
    "torchinit": Case("torchinit init_module()", "floor-init", compare=True),
    "torchinit-empty": Case("torchinit init_module(empty_init=True)", "floor-alloc"),
    "torchinit-load": Case("torchinit empty_init + load_state_dict(mmap)", None, compare=True),
    "lightning": Case("Lightning Fabric init_module()", "floor-init", compare=True, needs=LIGHTNING),
    "lightning-empty": Case("Lightning Fabric init_module(empty_init=True)", "floor-alloc", needs=LIGHTNING),
    "accelerate-empty": Case("accelerate init_empty_weights + to_empty", "floor-alloc", needs=("accelerate",)),
    "floor-init": Case("floor: allocate + normal_", "floor-init"),
    "floor-alloc": Case("floor: allocate", "floor-alloc"),
}


def _lightning_fabric(device: torch.device, precision: str):
    if importlib.util.find_spec("lightning") is not None:
        from lightning.fabric import Fabric
    else:
        from lightning_fabric import Fabric
    return Fabric(accelerator=device.type, devices=1, precision=precision)


def _setup(case: str, cfg: LlamaConfig, device: torch.device, precision: str, checkpoint: Path) -> Build:
    """Untimed setup for a case; returns the build step that is timed."""
    dtype = DTYPES[precision]
    if case == "naive":
        return lambda: build_naive(cfg, device, dtype)
    if case == "eager":
        return lambda: build_eager(cfg, device, dtype)
    if case.startswith("floor"):
        numel = num_parameters(cfg)
        if case == "floor-alloc":
            return lambda: torch.empty(numel, dtype=dtype, device=device)
        return lambda: torch.empty(numel, dtype=dtype, device=device).normal_()
    if case == "accelerate-empty":
        from accelerate import init_empty_weights

        def build_accelerate() -> nn.Module:
            with init_empty_weights():
                model = Llama(cfg)
            return model.to(dtype).to_empty(device=device)

        return build_accelerate

    if case.startswith("lightning"):
        fabric = _lightning_fabric(device, precision)
    else:
        fabric = torchinit.Fabric(accelerator=device.type, precision=precision)
    empty_init = case in ("torchinit-empty", "torchinit-load", "lightning-empty")

    def build() -> nn.Module:
        torch.manual_seed(0)
        with fabric.init_module(empty_init=empty_init):
            model = Llama(cfg)
        if case == "torchinit-load":
            model.load_state_dict(torch.load(checkpoint, mmap=True, weights_only=True))
        return model

    return build


def checksum(model: nn.Module) -> str:
    """Fingerprint of the bits of every parameter and buffer, computed where the model lives, so that
    big models are compared without shipping them between processes."""
    digest = hashlib.sha256()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        bits = tensor.detach().view(_INT_VIEWS[tensor.element_size()]).sum(dtype=torch.int64).item()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{bits};".encode())
    return digest.hexdigest()[:12]


def _run_case(case: str, size: str, device: str, precision: str, repeat: int, workdir: str) -> dict:
    cfg, target, checkpoint = config_for(size), torch.device(device), Path(workdir) / "eager.pt"
    build = _setup(case, cfg, target, precision, checkpoint)
    importlib.import_module("torch._subclasses.fake_tensor").FakeTensorMode()  # its imports, once per process

    probe = Probe(target)
    with probe.timed():
        built = build()
    first, first_peak = probe.seconds, probe.result()["rss_mib"]  # a process building its model: the first build
    after_mib = max(0, psutil.Process().memory_info().rss - probe.rss_base) / 2**20  # the first build, still held
    tensors = [built] if isinstance(built, torch.Tensor) else [*built.parameters(), *built.buffers()]
    model_mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    if first < CHEAP_SECONDS and repeat > 0:
        probe.times.clear()  # that was the warm-up
        for _ in range(repeat):
            del built
            gc.collect()
            if target.type == "cuda":
                torch.cuda.empty_cache()  # pay for fresh device memory each time, as a new process would
            with probe.timed():
                built = build()
    result = probe.result()
    result["first"], result["runs"] = first, len(probe.times)
    result["after_mib"], result["model_mib"] = after_mib, model_mib
    result["rss_mib"] = first_peak  # (later builds reuse what glibc kept of the freed model, or fragment it)
    result["checksum"] = checksum(built) if CASES[case].compare else None
    if case == "eager":  # what torchinit-load loads
        torch.save(built.state_dict(), checkpoint)
    return result


def _ratio(seconds: float, reference: dict | None) -> str:
    return f"{seconds / reference['seconds']:.3g}x" if reference else "-"


def _format_row(cells: list[str]) -> str:
    return f"{cells[0]:<46}" + "".join(f"{cell:>15}" for cell in cells[1:-1]) + f"   {cells[-1]}"


def _verdict(result: dict, naive: dict | None) -> str:
    if result["checksum"] is None or naive is None or result is naive:
        return "-"
    return "exact" if result["checksum"] == naive["checksum"] else "DIFFERENT"


def main(argv: list[str] | None = None) -> int:
    args, device = parse_args(__doc__, argv)
    with tempfile.TemporaryDirectory(prefix="torchinit-bench-") as workdir:
        results, notes = run_all(CASES, _run_case, args.size, device, args.precision, args.repeat, workdir,
                                 only=args.cases)

    naive = results.get("naive")
    reference = results.get("eager")  # the values to compare with: eager ON the device (a GPU draws other numbers)
    print()
    print(_format_row(["case", "best s", "first s", "model MiB", "peak RSS +MiB", "after RSS +MiB", "peak/model",
                       "after/model", "peak dev MiB", "/ naive", "/ floor", "params"]))
    for name, r in results.items():
        device_mib = "-" if r["device_mib"] is None else f"{r['device_mib']:,.0f}"
        times = [f"{r['seconds']:.3f}", f"{r['first']:.3f}"]
        memory = [f"{r['model_mib']:,.0f}", f"{r['rss_mib']:,.0f}", f"{r['after_mib']:,.0f}",
                  f"{r['rss_mib'] / r['model_mib']:.2f}x", f"{r['after_mib'] / r['model_mib']:.2f}x"]
        ratios = [_ratio(r["seconds"], naive), _ratio(r["seconds"], results.get(CASES[name].floor))]
        print(_format_row([CASES[name].label, *times, *memory, device_mib, *ratios, _verdict(r, reference)]))
    print("RSS columns: host memory above the process's baseline (peak: during the first build; after: right after the "
          "first build, the model still held), counted after the imports (fake tensors import torch._dynamo "
          "once per process: ~75-100 MiB, not counted). Timings on a busy machine are noisy.")
    for note in notes:
        print(note)
    emit([{"key": name, "case": CASES[name].label, "seconds": r["seconds"], "rss_mib": r["rss_mib"],
           "device_mib": r["device_mib"], "floor": CASES[name].floor,
           "exact": {"-": None, "exact": True}.get(_verdict(r, reference), False)}
          for name, r in results.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
