"""DDP: every rank holds the whole model; DistributedDataParallel makes the ranks start equal (it broadcasts
rank 0's parameters and buffers when it wraps) and averages gradients in backward. `DDPStrategy`'s arguments
(find_unused_parameters, static_graph, ...) are DistributedDataParallel's."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchinit.strategies.one_device import OneDevice

__all__ = ["DDP"]


class DDP(OneDevice):
    """One device per process, replicated: forward runs through DistributedDataParallel."""

    def forward_module(self, module: nn.Module) -> DistributedDataParallel:
        device_ids = [self.plan.device.index] if self.plan.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **self.plan.options.ddp_kwargs())
