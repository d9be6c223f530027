"""DeepSpeed ZeRO: the engine shards; this module builds its config from the plan, keeps init from being lost,
and creates the engine when it has what it needs.

1. Config: stage and precision become a DeepSpeed config (micro batch 1: Fabric drives the loop); the user's
   entries are merged over it.
2. Construction (stage 3): by default the init is recorded (init/record.py) and `setup` replays it module by
   module, each partitioned as soon as it is complete (`partition_recorded`). With `record_init=False`,
   `deepspeed.zero.Init` partitions each module's parameters as soon as the module is
   built. Init that runs later inside the context (transformers' `post_init` -> `_init_weights`, or any
   `nn.init` call on a built module) would write into an empty partition and vanish (DeepSpeed #2650). The
   write watch below gathers such a parameter, applies the write, and re-partitions it (every rank runs the
   same code with the same seed; rank 0's result is kept). With empty init those writes are skipped instead.
3. Set-up: `deepspeed.initialize` needs the model and the optimizer together. `setup(model, optimizer)` makes
   the engine at once; after `setup(model)` alone it is made by `setup_optimizers(optimizer)` (the seed's
   order), or without an optimizer at the first forward.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.utils.weak import WeakIdKeyDictionary

from torchinit.core.compat import DispatchMode, tree_map
from torchinit.core.compat_deepspeed import full_shape, is_zero3_param, zero3_local, zero3_numel, zero3_partition_range
from torchinit.core.dtypes import module_dtype
from torchinit.core.errors import ConfigurationError, MaterializeError, UnsupportedError, UsageError
from torchinit.core.ops import aliased_result, storage_key, written_args
from torchinit.init.context import InitContext
from torchinit.init.record import RecordContext
from torchinit.materialize.inits import init_for, post_order
from torchinit.materialize.materialize import materialize
from torchinit.materialize.memory import Need, check_fits, work_nbytes
from torchinit.options import DeepSpeedStrategy
from torchinit.plan import Plan
from torchinit.record.recording import records_of
from torchinit.strategies.base import Common, Layout
from torchinit.strategies.deepspeed_config import config, param_dtype
from torchinit.strategies.precision import Precision
from torchinit.strategies.wrappers import FabricModule, check_optimizer


def _deepspeed():
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for a GPU
    import deepspeed

    return deepspeed


@contextlib.contextmanager
def zero_init(plan: Plan, options: DeepSpeedStrategy, skip_writes: bool) -> Iterator[None]:
    """Stage 3: partition every parameter as soon as its module is built, without losing later writes."""
    deepspeed = _deepspeed()
    watch = _PartitionedWrites(deepspeed, skip_writes)
    handle = module_hooks.register_module_parameter_registration_hook(watch.remember)
    try:
        # No dtype=: DeepSpeed 0.19 then takes it from the config's bf16/fp16 sections. Passed explicitly, it is
        # ignored wherever the accelerator lacks fp16 (an operator-precedence slip makes CPU partitions bf16).
        with deepspeed.zero.Init(config_dict_or_path=config(plan, options), remote_device=options.remote_device), \
                watch:
            yield
    finally:
        handle.remove()


class _PartitionedWrites(DispatchMode):
    """Writes into a parameter that ZeRO-3 already partitioned: gather, apply, re-partition (or skip)."""

    def __init__(self, deepspeed, skip: bool):
        super().__init__()
        self.deepspeed, self.skip = deepspeed, skip
        self.params = WeakIdKeyDictionary()  # by identity: a WeakSet would compare tensors with ==

    def remember(self, module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            self.params[param] = True
            if self.skip:
                param._torchinit_unwritten = True  # setup gives it its module's init

    def _owner(self, t: torch.Tensor) -> nn.Parameter | None:
        key = storage_key(t)
        for p in self.params:
            if is_zero3_param(p) and storage_key(p) == key:
                return p
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = [t for t in written_args(func, args, kwargs).values() if t.numel() == 0]
        owners = [p for p in map(self._owner, written) if p is not None and zero3_numel(p) > 0]
        if not owners:
            return func(*args, **kwargs)
        if self.skip:
            return aliased_result(func, args, kwargs)
        if len(owners) != 1 or len(written) != 1 or tuple(written[0].shape) != (0,):
            raise UnsupportedError(
                f"{func} writes into a ZeRO-3 partitioned parameter through a view; torchinit can apply whole-tensor "
                "writes only. Initialize it inside its module's __init__, or with empty_init=True and a checkpoint."
            )
        param, alias = owners[0], written[0]
        with self.deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            full = param.data
            args, kwargs = tree_map(lambda x: full if x is alias else x, (args, kwargs))
            func(*args, **kwargs)
        return alias


def initialize_partitioned(module: nn.Module) -> list[str]:
    """Empty init under ZeRO-3: give the parameters it left unwritten their module's init. Returns their names.

    Like FSDP's path, every rank runs the owner's init on full temporary tensors (the same random stream on
    every rank) and keeps only its own partition: no gather and no broadcast, and the values do not depend on
    the world size. Peak: the partitions plus one module's parameters in full.
    """
    names, hopeless = [], []
    with torch.no_grad():
        for path, owner in post_order(module):
            own = [(n, p) for n, p in owner.named_parameters(recurse=False)]
            if not any(getattr(p, "_torchinit_unwritten", False) for _, p in own):
                continue
            init = init_for(owner, None)
            if init is None:
                hopeless.append(f"'{path or '<root>'}' ({type(owner).__name__})")
                continue
            full = {n: nn.Parameter(torch.empty(full_shape(p), dtype=p.dtype, device=zero3_local(p).device),
                                    requires_grad=p.requires_grad) for n, p in own}
            for n, _ in own:
                owner._parameters[n] = full[n]
            try:
                init()
            finally:
                for n, p in own:
                    owner._parameters[n] = p
            for n, p in own:
                _keep_partition(p, full[n])
                p.__dict__.pop("_torchinit_unwritten", None)
                names.append(f"{path}.{n}" if path else n)
    if hopeless:
        raise MaterializeError(
            f"These modules were built with empty_init=True under ZeRO-3 and have no reset_parameters() to "
            f"initialize them: {', '.join(hopeless)}. Load a checkpoint, or give them an init method."
        )
    return names


def partition_recorded(module: nn.Module, plan: Plan, options: DeepSpeedStrategy, recorded) -> None:
    """ZeRO-3 from a record: module by module, children first, `materialize` gives the module's own meta
    tensors their values in full on the device (the record's; a module swapped in on meta after recording gets
    its own init), then DeepSpeed partitions them (`zero.Init(module=...)`) and frees the full ones.

    Every rank replays the same values (eager's, G3), so the partitions do not depend on the world size (G7).
    Peak: the partitions plus one module's tensors in full (a value the record finishes before its module
    comes up is kept until then).
    """
    deepspeed, cfg, dtype = _deepspeed(), config(plan, options), param_dtype(plan)
    check_fits(partition_needs(module, plan.device, dtype))
    for _, owner in post_order(module):
        own = [*owner._parameters.values(), *owner._buffers.values()]
        if any(t is not None and t.device.type == "meta" for t in own):
            materialize(owner, plan.device, dtype, recorded=recorded, check_values=False)
            deepspeed.zero.Init(module=owner, config_dict_or_path=cfg, remote_device=options.remote_device)


def partition_needs(module: nn.Module, device: torch.device, dtype: torch.dtype) -> list[Need]:
    """What `partition_recorded` leaves on this rank, module by module: each meta parameter's partition
    (`ceil(numel / world)` elements, as DeepSpeed cuts them) and each meta buffer in full (ZeRO-3 does not
    partition buffers); on the way, the module's own tensors in full plus the replay's largest work tensor."""
    world = torch.distributed.get_world_size()
    needs = []
    for path, owner in post_order(module):
        params = [p for p in owner._parameters.values() if p is not None and p.device.type == "meta"]
        buffers = [b for b in owner._buffers.values() if b is not None and b.device.type == "meta"]
        if not params and not buffers:
            continue
        final = [module_dtype(t, dtype) for t in (*params, *buffers)]
        full = [t.numel() * d.itemsize for t, d in zip((*params, *buffers), final, strict=True)]
        held = sum(-(-p.numel() // world) * d.itemsize for p, d in zip(params, final, strict=False))
        held += sum(full[len(params):])
        work = max(work_nbytes(t, d) for t, d in zip((*params, *buffers), final, strict=True))
        needs.append(Need(f"module '{path or '<root>'}'", device, held, sum(full) + work))
    return needs


def _keep_partition(param: nn.Parameter, full: torch.Tensor) -> None:
    """Copy this rank's slice of `full` into the ZeRO-3 partition (see `zero3_partition_range`)."""
    start, end = zero3_partition_range(param)
    zero3_local(param)[: end - start].copy_(full.detach().reshape(-1)[start:end])


