"""safetensors, read by hand: parse the header ourselves (header.py), then `preadv` the bytes straight into the
destination tensor's memory (no mmap page-faulting, no intermediate copy), from several threads. Values that
cannot land in place (another dtype, a GPU) are read into a small ring of staging slots and copied out of one slot
while the next is read: pinned slots and non-blocking copies on a side stream for CUDA, the cast done on the
device.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from torchinit.checkpoint.header import CheckpointError, Entry, read_header, stamp_of
from torchinit.core.threads import one_intraop_thread

try:
    import numpy as np
except ImportError:  # then the loader checks values in a pass of its own after the reads
    np = None

__all__ = ["read_into", "read_header"]  # read_header is header.py's: the reader's tests use it from here

CHUNK = 64 * 2**20  # large tensors are read in pieces of this size, in parallel
SLOT = 32 * 2**20  # one staging slot, for values that cannot be read in place; larger ones are split across slots
SLOTS = 4  # slots in the ring (pinned for CUDA, pinning costs time once per process): at most SLOTS x SLOT bytes
ALIGN = 64  # each piece starts this aligned in its slot, so that its bytes can be viewed as any dtype
PIECE = 2**20  # values read or cast on the CPU are checked for NaN/inf in pieces of this size, still in the cache


READERS = min(16, max(4, os.cpu_count() or 4))  # page-cache copies scale with cores; 4 is a good floor


def read_into(pairs: list[tuple[Entry, torch.Tensor]], threads: int = READERS,
              verdicts: dict[int, int] | None = None, direct_io: bool = False) -> int:
    """Fill each destination tensor with its entry's values (cast on the fly when the dtypes differ); returns the
    bytes read.

    Contiguous CPU destinations of the entry's dtype are read into directly. The others (another dtype, another
    device, strided) go through a ring of staging slots, at most `SLOTS` x `SLOT` bytes in all, so an fp32
    checkpoint loaded into a bf16 model never holds an fp32 copy of the model, and reading overlaps copying.

    With `verdicts`, the values written on the CPU are checked as they land, piece by piece while they are in the
    cache (a second pass over the model from memory would cost as much as a fifth of the load): `verdicts[id(out)]`
    becomes 0 (finite), 1 (+-inf, no NaN) or 2 (NaN) for each destination checked whole; the others are not in it.

    `direct_io`: the in-place reads bypass the page cache (O_DIRECT, through an aligned bounce buffer per thread),
    for files read once that are not in the cache: no readahead limit, and the cache is left to others.
    """
    check = verdicts is not None and np is not None
    verdicts = verdicts if verdicts is not None else {}
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
        uncached = {}
        if direct_io and direct:
            uncached = {path: _open(path, None, os.O_DIRECT) for path in {entry.path for entry, _ in direct}}
            files.update({("direct", path): fd for path, fd in uncached.items()})
        with ThreadPoolExecutor(max_workers=threads) as pool, _progress(total) as bar:
            jobs = _direct_jobs(direct, check)
            for job, future in zip(jobs, _submit(pool, files, bar, jobs, bool(uncached)), strict=True):
                verdict = future.result()
                if job[3] is not None:
                    verdicts[job[4]] = max(verdicts.get(job[4], 0), verdict)
            for device, group in staged.items():
                batches = _plan(group, SLOT)
                if batches:
                    _stage(pool, files, bar, batches, device, max(ALIGN, SLOT // threads), verdicts if check else None)
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
    owner: int  # id() of the destination `out` is a view of


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
            batch.append(_Piece(entry.path, entry.start + offset, nbytes, at, entry.dtype, view, id(out)))
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
           device: torch.device, step: int, verdicts: dict[int, int] | None) -> None:
    """Copy batch i out of its slot while the reads of the next batches (one per other slot) are under way."""
    cuda = device.type == "cuda"
    # A synchronous copy is done with its slot before the next read into it is queued: two slots are enough.
    ring = _ring(min(len(batches), SLOTS if cuda else 2), max(b[-1].at + b[-1].nbytes for b in batches), cuda)
    copier = _CudaCopier(device, len(ring)) if cuda else _Copier(verdicts)
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
    """Copies a filled slot out (the cast on the CPU); synchronous, so the slot can be refilled at once. With
    `verdicts`, checks each contiguous piece just written (see `read_into`); a strided one leaves its destination
    out of `verdicts`, for the caller to check."""

    def __init__(self, verdicts: dict[int, int] | None = None):
        self.verdicts, self.unchecked = verdicts, set()

    def free(self, k: int) -> None:
        pass

    def send(self, k: int, slot: torch.Tensor, batch: list[_Piece]) -> None:
        with one_intraop_thread():  # the reader threads keep the other cores busy
            self._send(batch, slot)

    def _send(self, batch: list[_Piece], slot: torch.Tensor) -> None:
        for piece in batch:
            piece.out.copy_(_staged(slot, piece))
            if self.verdicts is not None and piece.owner not in self.unchecked:
                if piece.out.is_contiguous() and piece.out.dtype in _FLOAT_BITS:
                    verdict = _verdict(piece.out.data_ptr(), piece.out.numel() * piece.out.itemsize, piece.out.dtype)
                    self.verdicts[piece.owner] = max(self.verdicts.get(piece.owner, 0), verdict)
                elif piece.out.is_floating_point() or piece.out.is_complex():
                    self.unchecked.add(piece.owner)
                    self.verdicts.pop(piece.owner, None)

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


def _direct_jobs(pairs: list[tuple[Entry, torch.Tensor]], check: bool) -> list[tuple]:
    """(file, offset, bytes to fill, dtype to check them as or None, id of the destination) reads of CHUNK bytes
    straight into (CPU, same dtype, contiguous) tensors."""
    jobs = []
    for entry, out in pairs:
        raw = out.detach().reshape(-1).view(torch.uint8)
        dtype = out.dtype if check and out.dtype in _FLOAT_BITS else None
        jobs += [(entry.path, entry.start + o, raw[o:o + CHUNK], dtype, id(out))
                 for o in range(0, entry.end - entry.start, CHUNK)]
    return jobs


def _slot_jobs(batch: list[_Piece], slot: torch.Tensor, step: int) -> list[tuple[Path, int, torch.Tensor]]:
    """Reads of at most `step` bytes that fill the batch's places in the slot (several per slot: the pool's
    threads share each one)."""
    return [(p.path, p.start + o, slot[p.at + o:p.at + min(p.nbytes, o + step)], None, 0)
            for p in batch for o in range(0, p.nbytes, step)]


def _submit(pool: ThreadPoolExecutor, files: dict, bar, jobs: list, uncached: bool = False) -> list[Future]:
    def run(job) -> int:
        if uncached:
            verdict = _pread_direct(files[("direct", job[0])], job[0], job[1], job[2], job[3])
        else:
            verdict = _pread(files[job[0]], job[0], job[1], job[2], job[3])
        bar.update(job[2].numel())
        return verdict

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


def _open(path: Path, stamp: tuple[int, ...] | None, flags: int = 0) -> int:
    """A descriptor of `path`, checked to be the file whose header was read: one replaced or rewritten since
    (another inode, size or modification time) would be read at the old offsets, as garbage."""
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError as error:
        how = " with O_DIRECT (direct_io=True)" if flags else ""
        raise CheckpointError(f"{path}: cannot be opened{how} to read its tensors ({error.strerror}).") from None
    if stamp is not None and stamp_of(os.fstat(fd)) != stamp:
        os.close(fd)
        raise CheckpointError(f"{path}: the file was replaced or changed after its header was read; nothing was "
                              "read from it. Load it again once it is no longer being written.")
    return fd


def _pread(fd: int, path: Path, offset: int, into: torch.Tensor, check: torch.dtype | None = None) -> int:
    """Fill the bytes `into` from `offset`; with `check`, check them as that dtype piece by piece as they arrive
    and return the verdict (see `read_into`), else 0."""
    # The tensor's own memory as a writable buffer (its owner keeps it alive).
    view = memoryview((ctypes.c_ubyte * into.numel()).from_address(into.data_ptr())).cast("B")
    step, done, worst = PIECE if check is not None else max(1, len(view)), 0, 0
    for end in range(min(step, len(view)), len(view) + step, step):
        begin, end = done, min(end, len(view))
        while done < end:
            try:
                got = os.preadv(fd, [view[done:end]], offset + done)
            except OSError as error:
                raise CheckpointError(f"{path}: reading bytes {offset + done}..{offset + len(view)} failed "
                                      f"({error.strerror or error}); the load was not finished.") from None
            if got == 0:
                raise CheckpointError(f"{path}: ended early at byte {offset + done}: the file is truncated.")
            done += got
        if check is not None and end > begin:
            worst = max(worst, _verdict(into.data_ptr() + begin, end - begin, check))
    return worst


BLOCK = 4096  # O_DIRECT reads start, end and land at multiples of this (the largest logical block size in use)
BOUNCE = 8 * 2**20  # each reader thread's aligned buffer for O_DIRECT reads


def _pread_direct(fd: int, path: Path, offset: int, into: torch.Tensor, check: torch.dtype | None) -> int:
    """`_pread` through the page-cache-bypassing descriptor `fd`: whole aligned blocks into this thread's bounce
    buffer, then the bytes wanted copied out (and checked, with `check`) while they are in the cache."""
    bounce = getattr(_scratch, "bounce", None)
    if bounce is None:
        bounce = _scratch.bounce = torch.empty(BOUNCE + BLOCK, dtype=torch.uint8)
    base = -bounce.data_ptr() % BLOCK
    view = memoryview((ctypes.c_ubyte * BOUNCE).from_address(bounce.data_ptr() + base)).cast("B")
    end, done, worst, checked = offset + into.numel(), offset, 0, 0
    size = check.itemsize if check is not None else 1
    while done < end:
        block = done - done % BLOCK
        try:
            got = os.preadv(fd, [view[:min(BOUNCE, -(-(end - block) // BLOCK) * BLOCK)]], block)
        except OSError as error:
            raise CheckpointError(f"{path}: reading bytes {done}..{end} with O_DIRECT failed "
                                  f"({error.strerror or error}); the load was not finished.") from None
        usable = min(block + got, end) - done
        if usable <= 0:
            raise CheckpointError(f"{path}: ended early at byte {done}: the file is truncated.")
        ctypes.memmove(into.data_ptr() + done - offset, bounce.data_ptr() + base + done - block, usable)
        done += usable
        upto = (done - offset) // size * size  # whole values only: blocks need not start at one
        if check is not None and upto > checked:
            worst = max(worst, _verdict(into.data_ptr() + checked, upto - checked, check))
            checked = upto
    return worst


# The bits of the floating dtypes checked as they are read: (signed and unsigned integer views, the pattern of
# +inf and of -inf (None: the dtype has none), the least pattern of a positive and of a negative NaN). Seen as
# signed integers, +inf and +NaN are the largest positive patterns; seen as unsigned, -inf and -NaN the largest
# of all. Others (the FNUZ float8s) are checked by the caller.
_FLOAT_BITS = {
    torch.float64: ("i8", "u8", 0x7FF << 52, (0x7FF << 52) + 1, 0xFFF << 52, (0xFFF << 52) + 1),
    torch.float32: ("i4", "u4", 0x7F800000, 0x7F800001, 0xFF800000, 0xFF800001),
    torch.complex64: ("i4", "u4", 0x7F800000, 0x7F800001, 0xFF800000, 0xFF800001),
    torch.bfloat16: ("i2", "u2", 0x7F80, 0x7F81, 0xFF80, 0xFF81),
    torch.float16: ("i2", "u2", 0x7C00, 0x7C01, 0xFC00, 0xFC01),
    torch.float8_e5m2: ("i1", "u1", 0x7C, 0x7D, 0xFC, 0xFD),
    torch.float8_e4m3fn: ("i1", "u1", None, 0x7F, None, 0xFF),
}
_scratch = threading.local()  # each reader thread's O_DIRECT bounce buffer


def _verdict(address: int, nbytes: int, dtype: torch.dtype) -> int:
    """0 (finite), 1 (+-inf) or 2 (NaN) for `nbytes` of `dtype` values at `address`: two max reductions over the
    bits say it (NumPy, one thread, outside the GIL; no scratch memory, so the bits stay in the cache)."""
    signed, unsigned, inf, nan, minus_inf, minus_nan = _FLOAT_BITS[dtype]
    raw = (ctypes.c_ubyte * nbytes).from_address(address)
    top, top_unsigned = int(np.frombuffer(raw, dtype=signed).max()), int(np.frombuffer(raw, dtype=unsigned).max())
    if top >= nan or top_unsigned >= minus_nan:
        return 2
    return int(top == inf or top_unsigned == minus_inf)
