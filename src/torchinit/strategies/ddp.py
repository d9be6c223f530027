"""DDP: every rank holds the whole model; DistributedDataParallel makes the ranks start equal (it broadcasts
rank 0's parameters and buffers when it wraps) and averages gradients in backward. `DDPStrategy`'s arguments
(find_unused_parameters, static_graph, ...) are DistributedDataParallel's."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchinit.strategies.one_device import OneDevice
from torchinit.strategies.wrappers import FabricModule

__all__ = ["DDP"]


class DDP(OneDevice):
    """One device per process, replicated: forward runs through DistributedDataParallel."""

    def forward_module(self, module: nn.Module) -> DistributedDataParallel:
        device_ids = [self.plan.device.index] if self.plan.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **self.plan.options.ddp_kwargs())

    def no_backward_sync(self, module: FabricModule, enabled: bool) -> AbstractContextManager:
        """DDP's `no_sync`: gradients stay local (accumulated) until a backward outside it."""
        return module.forward_module.no_sync() if enabled else nullcontext()
