"""safetensors, read by hand: parse the header ourselves, then `preadv` the bytes straight into the destination
tensor's memory (no mmap page-faulting, no intermediate copy), from several threads.

Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]},
"__metadata__": {...}}, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # the format's own limit
CHUNK = 64 * 2**20  # large tensors are read in pieces of this size, in parallel
STAGING = 256 * 2**20  # at most this much CPU buffer for values that cannot be read in place


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be; the message names the file and the key."""


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors and metadata of one .safetensors file, every offset and size checked against the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header length {length} does not fit the file ({size} bytes): truncated "
                                  "or not a safetensors file.")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    base, entries = 8 + length, {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed or unsupported header entry: {info!r}.") \
                from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({info['dtype']}, shape {list(shape)}) claims bytes {begin}..{end} but needs "
                f"{nbytes} and the file has {size - base} after the header: the file is truncated or corrupt."
            )
        entries[name] = Entry(path, dtype, shape, base + begin, base + end)
    return entries, metadata


READERS = min(16, max(4, os.cpu_count() or 4))  # page-cache copies scale with cores; 4 is a good floor


def read_into(pairs: list[tuple[Entry, torch.Tensor]], threads: int = READERS) -> int:
    """Fill each destination tensor with its entry's values (cast on the fly when the dtypes differ); returns the
    bytes read.

    CPU destinations of the entry's dtype are read into directly. Others (another dtype, another device) go
    through CPU buffers, at most `STAGING` bytes of them at a time, so an fp32 checkpoint loaded into a bf16
    model never holds an fp32 copy of the model.
    """
    direct = [(e, out) for e, out in pairs if out.device.type == "cpu" and out.dtype == e.dtype
              and out.is_contiguous()]
    in_place = {id(out) for _, out in direct}
    staged = [(e, out) for e, out in pairs if id(out) not in in_place]
    batches, batch, size = [], [], 0
    for entry, out in staged:
        if batch and size + entry.end - entry.start > STAGING:
            batches.append(batch)
            batch, size = [], 0
        batch.append((entry, out))
        size += entry.end - entry.start
    batches.append(batch)
    total = sum(entry.end - entry.start for entry, _ in pairs)
    files: dict[Path, int] = {}
    try:
        for path in {entry.path for entry, _ in pairs}:
            files[path] = os.open(path, os.O_RDONLY)
        with ThreadPoolExecutor(max_workers=threads) as pool, _progress(total) as bar:
            _read(pool, files, bar, direct)
            for batch in batches:
                buffers = [(out, torch.empty(entry.shape, dtype=entry.dtype)) for entry, out in batch]
                _read(pool, files, bar, [(entry, buf) for (entry, _), (_, buf) in zip(batch, buffers, strict=True)])
                with torch.no_grad():
                    for out, buffer in buffers:
                        out.copy_(buffer)
    finally:
        for fd in files.values():
            os.close(fd)
    return total


def _read(pool: ThreadPoolExecutor, files: dict[Path, int], bar, pairs: list[tuple[Entry, torch.Tensor]]) -> None:
    """pread every entry into its (CPU, same dtype, contiguous) tensor, in CHUNK pieces on the pool."""
    jobs = []
    for entry, out in pairs:
        raw = out.detach().reshape(-1).view(torch.uint8)
        for offset in range(0, entry.end - entry.start, CHUNK):
            jobs.append((entry.path, entry.start + offset, raw[offset:offset + CHUNK]))

    def run(job) -> None:
        _pread(files[job[0]], job[0], job[1], job[2])
        bar.update(job[2].numel())

    list(pool.map(run, jobs))


def _progress(total: int):
    """A tqdm bar that appears only if the load takes over a second, on a terminal (a no-op without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext(_NoBar())
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, delay=1.0, disable=None, desc="loading")


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _pread(fd: int, path: Path, offset: int, into: torch.Tensor) -> None:
    # The tensor's own memory as a writable buffer (its owner keeps it alive); no NumPy needed.
    view = memoryview((ctypes.c_ubyte * into.numel()).from_address(into.data_ptr())).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"{path}: ended early at byte {offset + done}: the file is truncated.")
        done += got
