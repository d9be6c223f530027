"""What every benchmark script shares: the command line, the header, and running each case in its own process."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

import torch

from torchinit.demo import DTYPES, SIZES, resolve_device, run_isolated
from torchinit.models import config_for, num_parameters


def parse_args(doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    """--size/--device/--precision/--repeat; prints the model and machine; returns (args, device)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", default="1b", choices=SIZES)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16-true", choices=list(DTYPES))
    parser.add_argument("--repeat", type=int, default=3, help="best of N after one warm-up, when cheap")
    parser.add_argument("--cases", default="", help="comma-separated case names to run (default: all)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    params, dtype = num_parameters(config_for(args.size)), DTYPES[args.precision]
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"Llama {args.size}: {params / 1e6:,.0f}M parameters, {params * dtype.itemsize / 2**20:,.0f} MiB in "
          f"{args.precision}; {device} ({where}), torch {torch.__version__}", flush=True)
    return args, device


def run_all(cases: dict, run_case: Callable[..., dict], *args: object) -> tuple[dict[str, dict], list[str]]:
    """Run `run_case(name, *args)` for each case in a fresh process; skip cases whose `needs` are missing.

    Returns the results and notes on what was skipped or failed (one broken peer must not hide the rest).
    """
    results, notes = {}, []
    for step, (name, case) in enumerate(cases.items(), start=1):
        if case.needs and not any(importlib.util.find_spec(module) for module in case.needs):
            notes.append(f"skipped {case.label}: {' or '.join(case.needs)} is not installed")
            continue
        print(f"[{step}/{len(cases)}] {case.label} ...", flush=True)
        try:
            results[name] = run_isolated(run_case, name, *args)
        except Exception as error:
            notes.append(f"FAILED {case.label}: {type(error).__name__}: {error}")
            continue
        print(f"      {results[name]['seconds']:.3f} s (best of {results[name]['runs']})", flush=True)
    return results, notes
