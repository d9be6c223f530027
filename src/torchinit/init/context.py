"""The init context: what `fabric.init_module()` and `fabric.init_tensor()` return.

While open, (1) the default dtype is the plan's dtype and factories without `device=` land on the plan's
device (G1); (2) the construction mode keeps low-precision construction bit-exact and, for empty init,
skips every write into parameters (construct.py); (3) module registration hooks note which modules were
built. At exit, every piece of global state is restored first (G2, also on exceptions), then the modules
built inside are finished: floating tensors still in another dtype are cast as `Module.to(dtype)` would,
and parameters that nothing wrote are handed to the unwritten registry (materialize/unwritten.py).

The default dtype is process-global: other threads see the plan's dtype while a context is open.
"""

from __future__ import annotations

import contextvars
import functools
import os
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from torchinit.init.construct import ConstructionMode
from torchinit.materialize import unwritten
from torchinit.plan import module_dtype

_POISON = contextvars.ContextVar("torchinit_nan_poison", default=os.environ.get("TORCHINIT_NAN_POISON") == "1")
_ACTIVE: list[InitContext] = []


def poison_enabled() -> bool:
    return _POISON.get()


@contextmanager
def nan_poison(enabled: bool = True) -> Iterator[None]:
    """Debug switch: fill memory that empty init leaves uninitialized, and every fresh allocation of
    `materialize`, with NaN, so that garbage cannot hide.

    Also on with the environment variable TORCHINIT_NAN_POISON=1.
    """
    token = _POISON.set(enabled)
    try:
        yield
    finally:
        _POISON.reset(token)


