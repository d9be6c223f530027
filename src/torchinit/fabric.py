"""Fabric: the front door. It composes the plan, the strategy (strategies/base.py's protocol) and the checkpoint
readers; it never asks which strategy it runs, and saves / loads by the strategy's state layout."""

from __future__ import annotations

import atexit
import functools
import inspect
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from torchinit import collectives, data, seeding
from torchinit import launch as launcher
from torchinit.callbacks import Callbacks
from torchinit.checkpoint import fabric_state, load_state
from torchinit.checkpoint.load_model import load_checkpoint
from torchinit.core.compat import compiled_parts
from torchinit.core.errors import ArgumentTypeError, ConfigurationError, UsageError
from torchinit.init.context import TensorContext
from torchinit.loggers import scalars
from torchinit.plan import Plan, make_plan
from torchinit.plugins import Accelerator, check_plugins
from torchinit.seeding import seed_everything
from torchinit.strategies.base import Layout, Strategy
from torchinit.strategies.model_parallel import ModelParallel
from torchinit.strategies.select import strategy_for
from torchinit.strategies.wrappers import FabricModule, FabricOptimizer, check_optimizer, setup_optimizer, unwrap


class Fabric:
    """Lightning-Fabric-style entry point, with Lightning 2.6's arguments (see the README's API section).

    Args:
        accelerator: "auto", "cpu", "cuda", "gpu" or "mps".
        strategy: "auto" (ddp when several devices), "single_device", "ddp", "ddp_spawn", "fsdp", "deepspeed..." or a
            strategy object (`FSDPStrategy(...)`, `DeepSpeedStrategy(...)`, `ModelParallelStrategy(...)`).
        devices: how many processes on this machine (N, "N", -1 for all, "auto") or CUDA indices [0, 1].
        num_nodes: machines; more than one must be started with torchrun.
        precision: "64-true", "32-true" (None: the default), "16-true", "bf16-true", "16-mixed", "bf16-mixed"
            (aliases 64, 32, "16" -> 16-mixed, "bf16" -> bf16-mixed).
        plugins: cluster environments that describe torchrun's variables; other plugins are refused by name.
        callbacks: objects whose methods `fabric.call(hook_name, ...)` runs.
        loggers: objects with `log_metrics(metrics, step)` (`torchinit.loggers.CSVLogger`, `TensorBoardLogger`).
        seed: if given, `seed_everything(seed)` now.
    """

    def __init__(
        self,
        accelerator: str = "auto",
        strategy: Any = "auto",
        devices: int | str | list[int] = "auto",
        num_nodes: int = 1,
        precision: str | int | None = None,
        plugins: Any = None,
        callbacks: Any = None,
        loggers: Any = None,
        seed: int | None = None,
    ):
        self._plugins = check_plugins(plugins)
        self._args = dict(accelerator=accelerator, strategy=strategy, devices=devices, num_nodes=num_nodes,
                          precision=precision, seed=seed)  # how to make another Fabric like this one
        plan = make_plan(accelerator, strategy, devices, num_nodes, "32-true" if precision is None else precision)
        self.strategy: Strategy = strategy_for(plan)
        self._ranks = launcher.Ranks()
        self._launched = not self.plan.multi_process
        self._callbacks = Callbacks(callbacks)
        self._loggers = list(loggers) if isinstance(loggers, (list, tuple)) else [] if loggers is None else [loggers]
        if seed is not None:
            seed_everything(seed)

    # ---- where we are ----------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The resolved arguments (plan.py); the strategy holds it."""
        return self.strategy.plan

    @plan.setter
    def plan(self, plan: Plan) -> None:
        """Another plan is another strategy (what a strategy set up under the old plan is not carried over)."""
        self.strategy = strategy_for(plan)

    device = property(lambda self: self.plan.device, doc="This process's device.")
    global_rank = property(lambda self: self._ranks.global_rank)
    local_rank = property(lambda self: self._ranks.local_rank)
    node_rank = property(lambda self: self._ranks.node_rank)
    world_size = property(lambda self: self._ranks.world_size)
    is_global_zero = property(lambda self: self._ranks.global_rank == 0)
    loggers = property(lambda self: self._loggers)
    logger = property(lambda self: self._loggers[0], doc="The first logger (the main one).")
    accelerator = property(lambda self: Accelerator(self.plan.accelerator))
    precision = property(lambda self: self.plan.precision,
                         doc="The resolved precision's name ('bf16-true', ...; '16-mixed' on CPU is 'bf16-mixed').")
    _precision = property(lambda self: self.strategy.precision)  # what Lightning programs read as fabric._precision

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

    def init_tensor(self) -> TensorContext:
        """Tensors created inside land on the device in the precision's dtype (also inside `init_module()`)."""
        self._require_launch("init_tensor()")
        return TensorContext(self.plan.device, self.plan.param_dtype)

    # ---- set up ----------------------------------------------------------------------------------
    def setup(self, module: nn.Module, *optimizers: torch.optim.Optimizer, scheduler: Any = None,
              move_to_device: bool = True, _reapply_compile: bool = True) -> Any:
        """`setup_module(module)`, then the optimizers set up for it; returns (module, *optimizers[, scheduler])."""
        self._require_launch("setup()")
        if any(isinstance(opt, FabricOptimizer) for opt in optimizers):
            raise ConfigurationError("An optimizer should be passed only once to the `setup` method.")
        for optimizer in optimizers:  # before the model changes, so that an error leaves it as it was
            check_optimizer(optimizer, model_set_up=False)
        wrapped = self.setup_module(module, move_to_device, _reapply_compile)
        wrapped_optimizers = [self._wrap_optimizer(self.strategy.setup_optimizer(opt)) for opt in optimizers]
        self.call("on_after_setup", fabric=self, module=wrapped)
        if not optimizers:
            return wrapped
        return (wrapped, *wrapped_optimizers, *([scheduler] if scheduler is not None else []))

    def setup_module(self, module: nn.Module, move_to_device: bool = True, _reapply_compile: bool = True) -> Any:
        """Materialize (each tensor from its one source), shard and wrap `module` as the strategy does. A module
        compiled with `torch.compile` is set up underneath and compiled again (its keys keep no `_orig_mod.`)."""
        self._require_launch("setup_module()")
        module, recompile = compiled_parts(module) if _reapply_compile else (module, None)
        wrapped = self.strategy.setup_module(module, move_to_device)
        if recompile is not None:
            wrapped.run_forward_through(recompile)
        return wrapped

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer) -> Any:
        self._require_launch("setup_optimizers()")
        if not optimizers:
            raise ConfigurationError("`setup_optimizers` requires at least one optimizer as input.")
        if any(isinstance(opt, FabricOptimizer) for opt in optimizers):
            raise ConfigurationError("An optimizer should be passed only once to the `setup_optimizers` method.")
        wrapped = [self._wrap_optimizer(self.strategy.setup_optimizer(opt)) for opt in optimizers]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def _wrap_optimizer(self, optimizer: Any) -> FabricOptimizer:
        def after_step(inner: Any) -> None:
            self.call("on_after_optimizer_step", strategy=self.strategy, optimizer=inner)
        return setup_optimizer(optimizer, self.strategy.precision, after_step)

    def setup_dataloaders(self, *dataloaders: Any, use_distributed_sampler: bool = True,
                          move_to_device: bool = True) -> Any:
        """Each loader gives this process its share of the data (a `DistributedSampler` when several run, its
        epoch set every pass) and batches on the device; one loader in, one out; several in, a list out."""
        self._require_launch("setup_dataloaders()")
        data.check_dataloaders(dataloaders)
        loaders = [data.setup_dataloader(dl, self.strategy.distributed_sampler_kwargs, self.global_rank,
                                         self.device if move_to_device else None, use_distributed_sampler)
                   for dl in dataloaders]
        return loaders[0] if len(loaders) == 1 else loaders

    def to_device(self, obj: Any) -> Any:
        """A module (moved in place) or any collection of tensors, on this process's device."""
        if isinstance(obj, nn.Module):
            return obj.to(self.device)
        return data.move_to_device(obj, self.device)

    # ---- save and load -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, state: dict[str, Any], filter: dict[str, Callable] | None = None,
             format: str | None = None) -> None:
        """Save modules, optimizers, objects with `state_dict` (as their state) and plain values, atomically (a crash
        never leaves a half-written `path`). `filter={key: fn(name, value) -> bool}` keeps only the entries of that
        key's state that `fn` accepts (one device and DDP).

        One device and DDP: rank 0 writes one file. FSDP and model parallel: a `torch.distributed.checkpoint`
        folder (loadable into another world size or mesh shape), each rank writing its own shards (optimizer state
        included), or with `state_dict_type="full"` / `save_distributed_checkpoint=False` one file that rank 0
        writes, gathered one tensor at a time. DeepSpeed: the engine's folder (each rank its partitions).
        `format="safetensors"`: `state` holds one module, written as a transformers-style folder (sharded
        safetensors files and their index), each rank writing its own shards into the final files. Every rank must
        call it; all return once `path` is in place."""
        fabric_state.save(path, state, self.strategy, filter, format)

    def load(self, path: str | os.PathLike, state: dict[str, Any] | None = None, strict: bool = True,
             allow_nonfinite: bool = False) -> dict:
        """Load what `save` wrote. Modules and optimizers in `state` are restored in place (modules through
        `load_checkpoint`: any model, meta included); other values in `state` are replaced. Returns what the file
        holds beyond `state` (everything, if `state` is None).

        `path` may be what `save` wrote under any strategy and world size (a file, a DCP folder, a DeepSpeed
        folder, a safetensors file or folder): see checkpoint/load_state.py. Under FSDP, model parallel (a DCP
        folder also into another mesh shape) and DeepSpeed `state` is required and each rank reads only its own
        shards into the modules and optimizers given. `strict` also checks module keys. `allow_nonfinite` (one
        device / DDP): load NaN / +-inf module values instead of raising. Objects with `load_state_dict` (LR
        schedulers, samplers) get their saved state in place."""
        return fabric_state.load(path, state, self.strategy, self.device, strict, allow_nonfinite)

    def load_raw(self, path: str | os.PathLike, obj: nn.Module | torch.optim.Optimizer, strict: bool = True,
                 allow_nonfinite: bool = False) -> Any:
        """Load a plain checkpoint into one module (any format `torchinit.load_checkpoint` reads, DCP folders
        included; real, empty or meta; before or after `setup`) or one optimizer. Returns the module's
        `LoadReport`.

        Sharded modules read only their part: FSDP shards their rows (DTensor shards, from DCP), ZeRO-3 ranks
        their partition's elements; no gather, no broadcast. Under DeepSpeed the optimizer's fp32 master
        weights take the file's values (an fp32 file is not rounded through the bf16 parameters). NaN / +-inf
        values are an error naming the file and keys unless `allow_nonfinite`."""
        obj = unwrap(obj)
        if isinstance(obj, torch.optim.Optimizer):
            obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return None
        if not isinstance(obj, nn.Module):
            raise ArgumentTypeError(f"fabric.load_raw loads into a module or a torch optimizer, not a "
                                    f"{type(obj).__name__} (under DeepSpeed the optimizer state loads with "
                                    "fabric.load).")
        if self.strategy.layout is Layout.DEEPSPEED:  # the optimizer's fp32 masters too
            return load_state.load_module(path, obj, strict, self.device, self.strategy.param_dtype,
                                          self.strategy.engine, allow_nonfinite)
        return load_checkpoint(obj, path, strict=strict, device=self.device, dtype=self.strategy.param_dtype,
                               allow_nonfinite=allow_nonfinite)

    # ---- run -------------------------------------------------------------------------------------
    def backward(self, tensor: torch.Tensor, *args: Any, model: Any = None, **kwargs: Any) -> None:
        """`tensor.backward(*args, **kwargs)` as the strategy needs it (fp16 loss scaling, DeepSpeed's engine).
        `model` is accepted for Lightning's signature (one engine per Fabric here: not needed)."""
        self.strategy.backward(tensor, *args, **kwargs)

    def clip_gradients(self, module: nn.Module, optimizer: Any, clip_val: float | None = None,
                       max_norm: float | None = None, norm_type: float = 2.0,
                       error_if_nonfinite: bool = True) -> torch.Tensor | None:
        """Clip the optimizer's gradients by value (`clip_val`) or to a total norm (`max_norm`: returns the norm
        before clipping). Gradients are unscaled first under 16-mixed; sharded gradients are clipped by the norm of
        the whole model (strategies/clipping.py)."""
        if clip_val is not None and max_norm is not None:
            raise ConfigurationError("Only one of `clip_val` or `max_norm` can be set as this specifies the underlying "
                                     "clipping algorithm!")
        module, optimizer = unwrap(module), unwrap(optimizer)
        if clip_val is not None:
            self.strategy.clip_gradients_value(module, optimizer, clip_val)
            return None
        if max_norm is not None:
            return self.strategy.clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite)
        raise ConfigurationError("You have to specify either `clip_val` or `max_norm` to do gradient clipping!")

    def no_backward_sync(self, module: Any, enabled: bool = True) -> AbstractContextManager:
        """Skip the gradient synchronization in forward and backward inside (gradient accumulation); a no-op (with a
        warning) where the strategy cannot skip it."""
        module, _ = compiled_parts(module)
        if not isinstance(module, FabricModule):
            raise ArgumentTypeError("You need to set up the model first before you can call "
                                    "`fabric.no_backward_sync()`: `model = fabric.setup(model, ...)`")
        return self.strategy.no_backward_sync(module, enabled)

    def autocast(self) -> AbstractContextManager:
        """The precision's forward context: autocast for mixed precisions, the precision's default dtype for true
        ones (Lightning's `forward_context`)."""
        return self.strategy.precision.forward_context()

    def launch(self, fn: Callable | None = None, *args: Any, **kwargs: Any) -> Any:
        """Start or join the processes, then run `fn(self, *args, **kwargs)` in every process (rank 0's result
        returned). One process: runs `fn` here. A process group the caller made: used as it is. Under torchrun: joins
        it. `launch(fn, ...)`: spawns one process per device, each with this Fabric (pickled: its class and
        attributes) and this process's random state; `fn` must pickle (a module-level function). `launch()` in a
        script: this process is rank 0 and the script is run again for the other ranks."""
        if fn is not None:
            if not callable(fn):
                raise ArgumentTypeError(f"`Fabric.launch(...)` needs to be a callable, but got {fn}. HINT: do "
                                        "`.launch(your_fn)` instead of `.launch(your_fn())`")
            if not inspect.signature(fn).parameters:
                raise ArgumentTypeError(f"`Fabric.launch(function={fn})` needs to take at least one argument. The "
                                        "launcher will pass in the `Fabric` object so you can use it inside the "
                                        "function.")
            fn = functools.partial(fn, **kwargs) if kwargs else fn
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
            return launcher.spawn(functools.partial(revived, self, seeding.rng_states()), self.plan, fn, args)
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
        self.strategy.start()  # every rank, now: a device mesh is made collectively

    # ---- collectives (collectives.py: Lightning's semantics) ----------------------------------------
    def barrier(self, name: str | None = None) -> None:
        """Wait until every process gets here."""
        collectives.barrier(self.device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """`obj` from rank `src`, in every process (any picklable object)."""
        return collectives.broadcast(obj, src)

    def all_reduce(self, data: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Tensors (numbers, collections of them) reduced over all processes, in place: "mean" (default), "sum",
        "max", "min", "product" or a `torch.distributed.ReduceOp`."""
        return collectives.all_reduce(data, self.device, group, reduce_op)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Tensors (numbers, collections of them) from all processes, stacked: (world_size, *shape)."""
        return collectives.all_gather(data, self.device, group, sync_grads)

    def rank_zero_first(self, local: bool = False) -> AbstractContextManager:
        """Rank 0 (with `local=True`: each node's local rank 0) runs the block first, the others after it."""
        return collectives.rank_zero_first(self.local_rank if local else self.global_rank, self.device)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on each node's first process."""
        if self.local_rank == 0:
            print(*args, **kwargs)

    # ---- callbacks, loggers, seeding ---------------------------------------------------------------
    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Run `hook_name(*args, **kwargs)` on every callback that has it (each gets the keywords it accepts)."""
        self._callbacks.call(hook_name, *args, **kwargs)

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Every logger's `log_metrics` (one-element tensors as numbers)."""
        metrics = scalars(metrics)
        for logger in self._loggers:
            logger.log_metrics(metrics=metrics, step=step)

    @staticmethod
    def seed_everything(seed: int | None = None, workers: bool | None = None, verbose: bool = True) -> int:
        """`torchinit.seed_everything`, with data loader workers seeded unless `workers=False` (as Lightning's
        method)."""
        return seed_everything(seed, workers=True if workers is None else workers, verbose=verbose)


def revived(fabric: Fabric, states: dict[str, Any]) -> Fabric:
    """In a spawned process: the launching Fabric (unpickled) and the launcher's random state."""
    seeding.set_rng_states(states)
    return fabric
