"""A checkpoint as one lazy mapping of key -> tensor (`Checkpoint`): shapes and dtypes known up front, data read
only into its destination, the values checked as they land; and a rank's part of a DTensor in the saved value's
terms (`local_rows`, the byte runs of a safetensors entry). The format readers (formats.py, zero.py) make these;
opener.py picks the reader.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from torchinit.checkpoint import safetensors
from torchinit.checkpoint.dcp import DcpEntry, read_dcp
from torchinit.checkpoint.header import CheckpointError, Entry
from torchinit.core.placement import is_distributed, local_box, local_tensor
from torchinit.core.text import shorten
from torchinit.core.values import INF, NAN, nonfinite


class Checkpoint(Mapping):
    """A checkpoint's tensors by key. `shape`/`dtype` cost nothing; `load_into` reads straight into tensors.

    `load_into` / `load_slices` check the values they write: NaN, or +-inf outside the keys in `inf_ok` (buffers,
    where -inf masks are common), is a `CheckpointError` naming the file and the keys, unless `allow_nonfinite`.
    """

    def __init__(self, path: Path, entries: dict[str, Entry | DcpEntry | torch.Tensor], files: list[Path],
                 metadata: dict):
        self.path, self.entries, self.files, self.metadata = path, entries, files, metadata
        self.bytes_read = 0
        self.allow_nonfinite = False
        self.inf_ok: frozenset[str] = frozenset()
        self.direct_io = False  # safetensors read past the page cache (O_DIRECT): for files not in the cache

    def renamed(self, names: Mapping[str, str]) -> Checkpoint:
        """The entries under other keys ({new key: key here}); data is still read only on `load_into`."""
        return Checkpoint(self.path, {new: self.entries[old] for new, old in names.items()}, self.files,
                          self.metadata)

    @classmethod
    def from_tensors(cls, path: Path, state: Mapping[str, torch.Tensor]) -> Checkpoint:
        """A state dict already in memory (one entry of a saved training state), named after its file."""
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: the entry is a {type(state).__name__}, not a state dict of tensors.")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: the entry is not a state dict of tensors (e.g. {bad[:3]}).")
        return cls(path, dict(state), [path], {})

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        if isinstance(entry, torch.Tensor):
            return entry
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if isinstance(entry, DcpEntry):
            read_dcp(entry.folder, {entry.key: out})
        else:
            safetensors.read_into([(entry, out)])
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries  # Mapping's default would read the tensor to find out

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def nbytes(self, key: str) -> int:
        entry = self.entries[key]
        if isinstance(entry, torch.Tensor):
            return entry.numel() * entry.element_size()
        if isinstance(entry, DcpEntry):
            return math.prod(entry.shape) * entry.dtype.itemsize
        return entry.end - entry.start

    def load_into(self, pairs: list[tuple[str, torch.Tensor]]) -> int:
        """Fill each tensor with the value under its key (cast as `copy_` would); returns bytes read.

        A DTensor destination (FSDP2 rows, TP rows or column blocks, 2-D meshes) gets only this rank's part,
        and for safetensors only that part's bytes are read (shard-on-read: no rank reads the whole tensor, no
        broadcast). From a DCP
        folder any DTensor gets its shard, reading only the saved chunks that overlap it.
        """
        lazy, eager, dcp, dcp_bytes, written = [], [], {}, 0, []
        for key, t in pairs:
            entry = self.entries[key]
            if isinstance(entry, DcpEntry):
                dcp[entry.key] = t
                dcp_bytes += local_tensor(t).numel() * entry.dtype.itemsize
                written.append((key, local_tensor(t)))
                continue
            local = local_tensor(t)
            written.append((key, local))
            try:
                if isinstance(entry, Entry):
                    lazy += _local_pieces(entry, t, local)
                elif is_distributed(t):
                    eager.append((entry[tuple(slice(o, o + n) for o, n in local_box(t))], local))
                else:
                    eager.append((entry, t))
            except ValueError as error:
                raise CheckpointError(f"{self.path}: cannot load {key!r} into a DTensor ({error}).") from None
        verdicts: dict[int, int] = {}
        done = self._fill(lazy, eager, verdicts)
        if dcp:
            read_dcp(self.path, dcp)  # a DCP checkpoint's path is its folder
            done += dcp_bytes
        self._check_values(written, verdicts)
        self.bytes_read += done
        return done

    def load_slices(self, items: list[tuple[str, int, int, torch.Tensor]]) -> int:
        """Elements [start, end) of each value, flattened, into a 1-D tensor (a ZeRO-3 partition); returns bytes
        read. From safetensors only those elements' bytes are read; a DCP value is read whole, one at a time."""
        lazy, eager = [], []
        for key, start, end, out in items:
            entry = self.entries[key]
            if isinstance(entry, Entry):
                size = entry.dtype.itemsize
                lazy.append((replace(entry, shape=(end - start,), start=entry.start + start * size,
                                     end=entry.start + end * size), out))
            else:
                eager.append(((entry if isinstance(entry, torch.Tensor) else self[key]).reshape(-1)[start:end], out))
        verdicts: dict[int, int] = {}
        done = self._fill(lazy, eager, verdicts)
        self._check_values([(key, out) for key, _, _, out in items], verdicts)
        self.bytes_read += done
        return done

    def _check_values(self, written: list[tuple[str, torch.Tensor]], verdicts: dict[int, int]) -> None:
        """Raise naming the file(s) and keys whose values are not finite (see the class). `verdicts` are those the
        reader found as it read (`core.values`' FINITE, INF, NAN, by id of the tensor); the others are checked here
        (`nonfinite`: one min/max pass per tensor, one device sync per device)."""
        if self.allow_nonfinite:
            return
        known = [(k, verdicts[id(t)]) for k, t in written if id(t) in verdicts]
        rest = [(k, t) for k, t in written if id(t) not in verdicts]
        known += zip([k for k, _ in rest], nonfinite([t for _, t in rest]), strict=True)
        order = {k: i for i, (k, _) in enumerate(written)}
        bad: dict[Path, list[str]] = {}
        for key, verdict in sorted(known, key=lambda kv: order[kv[0]]):
            if verdict == NAN or verdict == INF and key not in self.inf_ok:
                entry = self.entries[key]
                bad.setdefault(entry.path if isinstance(entry, Entry) else self.path, []).append(key)
        if bad:
            where = "; ".join(f"{file}: {shorten(names, 10)}" for file, names in bad.items())
            raise CheckpointError(f"NaN or infinite values in the checkpoint: {where}. A meta or empty-init model "
                                  "is left as it was (a real one was written in place: see the README). Pass "
                                  "allow_nonfinite=True to load them on purpose.")

    def _fill(self, lazy: list[tuple[Entry, torch.Tensor]], eager: list[tuple[torch.Tensor, torch.Tensor]],
              verdicts: dict[int, int]) -> int:
        done = safetensors.read_into(lazy, verdicts=verdicts, direct_io=self.direct_io) if lazy else 0
        with torch.no_grad():
            for value, out in eager:
                out.copy_(value)
                done += value.numel() * value.element_size()
        return done


