"""Export a model as a transformers-style safetensors folder without gathering it: every rank writes its own
rows (FSDP2 shards) or partition elements (ZeRO-3) straight into the final files at their offsets.

The layout is known before any data moves: from the global shapes and dtypes every rank computes the same shard
files (`model-0000i-of-0000n.safetensors`, cut at `max_shard_size`), headers and byte offsets. Rank 0 creates
the files at their full size with their headers; then each rank `pwrite`s its pieces (in chunks: no rank holds
more than its shards, plus one chunk when they live on a GPU). Rank 0 adds `model.safetensors.index.json` and the
model's transformers `config.json` (when it has one). The folder is written like the other sharded saves:
into a temporary folder, all ranks agreeing that every step worked, then renamed into place.
A tensor no rank owns alone (replicated: unsharded parameters, buffers) is written by rank 0.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchinit.checkpoint.base import local_rows
from torchinit.checkpoint.header import DTYPES
from torchinit.checkpoint.sharded_state import agree, save_folder, split_state
from torchinit.core.compat_deepspeed import full_shape, is_zero3_param, zero3_local, zero3_partition_range
from torchinit.core.errors import ConfigurationError

# The safetensors names of the dtypes an export writes: header.py's table, less the wider unsigned integers, complex
# and the FNUZ float8s, which an export refuses (torchinit reads them).
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()
               if name not in {"U16", "U32", "U64", "C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}}
INDEX = "model.safetensors.index.json"
CHUNK = 64 * 2**20  # bytes copied off a GPU per write


def save_safetensors_folder(path: str | os.PathLike, state: dict[str, Any], max_shard_size: int = 5 * 2**30) -> None:
    """Write the one module in `state` as a safetensors folder that `from_pretrained` and `safetensors` read.
    Every rank must call it."""
    path = Path(path)
    modules, optimizers, values = split_state(state)
    if len(modules) != 1 or optimizers or values:
        raise ConfigurationError(
            f"{path}: format='safetensors' saves one module's tensors; this state has {sorted(state)}. "
            "Save the model alone ({'model': model}), and the training state with the default format.")
    module = next(iter(modules.values()))
    tensors = _tensors(module)
    bad = [f"{n} ({t.dtype})" for n, t in tensors.items() if t.dtype not in DTYPE_NAMES]
    if bad:
        raise ConfigurationError(f"{path}: safetensors cannot hold {', '.join(bad[:5])}. Convert them to a dtype it "
                                 "holds (or drop them), or save with the default format.")
    files = _plan(tensors, max_shard_size)

    def write(folder: Path) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        error = None
        if rank == 0:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for name, (header, size, _) in files.items():
                    with open(folder / name, "wb") as f:
                        f.write(header)
                        f.truncate(size)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it
                error = exc
        agree(error, path)  # the files exist (or every rank raises) before anyone writes into them
        for name, (_, _, placed) in files.items():
            fd = os.open(folder / name, os.O_WRONLY)
            try:
                for key, offset in placed:
                    for at, data in _my_pieces(tensors[key], rank):
                        _pwrite(fd, data, offset + at)
            finally:
                os.close(fd)
        if rank == 0:
            _write_index(folder, files, tensors)
            config = getattr(module, "config", None)
            if hasattr(config, "save_pretrained"):
                config.save_pretrained(folder)

    save_folder(path, write, None, state)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor under its first name only (as transformers saves)."""
    out, seen = {}, set()
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _nbytes(t: torch.Tensor) -> int:
    return math.prod(full_shape(t)) * t.dtype.itemsize


def _plan(tensors: dict[str, torch.Tensor], max_shard_size: int) -> dict[str, tuple[bytes, int, list]]:
    """{file name: (8-byte length + header, file size, [(key, absolute data offset)])}, the same on every rank."""
    groups, size = [[]], 0
    for key, t in tensors.items():
        if groups[-1] and size + _nbytes(t) > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += _nbytes(t)
    files = {}
    for i, keys in enumerate(groups):
        header, at = {}, 0
        for key in keys:
            t = tensors[key]
            header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(full_shape(t)),
                           "data_offsets": [at, at + _nbytes(t)]}
            at += _nbytes(t)
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        head = len(text).to_bytes(8, "little") + text
        placed, base = [], len(head)
        for key in keys:
            placed.append((key, base + header[key]["data_offsets"][0]))
        files[f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"] = (head, base + at, placed)
    return files


def _my_pieces(t: torch.Tensor, rank: int) -> list[tuple[int, torch.Tensor]]:
    """(byte offset in the tensor's data, local contiguous tensor) that this rank writes."""
    if is_zero3_param(t):  # ZeRO-3: this rank's elements of the flattened parameter
        start, end = zero3_partition_range(t)
        return [(start * t.dtype.itemsize, zero3_local(t).data[:end - start])] if end > start else []
    placements = getattr(t, "placements", None)
    if placements is not None and any(p.is_shard() for p in placements):
        rows = local_rows(t)  # FSDP2: this rank's rows (refuses other layouts)
        local = t.to_local().detach()
        row = math.prod(t.shape[1:]) * t.dtype.itemsize
        return [(rows[0] * row, local)] if rows[1] > rows[0] else []
    if rank != 0:
        return []
    local = t.to_local() if placements is not None else t
    return [(0, local.detach())]


def _pwrite(fd: int, t: torch.Tensor, offset: int) -> None:
    data = t.contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, data.numel(), CHUNK):
        chunk = data[start:start + CHUNK]
        view = memoryview(chunk.cpu().numpy())
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + start + done)


def _write_index(folder: Path, files: dict, tensors: dict[str, torch.Tensor]) -> None:
    weight_map = {key: name for name, (_, _, placed) in files.items() for key, _ in placed}
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
