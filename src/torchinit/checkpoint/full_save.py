"""One consolidated checkpoint file from sharded modules (FSDP `state_dict_type="full"`, model parallel
`save_distributed_checkpoint=False`) that plain `torch.load` reads, streamed: no rank ever holds more than its
shards plus one full tensor.

1. Every rank converts the state as Lightning's full checkpoint holds it: modules to their state dicts (DTensor
   shards; nothing gathered yet), optimizers to theirs keyed by parameter name, other values as they are.
2. Rank 0 writes the file's skeleton with `torch.save` under `torch.serialization.skip_data`: each tensor a fake
   tensor of its full shape and dtype, so the pickle and the zip records are final and each tensor's bytes are
   reserved but not written. The order in which the pickler meets the tensors is their record number.
3. Tensor by tensor, every rank takes part in gathering each sharded one (`full_tensor()`); rank 0 writes its
   bytes where its record reserved them and drops it. Plain tensors are rank 0's own.
4. Rank 0 writes each record's CRC-32 (its data descriptor and the central directory), fsyncs and renames the
   file into place. Every step ends with all ranks agreeing, so a failure anywhere is raised everywhere and the
   checkpoint that was at the path stays as it was.
"""

from __future__ import annotations

import os
import pickle
import struct
import types
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchinit.checkpoint.save import fsync_folder, save_failure
from torchinit.checkpoint.sharded_state import agree, optimizer_owner, split_state
from torchinit.core.compat import FakeTensorMode, tree_leaves, tree_map
from torchinit.core.errors import ArgumentTypeError, SaveError

__all__ = ["full_state", "save_full"]

Filter = dict[str, Callable[[str, Any], bool]]


def full_state(path: str | os.PathLike, state: dict[str, Any], filter: Filter | None = None) -> dict[str, Any]:
    """The state as the file holds it, before gathering: module and optimizer state dicts (DTensor shards) and
    values; `filter[key](name, value)` keeps a module's or optimizer's entries it returns True for."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    modules, optimizers, _ = split_state(state)
    out = {}
    for key, obj in state.items():
        if key in modules:
            converted = get_model_state_dict(modules[key])
        elif key in optimizers:
            converted = get_optimizer_state_dict(optimizer_owner(path, key, obj, modules), obj)
        else:
            converted = obj
        if filter and key in filter and isinstance(converted, dict):
            converted = {name: value for name, value in converted.items() if filter[key](name, value)}
        out[key] = converted
    return out


def save_full(path: str | os.PathLike, state: dict[str, Any], filter: Filter | None = None) -> None:
    """Write `state` to the one file `path` (every rank must call it; rank 0 writes)."""
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    converted = full_state(path, state, filter)
    converted, tensors = _tied(converted)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    error, file = None, None
    try:
        if rank == 0:
            try:
                file = _Skeleton(temporary, converted, tensors)
            except Exception as exc:  # noqa: BLE001 (shared with the other ranks, then raised)
                error = save_failure(path, exc) or exc
        agree(error, path)
        for index, tensor in enumerate(tensors):  # the same order on every rank: the collectives pair up
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if file is not None and error is None:
                try:
                    file.write(index, full)
                except Exception as exc:  # noqa: BLE001 (keep gathering: the others are in the collectives)
                    error = save_failure(path, exc) or exc
            del full
        if file is not None and error is None:
            try:
                file.finish(path)
            except Exception as exc:  # noqa: BLE001
                error = save_failure(path, exc) or exc
        agree(error, path)
    finally:
        if rank == 0:
            if file is not None:
                file.close()
            temporary.unlink(missing_ok=True)


def _data_offset(fd: int, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes start: after its local header, whose name and extra field (torch pads it to
    align the data) have their own lengths there."""
    head = os.pread(fd, 30, info.header_offset)
    return info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30]))


