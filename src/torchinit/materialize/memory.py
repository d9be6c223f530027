"""Memory pre-flight: refuse a materialization that cannot fit, before a byte is allocated (G6).

Everything here counts what THIS process will hold: a DTensor's `numel()` is its global size, but a rank holds
only its local shard (`to_local()`); a replay computes each full tensor once before keeping its part.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import psutil
import torch

from torchinit.core.errors import InsufficientMemoryError
from torchinit.core.placement import local_tensor


def free_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes on `device`, or None where nothing can be measured (meta, mps, ...).

    For CUDA, memory the caching allocator holds but does not use counts as free: it is ours to reuse.
    """
    if device.type == "cpu":
        vm = psutil.virtual_memory()
        return vm.available, vm.total
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return free + cached, total
    return None


@dataclass
class Need:
    """Memory one tensor (or one module) is about to take on `device`: `held` bytes kept by this process, and
    `transient` bytes it needs while being computed (a replay computes a sharded tensor in full, in at least
    fp32, before keeping its part; 0 when it is written in place)."""

    name: str
    device: torch.device
    held: int
    transient: int = 0


def local_nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes this process holds for `t` (in `dtype`, default its own): a DTensor's local shard, not its global size."""
    local = local_tensor(t)
    return local.numel() * (dtype or t.dtype).itemsize


def work_nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """The full tensor a replay computes for `t`: its global size, in the work dtype (floats at least fp32)."""
    itemsize = max(dtype.itemsize, 4) if dtype.is_floating_point else dtype.itemsize
    return t.numel() * itemsize


def budget(needs: list[Need]) -> dict[torch.device, int]:
    """The bytes each device must have free: everything held, plus the largest transient beyond what its own
    tensor holds (one is computed at a time)."""
    held: dict[torch.device, int] = {}
    extra: dict[torch.device, int] = {}
    for need in needs:
        held[need.device] = held.get(need.device, 0) + need.held
        extra[need.device] = max(extra.get(need.device, 0), need.transient - need.held)
    return {device: nbytes + extra[device] for device, nbytes in held.items()}


def check_fits(needs: list[Need]) -> None:
    """Raise `InsufficientMemoryError` if any device lacks the bytes the plan will place on it (`budget`)."""
    needed = budget(needs)
    largest: dict[torch.device, tuple[str, int]] = {}
    for need in needs:
        size = max(need.held, need.transient)
        if size >= largest.get(need.device, ("", -1))[1]:
            largest[need.device] = (need.name, size)
    for device, nbytes in needed.items():
        measured = free_memory(device)
        if measured is None or nbytes <= measured[0]:
            continue
        free, total = measured
        name, biggest = largest[device]
        if biggest > total:
            raise InsufficientMemoryError(
                f"The plan cannot place {name} ({_gib(biggest)}) on {device}: that alone is larger than the "
                f"whole device ({_gib(total)}). Nothing was allocated. Shard it across devices "
                "(strategy='fsdp' or 'deepspeed_stage_3') or use a smaller precision ('bf16-true' halves fp32)."
            )
        raise InsufficientMemoryError(
            f"Materializing needs {_gib(nbytes)} on {device}, but only {_gib(free)} of {_gib(total)} is free; "
            f"nothing was allocated. The largest part is {name} ({_gib(biggest)}). To fit: use a smaller "
            "precision ('bf16-true' or '16-true' halve fp32), a sharded strategy ('fsdp', 'deepspeed_stage_3') "
            "over more devices, or free memory on the device."
        )


def warm_up(sizes: list[tuple[torch.device, int]]) -> None:
    """Grow each GPU's caching allocator once, by what the tensors about to be allocated there take (this
    process's local bytes), and free it back to the cache: the tensors are then split off that one block instead
    of costing a cudaMalloc each.

    Only requests over 1 MiB come from the allocator's large pool (where the block goes); each is rounded up to
    512 bytes there.
    """
    need: dict[torch.device, int] = {}
    for where, nbytes in sizes:
        if where.type == "cuda" and nbytes > 2**20:
            need[where] = need.get(where, 0) + -(-nbytes // 512) * 512
    for where, nbytes in need.items():
        try:
            torch.empty(nbytes, dtype=torch.uint8, device=where)  # dropped at once: the block stays cached
        except torch.cuda.OutOfMemoryError:
            pass  # only a speed-up: the pre-flight passed, so the tensors are allocated one by one as before


def release_freed_host_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`). A replay computes each value in
    fp32 and frees it once stored cast; glibc keeps such freed blocks mapped in its arenas, so without this the
    process kept ~5-10 % of a bf16 model more than the model after the build (0.3B Llama, init_bench.py). A no-op
    where the C library has no `malloc_trim` (musl, macOS)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
