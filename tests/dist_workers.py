"""Functions that `Fabric.launch(fn)` runs in spawned processes (module level, so that they pickle)."""

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

import torchinit


def gathered(fabric, value):
    out = [None] * fabric.world_size
    dist.all_gather_object(out, value)
    return out


def checksum(module: nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in module.parameters()]


def ddp_training(fabric, empty_init):
    """Build on each rank (meta context or init_module), set up, train one step on different data per rank."""
    assert fabric.device == torch.device("cpu") and torch.distributed.get_backend() == "gloo"
    if empty_init == "meta":
        with torchinit.InitContext(fabric.device, fabric.plan.param_dtype, meta=True):
            module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    else:
        torch.manual_seed(fabric.global_rank)  # different on purpose: DDP must make the ranks start equal
        with fabric.init_module(empty_init=empty_init):
            module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        if empty_init:
            module.load_state_dict({k: torch.full_like(v, fabric.global_rank + 1.0) for k, v in
                                    module.state_dict().items()})
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)  # made before setup: must keep working
    model, optimizer = fabric.setup(module, optimizer)
    start = gathered(fabric, checksum(model))
    data = torch.full((3, 4), float(fabric.global_rank + 1))  # different data on each rank
    fabric.backward(model(data).sum())
    optimizer.step()
    after = gathered(fabric, checksum(model))
    total = fabric.all_reduce(torch.tensor([fabric.global_rank + 1.0]))
    mean = fabric.all_reduce(torch.tensor([fabric.global_rank + 1.0]), reduce_op="mean")
    fabric.barrier()
    return {
        "ranks": gathered(fabric, (fabric.global_rank, fabric.local_rank, fabric.world_size, fabric.is_global_zero)),
        "start": start, "after": after, "moved": start[0] != after[0],
        "sum": total.item(), "mean": mean.item(), "broadcast": fabric.broadcast(f"from {fabric.global_rank}"),
        "keys": list(model.state_dict()),
    }


def crash_on_rank_one(fabric):
    if fabric.global_rank == 1:
        raise ValueError("rank one broke")
    fabric.barrier()  # rank 0 would wait here forever without the launcher's clean-up


def tiny_llama():
    from torchinit.models import Llama, config_for

    return Llama(config_for("tiny"))  # tied embedding and head, RoPE buffer, RMSNorms


def fsdp_build_and_setup(fabric, empty_init):
    """init_module + setup under FSDP; returns each parameter's local shard and what the rank saw."""
    with torchinit.nan_poison(), fabric.init_module(empty_init=empty_init):
        module = tiny_llama()
    assert all(p.device.type == "meta" for p in module.parameters()), "FSDP never builds the full model"
    assert module.rope.inv_freq.device.type == "meta", "recorded: buffers too are replayed in setup"
    early = torch.optim.AdamW(module.parameters(), lr=1e-3)  # before setup, from meta parameters
    with torchinit.nan_poison():
        model = fabric.setup(module)
    shards = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    return model, early, shards


def fsdp_training(fabric, empty_init):
    model, early, shards = fsdp_build_and_setup(fabric, empty_init)
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    early = fabric.setup_optimizers(early)  # the seed's order: setup(model), then setup_optimizers
    ids = torch.tensor([[1, 2, 3, 4]])
    fabric.backward(model(ids).float().pow(2).mean())
    early.step()
    moved = any(not torch.equal(p.full_tensor(), full[name]) for name, p in model.named_parameters())
    return {
        "full": full, "moved": moved, "tied": model.module.lm_head.weight is model.module.embed.weight,
        "inv_freq": model.module.rope.inv_freq, "local_shapes": gathered(fabric, {n: tuple(s.shape) for n, s in
                                                                              shards.items()}),
        "dtype": {p.dtype for p in full.values()},
    }


def seed_snippet(fabric):
    """The seed's code, as written there (with our bundled Llama as MyModel)."""
    with fabric.init_module(empty_init=True):
        model = tiny_llama()
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters()))
    loss = model(torch.tensor([[1, 2, 3]])).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    return fabric.all_reduce(loss.detach(), reduce_op="mean").item()


