"""The op recorder: a dispatch mode above the fake mode that writes down every aten op a constructor runs, with
its inputs as references to earlier outputs (or to the memory they alias), copies of real tensors captured from
outside, and generators; `torch.nn.init` functions come in as one call each (init/record.py patches them).
`.item()` on a fresh tensor, and ops fake tensors cannot run, are answered by a replay of the record so far.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchinit.core.compat import (
    DispatchMode,
    FakeTensor,
    is_op_overload,
    tree_leaves,
    tree_map,
    unset_fake_temporarily,
)
from torchinit.core.ops import OVERWRITERS, spans_storage, storage_key, written_args
from torchinit.init.record_garbage import Garbage
from torchinit.record.data import Alias, Const, Gen, Op, Record, RecordError, Ref
from torchinit.record.replay import evaluate

__all__ = ["OpRecorder"]

_SKIP = {torch.ops.prim.device.default}


class OpRecorder(DispatchMode):
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
        self.windows: list[list[int | None]] = []  # node ranges [start, end) made under init_tensor()

    # -- references
    def ref(self, t: torch.Tensor) -> Ref | Alias:
        key = storage_key(t)
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
        return tree_map(self._encode_one, tree)

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
        for leaf in tree_leaves(out):
            if not isinstance(leaf, FakeTensor):
                continue
            key = storage_key(leaf)
            node = self.node_of.get(id(leaf))
            if node is not None and self.storage_of_node[node] == key:
                nodes.append(None)  # an in-place op returned its argument
                continue
            node = len(self.storage_of_node)
            self.storage_of_node.append(key)
            self.node_of[id(leaf)] = node
            self.record.memory_of[node] = self.first_node.setdefault(key, node)
            self.record.layout.append((tuple(leaf.shape), tuple(leaf.stride()), leaf.storage_offset(), leaf.dtype))
            if self.record.memory_of[node] == node and spans_storage(leaf):
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
        writes.update(self.first_node[storage_key(t)] for t in written if storage_key(t) in self.first_node)
        overwritten = self.overwritten(filled)
        paused, self.paused = self.paused, True  # the masks' own ops are not the model's
        try:
            self.garbage.update(func, reads, writes, overwritten, filled)
        finally:
            self.paused = paused
        random = torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()) if is_op_overload(
            func) else getattr(func, "__name__", "") not in _DETERMINISTIC_INIT
        self.record.ops.append(Op(func, args, kwargs, outs, tuple(sorted(reads | writes)), overwritten,
                                  tuple(sorted(writes)), random))

    def filled(self, args: tuple) -> tuple[int, FakeTensor] | None:
        """The memory and view an overwriting op fills without reading: its first argument, when no other
        argument reads that storage."""
        first = args[0] if args else None
        if not isinstance(first, FakeTensor):
            return None
        key = storage_key(first)
        if key not in self.first_node or any(
                isinstance(x, FakeTensor) and storage_key(x) == key for x in tree_leaves(args[1:])):
            return None
        return self.first_node[key], first

    @staticmethod
    def overwritten(filled: tuple[int, FakeTensor] | None) -> int | None:
        """The memory an overwriting op fills in full: the filled view spans its storage."""
        return filled[0] if filled is not None and spans_storage(filled[1]) else None

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused or func in _SKIP:
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return self.scalar(args[0])
        filled = self.filled(args) if func.overloadpacket in OVERWRITERS else None
        self.touched = set()
        enc_args, enc_kwargs = self.encode(args), self.encode(kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            if not func._schema.is_mutable and any(isinstance(x, FakeTensor) for x in tree_leaves(args)):
                return self.through(func, args, kwargs, exc)
            raise RecordError(
                f"Cannot record {func} in {_where()}: {type(exc).__name__}: {exc}. Build the model without a "
                "record: FSDPStrategy(record_init=False) / DeepSpeedStrategy(stage=3, record_init=False) under "
                "Fabric, or torchinit.InitContext instead of torchinit.RecordContext."
            ) from exc
        self.add(func, enc_args, enc_kwargs, out, filled, tuple(written_args(func, args, kwargs).values()))
        return out

    def through(self, func: Callable, args: tuple, kwargs: dict, failed: Exception) -> Any:
        """An op fake tensors cannot run (an output shape that depends on values: `unique`, `nonzero`, boolean
        indexing; an op without a fake kernel): run it on the real inputs (a replay of the record so far, as for
        `.item()`) and record its result as a constant. Eager computes exactly this, since the inputs are fixed
        by the record. If the real op fails too, that is the constructor's own error: it is raised as it is."""
        self.touched = set()
        fakes = [x for x in tree_leaves((args, kwargs)) if isinstance(x, FakeTensor)]
        mode = fakes[0].fake_mode
        with unset_fake_temporarily():
            real_args, real_kwargs = tree_map(
                lambda x: evaluate(self.record, self.ref(x)) if isinstance(x, FakeTensor) else x, (args, kwargs))
            try:
                real = func(*real_args, **real_kwargs)
            except Exception as exc:
                raise exc from failed
        self.paused = True
        try:
            out = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, real)
        finally:
            self.paused = False
        for value, fake in zip(tree_leaves(real), tree_leaves(out), strict=True):
            if isinstance(fake, FakeTensor):
                self.touched = set()
                self.add(torch.ops.aten.clone.default, (self.constant(value),), {}, fake)
        return out

    def scalar(self, t: torch.Tensor) -> Any:
        """`.item()` on a fake tensor: its real value, from a replay of the record so far (never a guess)."""
        constant = getattr(t, "constant", None)
        if constant is not None:
            return constant.item()
        with unset_fake_temporarily():
            return evaluate(self.record, self.ref(t)).item()

    def record_call(self, fn: Callable, tensor: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """One `torch.nn.init` call: each of them writes every element of its tensor."""
        filled = self.filled((tensor, *args))
        self.touched = set()
        self.add(fn, self.encode((tensor, *args)), self.encode(kwargs), None, filled, (tensor,))


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
