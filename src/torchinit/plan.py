"""Plan: turn Fabric's accelerator / devices / precision / strategy arguments into one frozen object.

Everything downstream (the init context, setup, the wrappers) reads the plan and nothing else, so all
argument checking happens here, once, with errors that list what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from torchinit import from_lightning
from torchinit.core.errors import ConfigurationError, UnsupportedError
from torchinit.options import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, WrapPolicy

__all__ = ["DDPStrategy", "DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy", "Plan", "WrapPolicy",
           "make_plan"]

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
Options = FSDPStrategy | DDPStrategy | DeepSpeedStrategy | ModelParallelStrategy
# Lightning's strategy names, each the options it stands for
NAMED_STRATEGIES: dict[str, Callable[[], Options]] = {
    "ddp": DDPStrategy,
    "ddp_spawn": functools.partial(DDPStrategy, start_method="spawn"),
    "ddp_find_unused_parameters_true": functools.partial(DDPStrategy, find_unused_parameters=True),
    "fsdp": FSDPStrategy,
    "fsdp_cpu_offload": functools.partial(FSDPStrategy, cpu_offload=True),
    "deepspeed": DeepSpeedStrategy,
    "deepspeed_stage_1": functools.partial(DeepSpeedStrategy, stage=1),
    "deepspeed_stage_1_offload": functools.partial(DeepSpeedStrategy, stage=1, offload_optimizer=True),
    "deepspeed_stage_2": functools.partial(DeepSpeedStrategy, stage=2),
    "deepspeed_stage_2_offload": functools.partial(DeepSpeedStrategy, stage=2, offload_optimizer=True),
    "deepspeed_stage_3": functools.partial(DeepSpeedStrategy, stage=3),
    "deepspeed_stage_3_offload": functools.partial(DeepSpeedStrategy, stage=3, offload_optimizer=True,
                                                   offload_parameters=True),
    "deepspeed_stage_3_offload_nvme": functools.partial(
        DeepSpeedStrategy, stage=3, offload_optimizer=True, offload_parameters=True, remote_device="nvme",
        offload_params_device="nvme", offload_optimizer_device="nvme"),
}
# the options class -> the strategy that runs it (strategies/select.py)
KINDS: dict[type, str] = {FSDPStrategy: "fsdp", DDPStrategy: "ddp", DeepSpeedStrategy: "deepspeed",
                          ModelParallelStrategy: "model_parallel"}
MODEL_PARALLEL_PRECISIONS = ("64-true", "32-true", "bf16-true", "16-true", "bf16-mixed")


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
    options: Options | None = None  # the strategy's settings (options.py)

    @property
    def mixed(self) -> bool:
        return self.autocast_dtype is not None

    @property
    def world_size(self) -> int:
        return len(self.device_indices) * self.num_nodes

    @property
    def multi_process(self) -> bool:
        return self.strategy != "single_device"

    @property
    def process_group(self) -> tuple[str | None, timedelta | None]:
        """The backend and timeout the strategy's options ask of the process group (None: the defaults)."""
        return getattr(self.options, "process_group_backend", None), getattr(self.options, "timeout", None)

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


def resolve_strategy(strategy: object, num_devices: int) -> tuple[str, Options | None]:
    """(the strategy that runs it, its options): from a name, one of our options objects, or a Lightning strategy
    object (translated argument by argument, from_lightning.py)."""
    strategy = from_lightning.translate(strategy)
    if strategy == "auto":
        strategy = "ddp" if num_devices > 1 else "single_device"
    if strategy == "single_device":
        if num_devices > 1:
            raise ConfigurationError(f"strategy='single_device' runs one process, but devices asks for {num_devices}: "
                                     "use strategy='ddp' (or 'auto').")
        return "single_device", None
    if isinstance(strategy, str) and strategy in NAMED_STRATEGIES:
        strategy = NAMED_STRATEGIES[strategy]()
    if type(strategy) not in KINDS:
        raise ConfigurationError(
            f"strategy={strategy!r} is not supported. Choose one of: "
            f"{', '.join(SINGLE_DEVICE_STRATEGIES + tuple(NAMED_STRATEGIES))}, or pass a strategy object "
            f"({', '.join(cls.__name__ for cls in KINDS)}, torchinit's or Lightning's).")
    kind = KINDS[type(strategy)]
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UnsupportedError(f"strategy={strategy!r} needs DeepSpeed, which is not installed: "
                               "`pip install deepspeed` (on a machine without a GPU, also set DS_ACCELERATOR=cpu).")
    return kind, strategy


def make_plan(accelerator: str, strategy: object, devices: object, num_nodes: int, precision: object) -> Plan:
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
        raise ConfigurationError(f"num_nodes={num_nodes!r} is not valid: use a positive number.")
    resolved_accelerator = resolve_accelerator(accelerator)
    wants_many = not isinstance(strategy, str) or strategy not in SINGLE_DEVICE_STRATEGIES or num_nodes > 1
    indices = resolve_devices(resolved_accelerator, devices, wants_many)
    resolved_strategy, options = resolve_strategy(strategy, len(indices) * num_nodes)
    if isinstance(options, (FSDPStrategy, ModelParallelStrategy)):
        options = options.resolved(len(indices) * num_nodes, num_nodes)
    if resolved_strategy == "model_parallel":
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
