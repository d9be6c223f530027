"""Record mode: construct a model on fake tensors and keep, per parameter and buffer, the operations that made it.

Fake tensors (torch's `FakeTensorMode`) claim the target device and dtype but own no memory, so model code sees
"cpu"/"cuda" and runs its normal init (transformers' `_init_weights` included) at no cost. Underneath, a
dispatch mode writes down every aten op with its arguments, in order; `torch.nn.init` functions are written
down as one call each (`trunc_normal_` loops on a data-dependent `mask.any()`, which fake tensors cannot
answer). At exit the fake parameters and buffers become meta placeholders and the record is kept next to the
modules (freed with them); `materialize` finds it and replays it on real memory (record/replay.py),
from the random-generator state construction started with, so the values are eager's, bit for bit.

1. Enter: default device, fake mode, the op recorder, function-level `nn.init` recording, module hooks.
2. Construct: each op is recorded with its inputs as references to earlier outputs (or to the memory they
   alias), copies of real tensors captured from outside, and generators. `.item()` / `.tolist()` on a
   fresh tensor replays the record so far to answer with the real value (record-through).
3. Exit: global state restored first; then fake tensors on the modules become meta placeholders (ties kept:
   one placeholder per tensor object) and each placeholder is bound to the reference of its final value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import torch

from torchinit.core.compat import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torchinit.core.errors import ConfigurationError
from torchinit.core.patching import init_functions, patched
from torchinit.init import record_rng
from torchinit.init.context import ACTIVE, RECORDS, ContextStack, ModuleWatch
from torchinit.init.finish import finish, replay_now
from torchinit.init.record_apply import converting_fake_modules, copying_fake_tensors
from torchinit.init.recorder import OpRecorder
from torchinit.record import pending
from torchinit.record.data import Record, RecordError

__all__ = ["RecordContext", "RecordError"]


def _record_init_functions() -> AbstractContextManager[None]:
    """Record each `torch.nn.init` function on a fake tensor as one call (also `_no_grad_trunc_normal_`, which
    implementations captured before the patch reach through), after checking its arguments on a meta tensor."""

    def recording(fn):
        @functools.wraps(fn)
        def wrapper(tensor, *args, **kwargs):
            recorder = RECORDING[-1] if RECORDING else None
            if recorder is None or recorder.paused or not isinstance(tensor, FakeTensor):
                return fn(tensor, *args, **kwargs)
            recorder.paused = True
            try:  # validation only, on a plain meta tensor; factories inside on meta too, so nothing is drawn for
                with unset_fake_temporarily(), torch.device("meta"):  # real (sparse_'s randperm; eye_'s out=)
                    fn(torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta"), *args,
                       **kwargs)
            finally:
                recorder.paused = False
            recorder.record_call(fn, tensor, args, kwargs)
            return tensor

        return wrapper

    return patched(init_functions("_no_grad_trunc_normal_"), recording)


# ---- the context ------------------------------------------------------------------------------------------
class RecordContext:
    """Construct modules in record mode: parameters and buffers end on meta, their init recorded for replay.

    `device` is where the init is recorded to run (random numbers differ between CPU and CUDA); `dtype` is the
    dtype floating placeholders get (as `Module.to(dtype)` would leave them; the values are computed in the
    default dtype and cast when replayed). `torchinit.materialize(model)` and `fabric.setup(model)` replay.
    With `replay=True` the modules are materialized at exit (`fabric.init_module()` in a low precision: the
    constructor ran in eager's dtypes, G8, and each value is computed in fp32 and stored cast, one at a time).
    With `empty_init=True` the placeholders are real, uninitialized memory on `device` (so `load_state_dict`
    works): buffers get their values at exit, parameters stay pending until a checkpoint writes them, and the
    record replays into exactly those nothing wrote (record/pending.py).
    Nothing is entered before `__enter__`. A record context with the same plan nests (it does nothing), and so does
    `fabric.init_tensor()` of the same device and dtype (what it makes is recorded, and comes out real in this dtype
    at exit); any other context inside or around it raises `ValueError`, changing nothing.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype | None = None, empty_init: bool = False,
                 replay: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.empty_init = bool(empty_init)
        self.replay = bool(replay) and not self.empty_init
        self._open: list[tuple[ExitStack, OpRecorder, ModuleWatch] | None] = []

    def plan(self) -> tuple:
        """What the context does (contexts with equal plans nest)."""
        return self.device, self.dtype, self.empty_init, self.replay

    def describe(self) -> str:
        return f"record: device={self.device}, dtype={self.dtype}, empty_init={self.empty_init}, replay={self.replay}"

    @property
    def tensor_dtype(self) -> torch.dtype:
        """The dtype its floating tensors end in (while open)."""
        return self.dtype if self.dtype is not None else RECORDING[-1].record.default_dtype

    def tensor_window(self) -> Callable[[], None]:
        """`init_tensor()` opens inside: what is made until the returned function runs ends in `tensor_dtype`."""
        recorder = RECORDING[-1]
        window = [len(recorder.storage_of_node), None]
        recorder.windows.append(window)
        return lambda: window.__setitem__(1, len(recorder.storage_of_node))

    def __enter__(self) -> RecordContext:
        RECORDS.check_thread()
        ACTIVE.check_thread()
        if ACTIVE or RECORDING:  # an init context open inside a record (init_tensor()) is part of that record
            outer = RECORDS[-1] if RECORDING else ACTIVE[-1]
            if not RECORDING or outer.plan() != self.plan():
                raise ConfigurationError(
                    f"Cannot open a record context ({self.describe()}) inside another context with a different plan "
                    f"({outer.describe()}): close the outer context first, or use the same Fabric for both.")
            self._open.append(None)  # the outer context does everything
            return self
        stack = ExitStack()
        try:
            record = Record(self.device, torch.get_default_dtype())
            recorder = OpRecorder(record)
            record_rng.snapshot(recorder, self.device)
            modules = ModuleWatch(None)
            stack.enter_context(modules)
            stack.enter_context(torch.device(self.device))
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(recorder)
            RECORDING.push(recorder)
            stack.callback(RECORDING.pop)
            RECORDS.push(self)
            stack.callback(RECORDS.pop)
            stack.enter_context(_record_init_functions())
            stack.enter_context(record_rng.recording_seeds(recorder))
            stack.enter_context(converting_fake_modules())
            stack.enter_context(copying_fake_tensors())
        except BaseException:
            stack.close()
            raise
        self._open.append((stack, recorder, modules))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        opened = self._open.pop()
        if opened is None:
            return False
        stack, recorder, modules = opened
        stack.close()
        if exc_type is None:
            record_rng.check(recorder.record)
            built = list(modules.modules)
            with pending.trackable():  # placeholders are normal tensors, also under inference mode
                finish(recorder, built, self.dtype, self.device if self.empty_init else None,
                       keep_garbage=self.replay, dtype_of=_tensor_dtypes(recorder, self.dtype))
            if self.replay:
                replay_now(recorder.record, built, self.device, self.dtype)
        return False


def _tensor_dtypes(recorder: OpRecorder, dtype: torch.dtype | None) -> Callable[[torch.Tensor, int], torch.dtype]:
    """The dtype a loose tensor ends in: made under `init_tensor()` (a window of nodes) in the default dtype of
    construction, the context's dtype; else its own (eager's: a tensor that is not the module's is not cast)."""
    compute = recorder.record.default_dtype

    def dtype_of(fake: torch.Tensor, node: int) -> torch.dtype:
        inside = any(start <= node and (end is None or node < end) for start, end in recorder.windows)
        return dtype if inside and dtype is not None and fake.dtype == compute else fake.dtype

    return dtype_of


RECORDING: ContextStack[OpRecorder] = ContextStack("record")  # the recorder of the open record context
