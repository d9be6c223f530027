"""Fabric: the front door. It composes the plan, the init context and the strategy; no logic of its own."""

from __future__ import annotations

import atexit
import os
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchinit import launch as launcher
from torchinit.checkpoint import sharded
from torchinit.checkpoint.formats import Checkpoint
from torchinit.checkpoint.load import load_checkpoint, load_into
from torchinit.checkpoint.save import save_state
from torchinit.init.context import InitContext
from torchinit.init.record import RecordContext
from torchinit.plan import make_plan
from torchinit.strategies import deepspeed as ds
from torchinit.strategies import fsdp, single


class Fabric:
    """Lightning-Fabric-style entry point (see the README's API section).

    Args:
        accelerator: "auto", "cpu", "cuda", "gpu" or "mps".
        strategy: "auto" (ddp when several devices), "single_device", "ddp", "ddp_spawn", "fsdp" or an
            `FSDPStrategy(...)`.
        devices: how many processes on this machine (N, "N", -1 for all, "auto") or CUDA indices [0, 1].
        num_nodes: machines; more than one must be started with torchrun.
        precision: "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed" (aliases 64, 32,
            "16" -> 16-mixed, "bf16" -> bf16-mixed).
        seed: if given, seeds torch (all devices), `random` and NumPy now.
    """

    def __init__(
        self,
        accelerator: str = "auto",
        strategy: str = "auto",
        devices: int | str | list[int] = "auto",
        num_nodes: int = 1,
        precision: str | int = "32-true",
        seed: int | None = None,
    ):
        self._args = dict(accelerator=accelerator, strategy=strategy, devices=devices, num_nodes=num_nodes,
                          precision=precision, seed=seed)
        self.plan = make_plan(accelerator, strategy, devices, num_nodes, precision)
        self._scaler = single.grad_scaler(self.plan)
        self._ranks = launcher.Ranks()
        self._sharded: dict[int, nn.Parameter] = {}  # id(parameter before setup) -> the one sharding made
        self._engine: ds.Engine | None = None  # DeepSpeed's, once setup made it
        self._launched = not self.plan.multi_process
        if seed is not None:
            seed_everything(seed)

    # ---- where we are ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def global_rank(self) -> int:
        return self._ranks.global_rank

    @property
    def local_rank(self) -> int:
        return self._ranks.local_rank

    @property
    def node_rank(self) -> int:
        return self._ranks.node_rank

    @property
    def world_size(self) -> int:
        return self._ranks.world_size

    @property
    def is_global_zero(self) -> bool:
        return self._ranks.global_rank == 0

    def _require_launch(self, what: str) -> None:
        if not self._launched:
            raise RuntimeError(
                f"{what} with strategy={self.plan.strategy!r} needs the processes first: call fabric.launch() "
                "(or fabric.launch(fn, *args)) before it."
            )

    # ---- construct -------------------------------------------------------------------------------
    def init_module(self, empty_init: bool | None = None) -> InitContext | RecordContext:
        """Build modules on the device in the precision's dtype; `empty_init=True` skips all init work.

        Without empty init the model equals, bit for bit, the eager model built with the same seed on the
        device and then cast to the precision's dtype. With empty init, parameter memory is uninitialized
        until a checkpoint or `setup` writes it; reading it in forward raises.
        """
        self._require_launch("init_module()")
        if self.plan.strategy == "deepspeed":
            return self._deepspeed_init(bool(empty_init))
        # FSDP never builds the full model: parameters on meta, materialized shard by shard in setup; by default
        # their init is recorded (with or without empty_init: it is cheap) and replayed there.
        if self.plan.strategy == "fsdp" and self.plan.options.record_init:
            return RecordContext(self.plan.device, self.plan.param_dtype)
        if empty_init and self.plan.strategy != "fsdp":  # record now, replay what no checkpoint writes (unwritten.py)
            return RecordContext(self.plan.device, self.plan.param_dtype, empty_init=True)
        if self.plan.strategy != "fsdp" and self.plan.param_dtype != torch.get_default_dtype():
            # G8: the constructor runs in eager's dtypes on fake tensors; each value is computed as eager does and
            # stored cast at exit, one tensor at a time (never an fp32 copy of the model)
            return RecordContext(self.plan.device, self.plan.param_dtype, replay=True)
        meta = self.plan.strategy == "fsdp"
        return InitContext(self.plan.device, self.plan.param_dtype, empty_init=bool(empty_init), meta=meta)

    def _deepspeed_init(self, empty_init: bool) -> InitContext | RecordContext:
        """ZeRO-3: record (setup replays into the partitions). Else the engine's dtype, and for ZeRO-3 without
        the record `deepspeed.zero.Init` (partition each module as it is built)."""
        if self.plan.options.stage == 3 and self.plan.options.record_init:
            return RecordContext(self.plan.device, ds.param_dtype(self.plan))
        return self._deepspeed_eager_init(empty_init)

    @contextmanager
    def _deepspeed_eager_init(self, empty_init: bool) -> Iterator[None]:
        with ExitStack() as stack:
            if self.plan.options.stage == 3:
                stack.enter_context(ds.zero_init(self.plan, self.plan.options, skip_writes=empty_init))
            stack.enter_context(InitContext(self.plan.device, ds.param_dtype(self.plan), empty_init=empty_init))
            yield

    def init_tensor(self) -> InitContext:
        """Tensors created inside land on the device in the precision's dtype."""
        self._require_launch("init_tensor()")
        return InitContext(self.plan.device, self.plan.param_dtype, empty_init=False)

    # ---- set up ----------------------------------------------------------------------------------
    def setup(self, module: nn.Module, *optimizers: torch.optim.Optimizer) -> Any:
        """`setup_module(module)`, and `setup_optimizers(*optimizers)` if any are given."""
        self._require_launch("setup()")
        for optimizer in optimizers:  # before the model changes, so that an error leaves it as it was
            single.check_optimizer(optimizer, model_set_up=False)
        wrapped = self.setup_module(module)
        if not optimizers:
            return wrapped
        return (wrapped, *(self._setup_optimizer(opt) for opt in optimizers))

    def setup_module(self, module: nn.Module) -> single.FabricModule:
        self._require_launch("setup_module()")
        wrapped, sharded = single.setup_module(module, self.plan)
        self._sharded.update(sharded)
        if isinstance(wrapped._forward_module, ds.Engine):
            self._engine = wrapped._forward_module
        return wrapped

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer) -> Any:
        self._require_launch("setup_optimizers()")
        wrapped = [self._setup_optimizer(opt) for opt in optimizers]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def _setup_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        single.check_optimizer(optimizer, model_set_up=False)
        if self.plan.strategy == "deepspeed":
            if self._engine is None:
                raise RuntimeError("Under DeepSpeed the engine needs the model: call fabric.setup(model) before "
                                   "setup_optimizers(optimizer), or fabric.setup(model, optimizer).")
            self._engine.start(optimizer)
            return ds.EngineOptimizer(self._engine)
        if self._sharded:  # made from the parameters before sharding: point it at the shards
            fsdp.remap_optimizer(optimizer, self._sharded)
        single.check_optimizer(optimizer)
        return single.setup_optimizer(optimizer, self._scaler)

    # ---- save and load -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, state: dict[str, Any]) -> None:
        """Save modules, optimizers and plain values, atomically (a crash never leaves a half-written `path`).

        One device and DDP: rank 0 writes one file. FSDP: a `torch.distributed.checkpoint` folder, each rank
        writing its own shards (optimizer state included). DeepSpeed: the engine's folder (each rank its
        partitions). Every rank must call it; all return once `path` is in place."""
        if self.plan.strategy == "fsdp":
            sharded.save_fsdp(path, state)
            return
        if self.plan.strategy == "deepspeed":
            sharded.save_deepspeed(path, state, self._engine)
            return
        if self.is_global_zero:
            save_state(path, state)
        self.barrier()

    def load(self, path: str | os.PathLike, state: dict[str, Any] | None = None, strict: bool = True) -> dict:
        """Load what `save` wrote. Modules and optimizers in `state` are restored in place (modules through
        `load_checkpoint`: any model, meta included); other values in `state` are replaced. Returns what the file
        holds beyond `state` (everything, if `state` is None).

        Under FSDP and DeepSpeed, `path` is the folder `save` wrote under the same strategy and `state` is
        required: each rank reads only its own shards into the modules and optimizers given (an FSDP folder
        also into another world size; a DeepSpeed one only into the same). `strict` also checks module keys."""
        if self.plan.strategy in ("fsdp", "deepspeed"):
            if not state:
                raise ValueError(f"fabric.load under strategy={self.plan.strategy!r} reads shards into the objects "
                                 "they belong to: pass state={'model': model, 'optimizer': optimizer, ...}.")
            if self.plan.strategy == "fsdp":
                return sharded.load_fsdp(path, state, strict, self.device, self.plan.param_dtype)
            return sharded.load_deepspeed(path, state, strict, self._engine)
        if Path(path).suffix == ".safetensors":
            modules = {k: v for k, v in (state or {}).items() if isinstance(v, nn.Module)}
            if len(modules) != 1:
                raise ValueError(f"{path}: a .safetensors file holds one module; pass state={{'model': model}}.")
            (name, module), = modules.items()
            self.load_raw(path, module, strict=strict)
            return {}
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if state is None:
            return saved
        absent = [k for k in state if k not in saved]
        if absent and strict:
            raise KeyError(f"{path}: has no {absent}; it holds {sorted(saved)}. Pass strict=False to skip them.")
        for key, obj in state.items():
            if key not in saved:
                continue
            if isinstance(obj, nn.Module):
                module = obj.module if isinstance(obj, single.FabricModule) else obj
                load_into(module, Checkpoint.from_tensors(Path(path), saved[key]), strict=strict, device=self.device,
                          dtype=self.plan.param_dtype)
            elif isinstance(obj, torch.optim.Optimizer):
                obj.load_state_dict(saved[key])
            else:
                state[key] = saved[key]
        return {k: v for k, v in saved.items() if k not in state}

    # ---- load ------------------------------------------------------------------------------------
    def load_raw(self, path: str | os.PathLike, obj: nn.Module | torch.optim.Optimizer, strict: bool = True) -> Any:
        """Load a plain checkpoint into one module (any format `torchinit.load_checkpoint` reads, DCP folders
        included; real, empty or meta; before or after `setup`) or one optimizer. Returns the module's
        `LoadReport`.

        Sharded modules read only their part: FSDP shards their rows (DTensor shards, from DCP), ZeRO-3 ranks
        their partition's elements; no gather, no broadcast. Under DeepSpeed the optimizer's fp32 master
        weights are refreshed from the loaded values."""
        if isinstance(obj, torch.optim.Optimizer):
            obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return None
        if not isinstance(obj, nn.Module):
            raise TypeError(f"fabric.load_raw loads into a module or a torch optimizer, not a {type(obj).__name__}"
                            " (under DeepSpeed the optimizer state loads with fabric.load).")
        module = obj.module if isinstance(obj, single.FabricModule) else obj
        if self.plan.strategy != "deepspeed":
            return load_checkpoint(module, path, strict=strict, device=self.device, dtype=self.plan.param_dtype)
        report = load_checkpoint(module, path, strict=strict, device=self.device, dtype=ds.param_dtype(self.plan))
        if self._engine is not None:
            self._engine.weights_loaded()
        return report

    # ---- run -------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        if self._engine is not None and self._engine.engine is not None:  # its loss scaling and ZeRO hooks
            self._engine.engine.backward(loss, **kwargs)
            return
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward(**kwargs)

    def autocast(self):
        """Autocast to the mixed precision's dtype (a no-op for true precisions)."""
        return single.autocast(self.plan)

    def launch(self, fn: Callable | None = None, *args: Any) -> Any:
        """Start or join the processes, then run `fn(self, *args)` (in every process; rank 0's result returned).

        One process: runs `fn` here. Under torchrun: joins its process group. `launch(fn, ...)`: spawns one
        process per device (`fn` must be picklable: a module-level function). `launch()` in a script: this
        process is rank 0 and the script is run again for the other ranks.
        """
        if not self.plan.multi_process:
            return fn(self, *args) if fn is not None else None
        if self._launched:
            raise RuntimeError("launch() was already called on this Fabric.")
        ranks = launcher.from_environment(self.plan)
        if ranks is not None:
            self._join(ranks, f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
            atexit.register(launcher.leave_group)
        elif fn is not None:
            return launcher.spawn(self._args, self.plan, fn, args)
        else:
            self._join(*launcher.start_script_ranks(self.plan))
        return fn(self, *args) if fn is not None else None

    def _join(self, ranks: launcher.Ranks, init_method: str) -> None:
        self.plan = launcher.join(self.plan, ranks, init_method)
        self._ranks, self._launched = ranks, True

    def barrier(self, name: str | None = None) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """`obj` from rank `src`, in every process (any picklable object)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        """`tensor` summed ("sum") or averaged ("mean") over all processes, as a new tensor."""
        if reduce_op not in ("sum", "mean"):
            raise ValueError(f"reduce_op={reduce_op!r} is not supported: use 'sum' or 'mean'.")
        if self.world_size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size if reduce_op == "mean" else out

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_global_zero:
            print(*args, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed torch on every device, Python's `random` and NumPy (if installed)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed % 2**32)