def _tied(converted: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The state with tensors that are one tensor under two names (a tied weight: `state_dict` detaches each
    name separately) made one object again, so it is gathered once and stored once (tied, as `torch.save` keeps
    it); and the distinct tensors in order. Rank 0 decides, so every rank gathers the same tensors."""
    tensors = list({id(t): t for t in tree_leaves(converted) if isinstance(t, torch.Tensor)}.values())
    keys = [_same(t) for t in tensors]
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [keys]
        dist.broadcast_object_list(box, src=0)
        keys = box[0]
    first: dict[Any, torch.Tensor] = {}
    chosen = {id(t): first.setdefault(key, t) if key is not None else t for t, key in zip(tensors, keys, strict=True)}
    converted = tree_map(lambda v: chosen[id(v)] if isinstance(v, torch.Tensor) else v, converted)
    return converted, [t for t in tensors if chosen[id(t)] is t]


def _same(t: torch.Tensor) -> tuple | None:
    """What makes two tensor objects one tensor (memory, view and placement); None when this rank holds none of it."""
    local = t.to_local() if isinstance(t, DTensor) else t
    if local.numel() == 0 or local.device.type == "meta":
        return None
    where = (str(t.device_mesh), tuple(map(str, t.placements))) if isinstance(t, DTensor) else None
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape), local.stride(),
            str(t.dtype), where)


class _Picker(pickle.Pickler):
    """Notes the placeholders in the order the pickler meets them (torch numbers their records so) and refuses a
    real tensor: one hidden in an object that is not a container would be saved without its bytes."""

    placeholders: set[int] = set()
    met: list[torch.Tensor] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self.placeholders:
                raise ArgumentTypeError(
                    "fabric.save (one full file): the state holds a tensor inside an object that is not a dict, "
                    f"list or tuple ({type(obj).__name__} of shape {tuple(obj.shape)}); it cannot be streamed. Keep "
                    "tensors in dicts, lists or tuples.")
            self.met.append(obj)
        return NotImplemented


class _Skeleton:
    """The file with every record in place and the tensors' bytes reserved; `write` fills one tensor."""

    def __init__(self, path: Path, converted: dict[str, Any], tensors: list[torch.Tensor]):
        self.path, self.fd = path, None
        with FakeTensorMode():
            holders = [torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu") for t in tensors]
        by_id = {id(t): h for t, h in zip(tensors, holders, strict=True)}
        skeleton = tree_map(lambda v: by_id[id(v)] if isinstance(v, torch.Tensor) else v, converted)
        picker = type("Picker", (_Picker,), {"placeholders": {id(h) for h in holders}, "met": []})
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, path, pickle_module=types.SimpleNamespace(Pickler=picker, __name__="pickle"))
        number = {id(h): i for i, h in enumerate(picker.met)}
        with zipfile.ZipFile(path) as archive:
            self.records = {info.filename: info for info in archive.infolist()}
        by_name = {name.split("/", 1)[1]: info for name, info in self.records.items()}
        self.places: list[tuple[str, int, int]] = []  # per tensor: record name, data offset, bytes
        with open(path, "rb") as f:
            for holder in holders:
                info, nbytes = by_name[f"data/{number[id(holder)]}"], holder.numel() * holder.element_size()
                if info.file_size != nbytes:
                    raise SaveError(0, f"Saving {path}: torch's file layout is not the one expected (record "
                                       f"{info.filename} holds {info.file_size} bytes, its tensor {nbytes}).")
                self.places.append((info.filename, _data_offset(f.fileno(), info), nbytes))
        self.crcs: dict[str, int] = {}
        self.fd = os.open(path, os.O_RDWR)

    def write(self, index: int, tensor: torch.Tensor) -> None:
        name, offset, size = self.places[index]
        if size == 0:
            self.crcs[name] = 0
            return
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written
        self.crcs[name] = zlib.crc32(data)

    def finish(self, path: Path) -> None:
        """Every record's CRC-32 in its data descriptor and the central directory; then in place, atomically."""
        self._write_crcs()
        os.fsync(self.fd)
        os.replace(self.path, path)
        fsync_folder(path.parent)

    def _write_crcs(self) -> None:
        size = os.fstat(self.fd).st_size
        start = max(0, size - 65557)  # the end record and its longest comment
        tail = os.pread(self.fd, size - start, start)
        end = tail.rfind(b"PK\x05\x06")
        entries, = struct.unpack("<H", tail[end + 10:end + 12])
        directory, = struct.unpack("<I", tail[end + 16:end + 20])
        if directory == 0xFFFFFFFF or entries == 0xFFFF:  # zip64: its end record, named by the locator before
            record = os.pread(self.fd, 56, struct.unpack("<Q", tail[end - 12:end - 4])[0])
            entries, directory = struct.unpack("<Q", record[32:40])[0], struct.unpack("<Q", record[48:56])[0]
        position = directory
        for _ in range(entries):  # each central directory entry: its CRC, and its record's data descriptor
            head = os.pread(self.fd, 46, position)
            n, m, k = struct.unpack("<HHH", head[28:34])
            name = os.pread(self.fd, n, position + 46).decode()
            if name in self.crcs:
                crc, info = struct.pack("<I", self.crcs[name]), self.records[name]
                os.pwrite(self.fd, crc, position + 16)
                after = _data_offset(self.fd, info) + info.file_size
                signed = os.pread(self.fd, 4, after) == b"PK\x07\x08"
                os.pwrite(self.fd, crc, after + (4 if signed else 0))
            position += 46 + n + m + k

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
