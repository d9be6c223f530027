"""Benchmark meta -> real materialization of a Llama: torchinit, Lightning's path, plain torch, eager, floor.

Each case runs in its own spawned process (peak RSS is that case's alone). Building the meta model is not
timed; the table times the step that gives it memory and values, and checks what came out: are the tied
embedding and head still one tensor, is the RoPE buffer the value eager code computes, is every parameter
finite. The floor is one allocation of the model's bytes plus one ``uniform_`` over it.

    python benchmarks/materialize_bench.py --size 1b --device cpu --repeat 3
    python benchmarks/materialize_bench.py --size 7b --device cuda
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import emit, parse_args, run_all
from torch import nn

import torchinit
from torchinit.demo import DTYPES, Probe
from torchinit.models import Llama, config_for, num_parameters
from torchinit.models.llama import RotaryEmbedding

CHEAP_SECONDS = 10.0  # a warm-up slower than this is the measurement; no repeats


@dataclass(frozen=True)
class Case:
    label: str
    needs: tuple[str, ...] = ()  # any one of these modules must be importable


LIGHTNING = ("lightning", "lightning_fabric")
CASES = {
    "eager": Case("eager on the device (fp32, then cast)"),
    "torch": Case("torch: meta, to_empty + reset_parameters"),
    "lightning": Case("Lightning _materialize_distributed_module", needs=LIGHTNING),
    "torchinit": Case("torchinit materialize (+ verify)"),
    "torchinit-noverify": Case("torchinit materialize, check_values=False"),
    "floor": Case("floor: allocate + uniform_"),
}


def _plain_meta(cfg, dtype: torch.dtype) -> nn.Module:
    """What torch users and Lightning's FSDP init_module do: default dtype + meta device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return Llama(cfg)
    finally:
        torch.set_default_dtype(previous)


def _to_empty_and_reset(model: nn.Module, device: torch.device) -> nn.Module:
    model.to_empty(device=device)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


def _lightning_materialize(model: nn.Module, device: torch.device) -> nn.Module:
    if importlib.util.find_spec("lightning") is not None:
        from lightning.fabric.utilities.init import _materialize_distributed_module
    else:
        from lightning_fabric.utilities.init import _materialize_distributed_module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that RotaryEmbedding is left uninitialized: the table says so
        _materialize_distributed_module(model, device)
    return model


def _prepare(case: str, cfg, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], object]:
    """(timed step, its input) for one repetition; building the input is not timed."""
    if case == "eager":
        def eager(_):
            torch.manual_seed(0)
            with torch.device(device):
                return Llama(cfg).to(dtype)
        return eager, None
    if case == "floor":
        numel = num_parameters(cfg)
        return (lambda _: torch.empty(numel, dtype=dtype, device=device).uniform_()), None
    if case in ("torch", "lightning"):
        step = _to_empty_and_reset if case == "torch" else _lightning_materialize
        return (lambda model: step(model, device)), _plain_meta(cfg, dtype)
    with torchinit.InitContext(device, dtype, meta=True):
        model = Llama(cfg)
    check = case == "torchinit"
    return (lambda m: (torchinit.materialize(m, device, dtype, check_values=check), m)[1]), model


def _quality(model: object, cfg, device: torch.device, dtype: torch.dtype) -> dict:
    if not isinstance(model, Llama):
        return {"ties": "-", "rope": "-", "finite": "-"}
    want = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).inv_freq.to(device=device, dtype=dtype)
    return {
        "ties": "kept" if model.lm_head.weight is model.embed.weight else "LOST",
        "rope": "exact" if torch.equal(model.rope.inv_freq, want) else "GARBAGE",
        "finite": "yes" if all(torch.isfinite(p).all() for p in model.parameters()) else "NO",
    }


def _run_case(case: str, size: str, device: str, precision: str, repeat: int) -> dict:
    cfg, target, dtype = config_for(size), torch.device(device), DTYPES[precision]
    probe = Probe(target)
    built = given = None
    for _ in range(1 + repeat):
        del built, given  # both: `given` is the model a torchinit case materialized, alive until replaced
        gc.collect()
        if target.type == "cuda":
            torch.cuda.empty_cache()
        step, given = _prepare(case, cfg, target, dtype)
        with probe.timed():
            built = step(given)
        if probe.times[0] >= CHEAP_SECONDS:
            break
    first = probe.times[0]
    if len(probe.times) > 1:
        probe.times.pop(0)  # the warm-up
    result = probe.result()
    result["first"], result["runs"] = first, len(probe.times)
    result.update(_quality(built, cfg, target, dtype))
    return result


def _row(cells: list[str]) -> str:
    return f"{cells[0]:<44}" + "".join(f"{c:>13}" for c in cells[1:])


def main(argv: list[str] | None = None) -> int:
    args, device = parse_args(__doc__, argv)
    results, notes = run_all(CASES, _run_case, args.size, device, args.precision, args.repeat, only=args.cases)
    print()
    print(_row(["case", "best s", "first s", "RSS +MiB", "dev MiB", "/ eager", "/ floor", "ties", "RoPE", "finite"]))
    for name, r in results.items():
        ratios = [f"{r['seconds'] / results[ref]['seconds']:.3g}x" if ref in results else "-"
                  for ref in ("eager", "floor")]
        dev = "-" if r["device_mib"] is None else f"{r['device_mib']:,.0f}"
        print(_row([CASES[name].label, f"{r['seconds']:.3f}", f"{r['first']:.3f}", f"{r['rss_mib']:,.0f}", dev,
                    *ratios, r["ties"], r["rope"], r["finite"]]))
    for note in notes:
        print(note)
    emit([{"key": name, "case": CASES[name].label, "seconds": r["seconds"], "rss_mib": r["rss_mib"],
           "device_mib": r["device_mib"], "floor": "floor",
           "exact": None if r["ties"] == "-" else (r["ties"], r["rope"], r["finite"]) == ("kept", "exact", "yes")}
          for name, r in results.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
