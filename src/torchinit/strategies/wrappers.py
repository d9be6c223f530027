"""What Fabric hands back from setup, for every strategy: the module wrapper (forward in the plan's precision), the
optimizer checks, and the fp16 grad scaler behind `ScaledOptimizer`."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from torchinit.core.compat import tree_map
from torchinit.core.errors import ConfigurationError, UsageError
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


class FabricModule(nn.Module):
    """A thin wrapper: forward (through DDP if wrapped) in the plan's precision; state_dict keys, parameters and
    attributes are the original module's."""

    def __init__(self, forward_module, plan: Plan, original: nn.Module | None = None,
                 input_dtype: torch.dtype | None = None):
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original if original is not None else forward_module
        self._plan = plan
        self._input_dtype = input_dtype  # the engine's dtype (DeepSpeed); else the plan's for true precisions

    @property
    def module(self) -> nn.Module:
        """The module as the user built it (state dict keys, parameters, attributes)."""
        return self._original_module

    @property
    def forward_module(self) -> nn.Module:
        """What forward runs through: DDP's wrapper, DeepSpeed's engine, `parallelize_fn`'s result or the module."""
        return self._forward_module

    def forward(self, *args, **kwargs):
        if self._input_dtype is not None:  # the engine handles precision itself
            args, kwargs = cast_floating((args, kwargs), self._input_dtype)
            return self._forward_module(*args, **kwargs)
        if not self._plan.mixed:
            args, kwargs = cast_floating((args, kwargs), self._plan.param_dtype)
        with autocast(self._plan):
            return self._forward_module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._original_module.load_state_dict(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        return self._original_module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return self._original_module.named_buffers(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_original_module"), name)


def cast_floating(tree, dtype: torch.dtype):
    return tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


def check_optimizer(optimizer: torch.optim.Optimizer, model_set_up: bool = True) -> None:
    """An optimizer built from meta parameters is fine once they are materialized in place; one that already
    holds state for meta parameters (a step was taken) is not, and parameters still on meta cannot step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def meta_state(p: torch.Tensor) -> bool:
        state = optimizer.state.get(p, {})
        return bool(state) and (p.device.type == "meta" or any(
            isinstance(v, torch.Tensor) and v.device.type == "meta" for v in state.values()))

    stale = [i for i, p in enumerate(params) if meta_state(p)]
    if stale:
        raise UsageError(
            f"{type(optimizer).__name__} already holds state for {len(stale)} parameter(s) on the meta device "
            f"(indices {stale[:10]} in its param groups): that state has no values and cannot be moved. Create the "
            "optimizer without stepping it before setup(), or after setup()."
        )
    on_meta = sum(p.device.type == "meta" for p in params)
    if on_meta and model_set_up:
        raise UsageError(
            f"{on_meta} parameter(s) of {type(optimizer).__name__} are still on the meta device. Call "
            "fabric.setup(model) (or setup_module) before setup_optimizers(): it materializes them in place, and "
            "the optimizer keeps working with the same Parameter objects."
        )


def setup_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> torch.optim.Optimizer:
    """With a grad scaler, `step()` must go through it (`ScaledOptimizer`); otherwise the optimizer is returned.

    The wrapper's class also derives from the optimizer's own (`isinstance(opt, torch.optim.SGD)` holds)."""
    if scaler is None:
        return optimizer
    cls = type(optimizer)
    scaled = type(f"Scaled{cls.__name__}", (ScaledOptimizer, cls), {"__module__": __name__})
    return scaled(optimizer, scaler)


class ScaledOptimizer(torch.optim.Optimizer):
    """The optimizer, stepped through a grad scaler (16-mixed): `step()` unscales the gradients, skips the step on
    inf/NaN and updates the scale.

    Composition, not a shared `__dict__`: an LR scheduler patches `step` on the object it is given, so on a
    shared dict a scheduler made on the wrapper recursed forever and one made before `setup` bypassed the scaler.
    `param_groups`, `state` and `defaults` are the optimizer's own objects, so schedulers change its learning
    rates; `state_dict` / `load_state_dict` / `add_param_group` / `zero_grad` are its own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler):  # no super(): no state
        self.optimizer, self.scaler = optimizer, scaler

    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, groups: setattr(self.optimizer, "param_groups", groups))
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def step(self, closure=None):
        if closure is not None:
            raise ConfigurationError("optimizer.step(closure) is not supported with precision='16-mixed' (grad "
                                     "scaler): call fabric.backward(loss) yourself, then optimizer.step().")
        result = self.scaler.step(self.optimizer)
        self.scaler.update()
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str):  # hooks, options and methods of the optimizer's own class
        if name == "optimizer":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"
