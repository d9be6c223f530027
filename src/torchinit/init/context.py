"""The init context: what `fabric.init_module()` and `fabric.init_tensor()` return.

While open, (1) the default dtype is the plan's dtype and factories without `device=` land on the plan's
device (G1); (2) the construction mode keeps low-precision construction bit-exact and, for empty init,
skips every write into parameters (construct.py); (3) module registration hooks note which modules were
built. At exit, every piece of global state is restored first (G2, also on exceptions), then the modules
built inside are finished: floating tensors still in another dtype are cast as `Module.to(dtype)` would,
and parameters that nothing wrote are handed to the pending registry (record/pending.py).

The default dtype, the default device and `torch.nn.init` are process-global: while a context is open, other
threads see them changed, so a second thread that opens a context meanwhile gets an error (`ContextStack`).
Contexts nest only with the same plan; `TensorContext` (`init_tensor()`) nests inside any context of its device
and dtype, record contexts included (`RECORDS`, `OpenRecord`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Generic, Protocol, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from torchinit.core.dtypes import module_dtype
from torchinit.core.errors import ConfigurationError, UsageError
from torchinit.core.flags import poison_enabled
from torchinit.core.ops import storage_object_id
from torchinit.core.patching import init_functions, patched
from torchinit.init.construct import ConstructionMode
from torchinit.record import pending

__all__ = ["ACTIVE", "RECORDS", "ContextStack", "InitContext", "ModuleWatch", "OpenRecord", "TensorContext",
           "eager_default_dtype"]

T = TypeVar("T")


class ContextStack(Generic[T]):
    """The contexts of one kind open now, innermost last. What they change is process-global, so every open
    context, of any kind, belongs to the thread that opened the outermost one: another thread that opens one
    meanwhile gets `UsageError`. (The owner is shared by all stacks: an init context in one thread and a record
    context in another would fight over the same default dtype and device.)"""

    _open = 0  # contexts open in all stacks together
    _owner: int | None = None  # the thread they belong to
    _guard = threading.Lock()

    def __init__(self, kind: str):
        self.kind = kind
        self._items: list[T] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def __getitem__(self, index: int) -> T:
        return self._items[index]

    def check_thread(self) -> None:
        """Raise `UsageError` if torchinit contexts are open in another thread."""
        if ContextStack._open and ContextStack._owner != threading.get_ident():
            raise UsageError(
                f"A torchinit context is open in another thread (this thread asked for a {self.kind} context): the "
                "default dtype, the default device and torch.nn.init are process-global while it is open. Build "
                "models one thread at a time (open the context in one thread, or wait until the other thread's "
                "context has closed)."
            )

    def push(self, item: T) -> None:
        with ContextStack._guard:
            self.check_thread()
            ContextStack._owner = threading.get_ident()
            ContextStack._open += 1
            self._items.append(item)

    def pop(self) -> T:
        with ContextStack._guard:
            item = self._items.pop()
            ContextStack._open -= 1
            if not ContextStack._open:
                ContextStack._owner = None
            return item


def eager_default_dtype() -> torch.dtype:
    """The default dtype that eager code would see: the one before the open init contexts changed it."""
    entered = [c.eager_dtype for c in ACTIVE._items if c.eager_dtype is not None] if ACTIVE else []
    return entered[0] if entered else torch.get_default_dtype()


class OpenRecord(Protocol):
    """What an init context needs of an open record context (init/record.py) to nest inside it."""

    device: torch.device

    @property
    def tensor_dtype(self) -> torch.dtype:
        """The dtype its floating tensors end in."""

    def describe(self) -> str:
        """Its plan, for messages."""

    def tensor_window(self) -> Callable[[], None]:
        """Tensors made from now until the returned function is called end in `tensor_dtype` (`init_tensor()`)."""


ACTIVE: ContextStack[InitContext] = ContextStack("init")
RECORDS: ContextStack[OpenRecord] = ContextStack("record")  # open record contexts (init/record.py), innermost last


class InitContext:
    """Construct modules and tensors on `device` in `dtype`; with `empty_init`, skip initialization.

    With `meta=True`, parameters are made on the meta device instead (no memory, no init work) while
    buffers are still computed for real on `device`, exactly as eager code computes them; `materialize`
    later gives the parameters memory and values.

    Nothing is entered before `__enter__`. The same object may be entered again, also nested; nesting a
    context with a different plan, or inside a record context, raises `ValueError` and changes nothing.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, empty_init: bool = False, meta: bool = False):
        self.device, self.dtype, self.empty_init = torch.device(device), dtype, bool(empty_init)
        self.meta = bool(meta)
        self.eager_dtype: torch.dtype | None = None  # the default dtype at entry (outermost): eager code's
        self._open: list[tuple[ExitStack, ModuleWatch | None]] = []

    def plan(self) -> tuple:
        """What the context does (contexts with equal plans nest)."""
        return self.device, self.dtype, self.empty_init, self.meta

    def describe(self) -> str:
        return f"device={self.device}, dtype={self.dtype}, empty_init={self.empty_init}, meta={self.meta}"

    def _nests_in(self, outer: InitContext) -> bool:
        return outer.plan() == self.plan()

    def _nests_in_record(self, outer: OpenRecord) -> bool:
        return False  # a record context builds on fake tensors: another way of building cannot open inside it

    def __enter__(self) -> InitContext:
        ACTIVE.check_thread()  # before anything is entered or compared: another thread's context is not ours
        RECORDS.check_thread()
        stack = ExitStack()
        if ACTIVE or RECORDS:
            outer = ACTIVE[-1] if ACTIVE else RECORDS[-1]  # (init contexts open inside a record are inner to it)
            if not (self._nests_in(outer) if ACTIVE else self._nests_in_record(outer)):
                kind = "init" if ACTIVE else "record"
                raise ConfigurationError(
                    f"Cannot open an init context ({self.describe()}) inside a {kind} context with a different plan "
                    f"({outer.describe()}); only init_tensor() of the same device and dtype, or a context with the "
                    "same plan, nests. Close the outer context first, or use the same Fabric for both."
                )
            if not ACTIVE:  # init_tensor() inside a record: what it makes is recorded, and ends in its dtype
                stack.callback(outer.tensor_window())
            recorder = None  # the outer context already does everything
        else:
            try:
                recorder = self._enter_state(stack)
            except BaseException:
                stack.close()
                raise
        ACTIVE.push(self)
        stack.callback(ACTIVE.pop)
        self._open.append((stack, recorder))
        return self

    def _enter_state(self, stack: ExitStack) -> ModuleWatch:
        if self.empty_init:  # the parameters it makes are tracked until written: no inference tensors
            stack.enter_context(pending.trackable())
        compute = self.eager_dtype = torch.get_default_dtype()
        stack.callback(setattr, self, "eager_dtype", None)
        stack.callback(torch.set_default_dtype, compute)
        torch.set_default_dtype(self.dtype)
        stack.enter_context(torch.device(self.device))
        mode = None
        if (compute != self.dtype or self.empty_init) and self.device.type != "meta":
            mode = ConstructionMode(compute, self.dtype, skip_param_writes=self.empty_init, poison=poison_enabled())
            stack.enter_context(mode)
        if self.meta or (self.empty_init and mode is not None):
            stack.enter_context(_skip_init_functions(mode.param_storages if mode is not None else set(),
                                                     mode.skipped if mode is not None else None))
        recorder = ModuleWatch(mode, params_on_meta=self.meta)
        stack.enter_context(recorder)
        return recorder

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, recorder = self._open.pop()
        stack.close()
        if recorder is not None:
            try:
                if exc_type is None:
                    with pending.trackable():
                        recorder.finish(self.dtype)
            finally:
                recorder.close()
        return False


