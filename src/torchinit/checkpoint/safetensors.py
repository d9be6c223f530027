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
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
MAX_HEADER = 100_000_000  # the format's own limit on the header's length
LIMIT = 2**64  # sizes and offsets are unsigned 64-bit integers in the format
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
    stamp: tuple[int, ...] | None = None  # the file's identity when its header was read (see `_stamp`)


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors and metadata of one .safetensors file, held to the format's rules as the `safetensors` library
    holds them: anything else is one `CheckpointError` naming the file (and the key), never a guess.

    The rules: an 8-byte little-endian length N of a header that fits the format's limit and the file; N bytes of
    UTF-8 holding one JSON object (no duplicate keys, no NaN/Infinity literals); each tensor's entry with a known
    `dtype`, a `shape` of non-negative integers and `data_offsets` [begin, end] of non-negative integers whose
    length is shape x dtype size; all ranges, in order, tiling the data region with no gap and no overlap and
    ending at the file's end; `__metadata__`, if present, a map of strings to strings.
    """
    with open(path, "rb") as f:
        stamp = _stamp(os.fstat(f.fileno()))
        size = stamp[2]
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise CheckpointError(f"{path}: header length {length} does not fit the file ({size} bytes) or the "
                                  f"format's limit ({MAX_HEADER}): truncated or not a safetensors file.")
        raw = f.read(length)
    header = _parse(path, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: '__metadata__' must map strings to strings, not {_short(metadata)}.")
    base, entries, spans = 8 + length, {}, []
    for name, info in header.items():
        dtype, shape, (begin, end) = _fields(path, name, info)
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']}, shape {list(shape)}) needs {nbytes} "
                                  f"bytes but its data_offsets [{begin}, {end}] hold {end - begin}.")
        entries[name] = Entry(path, dtype, shape, base + begin, base + end, stamp)
        spans.append((begin, end, name))
    _check_tiling(path, sorted(spans), size - base)
    return entries, metadata


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced (device, inode) or rewritten (size, modification time)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _parse(path: Path, raw: bytes) -> dict:
    def pairs(items: list[tuple[str, object]]) -> dict:
        out = dict(items)
        if len(out) != len(items):
            seen: set[str] = set()
            twice = next(k for k, _ in items if k in seen or seen.add(k))
            raise CheckpointError(f"{path}: the safetensors header holds the key {twice!r} twice.")
        return out

    def constant(name: str):
        raise CheckpointError(f"{path}: the safetensors header holds {name}, which JSON does not allow.")

    try:
        text = raw.decode("utf-8")
        text.encode("utf-8")  # lone surrogates from \ud800-style escapes are not UTF-8 either
        if not text.startswith("{"):
            raise ValueError("it does not start with '{'")
        header = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, UnicodeError, RecursionError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the safetensors header is not one valid JSON object ({error}).") from None
    _check_strings(path, header)
    return header


def _check_strings(path: Path, value: object) -> None:
    """Every string in the header (keys included) must be valid UTF-8: JSON escapes can make lone surrogates."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeError:
            raise CheckpointError(f"{path}: the safetensors header holds a string that is not UTF-8 "
                                  f"({value!r}).") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(path, k)
            _check_strings(path, v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(path, v)


def _fields(path: Path, name: str, info: object) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """A tensor entry's dtype, shape and data_offsets, each checked for type and range."""
    def bad(what: str):
        return CheckpointError(f"{path}: tensor {name!r} has {what} in its header entry {_short(info)}.")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise bad("not the fields dtype, shape and data_offsets")
    if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
        raise bad(f"an unknown dtype (known: {', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad("a shape that is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets):
        raise bad("data_offsets that are not two non-negative integers")
    if offsets[1] < offsets[0]:
        raise bad("data_offsets that end before they begin")
    return DTYPES[info["dtype"]], tuple(shape), (offsets[0], offsets[1])


def _natural(value: object) -> bool:
    return type(value) is int and 0 <= value < LIMIT  # not bool, not float: 2.5 is not a size


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data: int) -> None:
    """The byte ranges, sorted, must follow each other with no gap or overlap and end where the file ends."""
    at = 0
    for begin, end, name in spans:
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise CheckpointError(f"{path}: tensor {name!r} starts at data byte {begin} and {what} (which ends at "
                                  f"{at}): the byte ranges must follow each other exactly.")
        at = end
    if at != data:
        why = "bytes after the last tensor" if data > at else "truncated"
        raise CheckpointError(f"{path}: the tensors' data ends at byte {at} of the data region, but the file holds "
                              f"{data} bytes after the header: {why}.")


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
        for path, stamp in {entry.path: entry.stamp for entry, _ in pairs}.items():
            files[path] = _open(path, stamp)
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


class _CudaCopier(_Copier):
    """Non-blocking copies from pinned slots on a side stream, so the GPU takes slot i while slot i + 1 is read.

    A non-blocking host-to-device `copy_` between dtypes stages the file's dtype in device memory and casts there
    (torch >= 2.3; a blocking one would cast on the CPU into pageable memory first). A slot is refilled only once
    the event recorded after its copies has passed.
    """

    def __init__(self, device: torch.device, slots: int):
        self.stream = torch.cuda.Stream(device)
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


def _open(path: Path, stamp: tuple[int, ...] | None) -> int:
    """A descriptor of `path`, checked to be the file whose header was read: one replaced or rewritten since
    (another inode, size or modification time) would be read at the old offsets, as garbage."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be opened to read its tensors ({error.strerror}).") from None
    if stamp is not None and _stamp(os.fstat(fd)) != stamp:
        os.close(fd)
        raise CheckpointError(f"{path}: the file was replaced or changed after its header was read; nothing was "
                              "read from it. Load it again once it is no longer being written.")
    return fd


def _pread(fd: int, path: Path, offset: int, into: torch.Tensor) -> None:
    # The tensor's own memory as a writable buffer (its owner keeps it alive); no NumPy needed.
    view = memoryview((ctypes.c_ubyte * into.numel()).from_address(into.data_ptr())).cast("B")
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as error:
            raise CheckpointError(f"{path}: reading bytes {offset + done}..{offset + len(view)} failed "
                                  f"({error.strerror or error}); the load was not finished.") from None
        if got == 0:
            raise CheckpointError(f"{path}: ended early at byte {offset + done}: the file is truncated.")
        done += got