def local_rows(t: torch.Tensor) -> tuple[int, int] | None:
    """This rank's rows [start, end) of a DTensor whose part is a run of whole rows (FSDP2's dim-0 shards, on any
    mesh), else None for a plain tensor. Other layouts (TP's column blocks) are refused: the callers (the
    DeepSpeed-folder reader, the safetensors export) write rows."""
    if not is_distributed(t):
        return None
    box = local_box(t)
    if any((o, n) != (0, t.shape[d]) for d, (o, n) in enumerate(box) if d > 0):
        raise CheckpointError(f"a DTensor with placements {t.placements} holds a block of columns, not whole rows; "
                              "only row shards (FSDP2) are supported here.")
    start, length = box[0] if box else (0, 0)
    return start, start + length


def _local_pieces(entry: Entry, t: torch.Tensor, local: torch.Tensor) -> list[tuple[Entry, torch.Tensor]]:
    """The byte ranges of a row-major tensor in the file that hold this rank's part of `t`, each with where it
    goes: all of it for a plain tensor, one run of rows for a dim-0 shard (FSDP2), and one run per row for a
    column block (TP's Shard(1)): exactly the part's bytes, read in place. `local` is `t`'s local tensor."""
    if not is_distributed(t):
        return [(entry, t)]
    box = local_box(t)
    if any(n == 0 for _, n in box):
        return []
    shape, size = entry.shape, entry.dtype.itemsize
    partial = [d for d, (o, n) in enumerate(box) if (o, n) != (0, shape[d])]
    if not partial:
        return [(entry, local)]
    last = partial[-1]  # dims after it are whole: each run is contiguous in the file
    inner = math.prod(shape[last + 1:])
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    pieces = []
    for index in itertools.product(*(range(o, o + n) for o, n in box[:last])):
        first = sum(i * strides[d] for d, i in enumerate(index)) + box[last][0] * strides[last]
        count = box[last][1] * inner
        out = local[tuple(i - box[d][0] for d, i in enumerate(index))]
        pieces.append((replace(entry, shape=tuple(out.shape), start=entry.start + first * size,
                               end=entry.start + (first + count) * size), out))
    return pieces
