"""Saving: the training state as one file, written atomically (a temporary name in the same folder, fsync,
rename), so that a crash never leaves a half-written file at the final path, and a failed write (a full disk)
leaves the previous checkpoint as it was and no temporary file behind."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchinit.core.errors import CheckpointError, ConfigurationError, SaveError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, then move the result to `path` in one step (or remove it on failure).

    An I/O failure is raised as one `SaveError` (an `OSError`) that names `path`, says why (the disk's free space
    when it is full) and that the checkpoint already there is untouched."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        failure = save_failure(path, error)
        temporary.unlink(missing_ok=True)
        if failure is None:
            raise
        raise failure from error
    fsync_folder(path.parent)


FULL = 2**20  # a filesystem with less free space than this when a write failed is taken to be full


def save_failure(path: Path, error: BaseException) -> SaveError | None:
    """A clear `SaveError` (an `OSError`, its errno kept) for an I/O failure while saving `path` (None for other
    errors: a value that cannot be pickled is the caller's to see as it is). Call it before removing what the save
    wrote.

    Writers report a full disk in their own words: its errno is found in the exception chain or the message; and
    torch's zip writer only says "unexpected pos", so a filesystem left with less than `FULL` bytes free counts as
    full too."""
    code, seen = None, error
    while seen is not None and code is None:
        code = seen.errno if isinstance(seen, OSError) and seen.errno else None
        found = re.search(r"os error (\d+)|\[Errno (\d+)\]|No space left on device", str(seen))
        if code is None and found:
            code = int(found.group(1) or found.group(2) or errno.ENOSPC)
        seen = seen.__cause__ or seen.__context__
    if code is None and isinstance(error, Exception) and shutil.disk_usage(path.parent).free < FULL:
        code = errno.ENOSPC
    if code is None:
        return None
    why = os.strerror(code)
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        why += f" ({free:,} bytes free on the filesystem of {path.parent})"
    return SaveError(code, f"Saving {path} failed: {why}. The checkpoint that was at {path} (if any) is as it was, "
                         "and no temporary file was left behind. Free some space (or save elsewhere) and save again.")


def torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a Python file, so that a failed write is an OSError with its errno (torch's own file
    writer turns a full disk into an unexplained RuntimeError)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or the
    filesystem cannot, for the caller to fall back on two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise SaveError(code, f"Saving {b} failed: cannot swap the new {a.name} into its place ({os.strerror(code)}). "
                          f"The checkpoint at {b} is as it was; save again (or to another folder).")


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
            raise ConfigurationError(f"{path}: a .safetensors file holds one module's tensors; this state has "
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
    atomic_write(path, lambda p: torch_save(plain, p))


def on_rank_zero(work: Callable[[], None], failed: str) -> None:
    """`work` on rank 0 while the others wait; its outcome is shared, so when it raises every rank raises (rank 0 its
    own error, the others `failed` and the cause) instead of waiting at a barrier it never reaches."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        work()
        return
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            work()
        except Exception as caught:  # noqa: BLE001 (re-raised below, after the others are told)
            error = caught
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise CheckpointError(f"{failed} ({outcome[0]}).")
