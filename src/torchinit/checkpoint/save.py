"""Saving: the training state as one file, written atomically (a temporary name in the same folder, fsync,
rename), so that a crash never leaves a half-written file at the final path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, then move the result to `path` in one step (or remove it on failure)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make renames inside `folder` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """Modules and optimizers become their state dicts (a Fabric wrapper's keys are the original module's)."""
    return {k: v.state_dict() if isinstance(v, (nn.Module, torch.optim.Optimizer)) else v for k, v in state.items()}


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """`.safetensors` for a state holding one module (tied tensors stored once); a torch file otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        modules = [v for v in state.values() if isinstance(v, nn.Module)]
        if len(modules) != 1 or len(state) != 1:
            raise ValueError(f"{path}: a .safetensors file holds one module's tensors; this state has "
                             f"{sorted(state)}. Save it to a .pt/.ckpt path instead.")
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for key, value in modules[0].state_dict().items():
            if value.data_ptr() not in seen or value.numel() == 0:
                seen.add(value.data_ptr())
                tensors[key] = value.detach().contiguous().cpu()
        atomic_write(path, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        return
    plain = plain_state(state)
    atomic_write(path, lambda p: torch.save(plain, p))
