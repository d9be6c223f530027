"""Plan: turn Fabric's accelerator / devices / precision / strategy arguments into one frozen object.

Everything downstream (the init context, setup, the wrappers) reads the plan and nothing else, so all
argument checking happens here, once, with errors that list what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from torchinit.core.errors import ConfigurationError, UnsupportedError

# canonical precision -> (dtype of parameters, autocast dtype or None)
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "64-true": (torch.float64, None),
    "32-true": (torch.float32, None),
    "16-true": (torch.float16, None),
    "bf16-true": (torch.bfloat16, None),
    "16-mixed": (torch.float32, torch.float16),
    "bf16-mixed": (torch.float32, torch.bfloat16),
}
_PRECISION_ALIASES: dict[object, str] = {
    64: "64-true", "64": "64-true", 32: "32-true", "32": "32-true",
    16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed",
}
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
SINGLE_DEVICE_STRATEGIES = ("auto", "single_device")
DEEPSPEED_STAGES = {"deepspeed": 2, "deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_3": 3}
AVAILABLE_MULTI_PROCESS = ("ddp", "ddp_spawn", "fsdp", *DEEPSPEED_STAGES)

WrapPolicy = set[type[nn.Module]] | Callable[[nn.Module], bool] | None


@dataclass(frozen=True)
class FSDPStrategy:
    """FSDP2 options: `Fabric(strategy=FSDPStrategy(...))`; `strategy="fsdp"` is `FSDPStrategy()`.

    Args:
        wrap: which modules become their own shard group: a set of module classes, a predicate on modules,
            or None for every element of every `nn.ModuleList` (transformer blocks). The root always is one.
        reshard_after_forward: free the gathered parameters after forward (less memory, one more all-gather).
        cpu_offload: keep shards and optimizer state on the CPU (CUDA only).
        record_init: `init_module()` records the init on fake tensors and `setup` replays it, so the sharded
            model equals the eager one (`torchinit.RecordContext`). False: parameters on meta, initialized in
            `setup` by each module's own init (`reset_parameters`), for code the recorder cannot follow.
    """

    wrap: WrapPolicy = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    record_init: bool = True


@dataclass(frozen=True)
class DeepSpeedStrategy:
    """DeepSpeed options: `Fabric(strategy=DeepSpeedStrategy(stage=3, config={...}))`.

    `"deepspeed"` is stage 2 (as in Lightning), `"deepspeed_stage_N"` stage N. The DeepSpeed config is built
    from the precision and the stage; `config` entries are merged over it (yours win). Stage 3 records the init
    in `init_module()` and replays it into the partitions in `setup` (`record_init=False`: partition each module
    as it is built, under `deepspeed.zero.Init`).
    """

    stage: int = 2
    config: dict | None = None
    record_init: bool = True

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigurationError(f"DeepSpeedStrategy(stage={self.stage!r}): ZeRO stages are 1, 2 and 3.")


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
        record_init: as for `FSDPStrategy`: record the init in `init_module()` and replay it into the shards.
    """

    parallelize_fn: Callable[[nn.Module, object], nn.Module] | None = None
    data_parallel_size: int | str = "auto"
    tensor_parallel_size: int | str = "auto"
    record_init: bool = True

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


MODEL_PARALLEL_PRECISIONS = ("64-true", "32-true", "bf16-true", "16-true", "bf16-mixed")
MULTI_PROCESS_STRATEGIES = AVAILABLE_MULTI_PROCESS


@dataclass(frozen=True)
class Plan:
    """Where tensors live, in which dtype, how forward runs, and across how many processes.

    `device` is this process's device (local rank 0's until `for_local_rank` is applied by the launcher);
    `device_indices` are the devices of one node, one process each.
    """

    accelerator: str
    device: torch.device
    precision: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    strategy: str
    device_indices: tuple[int, ...] = (0,)
    num_nodes: int = 1
    options: FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy | None = None  # the strategy's settings

    @property
    def mixed(self) -> bool:
        return self.autocast_dtype is not None

    @property
    def world_size(self) -> int:
        return len(self.device_indices) * self.num_nodes

    @property
    def multi_process(self) -> bool:
        return self.strategy != "single_device"

    def for_local_rank(self, local_rank: int) -> Plan:
        return dataclasses.replace(self, device=_device(self.accelerator, self.device_indices[local_rank]))


def parse_precision(precision: object, accelerator: str) -> str:
    """Canonical precision string; '16-mixed' on CPU becomes 'bf16-mixed' with a warning."""
    name = _PRECISION_ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        allowed = sorted(PRECISIONS) + [repr(a) for a in _PRECISION_ALIASES]
        raise ConfigurationError(f"precision={precision!r} is not supported. Choose one of: {', '.join(allowed)}.")
    if name == "16-mixed" and accelerator == "cpu":
        warnings.warn(
            "precision='16-mixed' is not supported on CPU (float16 autocast needs a GPU); using 'bf16-mixed'.",
            stacklevel=3,
        )
        name = "bf16-mixed"
    return name


