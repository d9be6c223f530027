"""Replay a record (init/record.py writes it) on real memory: the recorded init's values, bit for bit, on the device.

1. The random generators are set to their states at record start (the user's states are restored after).
2. The ops run in recorded order on the record's device (CPU and CUDA draw different random numbers), in the
   default dtype of construction; each input is the real tensor of the node it refers to.
3. When the last op touching a target's memory has run, the value is written into the target (cast as
   `Module.to(dtype)` would; a sharded target keeps only its part) and memory no later op needs is freed.
   So a replay holds the targets plus the tensors still in use: one full parameter at a time for a sharded
   model.
A replay can stop early (the targets asked for are written) and go on later: values finished on the way
for targets not asked for yet are kept until they are.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from torchinit.core.compat import tree_leaves, tree_map
from torchinit.core.dtypes import default_dtype
from torchinit.record.data import Alias, Const, Gen, Record, Ref

__all__ = ["Replayer", "backward_slice", "evaluate", "generator_states"]


class Replayer:
    """Runs a record's ops, in order, from a cursor; holds the real tensor of each node while it is needed.

    Memory lives only while its value can still be read: after the last op touching it (its value is then
    finished), or when the next op reading or writing its values overwrites it in full (an init that a later
    init replaces: `Linear.reset_parameters` before transformers' `_init_weights`), it is freed, and allocated
    again, empty, at its next use (views such as `.data` do not read values). So a replay holds about one
    full tensor at a time, plus the live temporaries.
    """

    def __init__(self, record: Record, only: set[int] | None = None):
        self.record = record
        self.only = only  # the ops to run (a slice); None: all
        self.cursor = 0
        self.env: dict[int, torch.Tensor] = {}
        self.consts: dict[int, torch.Tensor] = {}
        self.rng = {i: state.clone() for i, state in record.rng.items()}
        self.nodes_of_memory: dict[int, list[int]] = {}
        self.finish_at: dict[int, int] = {}  # memory -> the last op touching it
        self.dead_after: dict[int, list[int]] = {}  # op -> memory whose value no later op reads
        self.freed: set[int] = set()  # memory freed while dead, to allocate again for its overwrite
        self.live: dict[int, int] = {}  # memory -> bytes, while held
        self.held = self.peak = 0  # bytes held now, and at most (targets and constants not counted)
        touches: dict[int, list[int]] = {}
        for i, op in enumerate(record.ops):
            if only is not None and i not in only:
                continue
            for memory in op.memory:
                touches.setdefault(memory, []).append(i)
        for memory, ops in touches.items():
            self.finish_at[memory] = ops[-1]
            if memory not in record.whole:
                continue
            following = None  # the next op after this one that reads or writes the memory's values
            for i in reversed(ops):
                if following is not None and record.ops[following].overwrites == memory:
                    self.dead_after.setdefault(i, []).append(memory)
                if not getattr(record.ops[i].func, "is_view", False):
                    following = i

    def value(self, ref: Ref | Alias) -> torch.Tensor:
        if isinstance(ref, Ref):
            found = self.env.get(ref.node)
            if found is not None:
                return found
            size, stride, offset, dtype = self.record.layout[ref.node]  # a view of memory allocated again
            view = self._view(self.record.memory_of[ref.node], size, stride, offset, dtype)
            self._keep(ref.node, view)
            return view
        return self._view(ref.node, ref.size, ref.stride, ref.offset, ref.dtype)

    def _view(self, memory: int, size, stride, offset, dtype) -> torch.Tensor:
        base = self.env[memory]
        if base.dtype != dtype:
            base = base.view(dtype)
        return base.as_strided(size, stride, offset)

    def _keep(self, node: int, tensor: torch.Tensor) -> None:
        memory = self.record.memory_of[node]
        self.env[node] = tensor
        self.nodes_of_memory.setdefault(memory, []).append(node)
        if memory not in self.live:
            self.live[memory] = tensor.untyped_storage().nbytes()
            self.held += self.live[memory]
            self.peak = max(self.peak, self.held)

    def _keep_outputs(self, nodes, out) -> None:
        leaves = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
        for node, leaf in zip(nodes, leaves, strict=False):
            if node is not None:
                self._keep(node, leaf)

    def _free(self, memory: int) -> None:
        for node in self.nodes_of_memory.pop(memory, ()):
            self.env.pop(node, None)
        self.held -= self.live.pop(memory, 0)

    def decode(self, tree):
        def one(x):
            if isinstance(x, (Ref, Alias)):
                return self.value(x)
            if isinstance(x, Const):
                if x.index not in self.consts:  # a copy: replay must not change the record
                    self.consts[x.index] = self.record.consts[x.index].clone()
                return self.consts[x.index]
            if isinstance(x, Gen):
                return self.record.generators[x.index]
            return x

        return tree_map(one, tree)

    def run(self, stop: int, finished) -> None:
        """Run ops up to `stop`; `finished(memory)` once no later op touches it (then it is freed)."""
        ops, record = self.record.ops, self.record
        with self._generators(), default_dtype(record.default_dtype), torch.no_grad():
            while self.cursor < stop:
                i, op = self.cursor, ops[self.cursor]
                if self.only is not None and i not in self.only:
                    self.cursor += 1
                    continue
                for memory in self.freed.intersection(op.memory):  # freed while dead: fresh memory
                    self.freed.discard(memory)
                    size, stride, _, dtype = record.layout[memory]
                    self._keep(memory, torch.empty_strided(size, stride, dtype=dtype, device=record.device))
                # in a call of its own: no local here keeps an output alive once its memory is freed below
                self._keep_outputs(op.outs, op.func(*self.decode(op.args), **self.decode(op.kwargs)))
                self.cursor += 1
                for memory in op.memory:
                    if self.finish_at[memory] == i:
                        finished(memory)
                        self._free(memory)
                for memory in self.dead_after.get(i, ()):
                    self._free(memory)
                    self.freed.add(memory)

    @contextmanager
    def _generators(self):
        generators = self.record.generators
        saved = {i: generators[i].get_state() for i in self.rng}
        for i, state in self.rng.items():
            generators[i].set_state(state)
        try:
            yield
        finally:
            for i in self.rng:
                self.rng[i] = generators[i].get_state()
                generators[i].set_state(saved[i])




def backward_slice(record: Record, memories: set[int], every_draw: bool = False) -> set[int]:
    """The ops that the final values of `memories` depend on: every op writing memory that a chosen op reads (or
    a wanted memory), and, once a chosen op draws random numbers, every earlier op that draws (so the draws come
    out of the generators exactly as in eager). Replaying only these gives the same values as replaying all.
    `every_draw`: every op that draws is chosen (the generators' states, not only some values, are wanted)."""
    need, chosen, drawing = set(memories), set(), every_draw
    for i in range(len(record.ops) - 1, -1, -1):
        op = record.ops[i]
        if (drawing and op.random) or not need.isdisjoint(op.writes):
            chosen.add(i)
            need.update(op.memory)
            drawing = drawing or op.random
    return chosen


def evaluate(record: Record, ref: Ref | Alias) -> torch.Tensor:
    """The real value of one recorded tensor now (for `.item()` while recording): a replay of the record so far,
    freeing memory as it goes, that keeps a copy of the value when its memory is finished."""
    replayer, found = Replayer(record), []
    wanted = record.memory_of[ref.node]

    def finished(memory: int) -> None:
        if memory == wanted:
            found.append(replayer.value(ref).clone())

    replayer.run(len(record.ops), finished)
    return found[0]


def generator_states(record: Record) -> dict[int, torch.Tensor]:
    """The generators' states after the record so far (for `torch.get_rng_state` while recording): a replay of
    the ops that draw or re-seed and of those they read."""
    replayer = Replayer(record, only=backward_slice(record, set(), every_draw=True))
    replayer.run(len(record.ops), lambda memory: None)
    return dict(replayer.rng)
