"""The one place a plan's strategy name becomes a strategy object."""

from __future__ import annotations

from torchinit.plan import Plan
from torchinit.strategies.base import Strategy
from torchinit.strategies.ddp import DDP
from torchinit.strategies.deepspeed import DeepSpeed
from torchinit.strategies.fsdp import FSDP
from torchinit.strategies.model_parallel import ModelParallel
from torchinit.strategies.one_device import OneDevice

__all__ = ["STRATEGIES", "strategy_for"]

STRATEGIES: dict[str, type] = {"single_device": OneDevice, "ddp": DDP, "fsdp": FSDP, "model_parallel": ModelParallel,
                               "deepspeed": DeepSpeed}


def strategy_for(plan: Plan) -> Strategy:
    """The strategy that runs `plan` (make a new one when the plan changes, e.g. once the processes are joined)."""
    return STRATEGIES[plan.strategy](plan)
