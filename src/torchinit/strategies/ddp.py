"""DDP: every rank holds the whole model; DistributedDataParallel makes the ranks start equal (it broadcasts
rank 0's parameters and buffers when it wraps) and averages gradients in backward."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchinit.plan import Plan


def replicate(module: nn.Module, plan: Plan) -> DistributedDataParallel:
    device_ids = [plan.device.index] if plan.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)
