"""Functions that `Fabric.launch(fn)` runs in spawned processes (module level, so that they pickle)."""

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import torchinit


@dataclasses.dataclass
class Reads:
    total: int = 0  # every byte a read call on a file descriptor returned
    spans: list = dataclasses.field(default_factory=list)  # (offset, length) of the positioned reads
    streams: dict = dataclasses.field(default_factory=dict)  # file name -> (offset, length) of Python file reads

    @property
    def distinct(self) -> int:
        """Bytes of the file read at least once (positioned reads)."""
        return _distinct(self.spans)

    @property
    def streamed(self) -> dict[str, int]:
        """File name -> its bytes read at least once through Python file objects (`open(..., "rb")`,
        `Path.open("rb")`)."""
        return {file: _distinct(spans) for file, spans in self.streams.items()}


def _distinct(spans) -> int:
    done, end = 0, 0
    for offset, length in sorted(spans):
        done += max(0, offset + length - max(offset, end))
        end = max(end, offset + length)
    return done


@contextlib.contextmanager
def bytes_read_from(path):
    """The bytes this process really reads from `path` (a file, or the files in a folder) while the block runs,
    whatever the reader reports of itself: `os.preadv` / `os.pread` / `os.readv` / `os.read` wrapped (`total`,
    `distinct`), and binary read-only Python file objects opened there (`streamed`: what their callers read, at
    the offsets they read it, whatever the buffer below fetched ahead)."""
    import builtins
    import io
    import os
    import threading

    root, lock, reads = str(Path(path).resolve()), threading.Lock(), Reads()
    originals = {name: getattr(os, name) for name in ("preadv", "pread", "readv", "read")}
    open_io, open_builtin = io.open, builtins.open

    def inside(where: str) -> bool:
        return where == root or where.startswith(root + os.sep)

    def counting(name):
        original = originals[name]

        def read(fd, *args):
            got = original(fd, *args)
            try:
                where = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return got
            if inside(where):
                n = got if isinstance(got, int) else len(got)
                with lock:
                    reads.total += n
                    if name.startswith("pread"):
                        reads.spans.append((args[1], n))
            return got

        return read

    class Counted(io.BufferedReader):
        def _note(self, at: int, n) -> None:
            with lock:
                reads.streams.setdefault(Path(self.name).name, []).append((at, n or 0))

        def read(self, size=-1):
            at = self.tell()
            data = super().read(size)
            self._note(at, len(data))
            return data

        def read1(self, size=-1):
            at = self.tell()
            data = super().read1(size)
            self._note(at, len(data))
            return data

        def readinto(self, buffer):
            at = self.tell()
            n = super().readinto(buffer)
            self._note(at, n)
            return n

        def readinto1(self, buffer):
            at = self.tell()
            n = super().readinto1(buffer)
            self._note(at, n)
            return n

    def opening(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
        if (mode == "rb" and buffering != 0 and closefd and opener is None and isinstance(file, (str, os.PathLike))
                and inside(os.path.realpath(file))):
            return Counted(io.FileIO(file, "rb"))
        return open_io(file, mode, buffering, encoding, errors, newline, closefd, opener)

    for name in originals:
        setattr(os, name, counting(name))
    io.open = builtins.open = opening
    try:
        yield reads
    finally:
        io.open, builtins.open = open_io, open_builtin
        for name, original in originals.items():
            setattr(os, name, original)


def gathered(fabric, value):
    out = [None] * fabric.world_size
    dist.all_gather_object(out, value)
    return out


def checksum(module: nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in module.parameters()]


def ddp_training(fabric, empty_init):
    """Build on each rank (meta context or init_module), set up, train one step on different data per rank."""
    assert fabric.device == torch.device("cpu") and torch.distributed.get_backend() == "gloo"
    if empty_init == "meta":
        with torchinit.InitContext(fabric.device, fabric.plan.param_dtype, meta=True):
            module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    else:
        torch.manual_seed(fabric.global_rank)  # different on purpose: DDP must make the ranks start equal
        with fabric.init_module(empty_init=empty_init):
            module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        if empty_init:
            module.load_state_dict({k: torch.full_like(v, fabric.global_rank + 1.0) for k, v in
                                    module.state_dict().items()})
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)  # made before setup: must keep working
    model, optimizer = fabric.setup(module, optimizer)
    start = gathered(fabric, checksum(model))
    data = torch.full((3, 4), float(fabric.global_rank + 1))  # different data on each rank
    fabric.backward(model(data).sum())
    optimizer.step()
    after = gathered(fabric, checksum(model))
    total = fabric.all_reduce(torch.tensor([fabric.global_rank + 1.0]), reduce_op="sum")
    mean = fabric.all_reduce(torch.tensor([fabric.global_rank + 1.0]), reduce_op="mean")
    fabric.barrier()
    return {
        "ranks": gathered(fabric, (fabric.global_rank, fabric.local_rank, fabric.world_size, fabric.is_global_zero)),
        "start": start, "after": after, "moved": start[0] != after[0],
        "sum": total.item(), "mean": mean.item(), "broadcast": fabric.broadcast(f"from {fabric.global_rank}"),
        "keys": list(model.state_dict()),
    }


