"""The zoo sweep: every case x mode against the eager model, bit for bit; counts per source x mode, with causes.

    python benchmarks/zoo.py                       # transformers' registries (all), timm, torchvision
    python benchmarks/zoo.py --sources hf --limit 40 --modes init_module,empty
    /work/venv-tv/bin/python benchmarks/zoo.py --sources timm,tv     # where torchvision imports

Each case runs in its own process with a timeout (`--one CASE MODE[,MODE...]` prints one JSON line). Eager is
`torch.manual_seed(0); build().to(dtype)` on CPU. A result is "exact" (every parameter and buffer equal, same
dtypes, same ties by object and by storage), "mismatch" (the names that differ: silent garbage), "error" (a
clear exception; its first line is the cause), or "skip" (the eager build itself fails: not a zoo case).
Lightning's `init_module()` and `torch.device("meta")` + `to_empty` + `reset_parameters` run side by side.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from zoo_cases import builder, cases  # noqa: E402

MODES = ["init_module", "record", "empty", "empty_partial", "empty_poison", "fsdp", "lightning", "meta_reset"]
FSDP_WORLD, FSDP_RANKS = 4, (0, 3)  # the fsdp mode: these ranks of a 4-rank world, under the fake process group
DTYPE = torch.bfloat16
PRECISION = "bf16-true"


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def _ties(model: nn.Module, storage: bool = True) -> tuple[list, list]:
    by_object, by_storage = collections.defaultdict(list), collections.defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_object[id(p)].append(name)
        if storage and p.device.type != "meta" and p.numel():
            by_storage[(p.untyped_storage().data_ptr(), p.storage_offset())].append(name)
    norm = lambda groups: sorted(sorted(g) for g in groups.values() if len(g) > 1)  # noqa: E731
    return norm(by_object), norm(by_storage)


def compare(got: nn.Module, want: nn.Module) -> list[str]:
    """What differs: names of tensors not bitwise equal (or missing / extra), and changed ties."""
    a, b = _tensors(got), _tensors(want)
    wrong = [f"missing {k}" for k in b if k not in a] + [f"extra {k}" for k in a if k not in b]
    for k in b:
        if k in a and (a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].device.type == "meta"
                       or not torch.equal(a[k], b[k])):
            wrong.append(k if a[k].dtype == b[k].dtype else f"{k} ({a[k].dtype} vs {b[k].dtype})")
    if _ties(got) != _ties(want):
        wrong.append(f"ties {_ties(got)} vs {_ties(want)}")
    return wrong


def _eager(build) -> nn.Module:
    torch.manual_seed(0)
    return build().to(DTYPE)


def _torchinit(build, mode: str, want: nn.Module) -> nn.Module:
    import torchinit

    torch.manual_seed(0)
    fabric = torchinit.Fabric(accelerator="cpu", precision=PRECISION)
    if mode == "init_module":
        with fabric.init_module():
            return build()
    if mode == "record":
        with torchinit.RecordContext("cpu", DTYPE):
            model = build()
        torchinit.materialize(model)
        return model
    poison = torchinit.nan_poison() if mode == "empty_poison" else contextlib.nullcontext()
    with poison:
        with fabric.init_module(empty_init=True):
            model = build()
        if mode == "empty_partial":  # every second tensor from a checkpoint (eager's), the rest replayed
            state = want.state_dict()
            half = collections.OrderedDict((k, v) for i, (k, v) in enumerate(state.items()) if i % 2 == 0)
            half._metadata = state._metadata  # (module versions: torchvision's MNASNet reads them)
            model.load_state_dict(half, strict=False)
        return fabric.setup(model).module


def fsdp_compare(build, want: nn.Module) -> list[str]:
    """Empty init + FSDP `setup` on ranks of a fake world (collectives do nothing, so each rank's values are its
    own): each parameter's local shard must equal its rows of eager's (torch.chunk along dim 0, as FSDP2 splits),
    buffers whole, ties by object."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import torchinit

    wrong = []
    for rank in FSDP_RANKS:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=FSDP_WORLD)
        try:
            fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=FSDP_WORLD, precision=PRECISION)
            fabric.launch()
            torch.manual_seed(0)
            with fabric.init_module(empty_init=True):
                model = build()
            model = fabric.setup(model).module
            wrong += [f"rank {rank}: {w}" for w in _shards_differ(model, want, rank)]
        finally:
            dist.destroy_process_group()
    return wrong