class PostInit(nn.Module):
    """Init after the submodules' __init__, as transformers' post_init does: ZeRO-3 must not lose it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        nn.init.constant_(self.body[0].weight, 0.5)
        self.body[2].bias.data.fill_(3.0)

    def forward(self, x):
        return self.body(x)


def deepspeed_training(fabric, empty_init, joint):
    """Build under the DeepSpeed init context, set up in either order, take a step; gather to check values."""
    import deepspeed

    with fabric.init_module(empty_init=empty_init):
        module = PostInit()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    if joint:
        model, optimizer = fabric.setup(module, optimizer)
    else:
        model = fabric.setup(module)
        optimizer = fabric.setup_optimizers(optimizer)
    params = list(module.parameters())
    partitioned = all(p.numel() == 0 for p in params) if fabric.plan.options.stage == 3 else None
    with deepspeed.zero.GatheredParameters(params):
        start = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    loss = model(torch.ones(2, 8)).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    with deepspeed.zero.GatheredParameters(params):
        after = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    return {"start": start, "after": after, "partitioned": partitioned, "loss": float(loss),
            "same": gathered(fabric, [float(v.sum()) for v in after.values()])}


def deepspeed_replaced_layer(fabric):
    """ZeRO-3 from a record in which one layer was swapped for a meta-built one: the rest replays, it gets its
    own init. Returns the gathered parameters."""
    import deepspeed

    with torchinit.nan_poison(), fabric.init_module():
        module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.device("meta"):
        module[1] = nn.Linear(4, 4)
    with torchinit.nan_poison():
        fabric.setup(module)
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def deepspeed_tied_llama(fabric):
    with fabric.init_module(empty_init=True):
        module = tiny_llama()
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(module.parameters(), lr=1e-3))
    loss = model(torch.tensor([[1, 2, 3]])).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    return {"tied": module.lm_head.weight is module.embed.weight, "loss": float(loss)}


def fsdp_load_raw(fabric, path):
    """Set up an empty model under FSDP, then load a checkpoint into the shards (each rank its own rows)."""
    with fabric.init_module(empty_init=True):
        module = tiny_llama()
    model = fabric.setup(module)
    report = fabric.load_raw(path, model)
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return {"full": full, "bytes": gathered(fabric, report.bytes), "missing": report.missing}


def relaunch(fabric):
    try:
        fabric.launch()
    except RuntimeError as error:
        return str(error)


def die_on_rank_one(fabric):
    import os
    import time

    if fabric.global_rank == 1:
        os._exit(3)  # no Python error, no error file: the launcher must still name it and stop rank 0
    time.sleep(60)


class NoInitParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4))


def deepspeed_errors(fabric):
    """Every DeepSpeed error path, in one run (all ranks do the same, so collectives stay matched)."""
    errors = {}

    def catch(name, fn):
        try:
            fn()
        except (RuntimeError, ValueError) as error:
            errors[name] = str(error)

    catch("optimizer first", lambda: fabric.setup_optimizers(torch.optim.SGD(nn.Linear(2, 2).parameters(), 0.1)))

    recorded_plan = fabric.plan  # the rest of the zero.Init path's errors
    fabric.plan = dataclasses.replace(fabric.plan, options=torchinit.DeepSpeedStrategy(stage=3, record_init=False))

    def view_write():
        with fabric.init_module():
            layer = nn.Linear(4, 4)
            layer.weight.data.unsqueeze(0).fill_(1.0)
    catch("view write", view_write)

    def no_init():
        with fabric.init_module(empty_init=True):
            module = NoInitParam()
        fabric.setup(module)
    catch("no init", no_init)
    fabric.plan = recorded_plan

    with fabric.init_module():
        module = nn.Linear(4, 4)
    model = fabric.setup(module)
    model(torch.ones(1, 4))  # the engine is made here, without an optimizer
    catch("engine twice", lambda: fabric.setup_optimizers(torch.optim.SGD(module.parameters(), 0.1)))

    with fabric.init_module():
        module = nn.Linear(4, 4)
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), 0.1))
    catch("closure", lambda: optimizer.step(closure=lambda: 0.0))
    return errors


def _full(model) -> dict:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def _train_step(fabric, model, optimizer, seed):
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(seed))
    fabric.backward(model(ids).float().pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()


def _fsdp_llama(fabric, seed):
    torch.manual_seed(seed)
    with fabric.init_module():
        module = tiny_llama()
    model = fabric.setup(module)
    return model, fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))


def _errors(cases: dict) -> dict:
    """Run each case; its error as 'Type: message' (every rank runs the same cases, so collectives match)."""
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
            out[name] = f"{type(error).__name__}: {error}"
    return out


def _folder_bytes(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fsdp_checkpoint(fabric, folder):
    """FSDP save -> load into a fresh model and optimizer -> same values and the same next step; atomic saves;
    error paths. Rank 0's view comes back (the test compares the folder with a single-process load)."""
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemWriter

    folder = Path(folder)
    path = folder / "ckpt"
    model, optimizer = _fsdp_llama(fabric, 0)
    _train_step(fabric, model, optimizer, 1)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1, "info": {"lr": 1e-2}})
    saved = _full(model)
    moments = {name: optimizer.state[p]["exp_avg"].full_tensor().clone() for name, p in model.named_parameters()}
    _train_step(fabric, model, optimizer, 2)
    continued = _full(model)

    fresh, fresh_opt = _fsdp_llama(fabric, 7)  # other values, no optimizer state yet
    state = {"model": fresh, "optimizer": fresh_opt, "step": 0, "info": None}
    extra = fabric.load(path, state)
    loaded = _full(fresh)
    loaded_moments = {name: fresh_opt.state[p]["exp_avg"].full_tensor().clone()
                      for name, p in fresh.named_parameters()}
    _train_step(fabric, fresh, fresh_opt, 2)
    again = _full(fresh)

    raw, _ = _fsdp_llama(fabric, 8)
    report = fabric.load_raw(path, raw)  # the DCP folder as a plain checkpoint: the model entry only

    # atomicity: a write failing on rank 1 leaves the old folder as it was and no new one
    before, original = _folder_bytes(path), FileSystemWriter.write_data
    if fabric.global_rank == 1:
        def broken(self, plan, planner):
            raise OSError("disk full (test)")
        FileSystemWriter.write_data = broken
    failures = _errors({
        "over": lambda: fabric.save(path, {"model": model, "optimizer": optimizer}),
        "new": lambda: fabric.save(folder / "new", {"model": model}),
        "value": lambda: fabric.save(folder / "bad", {"model": model, "bad": Unpicklable()}),
    })
    fabric.barrier()
    FileSystemWriter.write_data = original
    intact = _folder_bytes(path) == before
    leftovers = sorted(p.name for p in folder.iterdir())

    other, other_opt = _fsdp_llama(fabric, 9)
    untouched = _full(other)
    sub_opt = torch.optim.AdamW([next(other.parameters())], lr=1e-2)
    (folder / "plain").mkdir(exist_ok=True)
    errors = _errors({
        "absent": lambda: fabric.load(path, {"model": other, "epoch": 0}),
        "keys": lambda: fabric.load(path, {"model": nn.Linear(2, 2)}),
        "optimizer": lambda: fabric.load(path, {"model": other, "optimizer": sub_opt}),
        "folder": lambda: fabric.load(folder / "plain", {"model": other}),
        "no state": lambda: fabric.load(path),
    })
    errors["untouched"] = all(torch.equal(v, untouched[k]) for k, v in _full(other).items())
    fabric.load(path, {"model": other, "epoch": 0}, strict=False)  # absent entries skipped
    strict_false = _full(other)

    fabric.save(folder / "twice", {"model": other})
    fabric.save(folder / "twice", {"model": model, "step": 2})  # replaces the folder
    fabric.load_raw(folder / "twice", other)
    return {
        "saved": saved, "loaded": loaded, "moments": moments, "loaded_moments": loaded_moments,
        "continued": continued, "again": again, "values": (state["step"], state["info"]), "extra": extra,
        "raw": _full(raw), "raw_bytes": gathered(fabric, report.bytes), "failures": gathered(fabric, failures),
        "intact": intact,
        "leftovers": leftovers, "errors": errors, "strict_false": strict_false, "replaced": _full(other),
        "after_replace": sorted(p.name for p in folder.iterdir()),
    }


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def _ds_llama(fabric, seed, empty_init=False):
    torch.manual_seed(seed)
    with fabric.init_module(empty_init=empty_init):
        module = tiny_llama()
    model, optimizer = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-2))
    return module, model, optimizer


