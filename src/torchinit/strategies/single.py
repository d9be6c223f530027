"""One device: move and cast the module, run forward in the plan's precision, scale fp16 gradients."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from torch import nn

from torchinit.materialize.unwritten import initialize_unwritten
from torchinit.plan import Plan


def autocast(plan: Plan):
    """Autocast for mixed precisions; a no-op context for true precisions."""
    if not plan.mixed:
        return nullcontext()
    return torch.autocast(device_type=plan.device.type, dtype=plan.autocast_dtype)


def grad_scaler(plan: Plan) -> torch.amp.GradScaler | None:
    """fp16 autocast needs loss scaling; bf16 and the true precisions do not."""
    if plan.precision == "16-mixed" and plan.device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def setup_module(module: nn.Module, plan: Plan) -> FabricModule:
    """Initialize what empty init left unwritten, cast (true precisions), move, wrap."""
    if isinstance(module, FabricModule):
        raise ValueError("This module was already set up by a Fabric; pass the original module only once.")
    names = initialize_unwritten(module)
    if names:
        warnings.warn(
            f"setup() initialized {len(names)} parameter(s) that empty_init=True left unwritten and no "
            f"checkpoint filled (reset_parameters()): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}",
            stacklevel=3,
        )
    # Module.to swaps .data in place, so Parameter objects (and optimizers holding them) stay valid.
    module.to(device=plan.device, dtype=plan.param_dtype)
    return FabricModule(module, plan)


class FabricModule(nn.Module):
    """A thin wrapper: forward in the plan's precision; state_dict keys and attributes are the original's."""

    def __init__(self, module: nn.Module, plan: Plan):
        super().__init__()
        self._forward_module = module
        self._plan = plan

    @property
    def module(self) -> nn.Module:
        return self._forward_module

    def forward(self, *args, **kwargs):
        if not self._plan.mixed:
            args, kwargs = _cast_floating((args, kwargs), self._plan.param_dtype)
        with autocast(self._plan):
            return self._forward_module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self._forward_module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._forward_module.load_state_dict(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        return self._forward_module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return self._forward_module.named_buffers(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_forward_module"), name)


def _cast_floating(tree, dtype: torch.dtype):
    return torch.utils._pytree.tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


def setup_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None):
    """With a grad scaler, `step()` must go through it; otherwise the optimizer needs nothing on one device.

    The wrapper is an instance of a subclass of the optimizer's own class sharing its `__dict__`, so
    `isinstance` checks (LR schedulers) and all state are those of the original.
    """
    if scaler is None:
        return optimizer
    cls = type(optimizer)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("optimizer.step(closure) is not supported with precision='16-mixed' (grad scaler).")
        result = scaler.step(optimizer)
        scaler.update()
        return result

    wrapped = object.__new__(type(f"Fabric{cls.__name__}", (cls,), {"step": step}))
    wrapped.__dict__ = optimizer.__dict__
    return wrapped
