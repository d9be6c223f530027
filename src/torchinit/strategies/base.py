"""What a strategy is to Fabric: one small protocol (the init context, setup, backward, how state is saved) and
the behaviour every strategy shares, so that each strategy module only says how it shards or wraps.

Fabric never asks which strategy it runs: it calls the protocol, and saves / loads by the strategy's `layout`.
"""

from __future__ import annotations

import abc
import enum
import warnings
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from torchinit.core.errors import ConfigurationError
from torchinit.init.context import InitContext
from torchinit.init.record import RecordContext
from torchinit.plan import Plan
from torchinit.strategies.wrappers import FabricModule, check_optimizer, grad_scaler, setup_optimizer

__all__ = ["Layout", "Strategy", "Common", "sharded_init_context", "remap_optimizer"]


class Layout(enum.Enum):
    """How a strategy's state is saved and loaded."""

    FILE = "file"  # whole tensors, one file written by rank 0 (one device, DDP)
    DCP = "dcp"  # DTensor shards, a torch.distributed.checkpoint folder, each rank its own (FSDP, model parallel)
    FULL = "full"  # DTensor shards, saved as one file of whole tensors that rank 0 writes, one gathered at a time
    DEEPSPEED = "deepspeed"  # the ZeRO engine's folder, each rank its partitions

    @property
    def sharded(self) -> bool:
        """Whether the modules hold DTensor shards (loading fills each rank's part)."""
        return self in (Layout.DCP, Layout.FULL)


class Strategy(Protocol):
    """The protocol Fabric drives. `setup_module` may replace Parameter objects (sharding); `sharded` maps the ids
    of the old ones to the new, so that optimizers made before setup are pointed at the shards."""

    plan: Plan
    layout: Layout
    sharded: dict[int, nn.Parameter]

    @property
    def param_dtype(self) -> torch.dtype: ...

    def start(self) -> None: ...

    def init_context(self, empty_init: bool) -> AbstractContextManager: ...

    def setup_module(self, module: nn.Module) -> FabricModule: ...

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None: ...


class Common(abc.ABC):
    """What every strategy does the same way: optimizer checks and remapping, fp16 loss scaling, the set-up
    checks. A strategy subclasses it and writes `wrap(module)` (materialize, shard, wrap) and `init_context`."""

    layout = Layout.FILE

    def __init__(self, plan: Plan):
        self.plan = plan
        self.sharded: dict[int, nn.Parameter] = {}
        self.scaler = grad_scaler(plan)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the parameters are stored in."""
        return self.plan.param_dtype

    def start(self) -> None:
        """Called once the processes are joined (every rank): collective set-up, such as a device mesh."""
        return None

    def setup_module(self, module: nn.Module) -> FabricModule:
        """Check what can be checked before anything changes, then materialize, shard and wrap (`wrap`)."""
        if isinstance(module, FabricModule):
            raise ConfigurationError("This module was already set up by a Fabric; pass the original module only "
                                     "once.")
        devices = sorted({str(p.device) for p in module.parameters() if p.device.type != "meta"})
        if len(devices) > 1:
            warnings.warn(
                f"The model's parameters are on {len(devices)} devices ({', '.join(devices)}); setup() moves them "
                f"all to {self.plan.device}.",
                stacklevel=4,
            )
        return self.wrap(module)

    @abc.abstractmethod
    def init_context(self, empty_init: bool) -> AbstractContextManager:
        """The context `fabric.init_module` returns."""

    @abc.abstractmethod
    def wrap(self, module: nn.Module) -> FabricModule:
        """Materialize, shard and wrap `module` (each strategy's own)."""

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Point an optimizer made before setup at the shards, check it can step, scale fp16 gradients."""
        check_optimizer(optimizer, model_set_up=False)
        if self.sharded:
            remap_optimizer(optimizer, self.sharded)
        check_optimizer(optimizer)
        return setup_optimizer(optimizer, self.scaler)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward(**kwargs)


def sharded_init_context(plan: Plan, record: bool) -> InitContext | RecordContext:
    """FSDP and model parallel never build the full model: parameters on meta, materialized shard by shard in
    setup; by default their init is recorded (with or without empty_init: it is cheap) and replayed there."""
    if record:
        return RecordContext(plan.device, plan.param_dtype)
    return InitContext(plan.device, plan.param_dtype, empty_init=False, meta=True)


def remap_optimizer(optimizer: torch.optim.Optimizer, mapping: dict[int, nn.Parameter]) -> None:
    """Point an optimizer made from the unsharded parameters at the sharded ones (it must hold no state yet)."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]
