"""What `Module.to(dtype)` does to a module's tensors: the one dtype rule every layer applies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["default_dtype", "module_dtype", "own_apply"]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """`dtype` as torch's default dtype inside; the previous one restored on every path."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def module_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `t` gets from `module.to(dtype)`: floating and complex tensors take `dtype` (torch casts a complex
    one to a real dtype too, dropping its imaginary part, with its own warning); the others keep theirs."""
    return dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype


def own_apply(modules: list[nn.Module], dtype: torch.dtype | None) -> None:
    """Modules that override `Module._apply` decide for themselves what `model.to(dtype)` does to them (timm's
    rotary embeddings keep their bands in fp32 and recompute them): run eager's `.to(dtype)` on those, once
    their values are there. For every other module the cast is plain, and already done."""
    if dtype is None:
        return
    for module in modules:
        if type(module)._apply is not nn.Module._apply and all(
            t.device.type != "meta" and type(t) in (torch.Tensor, nn.Parameter)
            for t in [*module.parameters(), *module.buffers()]
        ):
            module.to(dtype)
