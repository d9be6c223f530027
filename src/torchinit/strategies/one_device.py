"""One device per process, the whole model in each: materialize it there (meta and unwritten tensors get their
one source), then run it as it is; `ddp.py` adds the replication."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

from torch import nn

from torchinit.init.context import InitContext, eager_default_dtype
from torchinit.init.record import RecordContext
from torchinit.materialize.materialize import materialize
from torchinit.record import pending
from torchinit.strategies.base import Common, Layout
from torchinit.strategies.wrappers import FabricModule

__all__ = ["OneDevice"]


class OneDevice(Common):
    """The model whole on this process's device; state is one file written by rank 0."""

    layout = Layout.FILE

    def init_context(self, empty_init: bool) -> InitContext | RecordContext:
        plan = self.plan
        if empty_init:  # record now, replay what no checkpoint writes (record/pending.py)
            return RecordContext(plan.device, plan.param_dtype, empty_init=True)
        if plan.param_dtype != eager_default_dtype():  # (not an open context's)
            # G8: the constructor runs in eager's dtypes on fake tensors; each value is computed as eager does and
            # stored cast at exit, one tensor at a time (never an fp32 copy of the model)
            return RecordContext(plan.device, plan.param_dtype, replay=True)
        return InitContext(plan.device, plan.param_dtype, empty_init=False)

    def wrap(self, module: nn.Module, move_to_device: bool = True) -> FabricModule:
        empty = pending.unwritten_names(module)
        materialize(module, self.plan.device if move_to_device else None, self.plan.param_dtype)
        if empty:
            warnings.warn(
                f"setup() initialized {len(empty)} parameter(s) that empty_init=True left unwritten and no checkpoint "
                "filled (the recorded init, eager's values; without a record, their module's init): "
                f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}",
                stacklevel=5,
            )
        return FabricModule(self.forward_module(module), self.precision, original=module)

    def no_backward_sync(self, module: FabricModule, enabled: bool) -> AbstractContextManager:
        """One process: nothing is synchronized, nothing to skip."""
        return nullcontext()

    def forward_module(self, module: nn.Module) -> nn.Module:
        """What forward runs through: the module itself on one device."""
        return module
