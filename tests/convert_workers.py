"""Workers for test_convert.py: every saved state into every strategy, in few launches.

Each launch saves the sources at its world size (a one-file save under DDP / one device, a safetensors file, an FSDP
DCP folder, DeepSpeed ZeRO 1, 2 and 3 folders), each after one AdamW step from its own seed, and keeps their values
(weights and optimizer state, gathered) as references; then it loads sources into one model per target strategy
and compares what the target holds, gathered, with the reference, bitwise.
"""

from pathlib import Path

import torch
import torch.distributed as dist
from dist_workers import _errors, _joined, _train_step, tiny_llama
from safetensors.torch import save_file

STRATEGIES = {"plain": None, "fsdp": "fsdp", "zero1": "deepspeed_stage_1", "zero2": "deepspeed_stage_2",
              "zero3": "deepspeed_stage_3"}


def _fabric(fabric, kind):
    if kind == "plain":
        return _joined(fabric, strategy="ddp" if fabric.world_size > 1 else "single_device", devices=fabric.world_size)
    return _joined(fabric, strategy=STRATEGIES[kind])


def _build(fabric, seed):
    torch.manual_seed(seed)
    with fabric.init_module():
        module = tiny_llama()
    model, optimizer = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-2))
    return module, model, optimizer


def _weights(fabric, module) -> dict:
    if fabric.plan.strategy == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {n: p.detach().clone() for n, p in module.named_parameters()}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}


def _state(fabric, module, optimizer) -> dict:
    """{parameter name: {state key: full value}}, plus "<master>" (DeepSpeed's fp32 copies) by name."""
    if fabric.plan.strategy != "deepspeed":
        return {n: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                    for k, v in optimizer.state[p].items()} for n, p in module.named_parameters()}
    engine = fabric.strategy.engine
    names = {id(p): n for n, p in module.named_parameters()}
    base = engine.engine.optimizer.optimizer
    pieces = []  # (name, key, start, values) from this rank's partitions
    for flat, members in engine.flat_partitions():
        for key, value in [("<master>", flat), *base.state[flat].items()]:
            for p, start, end, offset in members:
                part = value if value.dim() == 0 else value[offset:offset + end - start]
                pieces.append((names[id(p)], key, start, part.detach().clone()))
    everything = [None] * fabric.world_size
    dist.all_gather_object(everything, pieces) if fabric.world_size > 1 else everything.__setitem__(0, pieces)
    shapes = {n: p.ds_shape if hasattr(p, "ds_shape") else p.shape for n, p in module.named_parameters()}
    out: dict = {}
    for name, key, start, part in (x for rank in everything for x in rank):
        if part.dim() == 0:
            out.setdefault(name, {})[key] = part
            continue
        full = out.setdefault(name, {}).setdefault(key, torch.zeros(shapes[name]).reshape(-1))
        full[start:start + part.numel()] = part
    return {n: {k: v.reshape(shapes[n]) if v.dim() else v for k, v in s.items()} for n, s in out.items()}


def _snapshot(fabric, module, optimizer) -> dict:
    return {"weights": _weights(fabric, module), "state": _state(fabric, module, optimizer)}


def _differences(got: dict, want: dict, with_state: bool) -> list[str]:
    bad = [f"weight {n}" for n, v in want["weights"].items() if not torch.equal(got["weights"][n], v)]
    if not with_state:
        return bad
    for name, values in want["state"].items():
        for key, value in values.items():
            if key == "<master>":
                continue
            have = got["state"].get(name, {}).get(key)
            if have is None or not torch.equal(have.to(value.dtype), value):
                bad.append(f"{key} of {name}")
        master = got["state"].get(name, {}).get("<master>")  # a DeepSpeed target's fp32 copy
        expected = values.get("<master>", want["weights"][name].float())
        if master is not None and not torch.equal(master, expected):
            bad.append(f"master of {name}")
    return bad


def save_sources(fabric, folder: Path) -> dict:
    """The sources at this world size, and their references."""
    world, refs = fabric.world_size, {}
    for index, kind in enumerate(STRATEGIES):
        other = _fabric(fabric, kind)
        module, model, optimizer = _build(other, 10 * world + index)
        _train_step(other, model, optimizer, 1)
        path = folder / f"w{world}-{kind}" if kind != "plain" else folder / f"w{world}-plain.pt"
        other.save(path, {"model": model, "optimizer": optimizer, "step": 10 * world + index})
        refs[path.name] = _snapshot(other, module, optimizer) | {"step": 10 * world + index}
        if kind == "plain":
            weights = refs[path.name]["weights"]
            if fabric.is_global_zero:
                save_file(weights, folder / f"w{world}-weights.safetensors")
            refs[f"w{world}-weights.safetensors"] = {"weights": weights}
    fabric.barrier()
    return refs


