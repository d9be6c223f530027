"""Fabric: the front door. It composes the plan, the strategy (strategies/base.py's protocol) and the checkpoint
readers; it never asks which strategy it runs, and saves / loads by the strategy's state layout."""

from __future__ import annotations

import atexit
import functools
import os
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchinit import launch as launcher
from torchinit.checkpoint import export, full_save, load_state, sharded_state
from torchinit.checkpoint.load_model import load_checkpoint
from torchinit.checkpoint.save import save_state
from torchinit.core.errors import ArgumentTypeError, CheckpointError, ConfigurationError, UsageError
from torchinit.init.context import InitContext
from torchinit.plan import make_plan
from torchinit.strategies.base import Layout, Strategy
from torchinit.strategies.model_parallel import ModelParallel
from torchinit.strategies.select import strategy_for
from torchinit.strategies.wrappers import FabricModule, autocast, check_optimizer


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
        self.strategy: Strategy = strategy_for(self.plan)
        self._ranks = launcher.Ranks()
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

    @property
    def device_mesh(self):
        """The `DeviceMesh` of ModelParallelStrategy: 2-D, dims "data_parallel" (outer) and "tensor_parallel";
        `fabric.device_mesh["tensor_parallel"]` is the 1-D mesh of one dimension. Made in `launch()`."""
        if not isinstance(self.strategy, ModelParallel):
            raise UsageError(f"fabric.device_mesh belongs to ModelParallelStrategy; this Fabric runs "
                             f"strategy={self.plan.strategy!r}.")
        self._require_launch("fabric.device_mesh")
        if self.strategy.mesh is None:
            self.strategy.start()
        return self.strategy.mesh

    def _require_launch(self, what: str) -> None:
        if not self._launched:
            raise UsageError(
                f"{what} with strategy={self.plan.strategy!r} needs the processes first: call fabric.launch() "
                "(or fabric.launch(fn, *args)) before it."
            )

    # ---- construct -------------------------------------------------------------------------------
    def init_module(self, empty_init: bool | None = None) -> Any:
        """Build modules on the device in the precision's dtype; `empty_init=True` skips all init work.

        Without empty init the model equals, bit for bit, the eager model built with the same seed on the
        device and then cast to the precision's dtype. With empty init, parameter memory is uninitialized
        until a checkpoint or `setup` writes it; reading it in forward raises. Under FSDP and model parallel the
        parameters stay on meta until `setup` (the init is recorded and replayed shard by shard).
        """
        self._require_launch("init_module()")
        return self.strategy.init_context(bool(empty_init))

    def init_tensor(self) -> InitContext:
        """Tensors created inside land on the device in the precision's dtype."""
        self._require_launch("init_tensor()")
        return InitContext(self.plan.device, self.plan.param_dtype, empty_init=False)

    # ---- set up ----------------------------------------------------------------------------------
    def setup(self, module: nn.Module, *optimizers: torch.optim.Optimizer) -> Any:
        """`setup_module(module)`, and `setup_optimizers(*optimizers)` if any are given."""
        self._require_launch("setup()")
        for optimizer in optimizers:  # before the model changes, so that an error leaves it as it was
            check_optimizer(optimizer, model_set_up=False)
        wrapped = self.setup_module(module)
        if not optimizers:
            return wrapped
        return (wrapped, *(self.strategy.setup_optimizer(opt) for opt in optimizers))

    def setup_module(self, module: nn.Module) -> FabricModule:
        """Materialize (each tensor from its one source), shard and wrap `module` as the strategy does."""
        self._require_launch("setup_module()")
        return self.strategy.setup_module(module)

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer) -> Any:
        self._require_launch("setup_optimizers()")
        wrapped = [self.strategy.setup_optimizer(opt) for opt in optimizers]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    # ---- save and load -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, state: dict[str, Any], format: str | None = None) -> None:
        """Save modules, optimizers and plain values, atomically (a crash never leaves a half-written `path`).

        One device and DDP: rank 0 writes one file. FSDP and model parallel: a `torch.distributed.checkpoint`
        folder (loadable into another world size or mesh shape), each rank writing its own shards (optimizer state
        included). DeepSpeed: the engine's folder (each rank its partitions). `format="safetensors"`: `state` holds
        one module, written as a transformers-style folder (sharded safetensors files and their index), each rank
        writing its own shards into the final files. Every rank must call it; all return once `path` is in place."""
        if format == "safetensors":
            export.save_safetensors_folder(path, state)
            return
        if format is not None:
            raise ConfigurationError(f"format={format!r} is not supported: use None (the strategy's own) or "
                                     "'safetensors'.")
        layout = self.strategy.layout
        if layout is Layout.DCP:  # each rank its shards, any placement
            sharded_state.save_fsdp(path, state)
            return
        if layout is Layout.FULL:  # one file from rank 0, gathered one tensor at a time
            full_save.save_full(path, state)
            return
        if layout is Layout.DEEPSPEED:
            sharded_state.save_deepspeed(path, state, self.strategy.engine)
            return
        self._on_rank_zero(lambda: save_state(path, state), f"{os.fspath(path)}: rank 0 could not save it")

    def _on_rank_zero(self, work: Callable[[], None], failed: str) -> None:
        """`work` on rank 0 while the others wait; its outcome is shared, so when it raises every rank raises
        (rank 0 its own error, the others `failed` and the cause) instead of waiting at a barrier it never
        reaches."""
        if self.world_size == 1:
            work()
            return
        error: BaseException | None = None
        if self.is_global_zero:
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

    def load(self, path: str | os.PathLike, state: dict[str, Any] | None = None, strict: bool = True,
             allow_nonfinite: bool = False) -> dict:
        """Load what `save` wrote. Modules and optimizers in `state` are restored in place (modules through
        `load_checkpoint`: any model, meta included); other values in `state` are replaced. Returns what the file
        holds beyond `state` (everything, if `state` is None).

        `path` may be what `save` wrote under any strategy and world size (a file, a DCP folder, a DeepSpeed
        folder, a safetensors file or folder): see checkpoint/load_state.py. Under FSDP, model parallel (a DCP
        folder also into another mesh shape) and DeepSpeed `state` is required and each rank reads only its own
        shards into the modules and optimizers given. `strict` also checks module keys. `allow_nonfinite` (one
        device / DDP): load NaN / +-inf module values instead of raising."""
        layout = self.strategy.layout
        if layout is not Layout.FILE:
            if allow_nonfinite:
                raise ConfigurationError(f"fabric.load(allow_nonfinite=True) is for one device or DDP; under "
                                 f"strategy={self.plan.strategy!r} load the model with "
                                 "fabric.load_raw(path, model, allow_nonfinite=True).")
            if not state:
                raise ConfigurationError(f"fabric.load under strategy={self.plan.strategy!r} reads shards into the "
                                         "objects they belong to: pass state={'model': model, 'optimizer': "
                                         "optimizer, ...}.")
            return load_state.load(path, state, strict, layout, self.device, self.strategy.param_dtype,
                                   getattr(self.strategy, "engine", None))
        if state is None:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return load_state.load(path, state, strict, layout, self.device, self.strategy.param_dtype,
                               allow_nonfinite=allow_nonfinite)

    # ---- load ------------------------------------------------------------------------------------
    def load_raw(self, path: str | os.PathLike, obj: nn.Module | torch.optim.Optimizer, strict: bool = True,
                 allow_nonfinite: bool = False) -> Any:
        """Load a plain checkpoint into one module (any format `torchinit.load_checkpoint` reads, DCP folders
        included; real, empty or meta; before or after `setup`) or one optimizer. Returns the module's
        `LoadReport`.

        Sharded modules read only their part: FSDP shards their rows (DTensor shards, from DCP), ZeRO-3 ranks
        their partition's elements; no gather, no broadcast. Under DeepSpeed the optimizer's fp32 master
        weights take the file's values (an fp32 file is not rounded through the bf16 parameters). NaN / +-inf
        values are an error naming the file and keys unless `allow_nonfinite`."""
        if isinstance(obj, torch.optim.Optimizer):
            obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return None
        if not isinstance(obj, nn.Module):
            raise ArgumentTypeError(f"fabric.load_raw loads into a module or a torch optimizer, not a "
                                    f"{type(obj).__name__} (under DeepSpeed the optimizer state loads with "
                                    "fabric.load).")
        module = obj.module if isinstance(obj, FabricModule) else obj
        if self.strategy.layout is Layout.DEEPSPEED:  # the optimizer's fp32 masters too
            return load_state.load_module(path, module, strict, self.device, self.strategy.param_dtype,
                                          self.strategy.engine, allow_nonfinite)
        return load_checkpoint(module, path, strict=strict, device=self.device, dtype=self.strategy.param_dtype,
                               allow_nonfinite=allow_nonfinite)

    # ---- run -------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """`loss.backward()` as the strategy needs it (fp16 loss scaling, DeepSpeed's engine)."""
        self.strategy.backward(loss, **kwargs)

    def autocast(self):
        """Autocast to the mixed precision's dtype (a no-op for true precisions)."""
        return autocast(self.plan)

    def launch(self, fn: Callable | None = None, *args: Any) -> Any:
        """Start or join the processes, then run `fn(self, *args)` (in every process; rank 0's result returned).

        One process: runs `fn` here. A process group the caller made (`dist.init_process_group` first): used as
        it is. Under torchrun: joins its process group. `launch(fn, ...)`: spawns one process per device (`fn`
        must be picklable: a module-level function). `launch()` in a script: this process is rank 0 and the
        script is run again for the other ranks.
        """
        if not self.plan.multi_process:
            return fn(self, *args) if fn is not None else None
        if self._launched:
            raise UsageError("launch() was already called on this Fabric.")
        ranks = launcher.from_group(self.plan)
        if ranks is not None:  # a process group made by the caller: used as it is, left to the caller to end
            self.join_process_group(ranks, None)
            return fn(self, *args) if fn is not None else None
        ranks = launcher.from_environment(self.plan)
        if ranks is not None:
            self.join_process_group(ranks, f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
            atexit.register(launcher.leave_group)
        elif fn is not None:
            return launcher.spawn(functools.partial(type(self), **self._args), self.plan, fn, args)
        else:
            self.join_process_group(*launcher.start_script_ranks(self.plan))
        return fn(self, *args) if fn is not None else None

    def join_process_group(self, ranks: launcher.Ranks, init_method: str | None) -> None:
        """Make this Fabric the process `ranks` says (its device set from the local rank) and join the process
        group at `init_method` (a `torch.distributed` URL: "tcp://host:port", "file:///path"), or, with None,
        use the group the caller already made. `launch()` calls it in every way it starts or joins processes;
        call it yourself only to join processes started another way. Under model parallel it also makes the
        device mesh (collective: every rank must call it)."""
        self.plan = launcher.join(self.plan, ranks, init_method)
        self._ranks, self._launched = ranks, True
        self.strategy = strategy_for(self.plan)
        self.strategy.start()  # every rank, now: a device mesh is made collectively

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
            raise ConfigurationError(f"reduce_op={reduce_op!r} is not supported: use 'sum' or 'mean'.")
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
