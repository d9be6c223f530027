"""Faults while saving and loading, made for real where this machine can make them: a full disk (a size-limited
tmpfs, mounted as root), savers killed with SIGKILL at random moments; injected only where it cannot (an I/O error
at the read call). Nothing is lost: the previous checkpoint stays intact and loadable, a failed load leaves a meta
or empty-init model as it was, and every error names the file."""

import contextlib
import errno
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from fault_workers import disk_full_save, fill, full, saver, tiny_state
from safetensors.torch import save_file
from test_distributed import deadline_guard

import torchinit
from torchinit.checkpoint import safetensors as reader
from torchinit.checkpoint.dcp import dcp_metadata, read_dcp
from torchinit.checkpoint.load_model import load_into
from torchinit.checkpoint.opener import open_checkpoint
from torchinit.models import Llama, config_for
from torchinit.record import pending as unwritten

TRIALS = 20


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a real filesystem that fills up."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root and mount permission): "
                    f"{getattr(error, 'stderr', None) or error}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def assert_disk_full_error(message: str, path: Path) -> None:
    assert f"Saving {path} failed: No space left on device" in message, message
    assert "is as it was, and no temporary file was left behind" in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_disk_full_during_a_one_file_save_loses_nothing(suffix, small_disk):
    fabric = torchinit.Fabric(accelerator="cpu", devices=1, precision="32-true")
    path = small_disk / f"ckpt{suffix}"
    state = tiny_state(fabric, 1)
    saved = state if suffix == ".pt" else {"model": state["model"]}
    fabric.save(path, saved)
    before, values = path.read_bytes(), full(state["model"])
    fill(small_disk, path.stat().st_size // 2)
    newer = tiny_state(fabric, 2)
    with pytest.raises(OSError) as error:
        fabric.save(path, newer if suffix == ".pt" else {"model": newer["model"]})
    assert error.value.errno == errno.ENOSPC
    assert_disk_full_error(str(error.value), path)
    assert path.read_bytes() == before, "the previous checkpoint is byte for byte as it was"
    assert sorted(os.listdir(small_disk)) == [path.name, "filler"], "no temporary file left"
    again = tiny_state(fabric, 3)
    fabric.load(path, again if suffix == ".pt" else {"model": again["model"]})
    assert all(torch.equal(v, values[k]) for k, v in full(again["model"]).items())


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_disk_full_during_a_two_rank_save_loses_nothing(strategy, small_disk):
    with deadline_guard():
        fabric = torchinit.Fabric(accelerator="cpu", strategy=strategy, devices=2, precision="32-true")
        result = fabric.launch(disk_full_save, str(small_disk))
    for message in result["errors"]:  # every rank raises the clear error; none hangs (DDP: rank 0's, shared)
        assert_disk_full_error(message.removeprefix("SaveError: [Errno 28] "), small_disk / "ckpt")
    if strategy == "ddp":
        assert result["errors"][1].startswith(f"CheckpointError: {small_disk / 'ckpt'}: rank 0 could not save it")
    assert result["intact"], "the previous folder is byte for byte as it was"
    assert result["listing"] == ["ckpt", "filler"], "no temporary folder left"
    assert result["step"] == 1 and all(torch.equal(v, result["saved"][k]) for k, v in result["loaded"].items())


# ---- SIGKILL at random moments -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forkserver():
    """Processes forked from a server that imported torch once: a killed saver costs milliseconds to replace."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.checkpoint", "torchinit.fabric",
                                "fault_workers"])  # imports only: nothing runs that a fork would break
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(ctx, path: Path, seed: int, world: int, die_writing: bool = False) -> tuple[list, Path]:
    ready, port = path.with_name(f"ready-{seed}-{time.monotonic_ns()}"), free_port()
    procs = [ctx.Process(target=saver, args=(str(path), str(ready), seed, world, r, port, die_writing), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    while not all(Path(f"{ready}.{r}").exists() for r in range(world)):
        assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "a saver failed to start"
        time.sleep(0.001)
    return procs, ready


def contents(path: Path) -> dict:
    """Everything a checkpoint holds, read back (which fails on an incomplete one): tensors and the step."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        out = {("model", k): v for k, v in saved["model"].items()}
        out |= {("optimizer", k, n): v for k, s in saved["optimizer"]["state"].items() for n, v in s.items()}
        return out | {"step": saved["step"]}
    metadata = dcp_metadata(path)
    out = {key: torch.empty(tuple(m.size), dtype=m.properties.dtype) for key, m in metadata.state_dict_metadata.items()
           if hasattr(m, "properties")}
    read_dcp(path, out)  # one read of every tensor
    return out | {"step": torch.load(path / "values.pt", weights_only=True)["values"]["step"]}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())


