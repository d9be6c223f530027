"""What Fabric hands back from setup, for every strategy: the module wrapper (forward in the precision's rules), the
optimizer wrapper (steps through the precision) and the optimizer checks."""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import nn

from torchinit.core.errors import ArgumentTypeError, ConfigurationError, UsageError
from torchinit.strategies.precision import Precision


class FabricModule(nn.Module):
    """What `setup` returns (Lightning's `_FabricModule`): forward through the strategy's wrapper (DDP, the engine,
    `parallelize_fn`'s result) with inputs and outputs converted as the precision says (precision.py); state dict
    keys, parameters and attributes are the original module's, and setting an attribute sets it there."""

    def __init__(self, forward_module: nn.Module, precision: Precision, original: nn.Module | None = None):
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original if original is not None else forward_module
        self._precision = precision
        self._forward_methods: set[str] = set(STEP_METHODS)
        self._fabric_module_initialized = True

    @property
    def module(self) -> nn.Module:
        """The module as the user built it (state dict keys, parameters, attributes)."""
        return self._original_module

    @property
    def forward_module(self) -> nn.Module:
        """What forward runs through: DDP's wrapper, DeepSpeed's engine, `parallelize_fn`'s result or the module."""
        return self._forward_module

    def forward(self, *args, **kwargs):
        precision = self._precision
        args, kwargs = precision.convert_input((args, kwargs))
        with precision.forward_context():
            output = self._forward_module(*args, **kwargs)
        return precision.convert_output(output)

    def state_dict(self, *args, **kwargs):
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._original_module.load_state_dict(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        return self._original_module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return self._original_module.named_buffers(*args, **kwargs)

    def run_forward_through(self, make: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the module forward runs through by `make(it)` (the facade compiles it again after setup)."""
        self._modules["_forward_module"] = make(self._forward_module)

    def mark_forward_method(self, method: MethodType | str) -> None:
        """Run `method` of the original module through forward's path (DDP's wrapper, the engine, precision), as
        `training_step`, `validation_step`, `test_step` and `predict_step` already are."""
        if not isinstance(method, (MethodType, str)):
            raise ArgumentTypeError(f"mark_forward_method takes a method or its name, not a {type(method).__name__}.")
        name = method if isinstance(method, str) else method.__name__
        if name == "forward":
            raise ConfigurationError("You cannot mark the forward method itself as a forward method.")
        if not isinstance(getattr(self._original_module, name, None), MethodType):
            raise UsageError(f"You marked {name!r} as a forward method, but `{type(self._original_module).__name__}."
                             f"{name}` does not exist or is not a method.")
        self._forward_methods.add(name)

    def _through_forward(self, name: str) -> Callable:
        """`name` called as forward: the original module's forward is pointed at the method for one call through
        the wrapper, so DDP's hooks and the precision see it."""
        original = self._original_module
        real_forward = original.forward

        def redirected(*args, **kwargs):
            original.forward = real_forward
            return getattr(original, name)(*args, **kwargs)

        def call(*args, **kwargs):
            original.forward = redirected
            try:
                return self.forward(*args, **kwargs)
            finally:
                original.forward = real_forward
        return call

    def __getattr__(self, name: str):
        if name != "_forward_methods" and name in self.__dict__.get("_forward_methods", ()) and (
                self._modules["_forward_module"] is not self._modules["_original_module"]):
            return self._through_forward(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_original_module"), name)

    def __setattr__(self, name: str, value) -> None:
        if not self.__dict__.get("_fabric_module_initialized", False):
            super().__setattr__(name, value)
            return
        original = self._original_module
        on_original, on_wrapper = hasattr(original, name), name in dir(self)
        if on_original or not on_wrapper:
            setattr(original, name, value)
        if on_wrapper:
            super().__setattr__(name, value)


STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


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


def setup_optimizer(optimizer: Any, precision: Precision, on_step: Callable[[Any], None] | None = None) -> Any:
    """`FabricOptimizer` around `optimizer`; its class also derives from the optimizer's own (`isinstance(opt,
    torch.optim.SGD)` holds)."""
    if isinstance(optimizer, FabricOptimizer):
        raise ConfigurationError("This optimizer was already set up by a Fabric; pass the original optimizer only "
                                 "once.")
    cls = type(optimizer)
    bases = (FabricOptimizer, cls) if issubclass(cls, torch.optim.Optimizer) else (FabricOptimizer,)
    wrapped = type(f"Fabric{cls.__name__}", bases, {"__module__": __name__})
    return wrapped(optimizer, precision, on_step)


class FabricOptimizer(torch.optim.Optimizer):
    """What `setup_optimizers` returns (Lightning's `_FabricOptimizer`): `.optimizer` is the one given; `step()`
    goes through the precision (16-mixed: the grad scaler unscales, skips the step on inf/NaN and updates the
    scale), then the callbacks' `on_after_optimizer_step`.

    Composition, not a shared `__dict__`: an LR scheduler patches `step` on the object it is given, so on a
    shared dict a scheduler made on the wrapper recursed forever and one made before `setup` bypassed the scaler.
    `param_groups`, `state` and `defaults` are the optimizer's own objects, so schedulers change its learning
    rates; `state_dict` / `load_state_dict` / `add_param_group` / `zero_grad` are its own.
    """

    def __init__(self, optimizer: Any, precision: Precision, on_step: Callable[[Any], None] | None = None):
        self.optimizer, self.precision, self.on_step = optimizer, precision, on_step  # no super(): no state

    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, groups: setattr(self.optimizer, "param_groups", groups))
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    def step(self, closure=None):
        result = self.precision.optimizer_step(self.optimizer, closure)
        if self.on_step is not None:
            self.on_step(self.optimizer)
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


def unwrap(obj: Any) -> Any:
    """The object a Fabric wrapper holds (a set-up module: its original module; an optimizer: the one given)."""
    if isinstance(obj, FabricModule):
        return obj.module
    if isinstance(obj, FabricOptimizer):
        return obj.optimizer
    return obj
