"""Benchmark recorded init: record time, replay against eager construction, and FSDP set-up from a record.

1. Record a 7B Llama (transformers `LlamaForCausalLM` with the Llama-2-7B shapes, and the bundled Llama) against
   plain meta construction (`with torch.device("meta")`), best of 3. Target: at most 0.2 s.
2. `--size` model on `--device`: eager construction (`manual_seed`, build on the device, `.to(dtype)`) against
   record + `materialize` (replay), each in a fresh process, with a check that the two are bit for bit equal.
   Target on an H100 (7B): replay at most 1.5x eager.
3. FSDP with `--devices` ranks: `init_module()` + `setup` with the record (the default) against the meta path
   that initializes each module with its own `reset_parameters` (`record_init=False`, not eager's values),
   and against building the full model first. Per rank: seconds and peak host RSS growth (device peak on
   CUDA), against the target line local shards + the largest full parameter (in the compute dtype, fp32).

    python benchmarks/record_bench.py --size 0.3b --devices 2
    python benchmarks/record_bench.py --size 7b --device cuda --devices 1
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import emit
from distributed_bench import MiB, _measure

import torchinit
from torchinit.demo import DTYPES, SIZES, resolve_device, run_isolated
from torchinit.models import Llama, config_for, num_parameters


def _hf_7b():
    import transformers

    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    return lambda: transformers.LlamaForCausalLM(config)


def record_times() -> list[tuple[str, float, float, int]]:
    """(model, meta seconds, record seconds, ops recorded), best of 3 each."""
    rows = []
    for name, build in (("transformers Llama 7B", _hf_7b()), ("bundled Llama 7B", lambda: Llama(config_for("7b")))):
        build_meta, build_record, ops = [], [], 0
        for _ in range(3):
            start = time.perf_counter()
            with torch.device("meta"):
                build()
            build_meta.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torchinit.RecordContext("cpu", torch.bfloat16):
                model = build()
            build_record.append(time.perf_counter() - start)
            ops = len(torchinit.init.record.records_of(model).record.ops)
        rows.append((name, min(build_meta), min(build_record), ops))
    return rows


def eager(size: str, device: str, dtype: torch.dtype) -> dict:
    _start_cuda(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config_for(size)).to(dtype)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "sum": _checksum(model)}


def replay(size: str, device: str, dtype: torch.dtype) -> dict:
    _start_cuda(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torchinit.RecordContext(device, dtype):
        model = Llama(config_for(size))
    recorded = time.perf_counter() - start
    torchinit.materialize(model, device, dtype, check_values=False)
    _sync(device)
    return {"seconds": time.perf_counter() - start, "record": recorded, "sum": _checksum(model)}


def _start_cuda(device: str) -> None:
    """CUDA's context (about a second) is made before a timer starts: neither case should pay for it."""
    if device == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _checksum(model: torch.nn.Module) -> list[bytes]:
    """A digest of every tensor's bytes, to compare two models bit for bit across processes."""
    import hashlib

    return [hashlib.sha1(t.detach().float().cpu().numpy().tobytes()).digest() for t in model.state_dict().values()]


def fsdp_setup(fabric, size: str, record: bool, full_first: bool) -> list:
    def build():
        if full_first:
            torch.manual_seed(0)
            with torch.device(fabric.device):
                model = Llama(config_for(size)).to(fabric.plan.param_dtype)
        else:
            with fabric.init_module():
                model = Llama(config_for(size))
        return fabric.setup(model)

    return _measure(fabric, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.3b", choices=SIZES)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="bf16-true", choices=list(DTYPES))
    parser.add_argument("--sections", default="1,2,3", help="which of 1 (record time), 2 (eager vs replay), 3 (FSDP)")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    device, dtype = resolve_device(args.device), DTYPES[args.precision]
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}; {device} ({where})", flush=True)

    if "1" in sections:
        print("\n1. record time (best of 3)")
        print(f"{'model':<26}{'meta s':>9}{'record s':>10}{'ratio':>8}{'ops':>7}")
        for name, meta, recorded, ops in run_isolated(record_times):
            print(f"{name:<26}{meta:>9.3f}{recorded:>10.3f}{recorded / meta:>7.1f}x{ops:>7}")
    if "2" in sections:
        _eager_vs_replay(args.size, device, dtype, args.precision)
    if "3" in sections:
        _fsdp(args.size, device, dtype, args.precision, args.devices)
    return 0


def _eager_vs_replay(size: str, device: str, dtype: torch.dtype, precision: str) -> None:
    params = num_parameters(config_for(size))
    print(f"\n2. Llama {size} ({params / 1e6:,.0f}M parameters) on {device} in {precision}: eager vs replay")
    base = run_isolated(eager, size, device, dtype)
    again = run_isolated(replay, size, device, dtype)
    emit([{"key": "eager", "case": "eager construction + cast", "seconds": base["seconds"]},
          {"key": "torchinit-replay", "case": "torchinit record + replay", "seconds": again["seconds"],
           "exact": again["sum"] == base["sum"]}])
    print(f"eager construction + cast   {base['seconds']:8.2f} s   1.00x")
    print(f"record + replay             {again['seconds']:8.2f} s   {again['seconds'] / base['seconds']:.2f}x   "
          f"(record {again['record']:.3f} s)   bit-identical: {again['sum'] == base['sum']}")


def _fsdp(size: str, device: str, dtype: torch.dtype, precision: str, devices: int) -> None:
    params = num_parameters(config_for(size))
    with torch.device("meta"):
        model = Llama(config_for(size))
    largest = max(p.numel() for p in model.parameters()) * 4 / MiB  # replayed in fp32, then cast
    shard = params * dtype.itemsize / devices / MiB
    target = shard + largest
    print(f"\n3. FSDP, {devices} rank(s): local shards {shard:,.0f} MiB + largest full parameter (fp32) "
          f"{largest:,.0f} MiB = target {target:,.0f} MiB per rank")
    print(f"{'case':<44}{'rank':>5}{'s':>9}{'peak MiB':>10}{'/ target':>10}")
    for name, record, full_first in (("init_module() + setup (record, replay)", True, False),
                                     ("meta + reset_parameters (record_init=False)", False, False),
                                     ("full model first, then setup", True, True)):
        fabric = torchinit.Fabric(accelerator=device, devices=devices, precision=precision, seed=0,
                                  strategy=torchinit.FSDPStrategy(record_init=record))
        for rank, (seconds, grown, dev, _) in enumerate(fabric.launch(fsdp_setup, size, record, full_first)):
            peak = dev if dev is not None else grown
            print(f"{name:<44}{rank:>5}{seconds:>9.2f}{peak:>10,.0f}{peak / target:>9.2f}x")


if __name__ == "__main__":
    sys.exit(main())
