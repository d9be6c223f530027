"""Record mode: construct a model on fake tensors and keep, per parameter and buffer, the operations that made it.

Fake tensors (torch's `FakeTensorMode`) claim the target device and dtype but own no memory, so model code sees
"cpu"/"cuda" and runs its normal init (transformers' `_init_weights` included) at no cost. Underneath, a
dispatch mode writes down every aten op with its arguments, in order; `torch.nn.init` functions are written
down as one call each (`trunc_normal_` loops on a data-dependent `mask.any()`, which fake tensors cannot
answer). At exit the fake parameters and buffers become meta placeholders and the record is kept next to the
modules (freed with them); `materialize` finds it and replays it on real memory (materialize/replay.py),
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
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from torchinit.init import record_rng
from torchinit.init.construct import _written_args
from torchinit.init.context import _ACTIVE, _Recorder
from torchinit.init.record_apply import converting_fake_modules, copying_fake_tensors
from torchinit.init.record_data import Alias, Const, Gen, Op, Record, RecordError, Ref
from torchinit.init.record_garbage import Garbage

# ---- 2. the recorder ---------------------------------------------------------------------------------------
_SKIP = {torch.ops.prim.device.default}


class _OpRecorder(TorchDispatchMode):
    """Sits above the fake mode: every op is written down, then computed on fake tensors."""

    def __init__(self, record: Record):
        super().__init__()
        self.record = record
        self.keep: list[torch.Tensor] = []  # fake tensors seen, alive so that their ids stay unique
        self.node_of: dict[int, int] = {}  # id(fake) -> node
        self.storage_of_node: list[int] = []  # node -> storage key when made
        self.first_node: dict[int, int] = {}  # storage key -> first node made on it
        self.const_of: dict[int, int] = {}
        self.touched: set[int] = set()  # memory referenced by the op being encoded
        self.garbage = Garbage(record.garbage)
        self.paused = False

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # never compiled; skipping would import dynamo (a second)

    # -- references
    def ref(self, t: torch.Tensor) -> Ref | Alias:
        key = _storage_key(t)
        node = self.node_of.get(id(t))
        if node is not None and self.storage_of_node[node] == key:
            return Ref(node)
        base = self.first_node.get(key)
        if base is None:
            raise RecordError(f"A fake tensor of shape {tuple(t.shape)} that the record never saw was used in "
                              f"{_where()}: fake tensors from another FakeTensorMode cannot be replayed.")
        return Alias(base, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def encode(self, tree: Any) -> Any:
        """Fake tensors -> references (their memory noted in `touched`), real tensors -> constants."""
        if isinstance(tree, tuple) and not any(isinstance(x, (list, tuple, dict)) for x in tree):
            return tuple(map(self._encode_one, tree))  # the common cases, without pytree's cost
        if isinstance(tree, dict) and not any(isinstance(x, (list, tuple, dict)) for x in tree.values()):
            return {k: self._encode_one(v) for k, v in tree.items()}
        return pytree.tree_map(self._encode_one, tree)

    def _encode_one(self, x: Any) -> Any:
        if isinstance(x, FakeTensor):
            ref = self.ref(x)
            self.touched.add(self.record.memory_of[ref.node])
            return ref
        if isinstance(x, torch.Tensor):
            return self.constant(x)
        if isinstance(x, torch.Generator):
            return self.generator(x)
        return x

    def constant(self, t: torch.Tensor) -> Const:
        index = self.const_of.get(id(t))
        if index is None:
            with unset_fake_temporarily(), torch.no_grad():
                copy = t.detach().clone()
            index = self.const_of[id(t)] = len(self.record.consts)
            self.record.consts.append(copy)
            self.keep.append(t)
        return Const(index)

    def generator(self, g: torch.Generator) -> Gen:
        for i, known in enumerate(self.record.generators):
            if known is g:
                return Gen(i)
        self.record.generators.append(g)
        self.record.rng[len(self.record.generators) - 1] = g.get_state()
        return Gen(len(self.record.generators) - 1)

    def bind(self, out: Any) -> tuple[int | None, ...]:
        nodes = []
        for leaf in pytree.tree_leaves(out):
            if not isinstance(leaf, FakeTensor):
                continue
            key = _storage_key(leaf)
            node = self.node_of.get(id(leaf))
            if node is not None and self.storage_of_node[node] == key:
                nodes.append(None)  # an in-place op returned its argument
                continue
            node = len(self.storage_of_node)
            self.storage_of_node.append(key)
            self.node_of[id(leaf)] = node
            self.record.memory_of[node] = self.first_node.setdefault(key, node)
            self.record.layout.append((tuple(leaf.shape), tuple(leaf.stride()), leaf.storage_offset(), leaf.dtype))
            if self.record.memory_of[node] == node and _spans_storage(leaf):
                self.record.whole.add(node)
            self.keep.append(leaf)
            nodes.append(node)
        return tuple(nodes)

    def add(self, func: Callable, args: tuple, kwargs: dict, out: Any, filled: tuple | None = None,
            written: tuple[torch.Tensor, ...] = ()) -> None:
        """Append an op whose arguments were just encoded (so `touched` holds the memory they reference);
        `filled` is what `filled()` found for an overwriting op, `written` the arguments it writes in place."""
        outs = self.bind(out)
        reads, self.touched = self.touched, set()
        writes = {self.record.memory_of[n] for n in outs if n is not None}
        writes.update(self.first_node[_storage_key(t)] for t in written if _storage_key(t) in self.first_node)
        overwritten = self.overwritten(filled)
        paused, self.paused = self.paused, True  # the masks' own ops are not the model's
        try:
            self.garbage.update(func, reads, writes, overwritten, filled)
        finally:
            self.paused = paused
        random = torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()) if isinstance(
            func, torch._ops.OpOverload) else getattr(func, "__name__", "") not in _DETERMINISTIC_INIT
        self.record.ops.append(Op(func, args, kwargs, outs, tuple(sorted(reads | writes)), overwritten,
                                  tuple(sorted(writes)), random))

    def filled(self, args: tuple) -> tuple[int, FakeTensor] | None:
        """The memory and view an overwriting op fills without reading: its first argument, when no other
        argument reads that storage."""
        first = args[0] if args else None
        if not isinstance(first, FakeTensor):
            return None
        key = _storage_key(first)
        if key not in self.first_node or any(
                isinstance(x, FakeTensor) and _storage_key(x) == key for x in pytree.tree_leaves(args[1:])):
            return None
        return self.first_node[key], first

    @staticmethod
    def overwritten(filled: tuple[int, FakeTensor] | None) -> int | None:
        """The memory an overwriting op fills in full: the filled view spans its storage."""
        return filled[0] if filled is not None and _spans_storage(filled[1]) else None

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or func in _SKIP:
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return self.scalar(args[0])
        filled = self.filled(args) if func in _OVERWRITERS else None
        self.touched = set()
        enc_args, enc_kwargs = self.encode(args), self.encode(kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            if not func._schema.is_mutable and any(isinstance(x, FakeTensor) for x in pytree.tree_leaves(args)):
                return self.through(func, args, kwargs, exc)
            raise RecordError(
                f"Cannot record {func} in {_where()}: {type(exc).__name__}: {exc}. Build the model without a "
                "record: FSDPStrategy(record_init=False) / DeepSpeedStrategy(stage=3, record_init=False) under "
                "Fabric, or torchinit.InitContext instead of torchinit.RecordContext."
            ) from exc
        self.add(func, enc_args, enc_kwargs, out, filled, tuple(_written_args(func, args, kwargs).values()))
        return out

    def through(self, func: Callable, args: tuple, kwargs: dict, failed: Exception) -> Any:
        """An op fake tensors cannot run (an output shape that depends on values: `unique`, `nonzero`, boolean
        indexing; an op without a fake kernel): run it on the real inputs (a replay of the record so far, as for
        `.item()`) and record its result as a constant. Eager computes exactly this, since the inputs are fixed
        by the record. If the real op fails too, that is the constructor's own error: it is raised as it is."""
        from torchinit.materialize.replay import evaluate

        self.touched = set()
        fakes = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, FakeTensor)]
        mode = fakes[0].fake_mode
        with unset_fake_temporarily():
            real_args, real_kwargs = pytree.tree_map(
                lambda x: evaluate(self.record, self.ref(x)) if isinstance(x, FakeTensor) else x, (args, kwargs))
            try:
                real = func(*real_args, **real_kwargs)
            except Exception as exc:
                raise exc from failed
        self.paused = True
        try:
            out = pytree.tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, real)
        finally:
            self.paused = False
        for value, fake in zip(pytree.tree_leaves(real), pytree.tree_leaves(out), strict=True):
            if isinstance(fake, FakeTensor):
                self.touched = set()
                self.add(_aten.clone.default, (self.constant(value),), {}, fake)
        return out

    def scalar(self, t: torch.Tensor) -> Any:
        """`.item()` on a fake tensor: its real value, from a replay of the record so far (never a guess)."""
        constant = getattr(t, "constant", None)
        if constant is not None:
            return constant.item()
        from torchinit.materialize.replay import evaluate

        with unset_fake_temporarily():
            return evaluate(self.record, self.ref(t)).item()

    def record_call(self, fn: Callable, tensor: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """One `torch.nn.init` call: each of them writes every element of its tensor."""
        filled = self.filled((tensor, *args))
        self.touched = set()
        self.add(fn, self.encode((tensor, *args)), self.encode(kwargs), None, filled, (tensor,))


_RECORDING: list[_OpRecorder] = []


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _spans_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == \
        t.untyped_storage().nbytes()


_aten = torch.ops.aten
# In-place ops that write every element of their first argument without reading it.
_OVERWRITERS = {_aten.normal_.default, _aten.uniform_.default, _aten.fill_.Scalar, _aten.fill_.Tensor,
                _aten.zero_.default, _aten.random_.default, getattr(_aten.random_, "from"), _aten.random_.to,
                _aten.exponential_.default, _aten.bernoulli_.float, _aten.log_normal_.default,
                _aten.cauchy_.default, _aten.geometric_.default, _aten.copy_.default}
_DETERMINISTIC_INIT = {"constant_", "ones_", "zeros_", "eye_", "dirac_"}  # torch.nn.init functions drawing nothing


def _where() -> str:
    """The innermost module method on the Python stack (for error messages)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            return f"{type(owner).__name__}.{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        frame = frame.f_back
    return "code outside any module"


@contextmanager
def _record_init_functions() -> Iterator[None]:
    """Record each `torch.nn.init` function on a fake tensor as one call (also `_no_grad_trunc_normal_`, which
    implementations captured before the patch reach through), after checking its arguments on a meta tensor."""
    names = [n for n, fn in vars(nn.init).items() if callable(fn) and n.endswith("_") and not n.startswith("__")
             and (not n.startswith("_") or n == "_no_grad_trunc_normal_")]
    originals = {name: getattr(nn.init, name) for name in names}

    def recording(fn):
        @functools.wraps(fn)
        def wrapper(tensor, *args, **kwargs):
            recorder = _RECORDING[-1] if _RECORDING else None
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

    for name, fn in originals.items():
        setattr(nn.init, name, recording(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(nn.init, name, fn)


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
    record replays into exactly those nothing wrote (materialize/unwritten.py).
    Nothing is entered before `__enter__`; contexts do not nest.
    """

    def __init__(self, device: torch.device | str, dtype: torch.dtype | None = None, empty_init: bool = False,
                 replay: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.empty_init = bool(empty_init)
        self.replay = bool(replay) and not self.empty_init
        self._open: list[tuple[ExitStack, _OpRecorder, _Recorder] | None] = []

    def _plan(self) -> tuple:
        return self.device, self.dtype, self.empty_init, self.replay

    def __enter__(self) -> RecordContext:
        if _RECORDING or _ACTIVE:
            outer = _OPEN[-1] if _RECORDING else None
            if outer is None or outer._plan() != self._plan():
                raise ValueError("Cannot open a record context inside another init or record context with a different "
                                 "plan: close the outer context first, or use the same Fabric for both.")
            self._open.append(None)  # the outer context does everything
            return self
        stack = ExitStack()
        try:
            record = Record(self.device, torch.get_default_dtype())
            recorder = _OpRecorder(record)
            record_rng.snapshot(recorder, self.device)
            modules = _Recorder(None)
            stack.enter_context(modules)
            stack.enter_context(torch.device(self.device))
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(recorder)
            _RECORDING.append(recorder)
            _OPEN.append(self)
            stack.callback(_OPEN.pop)
            stack.callback(_RECORDING.pop)
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
            from torchinit.init.finish import finish, replay_now

            record_rng.check(recorder.record)
            built = list(modules.modules)
            finish(recorder, built, self.dtype, self.device if self.empty_init else None, keep_garbage=self.replay)
            if self.replay:
                replay_now(recorder.record, built, self.device, self.dtype)
        return False


_OPEN: list[RecordContext] = []


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def records_of(module: nn.Module):
    """The recording(s) kept for `module`'s modules (None if none was built in record mode)."""
    from torchinit.materialize.replay import Recordings

    found = []
    for sub in module.modules():
        recording = _RECORDS.get(sub)
        if recording is not None and recording.alive and all(r is not recording for r in found):
            found.append(recording)
    if not found:
        return None
    return found[0] if len(found) == 1 else Recordings(found)
