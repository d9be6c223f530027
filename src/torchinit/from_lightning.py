"""Lightning's strategy objects as torchinit's options, argument by argument.

Programs built on Lightning make their strategy themselves (litgpt: `lightning.fabric.strategies.FSDPStrategy(
auto_wrap_policy={Block}, state_dict_type="full", ...)`) and hand it to Fabric. Each argument the object holds is
carried into `options.py`'s class of the same name, or the object is refused with an error naming the argument and
why — none is dropped. lightning is never imported: its objects are recognized by their class's module and read
by attribute (the names Lightning 2.6 stores them under).
"""

from __future__ import annotations

from typing import Any

from torchinit.core.errors import ConfigurationError
from torchinit.options import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

__all__ = ["is_lightning", "is_lightning_class", "translate"]

FABRIC_MODULES = ("lightning.fabric.", "lightning_fabric.")
TRAINER_MODULES = ("lightning.pytorch.", "pytorch_lightning.")

# FSDP1 constructor arguments (Lightning's **kwargs) with no FSDP2 counterpart, and why
FSDP1_ONLY = {
    "param_init_fn": "torchinit materializes meta parameters itself (the recorded init, or reset_parameters)",
    "ignored_modules": "FSDP2 shards every parameter of a unit; keep such modules out of the model passed to setup",
    "ignored_states": "FSDP2 shards every parameter of a unit; keep such modules out of the model passed to setup",
    "process_group": "pass device_mesh=(replicas, shards) instead; launch() makes the process groups",
    "device_id": "each rank runs on its local device (devices= / the launcher), set by torchinit",
}
DDP_KWARGS = ("find_unused_parameters", "static_graph", "gradient_as_bucket_view", "bucket_cap_mb", "broadcast_buffers")


def is_lightning(obj: object) -> bool:
    """Whether `obj` is one of Lightning's objects (Fabric's or the Trainer's), or of a class derived from one."""
    return any(is_lightning_class(c) for c in type(obj).__mro__)


def is_lightning_class(cls: type) -> bool:
    return cls.__module__.startswith(FABRIC_MODULES + TRAINER_MODULES)


def translate(strategy: Any) -> Any:
    """`strategy` itself unless it is a Lightning strategy object; then torchinit's options (or "single_device")."""
    if not is_lightning(strategy):
        return strategy
    cls = type(strategy)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.startswith(TRAINER_MODULES):
        raise ConfigurationError(f"strategy={name}: that is a Trainer strategy; Fabric takes "
                                 f"lightning.fabric.strategies.{cls.__name__} (or torchinit.{cls.__name__}).")
    if not cls.__module__.startswith(FABRIC_MODULES + TRAINER_MODULES):
        raise ConfigurationError(f"strategy={name} derives from Lightning's "
                                 f"{next(c for c in cls.__mro__ if is_lightning_class(c)).__name__}: what it overrides "
                                 "cannot be carried over to torchinit. Pass Lightning's class itself, or torchinit's.")
    translator = TRANSLATORS.get(cls.__name__)
    if translator is None or not cls.__module__.startswith(tuple(f"{m}strategies" for m in FABRIC_MODULES)):
        raise ConfigurationError(f"strategy={name} has no torchinit counterpart. Use one of "
                                 f"{', '.join(sorted(TRANSLATORS))} (Lightning's or torchinit's), or a name.")
    _refuse_plugins(strategy, cls.__name__)
    return translator(strategy)


def _refuse(owner: str, argument: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"Lightning's {owner}({argument}=...) cannot be carried over to torchinit: {why}.")


def _refuse_plugins(strategy: Any, owner: str) -> None:
    """What Lightning's connector fills in (devices, environment, precision, I/O) comes from Fabric's arguments
    here: a strategy that brings its own is refused."""
    givens = {
        "accelerator": (getattr(strategy, "_accelerator", None), "pass accelerator= to Fabric"),
        "parallel_devices": (getattr(strategy, "_parallel_devices", None), "pass devices= to Fabric"),
        "cluster_environment": (getattr(strategy, "cluster_environment", None),
                                "torchinit reads torchrun's and SLURM's variables itself"),
        "precision": (getattr(strategy, "_precision", None), "pass precision= to Fabric"),
        "checkpoint_io": (getattr(strategy, "_checkpoint_io", None), "fabric.save writes the checkpoint itself"),
    }
    for argument, (value, why) in givens.items():
        if value is not None:
            raise _refuse(owner, argument, why)


