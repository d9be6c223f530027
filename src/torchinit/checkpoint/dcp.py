"""torch.distributed.checkpoint (DCP) folders: their metadata checked against the files, their keys' nested paths,
and reads into tensors by one process alone (each rank fetches only the chunks its own tensors overlap)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchinit.checkpoint.header import CheckpointError


@dataclass(frozen=True)
class DcpEntry:
    """A tensor in a DCP folder: read with `dcp.load`, which fetches only the chunks a destination overlaps."""

    folder: Path
    key: str  # the flattened key in the folder's metadata
    dtype: torch.dtype
    shape: tuple[int, ...]


def dcp_metadata(path: Path) -> Any:
    """A DCP folder's `Metadata`, after checking that every file it names is there."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as error:  # a pickle of torch classes: any error means "not readable"
        raise CheckpointError(f"{path}: a torch.distributed.checkpoint folder whose .metadata cannot be read "
                              f"({type(error).__name__}: {error}); the save did not finish or the folder is damaged."
                              ) from None
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: its .metadata names file(s) that are not in the folder: {', '.join(missing)}.")
    return metadata


def dcp_paths(metadata: Any) -> dict[str, tuple]:
    """Flattened key -> its path in the saved (nested) state: ("model", "layers.0.weight"), ("step",)."""
    nested = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return {key: tuple(nested.get(key, (key,))) for key in metadata.state_dict_metadata}


def read_dcp(folder: Path, targets: dict[str, Any]) -> None:
    """`dcp.load` into `targets` in place, in this process alone: no collectives, so ranks need not call it
    together; each one reads only the saved chunks that overlap its own tensors (its shards, for DTensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    except CheckpointException as error:
        raise CheckpointError(f"{folder}: reading the torch.distributed.checkpoint failed: {dcp_failures(error)}"
                              ) from None


def dcp_failures(error: BaseException) -> str:
    """What failed on which rank, from DCP's exception (whose message is every rank's whole traceback)."""
    failures = getattr(error, "failures", None)
    if not failures:
        return str(error)
    return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(failures.items()))