@pytest.mark.parametrize("world, name", [(1, "ckpt.pt"), (2, "ckpt")], ids=["one-file", "dcp-2-ranks"])
def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(world, name, forkserver, tmp_path):
    path = tmp_path / name
    for seed in (1, 2):  # the old and (when not killed) the new checkpoint; the second save is timed
        procs, ready = start(forkserver, path, seed, world)
        began = time.perf_counter()
        while not all(Path(f"{ready}.{r}.done").exists() for r in range(world)):
            time.sleep(0.0005)
        took = time.perf_counter() - began
        for p in procs:
            p.join(60)
        reference = tmp_path / f"ref-{seed}"
        shutil.copytree(path, reference) if world > 1 else shutil.copy(path, reference)
    old, new = contents(tmp_path / "ref-1"), contents(tmp_path / "ref-2")
    assert not same(old, new)
    rng, outcomes = random.Random(world), []
    for _ in range(TRIALS):
        shutil.rmtree(path) if world > 1 else path.unlink()
        shutil.copytree(tmp_path / "ref-1", path) if world > 1 else shutil.copy(tmp_path / "ref-1", path)
        procs, _ = start(forkserver, path, 2, world)
        time.sleep(rng.uniform(0, 2 * took))
        for p in procs:
            with contextlib.suppress(ProcessLookupError):  # it finished first
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join(60)
        now = contents(path)
        assert same(now, old) or same(now, new), "the checkpoint at path is neither the old one nor the new one"
        outcomes.append("new" if same(now, new) else "old")
    print(f"save took {took * 1e3:.1f} ms; after the kills: {outcomes.count('old')} old, {outcomes.count('new')} new")
    # and a kill that surely lands mid-write: each saver kills itself inside the save, its data written under a
    # temporary name (listed next to the checkpoint when it died) but not moved into place: the old checkpoint
    shutil.rmtree(path) if world > 1 else path.unlink()
    shutil.copytree(tmp_path / "ref-1", path) if world > 1 else shutil.copy(tmp_path / "ref-1", path)
    procs, ready = start(forkserver, path, 2, world, die_writing=True)
    for p in procs:
        p.join(60)
    for r, p in enumerate(procs):
        assert p.exitcode == -signal.SIGKILL, f"rank {r} was not killed inside the save"
        listed = Path(f"{ready}.{r}.writing").read_text().split()
        assert any(name.startswith(f".{path.name}.tmp-") for name in listed), f"rank {r}: no data written yet"
    assert same(contents(path), old), "a save killed mid-write changed the checkpoint"
    outcomes.append("old")
    if "new" not in outcomes:  # the savers were always killed first: one that finishes leaves the new one
        procs, ready = start(forkserver, path, 2, world)
        for p in procs:
            p.join(60)
        assert same(contents(path), new)
        outcomes.append("new")
    assert set(outcomes) == {"old", "new"}


# ---- loads that fail half way ---------------------------------------------------------------------------------
def checkpoint_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in Llama(config_for("tiny")).state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    return path


def target(kind: str):
    with torchinit.InitContext("cpu", torch.float32, meta=kind == "meta", empty_init=kind == "empty"):
        return Llama(config_for("tiny"))


def fingerprint(model) -> dict:
    return {n: (t.device.type, t.data_ptr() if t.device.type != "meta" else 0, unwritten.is_pending(t),
                None if t.device.type == "meta" or unwritten.is_pending(t) else t.detach().clone())
            for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_as_it_was(model, before: dict) -> None:
    after = fingerprint(model)
    for name, (device, ptr, pending, value) in before.items():
        assert after[name][:3] == (device, ptr, pending), name
        assert value is None or torch.equal(after[name][3], value), name


@pytest.mark.parametrize("kind", ["meta", "empty"])
def test_an_io_error_in_the_middle_of_a_read_leaves_the_model_as_it_was(kind, monkeypatch, tmp_path):
    path = checkpoint_file(tmp_path)
    monkeypatch.setattr(reader, "CHUNK", 4096)  # many reads, so that the failure falls in the middle
    calls, real = [0], os.preadv

    def failing(fd, buffers, offset):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader.os, "preadv", failing)
    model = target(kind)
    before = fingerprint(model)
    with pytest.raises(torchinit.CheckpointError, match=rf"{path}: reading bytes \d+\.\.\d+ failed \(Input/output "
                                                        "error\\); the load was not finished"):
        torchinit.load_checkpoint(model, path)
    assert calls[0] > 5, "the error came in the middle of the reads"
    assert_as_it_was(model, before)
    monkeypatch.setattr(reader.os, "preadv", real)
    torchinit.load_checkpoint(model, path)  # the same model loads once the disk is well


@pytest.mark.parametrize("change", ["replaced", "truncated", "rewritten"])
def test_a_file_changed_between_header_and_read_is_named(change, tmp_path):
    path = checkpoint_file(tmp_path)
    checkpoint = open_checkpoint(path)  # the header is parsed here
    if change == "replaced":  # another file renamed over it, of the same size
        other = tmp_path / "other.safetensors"
        other.write_bytes(path.read_bytes())
        os.replace(other, path)
    elif change == "truncated":
        os.truncate(path, path.stat().st_size - 100)
    else:  # the same inode and size, other bytes
        with open(path, "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"\x7f\x7f\x7f\x7f")
    model = target("meta")
    before = fingerprint(model)
    with pytest.raises(torchinit.CheckpointError, match=f"{path}: the file was replaced or changed after its header "
                                                        "was read; nothing was read from it"):
        load_into(model, checkpoint)
    assert_as_it_was(model, before)