def _process_group(strategy: Any) -> dict[str, Any]:
    """Backend and timeout; Lightning's default timeout (torch's) is left to torchinit's own default."""
    from torch.distributed.constants import default_pg_timeout

    timeout = getattr(strategy, "_timeout", None)
    return dict(process_group_backend=getattr(strategy, "_process_group_backend", None),
                timeout=None if timeout == default_pg_timeout else timeout)


def _fsdp(strategy: Any) -> FSDPStrategy:
    kwargs = dict(strategy._fsdp_kwargs)
    policy = kwargs.pop("auto_wrap_policy", None)
    carried = {key: kwargs.pop(key) for key in ("device_mesh", "limit_all_gathers", "use_orig_params",
                                                 "sync_module_states") if key in kwargs}
    backward = kwargs.pop("backward_prefetch", None)
    if backward is not None and getattr(backward, "name", backward) != "BACKWARD_PRE":
        raise _refuse("FSDPStrategy", "backward_prefetch", "FSDP2 prefetches the next all-gather before each backward "
                      "(BACKWARD_PRE) and nothing else")
    if kwargs.pop("forward_prefetch", False):
        raise _refuse("FSDPStrategy", "forward_prefetch", "FSDP2 prefetches in forward only when told which modules "
                      "to prefetch (FSDPModule.set_modules_to_forward_prefetch after setup)")
    if kwargs:
        key = next(iter(kwargs))
        raise _refuse("FSDPStrategy", key, FSDP1_ONLY.get(key, "it is not an argument FSDP2 has"))
    checkpointing = strategy._activation_checkpointing_kwargs
    checkpoint_policy = checkpointing.get("auto_wrap_policy", checkpointing.get("check_fn"))
    return FSDPStrategy(auto_wrap_policy=policy, activation_checkpointing_policy=checkpoint_policy,
                        sharding_strategy=strategy.sharding_strategy.name, state_dict_type=strategy._state_dict_type,
                        cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision, **carried,
                        **_process_group(strategy))


def _ddp(strategy: Any) -> DDPStrategy:
    kwargs = dict(strategy._ddp_kwargs)
    unknown = [key for key in kwargs if key not in DDP_KWARGS]
    if unknown:
        raise _refuse("DDPStrategy", unknown[0], f"torchinit passes {', '.join(DDP_KWARGS)} to "
                      "DistributedDataParallel")
    return DDPStrategy(start_method=strategy._start_method, **kwargs, **_process_group(strategy))


def _deepspeed(strategy: Any) -> DeepSpeedStrategy:
    config = dict(strategy.config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise _refuse("DeepSpeedStrategy", "zero_optimization", f"its config runs ZeRO stage {stage}; torchinit runs "
                      "stages 1-3 (without ZeRO use strategy='ddp')")
    carried = {key: getattr(strategy, key) for key in (
        "remote_device", "load_full_weights", "exclude_frozen_parameters", "loss_scale", "initial_scale_power",
        "loss_scale_window", "hysteresis", "min_loss_scale")}
    return DeepSpeedStrategy(stage=stage, config=config, **carried, **_process_group(strategy))


def _model_parallel(strategy: Any) -> ModelParallelStrategy:
    return ModelParallelStrategy(strategy._parallelize_fn, strategy._data_parallel_size,
                                 strategy._tensor_parallel_size, strategy._save_distributed_checkpoint,
                                 **_process_group(strategy))


def _single_device(strategy: Any) -> str:
    device = strategy._root_device
    if device.index not in (None, 0):
        raise _refuse("SingleDeviceStrategy", "device", f"pass devices=[{device.index}] to Fabric instead")
    return "single_device"


TRANSLATORS = {"FSDPStrategy": _fsdp, "DDPStrategy": _ddp, "DeepSpeedStrategy": _deepspeed,
               "ModelParallelStrategy": _model_parallel, "SingleDeviceStrategy": _single_device}
