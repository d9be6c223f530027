"""Benchmark loading a Llama safetensors checkpoint, side by side in one run: safetensors `load_file`,
`torch.load(mmap=True)`, transformers `from_pretrained`, accelerate `load_checkpoint_and_dispatch` (each when
installed), torchinit into a meta and an empty-init model, and the floors.

The CPU floor is the file read with preadv into fresh memory (the same reader threads torchinit uses): every
load into a new model pays the first touch of every page of the model, and so does this floor; it reads the
checkpoint's bytes, so with --file-precision 32-true it is the floor of the bytes read. (A memcpy into fresh
memory is no floor: it needs a resident source as large as the model besides, and it was 7x slower than reading
the file.) On CUDA the floor is one pinned host tensor copied to the device.

Each case runs in its own process (RSS growth is that case's alone), --repeat times, round robin, and reports
the best wall seconds, the CPU seconds (user + system, all threads) of that run, GiB/s of checkpoint bytes, the
ratio to the floor (floor seconds / case seconds: 1.00x is the floor's speed), and peak RSS growth. On a busy
machine wall seconds are noisy; CPU seconds much less so.

--cold drops the page cache before every case (root: /proc/sys/vm/drop_caches) and adds the O_DIRECT cases.

    python benchmarks/load_bench.py --size 1b --repeat 3
    python benchmarks/load_bench.py --size 1b --cold --cases floor-pread,floor-odirect,torchinit-meta,torchinit-odirect
    python benchmarks/load_bench.py --size 7b --device cuda
    python benchmarks/load_bench.py --file-precision 32-true --cases floor-pread,torchinit-meta  # fp32 into bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from common import emit

import torchinit
from torchinit.demo import DTYPES, SIZES, resolve_device, run_isolated
from torchinit.models import config_for

MiB = 2**20
CASES = {
    "floor-pread": "floor: preadv of the file into fresh memory",
    "floor-odirect": "floor: O_DIRECT read into fresh memory",
    "floor-h2d": "floor: pinned host -> device copy",
    "safetensors": "safetensors load_file + load_state_dict",
    "torch-mmap": "torch.load(mmap=True) + load_state_dict",
    "transformers": "transformers from_pretrained",
    "accelerate": "accelerate load_checkpoint_and_dispatch",
    "torchinit-meta": "torchinit load_checkpoint into a meta model",
    "torchinit-empty": "torchinit load_checkpoint into an empty model",
    "torchinit-odirect": "torchinit into a meta model, direct_io=True",
}
NEEDS = {"transformers": "transformers", "accelerate": "accelerate"}
CUDA_ONLY = {"floor-h2d"}
COLD_ONLY = {"floor-odirect", "torchinit-odirect"}


def hf_config(size: str):
    from transformers import LlamaConfig

    c = config_for(size)
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                       num_key_value_heads=c.num_kv_heads, tie_word_embeddings=False)


def write_checkpoint(size: str, dtype: torch.dtype, folder: Path) -> int:
    """A transformers Llama folder (config + safetensors) with random values; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = hf_config(size)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    state = {k: torch.randn(s, dtype=torch.float32).to(dtype) for k, s in shapes.items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return sum(v.numel() * v.element_size() for v in state.values())


def _write_pickle(folder: Path, warm: bool) -> None:
    """The safetensors file as a torch pickle (for `torch.load(mmap=True)`), its page cache warmed if asked."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "model.pt")
    if warm:
        _warm(folder / "model.pt")


def _warm(path: Path) -> None:
    """Read the file once, 64 MiB at a time, so its pages are in the page cache (warm-cache cases)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MiB):
            pass


def _model(size: str, dtype: torch.dtype, device: str, how: str):
    from transformers import LlamaForCausalLM

    if how == "meta":
        with torchinit.InitContext(device, dtype, meta=True):
            return LlamaForCausalLM(hf_config(size))
    with torchinit.InitContext(device, dtype, empty_init=True):
        return LlamaForCausalLM(hf_config(size))