def _ds_full(module) -> dict:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {name: p.detach().clone() for name, p in module.named_parameters()}


def _joined(fabric, **kwargs):
    """Another Fabric in the processes `fabric` was launched in: a second strategy without a second launch."""
    other = torchinit.Fabric(**{**fabric._args, **kwargs})
    other.launch()  # joins the process group already made
    return other


def _ds_round_trip(fabric, path):
    """Save, step on; load into a fresh engine, step: the values after load and after the step must match."""
    module, model, optimizer = _ds_llama(fabric, 0)
    _train_step(fabric, model, optimizer, 1)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    saved = _ds_full(module)
    _train_step(fabric, model, optimizer, 2)
    continued = _ds_full(module)
    module, model, optimizer = _ds_llama(fabric, 7)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    extra = fabric.load(path, state)
    loaded = _ds_full(module)
    _train_step(fabric, model, optimizer, 2)
    return {"saved": saved, "loaded": loaded, "continued": continued, "again": _ds_full(module),
            "step": state["step"], "extra": extra, "files": sorted(p.name for p in path.rglob("*"))}


def deepspeed_checkpoint(fabric, folder):
    """ZeRO-3: save/load round trip, load_raw of a safetensors file into the partitions, error paths; then the
    same round trip under ZeRO-2."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    out = {"zero3": _ds_round_trip(fabric, folder / "zero3")}

    torch.manual_seed(3)
    want = tiny_llama().to(torch.bfloat16)
    tensors = {k: v for k, v in want.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    if fabric.is_global_zero:
        save_file(tensors, folder / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if k != "norm.weight"}, folder / "partial.safetensors")
    fabric.barrier()
    module, model, optimizer = _ds_llama(fabric, 4, empty_init=True)
    _train_step(fabric, model, optimizer, 1)  # a forward leaves small parameters gathered, an optimizer state
    report = fabric.load_raw(folder / "model.safetensors", model)
    raw = _ds_full(module)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    _train_step(fabric, model, optimizer, 2)  # with stale fp32 master weights this would bring the old values back
    out["raw"] = {"want": dict(want.named_parameters()), "raw": raw, "after_step": _ds_full(module),
                  "bytes": gathered(fabric, report.bytes), "file_bytes": sum(v.numel() * 2 for v in tensors.values())}

    (folder / "plain").mkdir(exist_ok=True)
    before = _ds_full(module)
    errors = _errors({
        "partial": lambda: fabric.load_raw(folder / "partial.safetensors", model),
        "folder": lambda: fabric.load(folder / "plain", {"model": model}),
        "dcp": lambda: fabric.load(folder / "zero3", {"model": nn.Linear(2, 2)}),
        "absent": lambda: fabric.load(folder / "zero3", {"model": model, "epoch": 0}),
    })
    errors["untouched"] = all(torch.equal(v, before[k]) for k, v in _ds_full(module).items())
    with fabric.init_module():
        lone = nn.Linear(4, 4)
    lone = fabric.setup(lone)  # no optimizer, no forward: no engine yet
    errors.update(_errors({"no engine": lambda: fabric.save(folder / "x", {"model": lone})}))
    with fabric.init_module():
        other = PostInit()
    other, _ = fabric.setup(other, torch.optim.SGD(other.parameters(), lr=0.1))
    errors.update(_errors({"keys": lambda: fabric.load(folder / "zero3", {"model": other})}))
    out["zero2"] = _ds_round_trip(_joined(fabric, strategy="deepspeed"), folder / "zero2")
    out["errors"] = errors
    return out


def fsdp_reload(fabric, path):
    """Load a folder saved by another world size into a fresh model and optimizer."""
    model, optimizer = _fsdp_llama(fabric, 7)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    extra = fabric.load(path, state, strict=False)  # the folder also holds "info"
    moments = {name: optimizer.state[p]["exp_avg"].full_tensor() for name, p in model.named_parameters()}
    return {"loaded": _full(model), "moments": moments, "step": state["step"], "extra": extra}


def deepspeed_budget(fabric):
    """ZeRO-3 from a record: what the pre-flight plans to leave on this rank, against what the rank receives; and a
    model whose partitions cannot fit this machine is refused before anything is allocated."""
    import psutil

    from torchinit.materialize.memory import budget
    from torchinit.strategies.deepspeed import param_dtype, partition_needs

    with fabric.init_module(empty_init=True):
        module = PostInit()
    needs = partition_needs(module, fabric.device, param_dtype(fabric.plan))
    planned = sum(need.held for need in needs)
    fabric.setup(module)
    received = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in module.parameters())
    received += sum(b.nbytes for b in module.buffers())
    # 8 layers of side x side bf16: each rank's partitions plus one layer in full (and its fp32 work tensor) are
    # more than this machine has, one layer in full is not
    side = int((psutil.virtual_memory().total / 10) ** 0.5)
    with fabric.init_module(empty_init=True):
        huge = nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(8)])
    rss = psutil.Process().memory_info().rss
    try:
        fabric.setup(huge)
        refused = None
    except torchinit.InsufficientMemoryError as exc:
        refused = str(exc)
    return {"planned": planned, "received": received, "refused": refused,
            "grew": psutil.Process().memory_info().rss - rss,
            "huge": budget(partition_needs(huge, fabric.device, torch.bfloat16))[fabric.device]}


def fsdp_cpu_offload(fabric, record):
    """FSDP2 with CPU offload on a GPU: the shards end on the (pinned) CPU, a step trains, the ranks' process
    group knows its GPU (nccl device_id). Returns what the test checks."""
    from torch.distributed.distributed_c10d import _get_default_group

    fabric.plan = dataclasses.replace(fabric.plan, options=dataclasses.replace(fabric.plan.options,
                                                                               record_init=record))
    with fabric.init_module(empty_init=True):
        module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4))
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    devices = {p.to_local().device.type for p in model.parameters()}
    before = [p.to_local().clone() for p in model.parameters()]
    loss = model(torch.randn(3, 16, device=fabric.device)).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    moved = any(not torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters(), strict=True))
    return {"devices": devices, "pinned": all(p.to_local().is_pinned() for p in model.parameters()),
            "moved": moved, "bound": str(_get_default_group().bound_device_id)}
