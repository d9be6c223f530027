"""torchinit.Fabric vs lightning.fabric.Fabric on one CPU: the same loop (setup, setup_dataloaders, backward,
clip_gradients, a LambdaLR scheduler, all_reduce) gives bit-identical losses, norms and weights per precision.
Needs lightning: `python benchmarks/lightning_parity.py` in a venv that has it."""

import torch
from lightning.fabric import Fabric as LFabric
from torch import nn

import torchinit


def run(cls, precision):
    fabric = cls(accelerator="cpu", devices=1, precision=precision)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model, opt = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: 0.9 ** s)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(torch.randn(16, 8), batch_size=4))
    losses = []
    for x in loader:
        loss = model(x).pow(2).mean()
        fabric.backward(loss)
        norm = fabric.clip_gradients(model, opt, max_norm=0.05)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append((loss.item(), loss.dtype, norm.item()))
    r = fabric.all_reduce(torch.tensor([3]))
    return losses, [p.detach().clone() for p in module.parameters()], r

for precision in ("32-true", "bf16-true", "64-true", "bf16-mixed"):
    a, b = run(torchinit.Fabric, precision), run(LFabric, precision)
    same = a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True)) and torch.equal(a[2], b[2])
    print(precision, "identical" if same else f"DIFFER {a[0][:2]} vs {b[0][:2]}")
