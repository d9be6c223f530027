"""Memory pre-flight: refuse a materialization that cannot fit, before a byte is allocated (G6)."""

from __future__ import annotations

import psutil
import torch


class InsufficientMemoryError(MemoryError):
    """The plan needs more memory on a device than is free there. Nothing was allocated."""


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


def check_fits(needed: dict[torch.device, int], largest: dict[torch.device, tuple[str, int]]) -> None:
    """Raise `InsufficientMemoryError` if any device lacks the bytes the plan will place on it."""
    for device, nbytes in needed.items():
        measured = free_memory(device)
        if measured is None or nbytes <= measured[0]:
            continue
        free, total = measured
        name, biggest = largest[device]
        if biggest > total:
            raise InsufficientMemoryError(
                f"The plan cannot place {name} ({_gib(biggest)}) on {device}: that one tensor is larger than the "
                f"whole device ({_gib(total)}). Nothing was allocated. Shard it across devices "
                "(strategy='fsdp' or 'deepspeed_stage_3') or use a smaller precision ('bf16-true' halves fp32)."
            )
        raise InsufficientMemoryError(
            f"Materializing needs {_gib(nbytes)} on {device}, but only {_gib(free)} of {_gib(total)} is free; "
            f"nothing was allocated. The largest tensor is {name} ({_gib(biggest)}). To fit: use a smaller "
            "precision ('bf16-true' or '16-true' halve fp32), a sharded strategy ('fsdp', 'deepspeed_stage_3') "
            "over more devices, or free memory on the device."
        )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"
