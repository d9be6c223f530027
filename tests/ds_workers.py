"""DeepSpeed functions that `Fabric.launch(fn)` runs in spawned processes (module level, so that they pickle)."""

import dataclasses

import torch
from dist_workers import _errors, _joined, _train_step, bytes_read_from, gathered, tiny_llama
from torch import nn

import torchinit


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
    full = _ds_full(module)  # what setup made, gathered from the partitions
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(module.parameters(), lr=1e-3))
    loss = model(torch.tensor([[1, 2, 3]])).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    return {"tied": module.lm_head.weight is module.embed.weight, "full": full,
            "losses": gathered(fabric, loss.item())}


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
    with bytes_read_from(folder / "model.safetensors") as read:
        report = fabric.load_raw(folder / "model.safetensors", model)
    raw = _ds_full(module)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    _train_step(fabric, model, optimizer, 2)  # with stale fp32 master weights this would bring the old values back
    out["raw"] = {"want": dict(want.named_parameters()), "raw": raw, "after_step": _ds_full(module),
                  "bytes": gathered(fabric, report.bytes), "read": gathered(fabric, (read.total, read.distinct)),
                  "file_bytes": sum(v.numel() * 2 for v in tensors.values())}

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