def load_all(fabric, folder: Path, sources: dict) -> dict:
    """Every source into one model per target strategy; {(source, target): differences}."""
    out = {}
    for kind in STRATEGIES:
        other = _fabric(fabric, kind)
        module, model, optimizer = _build(other, 99)
        for name, want in sources.items():
            with_state = "state" in want
            state = {"model": model, "optimizer": optimizer, "step": -1} if with_state else {"model": model}
            other.load(folder / name, state)
            got = _snapshot(other, module, optimizer)
            bad = _differences(got, want, with_state)
            if with_state and state["step"] != want["step"]:
                bad.append(f"step value {state['step']}")
            out[(name, f"w{fabric.world_size}-{kind}")] = bad
    return out


def mixed_precision(fabric, folder: Path) -> dict:
    """bf16 parameters with fp32 masters: a ZeRO-3 folder into ZeRO-2 (bf16 parameters, masters from the saved
    fp32 ones, not rounded through bf16) and into FSDP with fp32 parameters (bf16-mixed: the masters)."""
    source = _joined(fabric, strategy="deepspeed_stage_3", precision="bf16-mixed")
    module, model, optimizer = _build(source, 7)
    _train_step(source, model, optimizer, 1)
    source.save(folder / "bf16-zero3", {"model": model, "optimizer": optimizer})
    want = _snapshot(source, module, optimizer)
    masters = {n: s.pop("<master>") for n, s in want["state"].items()}
    assert any(not torch.equal(masters[n], w.float()) for n, w in want["weights"].items()), "masters are finer"
    out = {}
    for kind, strategy in (("zero2", "deepspeed_stage_2"), ("fsdp", "fsdp")):
        other = _joined(fabric, strategy=strategy, precision="bf16-mixed")
        module, model, optimizer = _build(other, 99)
        other.load(folder / "bf16-zero3", {"model": model, "optimizer": optimizer})
        got = _snapshot(other, module, optimizer)
        if kind == "zero2":  # bf16 parameters, the saved masters beside them
            expected = {"weights": want["weights"],
                        "state": {n: {**s, "<master>": masters[n]} for n, s in want["state"].items()}}
        else:  # fp32 parameters: the masters
            expected = {"weights": masters, "state": want["state"]}
        out[("bf16-zero3", f"w2-{kind}-bf16")] = _differences(got, expected, True)
        if kind == "zero2":  # load_raw of an fp32 file: the masters are the file's values, not rounded via bf16
            if fabric.is_global_zero:
                save_file(masters, folder / "masters.safetensors")
            fabric.barrier()
            other.load_raw(folder / "masters.safetensors", model)
            expected["weights"] = {n: m.to(torch.bfloat16) for n, m in masters.items()}
            got = _snapshot(other, module, optimizer)
            out[("masters.safetensors", "w2-zero2-bf16-load_raw")] = _differences(got, expected, True)
    return out


def first_launch(fabric, folder):
    """World 1: its sources into world-1 targets, then the error paths (as `("errors", None)`); the references
    are kept for the second launch."""
    folder = Path(folder)
    refs = save_sources(fabric, folder)
    torch.save(refs, folder / "refs-w1.pt")
    return load_all(fabric, folder, refs) | {("errors", None): load_errors(fabric, folder)}


def second_launch(fabric, folder):
    """World 2: its sources and the world-1 ones into world-2 targets (saved world 2 into world 1 is left out
    to keep the test short: reading several ranks' partitions is covered by the world-2 pairs)."""
    folder = Path(folder)
    refs = save_sources(fabric, folder)
    if fabric.is_global_zero:
        torch.save(refs, folder / "refs-w2.pt")
    out = load_all(fabric, folder, refs | torch.load(folder / "refs-w1.pt", weights_only=True))
    return out | mixed_precision(fabric, folder)


def load_errors(fabric, folder):
    """What cannot be carried, and states that do not fit, into ZeRO-2 and a plain model: each an error that
    changes nothing."""
    folder = Path(folder)
    saved = torch.load(folder / "w1-plain.pt", weights_only=True)
    saved["optimizer"]["state"][1]["step"] = torch.tensor(7.0)  # one parameter stepped more often
    torch.save(saved, folder / "uneven-step.pt")
    return {kind: _error_cases(fabric, folder, kind) for kind in ("zero2", "plain")}


def _error_cases(fabric, folder: Path, kind: str) -> dict:
    other = _fabric(fabric, kind)
    module, model, optimizer = _build(other, 5)
    before = _weights(other, module)
    cases = {"safetensors optimizer": lambda: other.load(folder / "w1-weights.safetensors",
                                                         {"model": model, "optimizer": optimizer})}
    if kind == "plain":
        two_groups = torch.optim.AdamW([{"params": [p]} for p in module.parameters()], lr=1e-2)
        cases["groups"] = lambda: other.load(folder / "w1-zero3", {"model": model, "optimizer": two_groups})
    else:
        cases["uneven step"] = lambda: other.load(folder / "uneven-step.pt", {"model": model, "optimizer": optimizer})
    out = _errors(cases)
    out["untouched"] = all(torch.equal(v, before[n]) for n, v in _weights(other, module).items())
    return out
