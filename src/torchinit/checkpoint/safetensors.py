"""safetensors, read by hand: parse the header ourselves, then `preadv` the bytes straight into the destination
tensor's memory (no mmap page-faulting, no intermediate copy), from several threads. Values that cannot land in
place (another dtype, a GPU) are read into a small ring of staging slots and copied out of one slot while the
next is read: pinned slots and non-blocking copies on a side stream for CUDA, the cast done on the device.

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
from concurrent.futures import Future, ThreadPoolExecutor
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
SLOT = 32 * 2**20  # one staging slot, for values that cannot be read in place; larger ones are split across slots
SLOTS = 4  # slots in the ring (pinned for CUDA, pinning costs time once per process): at most SLOTS x SLOT bytes
ALIGN = 64  # each piece starts this aligned in its slot, so that its bytes can be viewed as any dtype


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

    Contiguous CPU destinations of the entry's dtype are read into directly. The others (another dtype, another
    device, strided) go through a ring of staging slots, at most `SLOTS` x `SLOT` bytes in all, so an fp32
    checkpoint loaded into a bf16 model never holds an fp32 copy of the model, and reading overlaps copying.
    """
    direct = [(e, out) for e, out in pairs if out.device.type == "cpu" and out.dtype == e.dtype
              and out.is_contiguous()]
    in_place = {id(out) for _, out in direct}
    staged: dict[torch.device, list[tuple[Entry, torch.Tensor]]] = {}
    for entry, out in pairs:
        if id(out) not in in_place:
            staged.setdefault(out.device, []).append((entry, out))
    total = sum(entry.end - entry.start for entry, _ in pairs)
    files: dict[Path, int] = {}
    try:
        for path in {entry.path for entry, _ in pairs}:
            files[path] = os.open(path, os.O_RDONLY)
        with ThreadPoolExecutor(max_workers=threads) as pool, _progress(total) as bar:
            _wait(_submit(pool, files, bar, _direct_jobs(direct)))
            for device, group in staged.items():
                batches = _plan(group, SLOT)
                if batches:
                    _stage(pool, files, bar, batches, device, max(ALIGN, SLOT // threads))
    finally:
        for fd in files.values():
            os.close(fd)
    return total


@dataclass(frozen=True)
class _Piece:
    """Bytes [start, start + nbytes) of a file, staged at `at` in a slot, bound for the destination view `out`."""

    path: Path
    start: int
    nbytes: int
    at: int
    dtype: torch.dtype  # the file's
    out: torch.Tensor


def _plan(pairs: list[tuple[Entry, torch.Tensor]], slot: int) -> list[list[_Piece]]:
    """Cut the values into pieces of at most `slot` bytes and pack them, in order, into batches that fit a slot."""
    batches: list[list[_Piece]] = []
    batch: list[_Piece] = []
    used = 0
    for entry, out in pairs:
        for offset, nbytes, view in _split(out.detach(), entry.dtype.itemsize, slot):
            at = -(-used // ALIGN) * ALIGN
            if batch and at + nbytes > slot:
                batches.append(batch)
                batch, at = [], 0
            batch.append(_Piece(entry.path, entry.start + offset, nbytes, at, entry.dtype, view))
            used = at + nbytes
    return [*batches, batch] if batch else batches


def _split(out: torch.Tensor, itemsize: int, limit: int, offset: int = 0):
    """(byte offset in the value, bytes, destination view) pieces of at most `limit` bytes, in file order: element
    ranges of a contiguous destination, blocks of rows of a strided one (of sub-rows, when one row is too big)."""
    nbytes = out.numel() * itemsize
    if nbytes <= limit:
        if nbytes:
            yield offset, nbytes, out
        return
    if out.is_contiguous():
        out, row = out.view(-1), itemsize
    else:
        row = nbytes // out.shape[0]
    if row > limit:
        for i in range(out.shape[0]):
            yield from _split(out[i], itemsize, limit, offset + i * row)
        return
    step = limit // row
    for i in range(0, out.shape[0], step):
        part = out[i:i + step]
        yield offset + i * row, part.numel() * itemsize, part


def _stage(pool: ThreadPoolExecutor, files: dict[Path, int], bar, batches: list[list[_Piece]],
           device: torch.device, step: int) -> None:
    """Copy batch i out of its slot while the reads of the next batches (one per other slot) are under way."""
    cuda = device.type == "cuda"
    # A synchronous copy is done with its slot before the next read into it is queued: two slots are enough.
    ring = _ring(min(len(batches), SLOTS if cuda else 2), max(b[-1].at + b[-1].nbytes for b in batches), cuda)
    copier = _CudaCopier(device, len(ring)) if cuda else _Copier()
    reads: dict[int, list[Future]] = {}

    def read(j: int) -> None:
        if j < len(batches):
            copier.free(j % len(ring))
            reads[j] = _submit(pool, files, bar, _slot_jobs(batches[j], ring[j % len(ring)], step))

    try:
        for j in range(len(ring) - 1):
            read(j)
        for i, batch in enumerate(batches):
            read(i + len(ring) - 1)  # into the slot batch i - 1 was copied from
            _wait(reads.pop(i))
            copier.send(i % len(ring), ring[i % len(ring)], batch)
    finally:
        copier.finish()


def _ring(count: int, nbytes: int, pinned: bool) -> list[torch.Tensor]:
    """The staging slots of one load; pinned for CUDA, so that transfers from them are asynchronous DMA."""
    return [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(count)]


def _staged(slot: torch.Tensor, piece: _Piece) -> torch.Tensor:
    """The piece's bytes in the slot, as the file's dtype in the destination view's shape."""
    return slot[piece.at:piece.at + piece.nbytes].view(piece.dtype).view(piece.out.shape)


class _Copier:
    """Copies a filled slot out (the cast on the CPU); synchronous, so the slot can be refilled at once."""

    def free(self, k: int) -> None:
        pass

    def send(self, k: int, slot: torch.Tensor, batch: list[_Piece]) -> None:
        for piece in batch:
            piece.out.copy_(_staged(slot, piece))

    def finish(self) -> None:
        pass


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU for the process: torch keeps a pool of 32 streams per device, each holding its own
    cached blocks, so a stream per load would cycle through them all."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _CudaCopier(_Copier):
    """Non-blocking copies from pinned slots on a side stream, so the GPU takes slot i while slot i + 1 is read.

    A non-blocking host-to-device `copy_` between dtypes stages the file's dtype in device memory and casts there
    (torch >= 2.3; a blocking one would cast on the CPU into pageable memory first). A slot is refilled only once
    the event recorded after its copies has passed.
    """

    def __init__(self, device: torch.device, slots: int):
        self.stream = _side_stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the destinations' allocation and fill first
        self.copied = [torch.cuda.Event() for _ in range(slots)]

    def free(self, k: int) -> None:
        self.copied[k].synchronize()

    def send(self, k: int, slot: torch.Tensor, batch: list[_Piece]) -> None:
        with torch.cuda.stream(self.stream):
            for piece in batch:
                piece.out.copy_(_staged(slot, piece), non_blocking=True)
            self.copied[k].record(self.stream)

    def finish(self) -> None:
        self.stream.synchronize()  # the values are in place (for every stream) when the load returns


def _direct_jobs(pairs: list[tuple[Entry, torch.Tensor]]) -> list[tuple[Path, int, torch.Tensor]]:
    """(file, offset, bytes to fill) reads of CHUNK bytes straight into (CPU, same dtype, contiguous) tensors."""
    jobs = []
    for entry, out in pairs:
        raw = out.detach().reshape(-1).view(torch.uint8)
        jobs += [(entry.path, entry.start + o, raw[o:o + CHUNK]) for o in range(0, entry.end - entry.start, CHUNK)]
    return jobs


def _slot_jobs(batch: list[_Piece], slot: torch.Tensor, step: int) -> list[tuple[Path, int, torch.Tensor]]:
    """Reads of at most `step` bytes that fill the batch's places in the slot (several per slot: the pool's
    threads share each one)."""
    return [(p.path, p.start + o, slot[p.at + o:p.at + min(p.nbytes, o + step)])
            for p in batch for o in range(0, p.nbytes, step)]


def _submit(pool: ThreadPoolExecutor, files: dict[Path, int], bar, jobs: list) -> list[Future]:
    def run(job) -> None:
        _pread(files[job[0]], job[0], job[1], job[2])
        bar.update(job[2].numel())

    return [pool.submit(run, job) for job in jobs]


def _wait(futures: list[Future]) -> None:
    for future in futures:
        future.result()


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