class Engine:
    """Creates the DeepSpeed engine once, when the model and (if any) the optimizer are known."""

    def __init__(self, module: nn.Module, plan: Plan, options: DeepSpeedStrategy):
        self.module, self.plan, self.options = module, plan, options
        self.engine = None
        self.optimizer = None
        self.clip_grad: float | None = None
        self.groups: list[list[nn.Parameter]] = []  # the optimizer's parameters by group, before DeepSpeed swaps them

    def start(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.engine is not None:
            raise UsageError(
                "The DeepSpeed engine was already created (by an earlier setup_optimizers or a forward without an "
                "optimizer). Pass the optimizer to setup(model, optimizer) or setup_optimizers(optimizer) before "
                "the first forward."
            )
        self.groups = [list(g["params"]) for g in optimizer.param_groups] if optimizer is not None else []
        deepspeed = _deepspeed()
        if self.options.logging_level is not None:
            deepspeed.utils.logging.logger.setLevel(self.options.logging_level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's use of deprecated collectives
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.module, optimizer=optimizer, config=config(self.plan, self.options), dist_init_required=False
            )
        self.clip_grad = getattr(self.engine.optimizer, "clip_grad", None)  # what clip_gradients overrides for a step

    def __call__(self, *args, **kwargs):
        if self.engine is None:
            self.start(None)
        return self.engine(*args, **kwargs)

    def weights_loaded(self) -> None:
        """After writing into the parameters: the optimizer's fp32 master copies follow them again, and ZeRO-3
        re-gathers what it keeps gathered (otherwise the next step would bring the old values back)."""
        optimizer = self.engine.optimizer if self.engine is not None else None
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()
        if hasattr(optimizer, "checkpoint_event_epilogue"):
            optimizer.checkpoint_event_epilogue()


    def flat_partitions(self) -> list[tuple[torch.Tensor, list[tuple[nn.Parameter, int, int, int]]]]:
        """This rank's fp32 partitions (the tensors the wrapped optimizer steps), each with the parameter
        elements it holds: (parameter, first element, end, offset in the partition). ZeRO 1/2: a group's
        parameters are flattened into one buffer cut into equal partitions; ZeRO 3: each parameter is cut on its
        own and a partition is its pieces in order (see `zero3_partition_range`)."""
        zero = self.engine.optimizer
        out = []
        if hasattr(zero, "single_partition_of_fp32_groups"):
            rank = torch.distributed.get_rank(zero.dp_process_group) if torch.distributed.is_initialized() else 0
            for i, flat in enumerate(zero.bit16_groups_flat):
                part = zero.parallel_partitioned_bit16_groups[i][rank]
                start, size, members = _offset(part, flat), part.numel(), []
                for p in zero.round_robin_bit16_groups[i]:
                    at = _offset(p, flat)
                    a, b = max(at, start), min(at + p.numel(), start + size)
                    if a < b:
                        members.append((p, a - at, b - at, a - start))
                out.append((zero.single_partition_of_fp32_groups[i], members))
        elif hasattr(zero, "fp32_partitioned_groups_flat"):
            for i, flat in enumerate(zero.fp16_partitioned_groups_flat):
                members = []
                for p in zero.fp16_groups[i]:
                    start, end = zero3_partition_range(p)
                    members.append((p, start, end, _offset(zero3_local(p), flat)))
                out.append((zero.fp32_partitioned_groups_flat[i], members))
        else:
            raise UnsupportedError(f"DeepSpeed's optimizer {type(zero).__name__} keeps no ZeRO fp32 partitions that "
                                   "torchinit can fill (ZeRO stage 1-3 without offload are supported).")
        return out


def _offset(t: torch.Tensor, flat: torch.Tensor) -> int:
    """Where `t` (a view into `flat`'s memory) starts in `flat`, in elements."""
    return (t.data_ptr() - flat.data_ptr()) // flat.element_size()


class EngineOptimizer:
    """What setup_optimizers returns under DeepSpeed: `step()` and `zero_grad()` go through the engine."""

    def __init__(self, engine: Engine):
        self._engine = engine

    @property
    def optimizer(self):
        """DeepSpeed's optimizer (the ZeRO optimizer around the one given)."""
        return self._engine.optimizer

    def belongs_to(self, engine: Engine) -> bool:
        """Whether this optimizer steps through `engine` (saving and loading check that it is the one set up)."""
        return self._engine is engine

    def step(self, closure=None):
        if closure is not None:
            raise ConfigurationError("optimizer.step(closure) is not supported with DeepSpeed: compute the loss, call "
                                     "fabric.backward(loss), then optimizer.step().")
        engine = self._engine.engine
        try:
            engine.step()
        finally:  # a clip_gradients call holds for one step; then the engine's own value again
            if self._engine.clip_grad is not None:
                engine.optimizer.clip_grad = self._engine.clip_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._engine.engine.zero_grad()

    def __getattr__(self, name: str):
        return getattr(self._engine.optimizer, name)


class DeepSpeed(Common):
    """DeepSpeed ZeRO 1-3: the engine owns precision, loss scaling and the optimizer; state is the engine's folder.
    `engine` is set by `setup_module`."""

    layout = Layout.DEEPSPEED

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.engine: Engine | None = None

    def make_precision(self, plan: Plan) -> Precision:
        """Inputs in the engine's dtype, outputs back; the engine runs forward and scales fp16 losses itself."""
        return Precision(plan, input_dtype=param_dtype(plan), engine=True)

    @property
    def param_dtype(self) -> torch.dtype:
        return param_dtype(self.plan)

    def init_context(self, empty_init: bool):
        """ZeRO-3: record (setup replays into the partitions). Else the engine's dtype, and for ZeRO-3 without the
        record `deepspeed.zero.Init` (partition each module as it is built)."""
        options = self.plan.options
        if options.stage == 3 and options.record_init:
            return RecordContext(self.plan.device, self.param_dtype)
        return self._eager_init(empty_init)

    @contextlib.contextmanager
    def _eager_init(self, empty_init: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.plan.options.stage == 3:
                stack.enter_context(zero_init(self.plan, self.plan.options, skip_writes=empty_init))
            stack.enter_context(InitContext(self.plan.device, self.param_dtype, empty_init=empty_init))
            yield

    def wrap(self, module: nn.Module, move_to_device: bool = True) -> FabricModule:
        recorded = records_of(module) if self.plan.options.stage == 3 else None
        if recorded is not None:
            partition_recorded(module, self.plan, self.plan.options, recorded)
        elif any(is_zero3_param(p) for p in module.parameters()):  # zero.Init partitioned it: init the unwritten
            names = initialize_partitioned(module)
            if names:
                warnings.warn(f"setup() initialized {len(names)} parameter(s) that empty_init=True left unwritten "
                              "under ZeRO-3 (their module's init).", stacklevel=5)
        else:
            materialize(module, self.plan.device, self.param_dtype)
        self.engine = Engine(module, self.plan, self.plan.options)
        return FabricModule(self.engine, self.precision, original=module)

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> EngineOptimizer:
        check_optimizer(optimizer, model_set_up=False)
        if self.engine is None:
            raise UsageError("Under DeepSpeed the engine needs the model: call fabric.setup(model) before "
                             "setup_optimizers(optimizer), or fabric.setup(model, optimizer).")
        self.engine.start(optimizer)
        return EngineOptimizer(self.engine)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.engine is not None and self.engine.engine is not None:  # its loss scaling and ZeRO hooks
            self.engine.engine.backward(loss, *args, **kwargs)
            return
        loss.backward(*args, **kwargs)

    def clip_gradients_norm(self, module: nn.Module, optimizer, max_norm: float, norm_type: float = 2.0,
                            error_if_nonfinite: bool = True) -> None:
        """ZeRO's gradients are partitioned, reduced and unscaled inside the engine's step: the coming step clips
        them to `max_norm` (the engine's own 2-norm; read it after the step with `engine.get_global_grad_norm()`).
        Returns None: the norm is known only in the step."""
        if float(norm_type) != 2.0:
            raise ConfigurationError(f"DeepSpeed clips gradients by their 2-norm only, not norm_type={norm_type!r}.")
        zero = self._zero_optimizer("clip_gradients")
        zero.clip_grad = float(max_norm)

    def clip_gradients_value(self, module: nn.Module, optimizer, clip_val: float) -> None:
        raise ConfigurationError("DeepSpeed clips gradients by norm only: use fabric.clip_gradients(model, optimizer, "
                                 "max_norm=...), or 'gradient_clipping' in the DeepSpeed config.")

    def _zero_optimizer(self, what: str):
        if self.engine is None or self.engine.engine is None or self.engine.optimizer is None:
            raise UsageError(f"{what} under DeepSpeed needs the engine and its optimizer: call "
                             "fabric.setup(model, optimizer) first.")
        return self.engine.engine.optimizer
