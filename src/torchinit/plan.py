"""Plan: turn Fabric's accelerator / devices / precision / strategy arguments into one frozen object.

Everything downstream (the init context, setup, the wrappers) reads the plan and nothing else, so all
argument checking happens here, once, with errors that list what is allowed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

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
MULTI_PROCESS_STRATEGIES = (
    "ddp", "ddp_spawn", "fsdp", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
)


@dataclass(frozen=True)
class Plan:
    """Where tensors live, in which dtype, and how forward runs."""

    accelerator: str
    device: torch.device
    precision: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    strategy: str

    @property
    def mixed(self) -> bool:
        return self.autocast_dtype is not None


def parse_precision(precision: object, accelerator: str) -> str:
    """Canonical precision string; '16-mixed' on CPU becomes 'bf16-mixed' with a warning."""
    name = _PRECISION_ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        allowed = sorted(PRECISIONS) + [repr(a) for a in _PRECISION_ALIASES]
        raise ValueError(f"precision={precision!r} is not supported. Choose one of: {', '.join(allowed)}.")
    if name == "16-mixed" and accelerator == "cpu":
        warnings.warn(
            "precision='16-mixed' is not supported on CPU (float16 autocast needs a GPU); using 'bf16-mixed'.",
            stacklevel=3,
        )
        name = "bf16-mixed"
    return name


def resolve_accelerator(accelerator: str) -> str:
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is not supported. Choose one of: {', '.join(ACCELERATORS)}.")
    cuda, mps = torch.cuda.is_available(), _mps_available()
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if accelerator == "gpu":
        if not (cuda or mps):
            raise RuntimeError("accelerator='gpu' was requested, but neither CUDA nor MPS is available here.")
        return "cuda" if cuda else "mps"
    if accelerator == "cuda" and not cuda:
        raise RuntimeError(
            "accelerator='cuda' was requested, but CUDA is not available (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False). Use accelerator='cpu' or 'auto', "
            "or install a CUDA build of torch."
        )
    if accelerator == "mps" and not mps:
        raise RuntimeError("accelerator='mps' was requested, but MPS is not available on this machine.")
    return accelerator


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(accelerator: str, devices: object) -> torch.device:
    """One device for single-process strategies: devices may be 1, 'auto', '1', or [index]."""
    count = torch.cuda.device_count() if accelerator == "cuda" else 1
    if devices in ("auto", 1, "1"):
        index = 0
    elif isinstance(devices, (list, tuple)) and len(devices) == 1 and isinstance(devices[0], int):
        index = devices[0]
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 1:
        raise NotImplementedError(
            f"devices={devices} needs a multi-process strategy (ddp, fsdp, deepspeed), which is not available "
            "yet in torchinit. Use devices=1."
        )
    else:
        raise ValueError(f"devices={devices!r} is not valid: use 1, 'auto', or a one-element list like [0].")
    if not 0 <= index < count:
        raise ValueError(
            f"devices={devices!r} asks for {accelerator} device {index}, but this machine has {count} "
            f"{accelerator} device(s) (valid indices: 0..{count - 1})."
        )
    if accelerator == "cpu":
        return torch.device("cpu")
    return torch.device(accelerator, index)


def resolve_strategy(strategy: object) -> str:
    if strategy in SINGLE_DEVICE_STRATEGIES:
        return "single_device"
    if strategy in MULTI_PROCESS_STRATEGIES:
        raise NotImplementedError(
            f"strategy={strategy!r} is not available yet in torchinit (multi-process strategies come with the "
            f"distributed work). Available now: {', '.join(SINGLE_DEVICE_STRATEGIES)}."
        )
    raise ValueError(
        f"strategy={strategy!r} is not supported. Choose one of: "
        f"{', '.join(SINGLE_DEVICE_STRATEGIES + MULTI_PROCESS_STRATEGIES)}."
    )


def make_plan(accelerator: str, strategy: object, devices: object, num_nodes: int, precision: object) -> Plan:
    if num_nodes != 1:
        raise NotImplementedError(f"num_nodes={num_nodes}: multi-node training is not available yet in torchinit.")
    resolved_strategy = resolve_strategy(strategy)
    resolved_accelerator = resolve_accelerator(accelerator)
    name = parse_precision(precision, resolved_accelerator)
    param_dtype, autocast_dtype = PRECISIONS[name]
    return Plan(
        accelerator=resolved_accelerator,
        device=resolve_device(resolved_accelerator, devices),
        precision=name,
        param_dtype=param_dtype,
        autocast_dtype=autocast_dtype,
        strategy=resolved_strategy,
    )
