"""What a record holds (init/record.py writes it, record/replay.py runs it): plain data, no fake tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from torchinit.core.errors import RecordError

__all__ = ["Alias", "Const", "Gen", "Op", "Record", "RecordError", "Ref"]


@dataclass(frozen=True)
class Ref:
    """The output `node` of an earlier op."""

    node: int


@dataclass(frozen=True)
class Alias:
    """A view made without an op (`.data`, `.data =`): `as_strided` of the memory node `node` was made with."""

    node: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Const:
    """A real tensor captured from outside the constructor (copied when recorded)."""

    index: int


@dataclass(frozen=True)
class Gen:
    """An explicit `torch.Generator` passed to a random op."""

    index: int


@dataclass
class Op:
    func: Callable  # an aten OpOverload, or a torch.nn.init function recorded as one call
    args: tuple
    kwargs: dict
    outs: tuple[int | None, ...]  # node ids of the tensor leaves of the result (None: not a new tensor)
    memory: tuple[int, ...]  # the memory (first node of each storage) this op touches
    overwrites: int | None = None  # memory this op writes in full without reading it (its old value is dead)
    writes: tuple[int, ...] = ()  # the memory this op writes (its outputs' and its in-place arguments')
    random: bool = False  # draws from a random generator (a replay of a slice must keep every earlier draw)


@dataclass
class Record:
    """Everything replay needs; holds no fake tensors and no reference to the modules."""

    device: torch.device
    default_dtype: torch.dtype
    ops: list[Op] = field(default_factory=list)
    consts: list[torch.Tensor] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)
    rng: dict[int, torch.Tensor] = field(default_factory=dict)  # generator index -> state at record start
    memory_of: dict[int, int] = field(default_factory=dict)  # node -> the first node of its storage
    layout: list[tuple] = field(default_factory=list)  # node -> (size, stride, storage offset, dtype)
    whole: set[int] = field(default_factory=set)  # memory whose first node spans its whole storage
    garbage: set[int] = field(default_factory=set)  # memory whose value is uninitialized (empty, never written)
