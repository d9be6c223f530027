"""What `test_fabric_distributed.py` runs in 2 spawned processes (module level, so that it pickles)."""

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import torchinit


class Noted(torchinit.Fabric):
    """A Fabric subclass with an attribute set by the caller: the ranks must get this object, not a fresh Fabric."""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 2)])

    def forward(self, x):
        return self.blocks[1](torch.relu(self.blocks[0](x)))

    def generate(self, x):
        return self.forward(x) * 2


def gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def ddp_surface(fabric, folder, scale=1):
    out = {"rand": torch.rand(1).item(), "class": (type(fabric).__name__, fabric.note, scale)}
    r, folder = fabric.global_rank, Path(folder)
    t = torch.tensor([r + 1.0])
    out["mean"] = (fabric.all_reduce(t) is t, t.item())
    i = torch.tensor([r + 2])
    fabric.all_reduce(i)
    out["int_mean"] = (i.dtype, i.item())
    summed = fabric.all_reduce({"a": r + 1, "b": [torch.tensor(r * 1.0)]}, reduce_op="sum")
    out["sum"] = (summed["a"].item(), summed["b"][0].item())
    out["max"] = fabric.all_reduce(torch.tensor(float(r)), reduce_op="max").item()
    out["gather"] = (fabric.all_gather(torch.tensor([r, r * 10])).tolist(), fabric.all_gather(r).tolist())
    x = torch.tensor([r + 1.0], requires_grad=True)
    (fabric.all_gather(x, sync_grads=True) * torch.tensor([[1.0], [10.0]])).sum().backward()
    out["gather_grad"] = x.grad.item()
    out["broadcast"] = fabric.broadcast(f"from {r}", src=1)
    with fabric.rank_zero_first():
        if r == 0:
            (folder / "first").write_text("rank 0 was first")
        out["first"] = (folder / "first").read_text()
    shuffled = fabric.setup_dataloaders(DataLoader(list(range(8)), batch_size=2, shuffle=True))
    out["epochs"] = [sum((b.tolist() for b in shuffled), []) for _ in range(2)]
    out["sampler"] = type(shuffled.sampler).__name__
    out["ordered"] = [b.tolist() for b in fabric.setup_dataloaders(DataLoader(list(range(8)), batch_size=4))]
    kept = fabric.setup_dataloaders(DataLoader(list(range(8))), use_distributed_sampler=False)
    out["kept"] = type(kept.sampler).__name__
    fabric.log("rank", r, step=0)
    fabric.logger.save()

    model, optimizer = fabric.setup(module := Net(), torch.optim.SGD(module.parameters(), lr=0.1))
    batch = torch.full((1, 4), r + 1.0)
    with fabric.no_backward_sync(model):
        fabric.backward(model(batch).sum())
    out["unsynced"] = gathered([g.sum().item() for g in grads(model)])
    fabric.backward(model(batch).sum())
    out["synced"] = gathered([g.sum().item() for g in grads(model)])
    before = torch.nn.utils.get_total_norm(grads(model))
    norm = fabric.clip_gradients(model, optimizer, max_norm=0.01)
    out["norm"] = (torch.equal(norm, before), gathered(norm.item()),
                   torch.nn.utils.get_total_norm(grads(model)).item())
    calls = []
    model.forward_module.register_forward_pre_hook(lambda *_: calls.append("through DDP"))
    model.mark_forward_method("generate")
    generated = model.generate(torch.ones(1, 4))
    out["generate"] = (calls, torch.equal(generated, module.forward(torch.ones(1, 4)) * 2))
    out["fsdp"] = fsdp_part(fabric)
    return out


def fsdp_part(fabric):
    """FSDP2 in the same processes: clipping by the norm of the whole (sharded) model, no_backward_sync."""
    other = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=2)
    other.launch()  # joins the process group already made
    torch.manual_seed(0)
    model = other.setup_module(Net())
    optimizer = other.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    batch = torch.full((1, 4), fabric.global_rank + 1.0)
    with other.no_backward_sync(model):
        other.backward(model(batch).sum())
    unsynced = [p.grad is None for p in model.parameters()]
    other.backward(model(batch).sum())
    full = [p.grad.full_tensor() for p in model.parameters()]
    want = torch.nn.utils.get_total_norm(full)
    norm = other.clip_gradients(model, optimizer, max_norm=0.01)
    clipped = [p.grad.full_tensor() for p in model.parameters()]
    coef = 0.01 / (want + 1e-6)
    other.clip_gradients(model, optimizer, clip_val=1e-4)
    return {"unsynced": unsynced, "norm": (norm.item(), want.item()),
            "clipped": all(torch.allclose(c, f * coef, rtol=1e-5, atol=0) for c, f in zip(clipped, full, strict=True)),
            "value": max(p.grad.full_tensor().abs().max().item() for p in model.parameters()),
            "accumulated": [g.sum().item() for g in full]}


def deepspeed_clipping(fabric):
    """ZeRO-2, one rank: `clip_gradients(max_norm=...)` clips the coming step as DeepSpeed's own `gradient_clipping`
    does, for that step only; by value it is refused."""
    from torchinit.plan import DeepSpeedStrategy

    def step(fab, clip):
        torch.manual_seed(0)
        module = Net()
        model, optimizer = fab.setup(module, torch.optim.SGD(module.parameters(), lr=1.0))
        fab.backward(model(torch.full((2, 4), 3.0)).pow(2).sum())
        if clip:
            assert fab.clip_gradients(model, optimizer, max_norm=1e-3) is None
        optimizer.step()
        zero = fab.strategy.engine.engine.optimizer
        return [p.detach().clone() for p in module.parameters()], zero.clip_grad, (model, optimizer)

    ours, after_step, (model, optimizer) = step(fabric, clip=True)
    configured = DeepSpeedStrategy(stage=2, config={"gradient_clipping": 1e-3})
    theirs = torchinit.Fabric(accelerator="cpu", strategy=configured, devices=1)
    theirs.launch()  # joins the process group already made
    want, _, _ = step(theirs, clip=False)
    unclipped, configured, _ = step(_fresh_deepspeed(), clip=False)
    try:
        fabric.clip_gradients(model, optimizer, clip_val=1.0)
        by_value = None
    except ValueError as error:
        by_value = str(error)
    return {"same": all(torch.equal(a, b) for a, b in zip(ours, want, strict=True)),
            "clipped": any(not torch.equal(a, b) for a, b in zip(ours, unclipped, strict=True)),
            "after_step": (after_step, configured), "by_value": by_value}


def _fresh_deepspeed():
    other = torchinit.Fabric(accelerator="cpu", strategy="deepspeed_stage_2", devices=1)
    other.launch()
    return other
