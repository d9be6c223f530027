"""Strategy options: what `Fabric(strategy=...)` takes besides a name, with Lightning 2.6's argument names and
defaults, so code written for `lightning.fabric.strategies` switches by changing the import.

Each class only holds and checks its arguments; the strategies (strategies/) act on them. Arguments of Lightning's
that FSDP2 or torchinit does on its own are accepted and documented; the few that cannot be honoured are not
arguments here (a `TypeError` names them), and a Lightning object carrying them is refused (from_lightning.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from torch import nn

from torchinit.core.errors import ArgumentTypeError, ConfigurationError

__all__ = ["DDPStrategy", "DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy", "SHARDING_STRATEGIES",
           "WrapPolicy"]

# a set of module classes, a predicate `fn(module) -> bool`, FSDP1's `fn(module, recurse, nonwrapped_numel)`, a
# `torch.distributed.fsdp.wrap` policy object (ModuleWrapPolicy, CustomPolicy), or None
WrapPolicy = set[type[nn.Module]] | Callable[..., bool] | Any | None

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
START_METHODS = ("popen", "spawn")


def _set(obj: object, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def _check_process_group(owner: str, backend: str | None, timeout: timedelta | None) -> None:
    if backend is not None and not isinstance(backend, str):
        raise ArgumentTypeError(f"{owner}(process_group_backend={backend!r}): name a backend, e.g. 'gloo' or 'nccl'.")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise ArgumentTypeError(f"{owner}(timeout={timeout!r}): pass a datetime.timedelta.")


@dataclass(frozen=True)
class FSDPStrategy:
    """FSDP2 (`fully_shard`) with Lightning's `FSDPStrategy` arguments: `Fabric(strategy=FSDPStrategy(...))`;
    `strategy="fsdp"` is `FSDPStrategy()`.

    Args:
        wrap / auto_wrap_policy (one name, two spellings): which modules become their own shard group: a set of
            module classes, a predicate `fn(module)`, an FSDP1 policy (`fn(module, recurse, nonwrapped_numel)`,
            `ModuleWrapPolicy`, `CustomPolicy`), or None for every element of every `nn.ModuleList`. The root
            always is one.
        reshard_after_forward: free the gathered parameters after forward (less memory, one more all-gather).
        cpu_offload: keep shards and optimizer state on the CPU (CUDA only); also FSDP1's `CPUOffload` or
            FSDP2's `CPUOffloadPolicy`.
        record_init: `init_module()` records the init on fake tensors and `setup` replays it, so the sharded
            model equals the eager one (`torchinit.RecordContext`). False: parameters on meta, initialized in
            `setup` by each module's own init (`reset_parameters`), for code the recorder cannot follow.
        activation_checkpointing_policy: the modules whose activations are recomputed in backward instead of
            kept (same forms as `auto_wrap_policy`). `activation_checkpointing`: Lightning's deprecated form
            (a class or a list of classes).
        sharding_strategy: "FULL_SHARD"; "SHARD_GRAD_OP" (parameters stay gathered from forward to backward);
            "NO_SHARD" (replicated, as DDP); "HYBRID_SHARD" (sharded within `device_mesh[1]` ranks, replicated
            across `device_mesh[0]`; by default the devices of a node and the nodes); "_HYBRID_SHARD_ZERO2";
            or the `torch.distributed.fsdp.ShardingStrategy` member.
        device_mesh: `(replication size, sharding size)` for the hybrid strategies, or a 2-D `DeviceMesh`.
        state_dict_type: "sharded": `fabric.save` writes a `torch.distributed.checkpoint` folder, each rank its
            shards; "full": one file written by rank 0, gathered one tensor at a time, that `torch.load` reads.
        mixed_precision: FSDP2's `MixedPrecisionPolicy` or FSDP1's `MixedPrecision` (its param and reduce
            dtypes; FSDP2 manages no buffers, so `buffer_dtype` is refused). None: from Fabric's precision.
        limit_all_gathers / use_orig_params: FSDP1's; FSDP2 always bounds its all-gathers and trains the
            original parameters (`use_orig_params=False` is refused).
        sync_module_states: broadcast rank 0's real parameters and buffers before sharding (values built in
            `init_module` are the same on every rank anyway).
        process_group_backend, timeout: of the process group `launch()` makes.
    """

    wrap: WrapPolicy = None
    reshard_after_forward: bool = True
    cpu_offload: Any = False
    record_init: bool = True
    auto_wrap_policy: WrapPolicy = None
    activation_checkpointing_policy: WrapPolicy = None
    activation_checkpointing: Any = None
    sharding_strategy: Any = "FULL_SHARD"
    state_dict_type: str = "sharded"
    mixed_precision: Any = None
    device_mesh: Any = None
    limit_all_gathers: bool = True
    use_orig_params: bool = True
    sync_module_states: bool = False
    process_group_backend: str | None = None
    timeout: timedelta | None = None

    def __post_init__(self) -> None:
        if self.wrap is not None and self.auto_wrap_policy is not None and self.wrap is not self.auto_wrap_policy:
            raise ConfigurationError("FSDPStrategy(wrap=..., auto_wrap_policy=...): they are one argument under two "
                                     "names; pass one of them.")
        policy = self.wrap if self.wrap is not None else self.auto_wrap_policy
        _set(self, wrap=policy, auto_wrap_policy=policy)
        if self.activation_checkpointing is not None:
            if self.activation_checkpointing_policy is not None:
                raise ConfigurationError("FSDPStrategy: pass activation_checkpointing_policy, not also the deprecated "
                                         "activation_checkpointing.")
            classes = self.activation_checkpointing
            classes = set(classes) if isinstance(classes, (list, tuple, set)) else {classes}
            warnings.warn(f"FSDPStrategy(activation_checkpointing=...) is deprecated (as in Lightning): use "
                          f"activation_checkpointing_policy={classes}.", DeprecationWarning, stacklevel=3)
            _set(self, activation_checkpointing_policy=classes, activation_checkpointing=None)
        name = getattr(self.sharding_strategy, "name", self.sharding_strategy)
        name = name.upper() if isinstance(name, str) and name.upper() in SHARDING_STRATEGIES else name
        if name not in SHARDING_STRATEGIES:
            raise ConfigurationError(f"FSDPStrategy(sharding_strategy={self.sharding_strategy!r}) is not one of "
                                     f"{', '.join(SHARDING_STRATEGIES)}.")
        _set(self, sharding_strategy=name)
        if self.state_dict_type not in ("full", "sharded"):
            raise ConfigurationError(f"FSDPStrategy(state_dict_type={self.state_dict_type!r}): use 'full' (one file) "
                                     "or 'sharded' (a folder of shards).")
        if self.device_mesh is not None and name in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise ConfigurationError(f"FSDPStrategy(device_mesh=...) lays out the hybrid strategies; with "
                                     f"sharding_strategy={name!r} pass no device_mesh (or use 'HYBRID_SHARD').")
        if not self.use_orig_params:
            raise ConfigurationError("FSDPStrategy(use_orig_params=False): FSDP2 always trains the original "
                                     "parameters (as DTensor shards); there are no flat parameters to ask for.")
        _set(self, cpu_offload=_cpu_offload(self.cpu_offload), mixed_precision=_mixed_precision(self.mixed_precision))
        _check_process_group("FSDPStrategy", self.process_group_backend, self.timeout)

    @property
    def hybrid(self) -> bool:
        """Whether the parameters are laid out on a 2-D (replicate, shard) mesh."""
        return "HYBRID" in self.sharding_strategy or self.sharding_strategy == "NO_SHARD"

    @property
    def resharded(self) -> bool:
        """Whether gathered parameters are freed after forward (not under the ZeRO-2-like strategies)."""
        return self.reshard_after_forward and self.sharding_strategy not in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2")

    def resolved(self, world_size: int, num_nodes: int) -> FSDPStrategy:
        """The same options with the mesh of the hybrid strategies as (replicate, shard) sizes, checked against the
        world size (a `DeviceMesh` given is used as it is)."""
        if not self.hybrid or self.device_mesh is not None and not isinstance(self.device_mesh, (tuple, list)):
            return self
        if self.device_mesh is not None:
            shape = tuple(self.device_mesh)
        else:
            shape = (world_size, 1) if self.sharding_strategy == "NO_SHARD" else (num_nodes, world_size // num_nodes)
        if self.sharding_strategy == "NO_SHARD" and shape[1:] != (1,):
            raise ConfigurationError(f"FSDPStrategy(sharding_strategy='NO_SHARD', device_mesh={self.device_mesh!r}): "
                                     "NO_SHARD replicates on every rank, so its mesh is (world size, 1).")
        if len(shape) != 2 or not all(isinstance(n, int) and n >= 1 for n in shape) or shape[0] * shape[1] != \
                world_size:
            raise ConfigurationError(
                f"FSDPStrategy(sharding_strategy={self.sharding_strategy!r}, device_mesh={self.device_mesh!r}): the "
                f"2-D mesh (replicas, shards) must hold all {world_size} processes (devices x num_nodes); "
                f"{shape!r} does not. Pass device_mesh=(replicas, shards) with replicas x shards = {world_size}.")
        return dataclasses.replace(self, device_mesh=shape)


def _cpu_offload(value: Any) -> Any:
    """A bool, or FSDP2's `CPUOffloadPolicy` kept as it is (its `pin_memory`); FSDP1's `CPUOffload` as a bool."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if isinstance(value, bool):
        return value
    if isinstance(value, CPUOffloadPolicy):
        return value
    if isinstance(value, OffloadPolicy):
        return False
    if type(value).__name__ == "CPUOffload" and hasattr(value, "offload_params"):
        return bool(value.offload_params)
    raise ArgumentTypeError(f"FSDPStrategy(cpu_offload={value!r}): pass True / False, FSDP1's CPUOffload or "
                            "FSDP2's CPUOffloadPolicy.")


