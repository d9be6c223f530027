"""What the fault tests run in other processes: FSDP and DDP saves onto a full disk (through `Fabric.launch`), and
savers that a test kills with SIGKILL at a random moment (forked from a forkserver that has torch imported, so
that twenty trials take seconds, not minutes)."""

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import torchinit


def tiny_state(fabric, seed: int) -> dict:
    """A tiny Llama (tied head, RoPE buffer) set up with AdamW after one step: model and optimizer state."""
    from torchinit.models import Llama, config_for

    torch.manual_seed(seed)
    with fabric.init_module():
        module = Llama(config_for("tiny"))
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(seed))
    fabric.backward(model(ids).float().pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()
    return {"model": model, "optimizer": optimizer, "step": seed}


def full(model) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of `folder` until `leave` bytes are free."""
    with open(folder / "filler", "wb") as f:
        f.write(bytes(max(0, shutil.disk_usage(folder).free - leave)))


def _contents(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()} if path.is_dir() else {path.name: path.read_bytes()}


def disk_full_save(fabric, folder: str) -> dict:
    """Save, fill the disk to half of what a save takes, save other values: every rank's error, what is left
    (an FSDP folder, or DDP's one file that rank 0 writes)."""
    folder = Path(folder)
    path = folder / "ckpt"
    state = tiny_state(fabric, 1)
    fabric.save(path, state)
    saved = full(state["model"])
    before = _contents(path)
    size = sum(len(b) for b in before.values())
    fabric.barrier()
    if fabric.global_rank == 0:
        fill(folder, size // 2)
    fabric.barrier()
    newer = tiny_state(fabric, 2)
    try:
        fabric.save(path, newer)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    errors = [None] * fabric.world_size
    dist.all_gather_object(errors, error)
    reloaded = tiny_state(fabric, 3)
    fabric.load(path, reloaded)
    return {"errors": errors, "intact": _contents(path) == before,
            "listing": sorted(os.listdir(folder)), "saved": saved, "loaded": full(reloaded["model"]),
            "step": reloaded["step"]}


def saver(path: str, ready: str, seed: int, world: int, rank: int, port: int, die_writing: bool = False) -> None:
    """Build the state for `seed`, touch `ready`, save it to `path` (killed by the test at a random moment).
    `die_writing`: SIGKILL itself inside the save, at its first fsync (the data written under a temporary name,
    not yet moved into place), after touching `ready.rank.writing` holding what the folder then lists."""
    if die_writing:
        import signal

        fsync = os.fsync

        def fsync_then_die(fd):
            fsync(fd)
            Path(f"{ready}.{rank}.writing").write_text("\n".join(sorted(os.listdir(Path(path).parent))))
            os.kill(os.getpid(), signal.SIGKILL)

        os.fsync = fsync_then_die
    torch.set_num_threads(1)  # a fresh OpenMP pool on a busy 2-core machine costs seconds; these tensors are tiny
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        fabric = torchinit.Fabric(accelerator="cpu", strategy="fsdp", devices=world, precision="32-true")
        fabric.launch()
    else:
        fabric = torchinit.Fabric(accelerator="cpu", devices=1, precision="32-true")
    state = tiny_state(fabric, seed)
    if world > 1:
        fabric.barrier()
    Path(f"{ready}.{rank}").touch()
    fabric.save(path, state)
    Path(f"{ready}.{rank}.done").touch()
    if world > 1:
        dist.destroy_process_group()