def resolve_accelerator(accelerator: str) -> str:
    if accelerator not in ACCELERATORS:
        raise ConfigurationError(f"accelerator={accelerator!r} is not supported. Choose one of: "
                                 f"{', '.join(ACCELERATORS)}.")
    cuda, mps = torch.cuda.is_available(), _mps_available()
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if accelerator == "gpu":
        if not (cuda or mps):
            raise UnsupportedError("accelerator='gpu' was requested, but neither CUDA nor MPS is available here. Use "
                                   "accelerator='cpu' or 'auto'.")
        return "cuda" if cuda else "mps"
    if accelerator == "cuda" and not cuda:
        raise UnsupportedError(
            "accelerator='cuda' was requested, but CUDA is not available (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False). Use accelerator='cpu' or 'auto', "
            "or install a CUDA build of torch."
        )
    if accelerator == "mps" and not mps:
        raise UnsupportedError("accelerator='mps' was requested, but MPS is not available on this machine. Use "
                               "accelerator='cpu' or 'auto'.")
    return accelerator


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _device(accelerator: str, index: int) -> torch.device:
    return torch.device("cpu") if accelerator == "cpu" else torch.device(accelerator, index)


def resolve_devices(accelerator: str, devices: object, multi_process: bool) -> tuple[int, ...]:
    """Device indices of one node: `devices` may be N, "N", "auto", -1 (all) or a list of indices."""
    count = torch.cuda.device_count() if accelerator == "cuda" else None  # CPU: any number of processes
    if devices == "auto":
        indices = list(range(count)) if multi_process and count else [0]
    elif isinstance(devices, str) and devices.lstrip("-").isdigit():
        return resolve_devices(accelerator, int(devices), multi_process)
    elif devices == -1 and not isinstance(devices, bool):
        indices = list(range(count if count is not None else 1))
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        indices = list(range(devices))
    elif isinstance(devices, (list, tuple)) and devices and all(isinstance(d, int) for d in devices):
        indices = list(devices)
    else:
        raise ConfigurationError(f"devices={devices!r} is not valid: use a positive number, 'auto', -1, or a list like "
                                 "[0, 1].")
    if len(set(indices)) != len(indices):
        raise ConfigurationError(f"devices={devices!r} names a device twice; list each index once.")
    if accelerator == "cpu":
        if isinstance(devices, (list, tuple)) and indices != list(range(len(indices))):
            raise ConfigurationError(
                f"devices={devices!r}: CPU processes are counted, not indexed; use devices={len(indices)}."
            )
    elif accelerator == "mps" and indices != [0]:
        raise ConfigurationError(f"devices={devices!r}: MPS has one device; use devices=1.")
    elif any(not 0 <= i < count for i in indices):
        raise ConfigurationError(
            f"devices={devices!r} asks for {accelerator} devices {indices}, but this machine has {count} "
            f"{accelerator} device(s) (valid indices: 0..{count - 1})."
        )
    return tuple(indices)


def resolve_strategy(strategy: object, num_devices: int) -> str:
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "model_parallel"
    if isinstance(strategy, DeepSpeedStrategy) or strategy in DEEPSPEED_STAGES:
        if importlib.util.find_spec("deepspeed") is None:
            raise UnsupportedError(f"strategy={strategy!r} needs DeepSpeed, which is not installed: "
                                   "`pip install deepspeed` (on a machine without a GPU, also set DS_ACCELERATOR=cpu).")
        return "deepspeed"
    if strategy == "auto":
        return "ddp" if num_devices > 1 else "single_device"
    if strategy == "single_device":
        if num_devices > 1:
            raise ConfigurationError(f"strategy='single_device' runs one process, but devices asks for {num_devices}: "
                                     "use strategy='ddp' (or 'auto').")
        return "single_device"
    if strategy in AVAILABLE_MULTI_PROCESS:
        return "fsdp" if strategy == "fsdp" else "ddp"
    raise ConfigurationError(
        f"strategy={strategy!r} is not supported. Choose one of: "
        f"{', '.join(SINGLE_DEVICE_STRATEGIES + MULTI_PROCESS_STRATEGIES)}."
    )


def _options(strategy: object, resolved: str) -> FSDPStrategy | DeepSpeedStrategy | ModelParallelStrategy | None:
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        return strategy
    if resolved == "fsdp":
        return FSDPStrategy()
    if resolved == "deepspeed":
        return DeepSpeedStrategy(stage=DEEPSPEED_STAGES[strategy])
    return None


def make_plan(accelerator: str, strategy: object, devices: object, num_nodes: int, precision: object) -> Plan:
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise ConfigurationError(f"num_nodes={num_nodes!r} is not valid: use a positive number.")
    resolved_accelerator = resolve_accelerator(accelerator)
    objects = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
    wants_many = isinstance(strategy, objects) or strategy not in SINGLE_DEVICE_STRATEGIES or num_nodes > 1
    indices = resolve_devices(resolved_accelerator, devices, wants_many)
    resolved_strategy = resolve_strategy(strategy, len(indices) * num_nodes)
    options = _options(strategy, resolved_strategy)
    if resolved_strategy == "model_parallel":
        options = options.resolved(len(indices) * num_nodes, num_nodes)
        given = _PRECISION_ALIASES.get(precision, precision) if isinstance(precision, (str, int)) else precision
        if given in PRECISIONS and given not in MODEL_PARALLEL_PRECISIONS:  # before '16-mixed' turns into bf16 on CPU
            raise ConfigurationError(
                f"ModelParallelStrategy does not support precision={precision!r}: fp16 autocast needs a gradient "
                "scaler, which does not work on tensor-parallel shards. Choose one of: "
                f"{', '.join(MODEL_PARALLEL_PRECISIONS)}.")
    name = parse_precision(precision, resolved_accelerator)
    param_dtype, autocast_dtype = PRECISIONS[name]
    return Plan(
        accelerator=resolved_accelerator,
        device=_device(resolved_accelerator, indices[0]),
        precision=name,
        param_dtype=param_dtype,
        autocast_dtype=autocast_dtype,
        strategy=resolved_strategy,
        device_indices=indices,
        num_nodes=num_nodes,
        options=options,
    )