def _mixed_precision(value: Any) -> Any:
    """None or FSDP2's `MixedPrecisionPolicy`; FSDP1's `MixedPrecision` becomes one (or is refused, naming the
    field FSDP2 cannot honour)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if value is None or isinstance(value, MixedPrecisionPolicy):
        return value
    if type(value).__name__ != "MixedPrecision" or not hasattr(value, "param_dtype"):
        raise ArgumentTypeError(f"FSDPStrategy(mixed_precision={value!r}): pass FSDP2's MixedPrecisionPolicy or "
                                "FSDP1's MixedPrecision.")
    if value.buffer_dtype is not None:
        raise ConfigurationError(
            f"FSDPStrategy(mixed_precision=MixedPrecision(buffer_dtype={value.buffer_dtype})): FSDP2 does not manage "
            "buffers, so it cannot cast them. Drop buffer_dtype (buffers stay in the precision's dtype), or use "
            "precision='bf16-true' / '16-true' to store everything in half precision.")
    if value.keep_low_precision_grads:
        raise ConfigurationError("FSDPStrategy(mixed_precision=MixedPrecision(keep_low_precision_grads=True)): FSDP2 "
                                 "keeps gradients in the parameters' dtype; set it to False.")
    return MixedPrecisionPolicy(param_dtype=value.param_dtype, reduce_dtype=value.reduce_dtype,
                                cast_forward_inputs=value.cast_forward_inputs or value.cast_root_forward_inputs)


@dataclass(frozen=True)
class DDPStrategy:
    """DistributedDataParallel with Lightning's `DDPStrategy` arguments: `strategy="ddp"` is `DDPStrategy()`.

    `find_unused_parameters`, `static_graph`, `gradient_as_bucket_view`, `bucket_cap_mb` and `broadcast_buffers`
    (Lightning's `**kwargs`) go to `DistributedDataParallel`. `start_method`: "popen" and "spawn" both run
    (`launch(fn)` spawns, `launch()` re-runs the script); forking is refused (it would copy this process's threads
    and devices).
    """

    process_group_backend: str | None = None
    timeout: timedelta | None = None
    start_method: str = "popen"
    find_unused_parameters: bool = False
    static_graph: bool = False
    gradient_as_bucket_view: bool = False
    bucket_cap_mb: float | None = None
    broadcast_buffers: bool = True

    def __post_init__(self) -> None:
        if self.start_method not in START_METHODS:
            raise ConfigurationError(
                f"DDPStrategy(start_method={self.start_method!r}): torchinit starts processes by spawning "
                "(launch(fn)) or by re-running the script (launch()), never by forking this process (its threads "
                f"and devices would be copied). Use one of {', '.join(START_METHODS)}.")
        _check_process_group("DDPStrategy", self.process_group_backend, self.timeout)

    def ddp_kwargs(self) -> dict[str, Any]:
        """What `DistributedDataParallel` is given besides the module."""
        kwargs = dict(find_unused_parameters=self.find_unused_parameters, static_graph=self.static_graph,
                      gradient_as_bucket_view=self.gradient_as_bucket_view, broadcast_buffers=self.broadcast_buffers)
        if self.bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = self.bucket_cap_mb
        return kwargs


@dataclass(frozen=True)
class DeepSpeedStrategy:
    """DeepSpeed ZeRO with Lightning's `DeepSpeedStrategy` arguments: `Fabric(strategy=DeepSpeedStrategy(stage=3))`.

    `"deepspeed"` is stage 2 (as in Lightning), `"deepspeed_stage_N"` stage N, `"deepspeed_stage_N_offload"` with
    offload. The DeepSpeed config is built from these arguments as Lightning builds it (offload, aio, activation
    checkpointing, bucket sizes) plus the precision's section (fp16 with the loss-scale arguments); `config`
    entries are merged over it (yours win). Stage 3 records the init in `init_module()` and replays it into the
    partitions in `setup` (`record_init=False`: partition each module as it is built, under
    `deepspeed.zero.Init(remote_device=...)`). `load_full_weights`: a one-file checkpoint always loads (each rank
    its partition). `exclude_frozen_parameters` is passed to the engine's save; `logging_level` to DeepSpeed's
    logger when the engine is made.
    """

    stage: int = 2
    config: dict | None = None
    record_init: bool = True
    zero_optimization: bool = True
    remote_device: str | None = None
    offload_optimizer: bool = False
    offload_parameters: bool = False
    offload_params_device: str = "cpu"
    nvme_path: str = "/local_nvme"
    params_buffer_count: int = 5
    params_buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    offload_optimizer_device: str = "cpu"
    optimizer_buffer_count: int = 4
    block_size: int = 1048576
    queue_depth: int = 8
    single_submit: bool = False
    overlap_events: bool = True
    thread_count: int = 1
    pin_memory: bool = False
    sub_group_size: int = 1_000_000_000_000
    contiguous_gradients: bool = True
    overlap_comm: bool = True
    allgather_partitions: bool = True
    reduce_scatter: bool = True
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    zero_allow_untested_optimizer: bool = True
    logging_batch_size_per_gpu: int | None = None
    logging_level: int | None = None
    loss_scale: float = 0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: int = 1
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    synchronize_checkpoint_boundary: bool = False
    load_full_weights: bool = False
    exclude_frozen_parameters: bool = False
    process_group_backend: str | None = None
    timeout: timedelta | None = None

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigurationError(f"DeepSpeedStrategy(stage={self.stage!r}): ZeRO stages are 1, 2 and 3.")
        if not self.zero_optimization:
            raise ConfigurationError("DeepSpeedStrategy(zero_optimization=False): torchinit runs DeepSpeed's ZeRO "
                                     "stages 1-3; without ZeRO use strategy='ddp'.")
        if self.config is not None and not isinstance(self.config, dict):
            raise ArgumentTypeError(f"DeepSpeedStrategy(config={self.config!r}): pass the config as a dict (read a "
                                    "JSON file with json.load).")
        _check_process_group("DeepSpeedStrategy", self.process_group_backend, self.timeout)


@dataclass(frozen=True)
class ModelParallelStrategy:
    """Tensor parallel x FSDP2 on a 2-D device mesh: `Fabric(strategy=ModelParallelStrategy(...))`.

    The argument names are Lightning's, so code switches by changing the import.

    Args:
        parallelize_fn: `fn(model, device_mesh) -> model`, run in `setup` on the model while it is on meta: it
            applies `parallelize_module` on `device_mesh["tensor_parallel"]` and `fully_shard` on
            `device_mesh["data_parallel"]`. None: a transformers model's own TP plan (`_tp_plan` /
            `base_model_tp_plan`), then `fully_shard` of each block.
        data_parallel_size: ranks in the data-parallel (FSDP) dimension; "auto": the number of nodes (or what the
            world size leaves after `tensor_parallel_size`).
        tensor_parallel_size: ranks in the tensor-parallel dimension; "auto": the devices of one node (or what
            the world size leaves after `data_parallel_size`).
        save_distributed_checkpoint: True: `fabric.save` writes a `torch.distributed.checkpoint` folder; False:
            one file written by rank 0, gathered one tensor at a time.
        process_group_backend, timeout: of the process group `launch()` makes.
        record_init: as for `FSDPStrategy`: record the init in `init_module()` and replay it into the shards.
    """

    parallelize_fn: Callable[[nn.Module, object], nn.Module] | None = None
    data_parallel_size: int | str = "auto"
    tensor_parallel_size: int | str = "auto"
    save_distributed_checkpoint: bool = True
    process_group_backend: str | None = None
    timeout: timedelta | None = None
    record_init: bool = True

    def __post_init__(self) -> None:
        _check_process_group("ModelParallelStrategy", self.process_group_backend, self.timeout)

    def resolved(self, world_size: int, num_nodes: int) -> ModelParallelStrategy:
        """The same options with both sizes as numbers, checked against the world size."""
        for name in ("data_parallel_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigurationError(f"ModelParallelStrategy({name}={value!r}): use a positive number or 'auto'.")
        dp, tp = self.data_parallel_size, self.tensor_parallel_size
        if dp == "auto" and tp == "auto":
            dp, tp = num_nodes, world_size // num_nodes
        elif dp == "auto":
            dp = world_size // tp if world_size % tp == 0 else 0
        elif tp == "auto":
            tp = world_size // dp if world_size % dp == 0 else 0
        if dp * tp != world_size:
            raise ConfigurationError(
                f"ModelParallelStrategy(data_parallel_size={self.data_parallel_size!r}, tensor_parallel_size="
                f"{self.tensor_parallel_size!r}): the mesh must hold all {world_size} processes (devices x num_nodes)"
                f", so the two sizes must multiply to {world_size}. Change one of them (or devices).")
        return dataclasses.replace(self, data_parallel_size=dp, tensor_parallel_size=tp)
