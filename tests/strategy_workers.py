"""Functions that `Fabric.launch(fn)` runs in spawned processes for the strategy-argument tests (module level, so
that they pickle). Each runs several Fabrics on the one process group the launch made."""

import torch
import torch.distributed as dist
from dist_workers import gathered, tiny_llama
from torch import nn
from torch.distributed.tensor import DTensor

import torchinit
from torchinit.models.llama import Block
from torchinit.strategies.policies import Checkpointed


def joined(strategy, **kwargs):
    """Another Fabric on the process group this launch made."""
    fabric = torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=dist.get_world_size(), **kwargs)
    fabric.launch()
    return fabric


def full(model) -> dict:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def step(fabric, model, optimizer, seed):
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(seed + fabric.global_rank))
    loss = model(ids).float().pow(2).mean()
    fabric.backward(loss)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in model.named_parameters()}
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), grads


def llama(fabric, seed=0):
    torch.manual_seed(seed)
    with fabric.init_module():
        module = tiny_llama()
    return fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-2))


def counting_forwards(model):
    """Count the Blocks' forward calls (beneath an activation-checkpointing wrapper, if any)."""
    calls = []
    for block in model.module.layers:
        def forward(*args, _block=block, **kwargs):
            calls.append(id(_block))
            return Block.forward(_block, *args, **kwargs)
        current = block.__dict__.get("forward")
        if isinstance(current, Checkpointed):
            current.forward = forward
        else:
            block.forward = forward
    return calls


def fsdp_lightning_arguments(fabric, path):
    """Activation checkpointing, SHARD_GRAD_OP, HYBRID_SHARD meshes and state_dict_type="full" (save, load)."""
    out = {}
    # activation checkpointing of every Block: each forward runs again in backward; same loss and gradients
    runs = {}
    for name, policy in (("plain", None), ("checkpointed", {Block})):
        f = joined(torchinit.FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy=policy))
        model, optimizer = llama(f)
        calls = counting_forwards(model)
        runs[name] = (*step(f, model, optimizer, 1), len(calls))
    out["checkpointing"] = runs
    # SHARD_GRAD_OP: parameters stay gathered between forward and backward (FULL_SHARD frees them)
    kept = {}
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        model, _ = llama(joined(torchinit.FSDPStrategy(sharding_strategy=strategy)))
        model(torch.tensor([[1, 2, 3]]))
        kept[strategy] = not isinstance(model.module.layers[0].attn.q_proj.weight, DTensor)
    out["kept after forward"] = kept
    # hybrid meshes: (replicas, shards) placements; values are eager's whatever the mesh
    meshes = {}
    for strategy, mesh in (("HYBRID_SHARD", (1, 2)), ("HYBRID_SHARD", (2, 1)), ("NO_SHARD", None)):
        f = joined(torchinit.FSDPStrategy(sharding_strategy=strategy, device_mesh=mesh))
        model, optimizer = llama(f)
        w = model.module.layers[0].attn.q_proj.weight
        meshes[f"{strategy} {mesh}"] = dict(shape=tuple(w.device_mesh.shape), placements=[str(p) for p in w.placements],
                                            local=tuple(w.to_local().shape), full=full(model),
                                            loss=step(f, model, optimizer, 1)[0])
    out["meshes"] = meshes
    # state_dict_type="full": one file from rank 0, gathered one tensor at a time (rank 0 writes between gathers)
    f = joined(torchinit.FSDPStrategy(state_dict_type="full"))
    model, optimizer = llama(f)
    step(f, model, optimizer, 1)
    events = []
    from torchinit.checkpoint import full_save

    original_gather, original_write = DTensor.full_tensor, full_save._Skeleton.write
    DTensor.full_tensor = lambda self, **kw: (events.append("gather"), original_gather(self, **kw))[1]
    full_save._Skeleton.write = lambda self, *a: (events.append("write"), original_write(self, *a))[1]
    try:
        f.save(path, {"model": model, "optimizer": optimizer, "step": 3, "extra": {"t": torch.arange(3)}})
    finally:
        DTensor.full_tensor, full_save._Skeleton.write = original_gather, original_write
    saved = full(model)
    moments = {n: optimizer.state[p]["exp_avg"].full_tensor().clone() for n, p in model.named_parameters()}
    continued = step(f, model, optimizer, 2)
    fresh, fresh_optimizer = llama(f, seed=5)
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    rest = f.load(path, state)
    out["full"] = dict(saved=saved, moments=moments, events=events if f.global_rank == 0 else None,
                       loaded=full(fresh), step=state["step"], rest=rest,
                       continued=(continued[0], step(f, fresh, fresh_optimizer, 2)[0]),
                       files=gathered(f, sorted(p.name for p in path.parent.iterdir())))
    return out


def sync_module_states(fabric):
    """A model built outside init_module with a different seed on each rank: sync_module_states shards rank 0's."""
    out = {}
    for sync in (False, True):
        torch.manual_seed(fabric.global_rank)
        module = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
        original = {n: p.detach().clone() for n, p in module.named_parameters()}
        f = joined(torchinit.FSDPStrategy(sync_module_states=sync))
        model = f.setup(module)
        out[sync] = (original, full(model))
    return out


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def ddp_unused_parameters(fabric):
    f = joined(torchinit.DDPStrategy(find_unused_parameters=True))
    with f.init_module():
        module = Branchy()
    model, optimizer = f.setup(module, torch.optim.SGD(module.parameters(), lr=0.1))
    for _ in range(2):  # DDP raises at the second step unless told that some parameters get no gradient
        f.backward(model(torch.ones(2, 3)).sum())
        optimizer.step()
        optimizer.zero_grad()
    return {"find_unused": model.forward_module.find_unused_parameters, "backend": dist.get_backend()}


def lightning_fsdp_training(fabric, path):
    """The step and save litgpt's full finetune makes; returns whether the Blocks recompute in backward."""
    with fabric.init_module(empty_init=True):
        module = tiny_llama()
    model, optimizer = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-3))
    fabric.backward(model(torch.tensor([[1, 2, 3]])).float().pow(2).mean())
    optimizer.step()
    fabric.save(path, {"model": model, "optimizer": optimizer, "iter_num": 1})
    return all(isinstance(block.__dict__.get("forward"), Checkpointed) for block in model.module.layers)