def _shards_differ(got: nn.Module, want: nn.Module, rank: int) -> list[str]:
    a, b = _tensors(got), _tensors(want)
    wrong = [f"missing {k}" for k in b if k not in a] + [f"extra {k}" for k in a if k not in b]
    for k in (k for k in b if k in a):
        value, expected = a[k], b[k].detach()
        if hasattr(value, "placements"):
            if [type(p).__name__ for p in value.placements] != ["Shard"] or value.placements[0].dim != 0:
                wrong.append(f"{k} (placements {value.placements})")
                continue
            value = value.to_local()
            chunks = torch.chunk(expected, FSDP_WORLD, dim=0)
            expected = chunks[rank] if rank < len(chunks) else expected[:0]
        if value.dtype != expected.dtype or value.shape != expected.shape or not torch.equal(value, expected):
            wrong.append(k)
    if _ties(got, storage=False)[0] != _ties(want, storage=False)[0]:
        wrong.append("ties by object")
    return wrong


def _peer(build, mode: str) -> nn.Module:
    torch.manual_seed(0)
    if mode == "lightning":
        from lightning.fabric import Fabric

        with Fabric(accelerator="cpu", precision=PRECISION, devices=1).init_module():
            return build()
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return model.to(DTYPE)


def run_one(case: str, modes: list[str]) -> dict[str, dict]:
    """Each mode of one case here (one import, one eager model): {mode: {"status", "cause"}}."""
    warnings.simplefilter("ignore")
    try:
        build = builder(case)
        want = _eager(build)
    except Exception as exc:  # noqa: BLE001
        skip = {"status": "skip", "cause": f"eager: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        return {mode: skip for mode in modes}
    results = {}
    for mode in modes:
        try:
            if mode == "fsdp":
                got, wrong = None, fsdp_compare(build, want)
            else:
                got = _peer(build, mode) if mode in ("lightning", "meta_reset") else _torchinit(build, mode, want)
                wrong = compare(got, want)
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).splitlines() or [""])[0][:200]
            results[mode] = {"status": "error", "cause": f"{type(exc).__name__}: {first}"}
            continue
        more = f" (+{len(wrong) - 4})" if len(wrong) > 4 else ""
        results[mode] = {"status": "mismatch", "cause": ", ".join(wrong[:4]) + more} if wrong else {"status": "exact"}
        del got
    return results


def run_isolated(case: str, modes: list[str], timeout: float, python: str = sys.executable) -> dict[str, dict]:
    """`run_one` in a fresh process: a crash, a hang or a leak stays in that case."""
    try:
        done = subprocess.run([python, __file__, "--one", case, ",".join(modes)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return {mode: {"status": "error", "cause": f"timeout after {timeout:.0f} s"} for mode in modes}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {mode: {"status": "error", "cause": f"crashed (exit {done.returncode}): {tail[:200]}"} for mode in modes}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("CASE", "MODE"), help="run one case here, print JSON")
    parser.add_argument("--sources", default="hf,timm,tv")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--limit", type=int, default=0, help="about N cases per source, evenly spread (0: all)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1].split(","))), flush=True)
        return 0
    from concurrent.futures import ThreadPoolExecutor

    from zoo_cases import importable

    modes = args.modes.split(",")
    work = []
    for source in args.sources.split(","):
        why = importable(f"{source}:x")
        if why:
            print(f"skipped source {source}: {why}")
            continue
        listed = cases(source)
        picked = listed[:: max(1, len(listed) // args.limit)] if args.limit else listed
        work += picked
    with ThreadPoolExecutor(args.jobs) as pool:
        per_case = list(pool.map(lambda case: (case, run_isolated(case, modes, args.timeout)), work))
    results = [((case, mode), r) for case, by_mode in per_case for mode, r in by_mode.items()]
    _print_table(results, modes)
    if args.json:
        Path(args.json).write_text(json.dumps([[c, m, r] for (c, m), r in results], indent=1))
    return 0


def _print_table(results, modes: list[str]) -> None:
    counts = collections.defaultdict(collections.Counter)
    causes = collections.defaultdict(collections.Counter)
    for (case, mode), r in results:
        source = case.split(":")[0]
        counts[(source, mode)][r["status"]] += 1
        if r["status"] in ("mismatch", "error"):
            causes[(mode, r["status"])][f"{case}: {r['cause']}"] += 1
    print(f"\n{'source':<6} {'mode':<14} {'exact':>6} {'mismatch':>9} {'error':>6} {'skip':>5}")
    for source in sorted({s for s, _ in counts}):
        for mode in modes:
            c = counts[(source, mode)]
            print(f"{source:<6} {mode:<14} {c['exact']:>6} {c['mismatch']:>9} {c['error']:>6} {c['skip']:>5}")
    for (mode, status), found in sorted(causes.items()):
        print(f"\n{status} under {mode}:")
        for line in sorted(found):
            print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
