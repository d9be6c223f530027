"""The precision as Lightning's precision plugins present it (`fabric.strategy.precision`): its name, how a set-up
module's inputs and outputs are converted, the context forward runs in, and fp16 loss scaling.

The conversion rules are Lightning 2.6's, so a program's values are the same as under Lightning:
- true precisions ("64-true", "bf16-true", "16-true"): floating inputs are cast to the precision's dtype, forward runs
  with it as the default dtype, floating outputs come back in the default dtype ("32-true": nothing is converted);
- mixed precisions: floating inputs are cast to the autocast dtype, forward runs under autocast, floating outputs come
  back in the default dtype;
- FSDP: as above, with "32-true" inputs cast to float32 too; DeepSpeed: inputs cast to the engine's dtype, outputs
  back, forward as it is (the engine handles precision).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from torchinit.core.compat import tree_map
from torchinit.core.dtypes import default_dtype
from torchinit.core.errors import ConfigurationError
from torchinit.plan import Plan

__all__ = ["Precision", "cast_floating", "grad_scaler"]


def cast_floating(tree: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor in `tree` (nested tuples, lists, dicts: what torch's pytree knows) cast to `dtype`."""
    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


def grad_scaler(plan: Plan) -> torch.amp.GradScaler | None:
    """fp16 autocast needs loss scaling; bf16 and the true precisions do not."""
    if plan.precision == "16-mixed" and plan.device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None




class Precision:
    """One precision, as a strategy runs it.

    Args:
        plan: the resolved precision, dtypes and device.
        input_dtype: what floating inputs are cast to (None: the rule above for `plan`).
        forward_dtype: the default dtype forward runs with (None: the rule above).
        engine: the strategy's engine handles precision in forward and backward (DeepSpeed): no autocast, no
            default dtype in forward, no grad scaler here.
    """

    def __init__(self, plan: Plan, input_dtype: torch.dtype | None = None, forward_dtype: torch.dtype | None = None,
                 engine: bool = False):
        self.precision: str = plan.precision
        self.device_type = plan.device.type
        self.param_dtype = plan.param_dtype
        self.autocast_dtype = None if engine else plan.autocast_dtype
        true_half = plan.autocast_dtype is None and plan.precision != "32-true"
        self.input_dtype = input_dtype or plan.autocast_dtype or (plan.param_dtype if true_half else None)
        if forward_dtype is None and true_half:
            forward_dtype = plan.param_dtype
        self.forward_dtype = None if engine else forward_dtype
        self.scaler = None if engine else grad_scaler(plan)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(precision={self.precision!r})"

    def convert_input(self, data: Any) -> Any:
        return data if self.input_dtype is None else cast_floating(data, self.input_dtype)

    def convert_output(self, data: Any) -> Any:
        return data if self.input_dtype is None else cast_floating(data, torch.get_default_dtype())

    def forward_context(self) -> AbstractContextManager:
        """Autocast for mixed precisions; the precision's dtype as the default dtype for true ones."""
        if self.autocast_dtype is not None:
            return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)
        if self.forward_dtype is not None:
            return default_dtype(self.forward_dtype)
        return nullcontext()

    def backward(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.scaler is not None:
            tensor = self.scaler.scale(tensor)
        tensor.backward(*args, **kwargs)

    def optimizer_step(self, optimizer: Any, closure: Any = None) -> Any:
        """Step (through the grad scaler for 16-mixed: unscale, skip on inf/NaN, update the scale)."""
        if self.scaler is None:
            return optimizer.step() if closure is None else optimizer.step(closure)
        if closure is not None:
            raise ConfigurationError("optimizer.step(closure) is not supported with precision='16-mixed' (grad "
                                     "scaler): call fabric.backward(loss) yourself, then optimizer.step().")
        result = self.scaler.step(optimizer)
        self.scaler.update()
        return result

    def unscale_gradients(self, optimizer: Any) -> None:
        """Before clipping: the gradients as they really are (a no-op without a grad scaler)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def main_params(self, optimizer: Any) -> Iterator[torch.Tensor]:
        for group in optimizer.param_groups:
            yield from group["params"]

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state_dict)