def crash_on_rank_one(fabric):
    if fabric.global_rank == 1:
        raise ValueError("rank one broke")
    fabric.barrier()  # rank 0 would wait here forever without the launcher's clean-up


def tiny_llama():
    from torchinit.models import Llama, config_for

    return Llama(config_for("tiny"))  # tied embedding and head, RoPE buffer, RMSNorms


def fsdp_build_and_setup(fabric, empty_init):
    """init_module + setup under FSDP; returns each parameter's local shard and what the rank saw."""
    with torchinit.nan_poison(), fabric.init_module(empty_init=empty_init):
        module = tiny_llama()
    assert all(p.device.type == "meta" for p in module.parameters()), "FSDP never builds the full model"
    assert module.rope.inv_freq.device.type == "meta", "recorded: buffers too are replayed in setup"
    early = torch.optim.AdamW(module.parameters(), lr=1e-3)  # before setup, from meta parameters
    with torchinit.nan_poison():
        model = fabric.setup(module)
    shards = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    return model, early, shards


def fsdp_training(fabric, empty_init):
    model, early, shards = fsdp_build_and_setup(fabric, empty_init)
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    early = fabric.setup_optimizers(early)  # the seed's order: setup(model), then setup_optimizers
    ids = torch.tensor([[1, 2, 3, 4]])
    fabric.backward(model(ids).float().pow(2).mean())
    early.step()
    moved = any(not torch.equal(p.full_tensor(), full[name]) for name, p in model.named_parameters())
    return {
        "full": full, "moved": moved, "tied": model.module.lm_head.weight is model.module.embed.weight,
        "inv_freq": model.module.rope.inv_freq, "local_shapes": gathered(fabric, {n: tuple(s.shape) for n, s in
                                                                              shards.items()}),
        "dtype": {p.dtype for p in full.values()},
    }


def seed_snippet(fabric):
    """The seed's code, as written there (with our bundled Llama as MyModel)."""
    with fabric.init_module(empty_init=True):
        model = tiny_llama()
    model = fabric.setup(model)
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}  # what setup made
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters()))
    loss = model(torch.tensor([[1, 2, 3]])).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    return {"full": full, "losses": gathered(fabric, loss.item()),
            "mean": fabric.all_reduce(loss.detach(), reduce_op="mean").item()}


def fsdp_load_raw(fabric, path):
    """Set up an empty model under FSDP, then load a checkpoint into the shards (each rank its own rows)."""
    with fabric.init_module(empty_init=True):
        module = tiny_llama()
    model = fabric.setup(module)
    with bytes_read_from(path) as read:
        report = fabric.load_raw(path, model)
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return {"full": full, "bytes": gathered(fabric, report.bytes),
            "read": gathered(fabric, (read.total, read.distinct)), "missing": report.missing}


def relaunch(fabric):
    try:
        fabric.launch()
    except RuntimeError as error:
        return str(error)


def die_on_rank_one(fabric):
    import os
    import time

    if fabric.global_rank == 1:
        os._exit(3)  # no Python error, no error file: the launcher must still name it and stop rank 0
    time.sleep(60)


def _full(model) -> dict:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def _train_step(fabric, model, optimizer, seed):
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(seed))
    fabric.backward(model(ids).float().pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()


def _fsdp_llama(fabric, seed):
    torch.manual_seed(seed)
    with fabric.init_module():
        module = tiny_llama()
    model = fabric.setup(module)
    return model, fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))


def _errors(cases: dict) -> dict:
    """Run each case; its error as 'Type: message' (every rank runs the same cases, so collectives match)."""
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except Exception as error:  # noqa: BLE001 - the test asserts on the type and message
            out[name] = f"{type(error).__name__}: {error}"
    return out


