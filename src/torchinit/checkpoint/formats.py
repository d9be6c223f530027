"""The format readers: each opens one kind of checkpoint as a `Checkpoint` (base.py) without reading tensor data.

- one .safetensors file: its header alone (`open_file`);
- an index (`*.safetensors.index.json`, `pytorch_model.bin.index.json`) of shard files (`open_index`);
- torch pickles (.pt/.bin/.ckpt/.pth, always `weights_only=True` and mmap), with the state found inside nested
  dicts (`state_dict`, `model`, `module`, Lightning checkpoints) or picked with `select` (`open_torch`);
- `torch.distributed.checkpoint` (DCP) folders, from their `.metadata` alone, with the same nesting rules
  (`open_dcp`).

DeepSpeed ZeRO folders are read by zero.py; opener.py picks the reader for a path.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from torchinit.checkpoint.base import Checkpoint
from torchinit.checkpoint.dcp import DcpEntry, dcp_metadata, dcp_paths
from torchinit.checkpoint.header import CheckpointError, Entry, read_header

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def open_file(path: Path, select: str | None, mmap: bool) -> Checkpoint:
    """One checkpoint file: safetensors (by its suffix; always read with pread, never mapped), else a torch
    pickle (mapped unless `mmap=False`)."""
    if path.suffix == ".safetensors":
        entries, metadata = read_header(path)
        return Checkpoint(path, dict(entries), [path], metadata)
    return open_torch(path, select, mmap)


def open_index(index: Path, select: str | None, mmap: bool) -> Checkpoint:
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
        shard = open_file(file, select, mmap)
        entries.update({k: shard.entries[k] for k, f in weight_map.items() if index.parent / f == file
                        and k in shard.entries})
    absent = [k for k in weight_map if k not in entries]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} key(s) are missing from the shard the index names, e.g. "
                              f"{absent[:3]}.")
    return Checkpoint(index, entries, files, {})


def open_dcp(path: Path, select: str | None) -> Checkpoint:
    """The tensors of a DCP folder, found as in a torch pickle: all of a flat state, one nested entry picked with
    `select`, or the first of NESTED_KEYS that holds only tensors (`fabric.save` puts a module under its key)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp_metadata(path)
    paths = dcp_paths(metadata)
    tops = list(dict.fromkeys(p[0] for p in paths.values()))
    if select is None and any(len(p) > 1 for p in paths.values()):
        select = next((k for k in NESTED_KEYS if k in tops and all(
            len(p) == 2 and isinstance(metadata.state_dict_metadata[key], TensorStorageMetadata)
            for key, p in paths.items() if p[0] == k)), None)
        if select is None:
            raise CheckpointError(f"{path}: found no state dict of tensors (top-level entries: "
                                  f"{', '.join(map(repr, tops[:10]))}). Pass select='<key>' to say where it is.")
    if select is not None and select not in tops:
        raise CheckpointError(f"{path}: has no entry {select!r} to select (top-level entries: "
                              f"{', '.join(map(repr, tops[:10]))}).")
    entries: dict[str, Entry | DcpEntry | torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        where = paths[key]
        if not isinstance(meta, TensorStorageMetadata) or select is not None and where[0] != select:
            continue
        name = ".".join(map(str, where[1:] if select is not None else where))
        entries[name] = DcpEntry(path, key, meta.properties.dtype, tuple(meta.size))
    files = sorted({path / info.relative_path for info in metadata.storage_data.values()})
    nested = {"entries": ", ".join(tops)} if any(len(p) > 1 for p in paths.values()) else {}
    return Checkpoint(path, entries, files, {"format": "torch.distributed.checkpoint", **nested})


def open_torch(path: Path, select: str | None, mmap: bool) -> Checkpoint:
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


