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

    def not_recorded():
        with fabric.init_module():
            module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        with torch.device("meta"):
            module[1] = nn.Linear(4, 4)
        fabric.setup(module)
    catch("not recorded", not_recorded)

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