class TensorContext(InitContext):
    """What `fabric.init_tensor()` returns: an `InitContext` for loose tensors that also nests inside any context of
    the same device and dtype, `init_module()`'s included. Inside a record context what it makes is recorded with
    the rest and comes out real at the record's exit, its floating tensors in this dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)

    def _nests_in(self, outer: InitContext) -> bool:
        return (outer.device, outer.dtype) == (self.device, self.dtype)

    def _nests_in_record(self, outer: OpenRecord) -> bool:
        return (outer.device, outer.tensor_dtype) == (self.device, self.dtype)


class ModuleWatch:
    """Global module-registration hooks: which modules were built inside the context, and their parameters."""

    def __init__(self, mode: ConstructionMode | None, params_on_meta: bool = False):
        self.mode = mode
        self.params_on_meta = params_on_meta
        self.modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.children: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._handles: list = []

    def __enter__(self) -> ModuleWatch:
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
            pending.track(roots, self.mode.is_unwritten)

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


def _skip_init_functions(param_storages: set[int], skipped=None) -> AbstractContextManager[None]:
    """Make every public `torch.nn.init` function a no-op on parameters (and on meta tensors) while open.

    The aten-level skip already leaves parameter memory untouched; this also skips the work these functions
    do on temporaries (orthogonal_'s QR, trunc_normal_'s rejection loop, which cannot run on meta at all)
    and the random numbers they draw.
    """

    def skipping(fn):
        @functools.wraps(fn)
        def wrapper(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor) and (
                tensor.device.type == "meta" or storage_object_id(tensor) in param_storages
            ):
                if skipped is not None and tensor.device.type != "meta":
                    skipped(tensor)  # its value is not eager's now: pending (G9)
                return tensor
            return fn(tensor, *args, **kwargs)

        return wrapper

    return patched(init_functions(), skipping)