def _run(case: str, size: str, device: str, precision: str, folder: str) -> dict:
    dtype, path = DTYPES[precision], Path(folder) / "model.safetensors"
    nbytes = path.stat().st_size
    prepared = None
    if device == "cuda":
        torch.empty(1, device=device)  # CUDA context start-up is no case's cost
    if case.startswith("torchinit") or case in ("safetensors", "torch-mmap"):
        prepared = _model(size, dtype, device, "meta" if case in ("torchinit-meta", "torchinit-odirect") else "empty")
    if case == "floor-h2d":  # the bytes already in pinned memory: what the PCIe link alone allows
        prepared = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    base, cpu = psutil.Process().memory_info().rss, _cpu_seconds()
    start = time.perf_counter()
    if case == "floor-h2d":
        prepared.to(device, non_blocking=True)
    elif case in ("floor-pread", "floor-odirect"):
        from torchinit.checkpoint.header import Entry
        from torchinit.checkpoint.safetensors import read_into

        out = torch.empty(nbytes, dtype=torch.uint8)
        read_into([(Entry(path, torch.uint8, (nbytes,), 0, nbytes), out)], direct_io=case == "floor-odirect")
    elif case == "safetensors":
        from safetensors.torch import load_file

        with torch.no_grad():
            prepared.load_state_dict(load_file(path, device=device), strict=False)
    elif case == "torch-mmap":
        pt = Path(folder) / "model.pt"
        prepared.load_state_dict(torch.load(pt, mmap=True, weights_only=True), strict=False)
    elif case == "transformers":
        from transformers import LlamaForCausalLM

        LlamaForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    elif case == "accelerate":
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch
        from transformers import LlamaForCausalLM

        with init_empty_weights():
            model = LlamaForCausalLM(hf_config(size))
        load_checkpoint_and_dispatch(model, str(path), device_map={"": device}, dtype=dtype)
    else:
        torchinit.load_checkpoint(prepared, path, device=device, dtype=dtype, strict=False,
                                  direct_io=case == "torchinit-odirect")
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    return {"seconds": seconds, "cpu_s": _cpu_seconds() - cpu, "gib_s": nbytes / 2**30 / seconds,
            "rss_mib": max(0, peak - base) / MiB}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drop_page_cache() -> None:
    """Write back and drop the page cache (root only), so that the next case reads from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def _peak_rss() -> int:
    """This process's own peak RSS (Linux). Not ru_maxrss: a spawned child inherits its parent's peak there, and
    the parent held the whole checkpoint while writing it."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1b", choices=SIZES)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16-true", choices=list(DTYPES), help="the model's")
    parser.add_argument("--file-precision", choices=list(DTYPES), help="the checkpoint's (default: the model's)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case, round robin; the best is shown")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every case (root)")
    parser.add_argument("--folder", help="a folder to keep the checkpoint in (written once, reused by later runs)")
    args = parser.parse_args(argv)
    device, file_precision = resolve_device(args.device), args.file_precision or args.precision
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    cases = {case: CASES[case] for case in args.cases.split(",")}
    results: dict[str, dict] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="torchinit-load-", dir=os.environ.get("TORCHINIT_BENCH_DIR")) as scratch:
        folder = Path(args.folder or scratch) / f"llama-{args.size}-{file_precision}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "model.safetensors").exists():
            write_checkpoint(args.size, DTYPES[file_precision], folder)
        nbytes = (folder / "model.safetensors").stat().st_size
        print(f"Llama {args.size} checkpoint: {nbytes / 2**30:.2f} GiB {file_precision} into a {args.precision} "
              f"model; {device}; {torch.get_num_threads()} threads; {'cold' if args.cold else 'warm'} page cache; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        runnable = {}
        for case, label in cases.items():
            if case in CUDA_ONLY and device != "cuda" or case in COLD_ONLY and not args.cold:
                continue
            if case in NEEDS and importlib.util.find_spec(NEEDS[case]) is None:
                notes.append(f"skipped {label}: {NEEDS[case]} is not installed")
                continue
            runnable[case] = label
        if not args.cold:
            for path in folder.iterdir():
                _warm(path)
        for round_ in range(args.repeat):
            for case, label in runnable.items():
                print(f"{label} ({round_ + 1}/{args.repeat}) ...", flush=True)
                if args.cold:
                    _drop_page_cache()
                if case == "torch-mmap":  # a second copy of the checkpoint, on disk only while its case runs
                    _write_pickle(folder, warm=not args.cold)  # (7B fp32: 27 GiB more)
                try:
                    result = run_isolated(_run, case, args.size, device, args.precision, str(folder))
                except Exception as error:
                    notes.append(f"FAILED {label}: {type(error).__name__}: {error}")
                    continue
                finally:
                    (folder / "model.pt").unlink(missing_ok=True)
                if case not in results or result["seconds"] < results[case]["seconds"]:
                    results[case] = result
    floor = _table(results, device, args.cold)
    emit([{"key": case, "case": CASES[case], "seconds": r["seconds"], "gib_s": r["gib_s"], "rss_mib": r["rss_mib"],
           "floor": floor} for case, r in results.items()])
    for note in notes:
        print(note)
    print(f"load average now {os.getloadavg()[0]:.1f}")
    return 0


def _table(results: dict[str, dict], device: str, cold: bool) -> str | None:
    """One row per case; the ratio is to the fastest floor measured (the O_DIRECT one may win when cold), which
    is returned."""
    floors = [c for c in (("floor-h2d",) if device == "cuda" else ("floor-pread", "floor-odirect")) if c in results]
    floor = min(floors, key=lambda c: results[c]["seconds"]) if floors else None
    print()
    print(f"{'case':<48}{'s':>8}{'CPU s':>8}{'GiB/s':>8}{'/ floor':>9}{'RSS +MiB':>10}   (floor: {floor})")
    for case, r in results.items():
        ratio = f"{results[floor]['seconds'] / r['seconds']:.2f}x" if floor else "-"
        print(f"{CASES[case]:<48}{r['seconds']:>8.2f}{r['cpu_s']:>8.2f}{r['gib_s']:>8.2f}{ratio:>9}"
              f"{r['rss_mib']:>10,.0f}")
    return floor


if __name__ == "__main__":
    sys.exit(main())
