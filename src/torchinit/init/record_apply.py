"""What constructors do to whole modules, in record mode: `module.to(...)` / `.float()` / `.half()`, and
`copy.deepcopy(layer)` (nn.Transformer's clones).

`nn.Module._apply` swaps a fake parameter with its converted copy (`torch.utils.swap_tensors`), which fake
tensors refuse (their mode keeps weak references to them): "_apply(): Couldn't swap ...weight". Eager swaps
nothing: it sets `param.data` (the same Parameter objects, so ties and references hold). While recording, a
module holding fake tensors does the same; the record follows `.data =` as it does everywhere (an alias of
the converted value's memory). `Tensor.__deepcopy__` copies a tensor's storage, which a fake tensor does
not have (a crash, later); while recording, a fake tensor is deep-copied by `clone`, as a Parameter is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from torchinit.core.compat import FakeTensor
from torchinit.core.patching import patched


def converting_fake_modules() -> contextlib.AbstractContextManager[None]:
    """`nn.Module._apply` patched while recording (restored at exit, on every path)."""
    return patched([(nn.Module, "_apply")], _converting)


def _converting(original: Callable) -> Callable:
    def _apply(module: nn.Module, fn: Callable, recurse: bool = True) -> nn.Module:
        if not any(isinstance(t, FakeTensor) for t in (*module._parameters.values(), *module._buffers.values())):
            return original(module, fn, recurse)
        if recurse:
            for child in module.children():
                child._apply(fn)
        for param in module._parameters.values():
            if param is None:
                continue
            with torch.no_grad():
                converted = fn(param)
            if converted is not param:
                param.data = converted
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = fn(buffer)
        return module

    return _apply


@contextlib.contextmanager
def copying_fake_tensors() -> Iterator[None]:
    """`FakeTensor.__deepcopy__` while recording: a recorded clone (a Parameter stays a Parameter)."""

    def __deepcopy__(tensor: FakeTensor, memo: dict) -> torch.Tensor:
        if id(tensor) not in memo:
            with torch.no_grad():
                copy = tensor.clone(memory_format=torch.preserve_format)
            is_param = isinstance(tensor, nn.Parameter)
            memo[id(tensor)] = nn.Parameter(copy, tensor.requires_grad) if is_param else copy.requires_grad_(
                tensor.requires_grad)
        return memo[id(tensor)]

    own = FakeTensor.__dict__.get("__deepcopy__")  # (none in torch today: Tensor's is inherited)
    FakeTensor.__deepcopy__ = __deepcopy__
    try:
        yield
    finally:
        if own is None:
            del FakeTensor.__deepcopy__
        else:
            FakeTensor.__deepcopy__ = own
