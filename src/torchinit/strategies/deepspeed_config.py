"""The DeepSpeed config a strategy runs with: Lightning's, built from `DeepSpeedStrategy`'s arguments as Lightning
builds it, the precision's section, and the user's `config` merged over it."""

from __future__ import annotations

import torch

from torchinit.core.errors import ConfigurationError
from torchinit.options import DeepSpeedStrategy
from torchinit.plan import Plan

__all__ = ["config", "lightning_config", "param_dtype"]


def param_dtype(plan: Plan) -> torch.dtype:
    """DeepSpeed keeps parameters in the half dtype for both true and mixed half precisions (fp32 master
    weights live in its optimizer)."""
    if plan.precision in ("bf16-true", "bf16-mixed"):
        return torch.bfloat16
    if plan.precision in ("16-true", "16-mixed"):
        return torch.float16
    if plan.precision == "64-true":
        raise ConfigurationError(
            "DeepSpeed does not train in float64: use precision '32-true', 'bf16-mixed' or '16-mixed'.")
    return torch.float32


def config(plan: Plan, options: DeepSpeedStrategy) -> dict:
    """The engine's config: Lightning's, from the strategy's arguments (when no `config` is given; else the stage
    alone), the precision's section, and `options.config` merged over it (its entries win)."""
    base = lightning_config(options) if options.config is None else \
        {"zero_optimization": {"stage": options.stage}, "zero_allow_untested_optimizer": True}
    # micro batch 1: Fabric drives the loop. Fabric users bring any torch optimizer; DeepSpeed refuses all but its
    # tested few unless told otherwise.
    base["train_micro_batch_size_per_gpu"] = options.logging_batch_size_per_gpu or 1
    dtype = param_dtype(plan)
    if dtype == torch.bfloat16:
        base["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        base["fp16"] = {"enabled": True, "loss_scale": options.loss_scale,
                        "initial_scale_power": options.initial_scale_power,
                        "loss_scale_window": options.loss_scale_window, "hysteresis": options.hysteresis,
                        "min_loss_scale": options.min_loss_scale}
    return _merge(base, options.config or {})


def lightning_config(o: DeepSpeedStrategy) -> dict:
    """The config Lightning's DeepSpeedStrategy builds from the same arguments (its `_create_default_config`)."""
    zero = {"stage": o.stage, "contiguous_gradients": o.contiguous_gradients, "overlap_comm": o.overlap_comm,
            "allgather_partitions": o.allgather_partitions, "reduce_scatter": o.reduce_scatter,
            "allgather_bucket_size": o.allgather_bucket_size, "reduce_bucket_size": o.reduce_bucket_size,
            "sub_group_size": o.sub_group_size}
    if o.offload_optimizer:
        zero["offload_optimizer"] = {"device": o.offload_optimizer_device, "nvme_path": o.nvme_path,
                                     "buffer_count": o.optimizer_buffer_count, "pin_memory": o.pin_memory}
    if o.offload_parameters:
        zero["offload_param"] = {"device": o.offload_params_device, "nvme_path": o.nvme_path,
                                 "buffer_count": o.params_buffer_count, "buffer_size": o.params_buffer_size,
                                 "max_in_cpu": o.max_in_cpu, "pin_memory": o.pin_memory}
    return {
        "activation_checkpointing": {
            "partition_activations": o.partition_activations, "cpu_checkpointing": o.cpu_checkpointing,
            "contiguous_memory_optimization": o.contiguous_memory_optimization,
            "synchronize_checkpoint_boundary": o.synchronize_checkpoint_boundary},
        "aio": {"block_size": o.block_size, "queue_depth": o.queue_depth, "single_submit": o.single_submit,
                "overlap_events": o.overlap_events, "thread_count": o.thread_count},
        "zero_allow_untested_optimizer": o.zero_allow_untested_optimizer,
        "zero_optimization": zero,
    }


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