def _folder_bytes(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fsdp_checkpoint(fabric, folder):
    """FSDP save -> load into a fresh model and optimizer -> same values and the same next step; atomic saves;
    error paths. Rank 0's view comes back (the test compares the folder with a single-process load)."""
    from pathlib import Path

    from torch.distributed.checkpoint import FileSystemWriter

    folder = Path(folder)
    path = folder / "ckpt"
    model, optimizer = _fsdp_llama(fabric, 0)
    _train_step(fabric, model, optimizer, 1)
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1, "info": {"lr": 1e-2}})
    saved = _full(model)
    moments = {name: optimizer.state[p]["exp_avg"].full_tensor().clone() for name, p in model.named_parameters()}
    _train_step(fabric, model, optimizer, 2)
    continued = _full(model)

    fresh, fresh_opt = _fsdp_llama(fabric, 7)  # other values, no optimizer state yet
    state = {"model": fresh, "optimizer": fresh_opt, "step": 0, "info": None}
    extra = fabric.load(path, state)
    loaded = _full(fresh)
    loaded_moments = {name: fresh_opt.state[p]["exp_avg"].full_tensor().clone()
                      for name, p in fresh.named_parameters()}
    _train_step(fabric, fresh, fresh_opt, 2)
    again = _full(fresh)

    raw, _ = _fsdp_llama(fabric, 8)
    with bytes_read_from(path) as read:
        report = fabric.load_raw(path, raw)  # the DCP folder as a plain checkpoint: the model entry only

    # atomicity: a write failing on rank 1 leaves the old folder as it was and no new one
    before, original = _folder_bytes(path), FileSystemWriter.write_data
    if fabric.global_rank == 1:
        def broken(self, plan, planner):
            raise OSError("disk full (test)")
        FileSystemWriter.write_data = broken
    failures = _errors({
        "over": lambda: fabric.save(path, {"model": model, "optimizer": optimizer}),
        "new": lambda: fabric.save(folder / "new", {"model": model}),
        "value": lambda: fabric.save(folder / "bad", {"model": model, "bad": Unpicklable()}),
    })
    fabric.barrier()
    FileSystemWriter.write_data = original
    intact = _folder_bytes(path) == before
    leftovers = sorted(p.name for p in folder.iterdir())

    other, other_opt = _fsdp_llama(fabric, 9)
    untouched = _full(other)
    sub_opt = torch.optim.AdamW([next(other.parameters())], lr=1e-2)
    (folder / "plain").mkdir(exist_ok=True)
    errors = _errors({
        "absent": lambda: fabric.load(path, {"model": other, "epoch": 0}),
        "keys": lambda: fabric.load(path, {"model": nn.Linear(2, 2)}),
        "optimizer": lambda: fabric.load(path, {"model": other, "optimizer": sub_opt}),
        "folder": lambda: fabric.load(folder / "plain", {"model": other}),
        "no state": lambda: fabric.load(path),
    })
    errors["untouched"] = all(torch.equal(v, untouched[k]) for k, v in _full(other).items())
    fabric.load(path, {"model": other, "epoch": 0}, strict=False)  # absent entries skipped
    strict_false = _full(other)

    fabric.save(folder / "twice", {"model": other})
    fabric.save(folder / "twice", {"model": model, "step": 2})  # replaces the folder
    fabric.load_raw(folder / "twice", other)
    return {
        "saved": saved, "loaded": loaded, "moments": moments, "loaded_moments": loaded_moments,
        "continued": continued, "again": again, "values": (state["step"], state["info"]), "extra": extra,
        "raw": _full(raw), "raw_bytes": gathered(fabric, report.bytes),
        "raw_read": gathered(fabric, read.streamed), "failures": gathered(fabric, failures),
        "intact": intact,
        "leftovers": leftovers, "errors": errors, "strict_false": strict_false, "replaced": _full(other),
        "after_replace": sorted(p.name for p in folder.iterdir()),
    }


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def _joined(fabric, **kwargs):
    """Another Fabric in the processes `fabric` was launched in: a second strategy without a second launch."""
    other = torchinit.Fabric(**{**fabric._args, **kwargs})
    other.launch()  # joins the process group already made
    return other


def fsdp_reload(fabric, path):
    """Load a folder saved by another world size into a fresh model and optimizer."""
    model, optimizer = _fsdp_llama(fabric, 7)
    state = {"model": model, "optimizer": optimizer, "step": 0}
    extra = fabric.load(path, state, strict=False)  # the folder also holds "info"
    moments = {name: optimizer.state[p]["exp_avg"].full_tensor() for name, p in model.named_parameters()}
    return {"loaded": _full(model), "moments": moments, "step": state["step"], "extra": extra}


def fsdp_cpu_offload(fabric, record):
    """FSDP2 with CPU offload on a GPU: the shards end on the (pinned) CPU, a step trains, the ranks' process
    group knows its GPU (nccl device_id). Returns what the test checks."""
    from torch.distributed.distributed_c10d import _get_default_group

    fabric.plan = dataclasses.replace(fabric.plan, options=dataclasses.replace(fabric.plan.options,
                                                                               record_init=record))
    with fabric.init_module(empty_init=True):
        module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 4))
    model = fabric.setup(module)
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    devices = {p.to_local().device.type for p in model.parameters()}
    before = [p.to_local().clone() for p in model.parameters()]
    loss = model(torch.randn(3, 16, device=fabric.device)).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    moved = any(not torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters(), strict=True))
    return {"devices": devices, "pinned": all(p.to_local().is_pinned() for p in model.parameters()),
            "moved": moved, "bound": str(_get_default_group().bound_device_id)}
