"""What a strategy is to Fabric: one small protocol (the init context, setup, backward, how state is saved) and
the behaviour every strategy shares, so that each strategy module only says how it shards or wraps.

Fabric never asks which strategy it runs: it calls the protocol, and saves / loads by the strategy's `layout`.
"""

from __future__ import annotations

import abc
import enum
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from torchinit.core.errors import ConfigurationError
from torchinit.init.context import InitContext
from torchinit.init.record import RecordContext
from torchinit.plan import Plan
from torchinit.strategies.clipping import clip_grad_norm, clip_grad_value
from torchinit.strategies.precision import Precision
from torchinit.strategies.wrappers import FabricModule, check_optimizer

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
    precision: Precision  # Lightning callers read `fabric.strategy.precision.precision`

    @property
    def param_dtype(self) -> torch.dtype: ...

    @property
    def root_device(self) -> torch.device: ...

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None: ...

    def start(self) -> None: ...

    def init_context(self, empty_init: bool) -> AbstractContextManager: ...

    def setup_module(self, module: nn.Module, move_to_device: bool = True) -> FabricModule: ...

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None: ...

    def clip_gradients_norm(self, module: nn.Module, optimizer: Any, max_norm: float, norm_type: float,
                            error_if_nonfinite: bool) -> torch.Tensor | None: ...

    def clip_gradients_value(self, module: nn.Module, optimizer: Any, clip_val: float) -> None: ...

    def no_backward_sync(self, module: FabricModule, enabled: bool) -> AbstractContextManager: ...


class Common(abc.ABC):
    """What every strategy does the same way: optimizer checks and remapping, fp16 loss scaling, the set-up
    checks. A strategy subclasses it and writes `wrap(module)` (materialize, shard, wrap) and `init_context`."""

    layout = Layout.FILE

    def __init__(self, plan: Plan):
        self.plan = plan
        self.sharded: dict[int, nn.Parameter] = {}
        self.precision = self.make_precision(plan)

    def make_precision(self, plan: Plan) -> Precision:
        """How forward inputs and outputs are converted (precision.py); FSDP and DeepSpeed have their own rules."""
        return Precision(plan)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 grad scaler (16-mixed on CUDA), else None."""
        return self.precision.scaler

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the parameters are stored in."""
        return self.plan.param_dtype

    @property
    def root_device(self) -> torch.device:
        """This process's device (Lightning's name)."""
        return self.plan.device

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def global_rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def num_nodes(self) -> int:
        return self.plan.num_nodes

    @property
    def num_processes(self) -> int:
        """Processes per node."""
        return len(self.plan.device_indices)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """How a `DistributedSampler` splits the data: every process its own part (None: one process, no split)."""
        if not self.plan.multi_process:
            return None
        return {"num_replicas": self.plan.world_size, "rank": self.global_rank}

    def start(self) -> None:
        """Called once the processes are joined (every rank): collective set-up, such as a device mesh."""
        return None

    def setup_module(self, module: nn.Module, move_to_device: bool = True) -> FabricModule:
        """Check what can be checked before anything changes, then materialize, shard and wrap (`wrap`).
        `move_to_device=False` leaves real tensors where they are where the strategy can (one device, DDP)."""
        if isinstance(module, FabricModule):
            raise ConfigurationError("A model should be passed only once to the `setup` method: this one was already "
                                     "set up by a Fabric; pass the original module only once.")
        devices = sorted({str(p.device) for p in module.parameters() if p.device.type != "meta"})
        if len(devices) > 1 and move_to_device:
            warnings.warn(
                f"The model's parameters are on {len(devices)} devices ({', '.join(devices)}); setup() moves them "
                f"all to {self.plan.device}.",
                stacklevel=4,
            )
        return self.wrap(module, move_to_device)

    @abc.abstractmethod
    def init_context(self, empty_init: bool) -> AbstractContextManager:
        """The context `fabric.init_module` returns."""

    @abc.abstractmethod
    def wrap(self, module: nn.Module, move_to_device: bool = True) -> FabricModule:
        """Materialize, shard and wrap `module` (each strategy's own)."""

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Point an optimizer made before setup at the shards and check it can step; returns what steps (the
        facade wraps it so that steps go through the precision)."""
        check_optimizer(optimizer, model_set_up=False)
        if self.sharded:
            remap_optimizer(optimizer, self.sharded)
        check_optimizer(optimizer)
        return optimizer

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.precision.backward(loss, *args, **kwargs)

    def clip_gradients_norm(self, module: nn.Module, optimizer: Any, max_norm: float, norm_type: float = 2.0,
                            error_if_nonfinite: bool = True) -> torch.Tensor | None:
        """Clip the optimizer's gradients to a total norm (unscaled first under 16-mixed); the norm before."""
        self.precision.unscale_gradients(optimizer)
        return clip_grad_norm(self.precision.main_params(optimizer), max_norm, norm_type, error_if_nonfinite)

    def clip_gradients_value(self, module: nn.Module, optimizer: Any, clip_val: float) -> None:
        self.precision.unscale_gradients(optimizer)
        clip_grad_value(self.precision.main_params(optimizer), clip_val)

    def no_backward_sync(self, module: FabricModule, enabled: bool) -> AbstractContextManager:
        """Skip the gradient synchronization in backward (gradient accumulation); where the strategy cannot, a
        warning and nothing skipped (as Lightning)."""
        warnings.warn(f"The {type(self).__name__} strategy does not support skipping the gradient synchronization. "
                      "Remove `.no_backward_sync()` from your code or choose a different strategy.", stacklevel=3)
        return nullcontext()


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