class InitContext:
    """Construct modules and tensors on `device` in `dtype`; with `empty_init`, skip initialization.

    With `meta=True`, parameters are made on the meta device instead (no memory, no init work) while
    buffers are still computed for real on `device`, exactly as eager code computes them; `materialize`
    later gives the parameters memory and values.

    Nothing is entered before `__enter__`. The same object may be entered again, also nested; nesting a
    context with a different plan raises `ValueError` and changes nothing.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, empty_init: bool = False, meta: bool = False):
        self.device, self.dtype, self.empty_init = torch.device(device), dtype, bool(empty_init)
        self.meta = bool(meta)
        self._open: list[tuple[ExitStack, _Recorder | None]] = []

    def _plan(self) -> tuple:
        return self.device, self.dtype, self.empty_init, self.meta

    def _describe(self) -> str:
        return f"device={self.device}, dtype={self.dtype}, empty_init={self.empty_init}, meta={self.meta}"

    def __enter__(self) -> InitContext:
        stack = ExitStack()
        if _ACTIVE:
            outer = _ACTIVE[-1]
            if outer._plan() != self._plan():
                raise ValueError(
                    f"Cannot open an init context ({self._describe()}) inside another one with a different plan "
                    f"({outer._describe()}). Close the outer context first, or use the same Fabric for both."
                )
            recorder = None  # the outer context already does everything
        else:
            try:
                recorder = self._enter_state(stack)
            except BaseException:
                stack.close()
                raise
        _ACTIVE.append(self)
        stack.callback(_ACTIVE.pop)
        self._open.append((stack, recorder))
        return self

    def _enter_state(self, stack: ExitStack) -> _Recorder:
        compute = torch.get_default_dtype()
        stack.callback(torch.set_default_dtype, compute)
        torch.set_default_dtype(self.dtype)
        stack.enter_context(torch.device(self.device))
        mode = None
        if (compute != self.dtype or self.empty_init) and self.device.type != "meta":
            mode = ConstructionMode(compute, self.dtype, skip_param_writes=self.empty_init, poison=_POISON.get())
            stack.enter_context(mode)
        if self.meta or (self.empty_init and mode is not None):
            stack.enter_context(_skip_init_functions(mode.param_storages if mode is not None else set(),
                                                     mode.skipped if mode is not None else None))
        recorder = _Recorder(mode, params_on_meta=self.meta)
        stack.enter_context(recorder)
        return recorder

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, recorder = self._open.pop()
        stack.close()
        if recorder is not None:
            try:
                if exc_type is None:
                    recorder.finish(self.dtype)
            finally:
                recorder.close()
        return False


class _Recorder:
    """Global module-registration hooks: which modules were built inside the context, and their parameters."""

    def __init__(self, mode: ConstructionMode | None, params_on_meta: bool = False):
        self.mode = mode
        self.params_on_meta = params_on_meta
        self.modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.children: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._handles: list = []

    def __enter__(self) -> _Recorder:
        self._handles = [
            module_hooks.register_module_parameter_registration_hook(self._on_parameter),
            module_hooks.register_module_buffer_registration_hook(self._on_buffer),
            module_hooks.register_module_module_registration_hook(self._on_module),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_parameter(self, module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        self.modules.add(module)
        if param is None:
            return None
        if self.params_on_meta and param.device.type != "meta" and type(param) is nn.Parameter:
            return _on_meta(param)
        if self.mode is not None and self.mode.skip_param_writes:
            self.mode.mark_parameter(param)
        return None

    def _on_buffer(self, module: nn.Module, name: str, buffer: torch.Tensor | None) -> None:
        self.modules.add(module)

    def _on_module(self, module: nn.Module, name: str, child: nn.Module | None) -> None:
        self.modules.add(module)
        if child is not None:
            self.children.add(child)
            for inner in child.modules():  # a subtree made without registering (copy.deepcopy(layer)) is ours too
                self.modules.add(inner)
                self.children.update(inner.children())

    def finish(self, dtype: torch.dtype) -> None:
        """Cast what is not yet in `dtype` (as `Module.to(dtype)` does) and hand unwritten params on."""
        tracking = self.mode is not None and self.mode.skip_param_writes
        with torch.no_grad():
            for module in list(self.modules):
                for param in module._parameters.values():
                    if param is not None and module_dtype(param, dtype) != param.dtype:
                        garbage = tracking and self.mode.is_unwritten(param)
                        param.data = param.data.to(dtype)
                        if garbage:  # (an explicit-dtype parameter: the cast copies garbage, it writes nothing)
                            self.mode._remember(self.mode.unwritten, param)
                for name, buffer in module._buffers.items():
                    if buffer is not None and module_dtype(buffer, dtype) != buffer.dtype:
                        module._buffers[name] = buffer.to(dtype)
        if self.mode is not None and self.mode.skip_param_writes:
            roots = [m for m in self.modules if m not in self.children]
            unwritten.track(roots, self.mode.is_unwritten)

    def close(self) -> None:
        if self.mode is not None:
            self.mode.close()
        self.mode = None


def _on_meta(param: nn.Parameter) -> nn.Parameter:
    """The same parameter on meta: shape, strides, dtype, requires_grad and attributes; its memory is freed."""
    data = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device="meta")
    meta = nn.Parameter(data, requires_grad=param.requires_grad)
    meta.__dict__.update(param.__dict__)
    return meta


@contextmanager
def _skip_init_functions(param_storages: set[int], skipped=None) -> Iterator[None]:
    """Make every public `torch.nn.init` function a no-op on parameters (and on meta tensors) while open.

    The aten-level skip already leaves parameter memory untouched; this also skips the work these functions
    do on temporaries (orthogonal_'s QR, trunc_normal_'s rejection loop, which cannot run on meta at all)
    and the random numbers they draw.
    """
    originals = {
        name: fn for name, fn in vars(nn.init).items()
        if callable(fn) and name.endswith("_") and not name.startswith("_")
    }

    def skipping(fn):
        @functools.wraps(fn)
        def wrapper(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor) and (
                tensor.device.type == "meta" or id(tensor.untyped_storage()) in param_storages
            ):
                if skipped is not None and tensor.device.type != "meta":
                    skipped(tensor)  # its value is not eager's now: pending (G9)
                return tensor
            return fn(tensor, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(nn.init, name, skipping(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(nn.init, name, fn)
