"""The one place that opens any checkpoint: a path (a file, an index, a folder of shards, a DCP folder, a
DeepSpeed ZeRO folder) goes to the reader that reads it (formats.py, zero.py), and comes back as one lazy
`Checkpoint` (base.py): shapes and dtypes known up front, data read only into its destination.
"""

from __future__ import annotations

from pathlib import Path

from torchinit.checkpoint.base import Checkpoint
from torchinit.checkpoint.formats import TORCH_SUFFIXES, open_dcp, open_file, open_index
from torchinit.checkpoint.header import CheckpointError
from torchinit.checkpoint.zero import open_zero


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
        return open_index(path, select, mmap)
    return open_file(path, select, mmap)


def _open_folder(path: Path, select: str | None, mmap: bool) -> Checkpoint:
    if (path / ".metadata").exists():
        return open_dcp(path, select)
    if (path / "latest").is_file():  # a DeepSpeed ZeRO folder: its model, assembled from the partitions
        return open_zero(path).model
    indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.bin.index.json"))
    if len(indexes) == 1:
        return open_index(indexes[0], select, mmap)
    singles = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
    if len(indexes) > 1 or len(singles) != 1:
        found = [p.name for p in (indexes or singles)] or "nothing loadable"
        raise CheckpointError(f"{path}: cannot tell which checkpoint to load (found {found}); pass the file itself.")
    return open_checkpoint(singles[0], select, mmap)
