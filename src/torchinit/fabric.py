"""Fabric: the front door. It composes the plan, the init context and the strategy; no logic of its own."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchinit.init.context import InitContext
from torchinit.plan import make_plan
from torchinit.strategies import single


class Fabric:
    """Lightning-Fabric-style entry point (see the README's API section).

    Args:
        accelerator: "auto", "cpu", "cuda", "gpu" or "mps".
        strategy: "auto" or "single_device" (multi-process strategies are not available yet).
        devices: 1, "auto" or a one-element list such as [1].
        num_nodes: 1.
        precision: "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed" (aliases 64, 32,
            "16" -> 16-mixed, "bf16" -> bf16-mixed).
        seed: if given, seeds torch (all devices), `random` and NumPy now.
    """

    def __init__(
        self,
        accelerator: str = "auto",
        strategy: str = "auto",
        devices: int | str | list[int] = "auto",
        num_nodes: int = 1,
        precision: str | int = "32-true",
        seed: int | None = None,
    ):
        self.plan = make_plan(accelerator, strategy, devices, num_nodes, precision)
        self._scaler = single.grad_scaler(self.plan)
        if seed is not None:
            seed_everything(seed)

    # ---- where we are ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.plan.device

    global_rank = 0
    local_rank = 0
    node_rank = 0
    world_size = 1
    is_global_zero = True

    # ---- construct -------------------------------------------------------------------------------
    def init_module(self, empty_init: bool | None = None) -> InitContext:
        """Build modules on the device in the precision's dtype; `empty_init=True` skips all init work.

        Without empty init the model equals, bit for bit, the eager model built with the same seed on the
        device and then cast to the precision's dtype. With empty init, parameter memory is uninitialized
        until a checkpoint or `setup` writes it; reading it in forward raises.
        """
        return InitContext(self.plan.device, self.plan.param_dtype, empty_init=bool(empty_init))

    def init_tensor(self) -> InitContext:
        """Tensors created inside land on the device in the precision's dtype."""
        return InitContext(self.plan.device, self.plan.param_dtype, empty_init=False)

    # ---- set up ----------------------------------------------------------------------------------
    def setup(self, module: nn.Module, *optimizers: torch.optim.Optimizer) -> Any:
        """`setup_module(module)`, and `setup_optimizers(*optimizers)` if any are given."""
        for optimizer in optimizers:  # before the model changes, so that an error leaves it as it was
            single.check_optimizer(optimizer, model_set_up=False)
        wrapped = self.setup_module(module)
        if not optimizers:
            return wrapped
        return (wrapped, *(self._setup_optimizer(opt) for opt in optimizers))

    def setup_module(self, module: nn.Module) -> single.FabricModule:
        return single.setup_module(module, self.plan)

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer) -> Any:
        wrapped = [self._setup_optimizer(opt) for opt in optimizers]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def _setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        single.check_optimizer(optimizer)
        return single.setup_optimizer(optimizer, self._scaler)

    # ---- run -------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward(**kwargs)

    def autocast(self):
        """Autocast to the mixed precision's dtype (a no-op for true precisions)."""
        return single.autocast(self.plan)

    def launch(self, fn: Callable | None = None, *args: Any) -> Any:
        """One process: run `fn(self, *args)` here (nothing to spawn)."""
        return fn(self, *args) if fn is not None else None

    def barrier(self, name: str | None = None) -> None:
        """One process: nothing to wait for."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        return tensor

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_global_zero:
            print(*args, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed torch on every device, Python's `random` and NumPy (if installed)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)
