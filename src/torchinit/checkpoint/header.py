"""The safetensors header, held to the format's rules as the `safetensors` library holds them (see
`read_header`): anything else is one `CheckpointError` naming the file and the key, never a guess.

Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [b, e]},
"__metadata__": {...}}, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from torchinit.core.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
MAX_HEADER = 100_000_000  # the format's own limit on the header's length
LIMIT = 2**64  # sizes and offsets are unsigned 64-bit integers in the format


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int
    stamp: tuple[int, ...] | None = None  # the file's identity when its header was read (see `stamp_of`)


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
        stamp = stamp_of(os.fstat(f.fileno()))
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


def stamp_of(st: os.stat_result) -> tuple[int, ...]:
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
            raise CheckpointError(f"{path}: the safetensors header is not one valid JSON object (it does not start "
                                  "with '{').")
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
