"""Open any checkpoint as one lazy mapping of key -> tensor: shapes and dtypes known up front, data read only
into its destination.

Formats: one .safetensors file; a folder or index (`*.safetensors.index.json`, `pytorch_model.bin.index.json`)
of shards; torch pickles (.pt/.bin/.ckpt/.pth, always `weights_only=True` and mmap), with the state found inside
nested dicts (`state_dict`, `model`, `module`, Lightning checkpoints) or picked with `select`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from torchinit.checkpoint import safetensors
from torchinit.checkpoint.safetensors import CheckpointError, Entry

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class Checkpoint(Mapping):
    """A checkpoint's tensors by key. `shape`/`dtype` cost nothing; `load_into` reads straight into tensors."""

    def __init__(self, path: Path, entries: dict[str, Entry | torch.Tensor], files: list[Path], metadata: dict):
        self.path, self.entries, self.files, self.metadata = path, entries, files, metadata
        self.bytes_read = 0

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
        return entry.end - entry.start

    def load_into(self, pairs: list[tuple[str, torch.Tensor]]) -> int:
        """Fill each tensor with the value under its key (cast as `copy_` would); returns bytes read.

        A destination sharded on dim 0 (an FSDP2 DTensor) gets only this rank's rows, and for safetensors only
        those rows' bytes are read (shard-on-read: no rank reads the whole tensor, no broadcast).
        """
        lazy, eager = [], []
        for key, t in pairs:
            entry, rows = self.entries[key], _local_rows(t)
            local = t.to_local() if rows is not None else t
            if isinstance(entry, Entry):
                lazy.append((_rows_of(entry, rows) if rows is not None else entry, local))
            else:
                eager.append((entry[rows[0]:rows[1]] if rows is not None else entry, local))
        done = safetensors.read_into(lazy) if lazy else 0
        with torch.no_grad():
            for value, local in eager:
                local.copy_(value)
                done += value.numel() * value.element_size()
        self.bytes_read += done
        return done


def _local_rows(t: torch.Tensor) -> tuple[int, int] | None:
    """This rank's rows of a DTensor sharded on dim 0 over a 1-D mesh (torch.chunk layout), else None."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return None
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise CheckpointError(f"loading into a DTensor with placements {placements} is not supported (dim-0 shards "
                              "on one mesh dimension are, as FSDP2 makes them).")
    mesh = t.device_mesh
    size, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-t.shape[0] // size) if t.shape[0] else 0
    start = min(rank * chunk, t.shape[0])
    return start, min(start + chunk, t.shape[0])


def _rows_of(entry: Entry, rows: tuple[int, int]) -> Entry:
    """The byte range of rows [a, b) of a row-major tensor in the file."""
    row = (entry.end - entry.start) // entry.shape[0] if entry.shape and entry.shape[0] else 0
    shape = (rows[1] - rows[0], *entry.shape[1:])
    return Entry(entry.path, entry.dtype, shape, entry.start + rows[0] * row, entry.start + rows[1] * row)


def open_checkpoint(path: str | Path, select: str | None = None, mmap: bool = True) -> Checkpoint:
    """Open `path` (file or folder) without reading tensor data; `select` picks a nested state by key.

    `mmap=False` reads torch pickles into memory instead of mapping them (for network filesystems, where
    page-faulting a mapping is slow); safetensors are always read with pread, never mapped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    if path.is_dir():
        return _open_folder(path, select, mmap)
    if path.name.endswith(".index.json"):
        return _open_index(path, select, mmap)
    if path.suffix == ".safetensors":
        entries, metadata = safetensors.read_header(path)
        return Checkpoint(path, dict(entries), [path], metadata)
    return _open_torch(path, select, mmap)


def _open_folder(path: Path, select: str | None, mmap: bool) -> Checkpoint:
    if (path / ".metadata").exists():
        raise CheckpointError(f"{path}: a torch.distributed.checkpoint folder; loading those is not supported yet. "
                              "Convert it with torch.distributed.checkpoint.format_utils.dcp_to_torch_save.")
    indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.bin.index.json"))
    if len(indexes) == 1:
        return _open_index(indexes[0], select, mmap)
    singles = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
    if len(indexes) > 1 or len(singles) != 1:
        found = [p.name for p in (indexes or singles)] or "nothing loadable"
        raise CheckpointError(f"{path}: cannot tell which checkpoint to load (found {found}); pass the file itself.")
    return open_checkpoint(singles[0], select, mmap)


def _open_index(index: Path, select: str | None, mmap: bool) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index}: not a valid checkpoint index ({error!r}).") from None
    entries: dict[str, Entry | torch.Tensor] = {}
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index}: names shard file(s) that do not exist next to it: {', '.join(missing)}.")
    for file in files:
        shard = open_checkpoint(file, select, mmap)
        entries.update({k: shard.entries[k] for k, f in weight_map.items() if index.parent / f == file
                        and k in shard.entries})
    absent = [k for k in weight_map if k not in entries]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} key(s) are missing from the shard the index names, e.g. "
                              f"{absent[:3]}.")
    return Checkpoint(index, entries, files, {})


def _open_torch(path: Path, select: str | None, mmap: bool) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds more than tensors and plain containers (pickled code or "
            f"objects), and torchinit only loads with weights_only=True. Re-save the state dict alone. ({error})"
        ) from None
    except RuntimeError as error:  # torch's message for truncated / corrupt zip archives
        raise CheckpointError(f"{path}: cannot read this torch checkpoint: {error}") from None
    state = _find_state(obj, path, select)
    return Checkpoint(path, state, [path], {})


def _find_state(obj: object, path: Path, select: str | None) -> dict[str, torch.Tensor]:
    if select is not None:
        if not isinstance(obj, dict) or select not in obj:
            raise CheckpointError(f"{path}: has no entry {select!r} to select (top-level keys: {_keys(obj)}).")
        obj = obj[select]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return _find_state(obj[key], path, None)
    raise CheckpointError(f"{path}: found no state dict of tensors (top-level keys: {_keys(obj)}). Pass "
                          "select='<key>' to say where it is.")


def _keys(obj: object) -> str:
    return ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, dict) else type(obj).__name__
