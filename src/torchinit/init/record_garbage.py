"""Which memory of a record holds uninitialized values (G9: known without poison).

1. `empty` and its kin make uninitialized memory.
2. An op that reads uninitialized values makes what it writes uninitialized (ops that read only shapes and
   dtypes, such as `zeros_like`, read no values; an op that fills its target without reading it does not read
   the target).
3. An op that writes memory in full from initialized inputs makes it initialized. Partial fills from initialized
   inputs are counted element by element (one mask per memory, made at its first partial fill), and make it
   initialized once they cover all of it: `x = torch.empty(n, 2); x[:, 0] = a; x[:, 1] = b`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchinit.core.compat import unset_fake_temporarily
from torchinit.core.ops import METADATA_ONLY, UNINITIALIZED

__all__ = ["Garbage"]


class Garbage:
    """The uninitialized memory of one record (`memory`: the record's set, updated in place)."""

    def __init__(self, memory: set[int]):
        self.memory = memory
        self._covered: dict[int, tuple[int, torch.Tensor]] = {}  # memory -> (element size, mask of filled elements)

    def update(self, func: Callable, reads: set[int], writes: set[int], overwritten: int | None,
               filled: tuple[int, torch.Tensor] | None) -> None:
        """After one op: `overwritten` is the memory it fills in full, `filled` (memory, view) the view of its
        first argument that it fills without reading it."""
        packet = getattr(func, "overloadpacket", None)
        if packet in UNINITIALIZED:
            self.memory.update(writes)
            for m in writes:
                self._covered.pop(m, None)
            return
        if getattr(func, "is_view", False):
            return
        target = filled[0] if filled is not None else None
        tainted = packet not in METADATA_ONLY and any(
            m in self.memory for m in reads if m != overwritten and m != target)
        for m in writes:
            if tainted:
                self.memory.add(m)
                self._covered.pop(m, None)
            elif m == overwritten or m not in reads:
                self.memory.discard(m)
                self._covered.pop(m, None)
            elif m == target and m in self.memory:
                self._cover(m, filled[1])

    def _cover(self, m: int, view: torch.Tensor) -> None:
        size = view.element_size()
        with unset_fake_temporarily():
            known = self._covered.get(m)
            if known is None:
                mask = torch.zeros(view.untyped_storage().nbytes() // size, dtype=torch.bool)
                known = self._covered[m] = (size, mask)
            if known[0] != size:  # views of another width: not counted, so it stays uninitialized
                return
            known[1].as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
            if bool(known[1].all()):
                self.memory.discard(m)
                del self._covered[m]
