"""A parallelize_fn from a transformers model's own tensor-parallel plan: `_tp_plan` (prefixed, the whole model)
or `config.base_model_tp_plan` (the base model's), styles translated to torch's ParallelStyles, then
`fully_shard` of each block (every element of every ModuleList) and of the root on the data-parallel mesh.

HF styles torch expresses: colwise, rowwise, colwise_rep / colwise_gather_output, rowwise_rep /
rowwise_split_input, embedding_rowwise, embedding_colwise. Others (HF's packed_* and moe_* layers for fused
3-D expert weights, sequence_parallel, ...) are left whole on the tensor-parallel dimension, with a warning, and
FSDP still shards them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from torchinit.core.errors import ConfigurationError
from torchinit.core.placement import is_distributed
from torchinit.materialize.verify import Ties, tie_groups
from torchinit.plan import Plan
from torchinit.strategies import fsdp

STYLES: dict[str, Callable[[], object]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_colwise": lambda: ColwiseParallel(output_layouts=Replicate()),
}


def model_plan(module: nn.Module) -> dict[str, str]:
    """The model's TP plan, keys relative to `module` (may hold `*` for any block index); {} if it has none."""
    plan = getattr(module, "_tp_plan", None)
    if plan:
        return dict(plan)
    config = getattr(module, "config", None)
    base = getattr(config, "base_model_tp_plan", None)
    if not base:
        return {}
    prefix = getattr(module, "base_model_prefix", "")
    inner = prefix if prefix and isinstance(getattr(module, prefix, None), nn.Module) else ""
    return {f"{inner}.{key}" if inner else key: style for key, style in base.items()}


def _layers_only(module: nn.Module, pattern: str) -> bool:
    """Whether the plan key names modules, all of them Linear or Embedding (what torch's styles shard)."""
    import fnmatch

    found = [m for name, m in module.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]
    return bool(found) and all(isinstance(m, (nn.Linear, nn.Embedding)) for m in found)


def parallelize_fn_for(module: nn.Module, mesh: DeviceMesh, plan: Plan) -> Callable[[nn.Module, DeviceMesh],
                                                                                 nn.Module]:
    """The parallelize_fn for a model with a TP plan; raises (model untouched) when it has none or its head counts
    do not divide by the TP size."""
    styles = model_plan(module)
    if not styles:
        raise ConfigurationError(
            f"ModelParallelStrategy(parallelize_fn=None) needs a model with a tensor-parallel plan (a "
            f"transformers model's _tp_plan / config.base_model_tp_plan); {type(module).__name__} has "
            "none. Pass parallelize_fn=fn, where fn(model, device_mesh) applies parallelize_module on "
            "device_mesh['tensor_parallel'] and fully_shard on device_mesh['data_parallel'] and "
            "returns the model.")
    tp = mesh["tensor_parallel"].size()
    config = getattr(module, "config", None)
    for name in ("num_attention_heads", "num_key_value_heads"):
        count = getattr(config, name, None)
        if isinstance(count, int) and count % tp:
            raise ConfigurationError(
                f"tensor_parallel_size={tp} does not divide {type(module).__name__}'s config.{name}="
                f"{count}: each rank must hold whole attention heads. Choose a tensor_parallel_size that"
                " divides it. Nothing was changed.")
    layers = {k for k, s in styles.items() if s in STYLES and _layers_only(module, k)}
    known = {k: STYLES[styles[k]]() for k in layers}
    skipped = sorted(f"{k} ({s})" for k, s in styles.items() if k not in layers)
    if skipped and tp > 1:
        warnings.warn(f"Kept whole on the tensor-parallel dimension (these HF plan styles have no torch "
                      f"ParallelStyle here; FSDP still shards them): {', '.join(skipped)}.", stacklevel=4)
    mixed = MixedPrecisionPolicy(param_dtype=plan.autocast_dtype, reduce_dtype=torch.float32) if plan.mixed \
        else MixedPrecisionPolicy()

    def parallelize(model: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        ties = tie_groups(model)
        if device_mesh["tensor_parallel"].size() > 1:
            parallelize_module(model, device_mesh["tensor_parallel"], known)
            retie(model, ties)
        for unit in [*fsdp.units(model, None), model]:
            fully_shard(unit, mesh=device_mesh["data_parallel"], mp_policy=mixed)
        return model

    return parallelize


def retie(model: nn.Module, ties: Ties) -> None:
    """Tie again what parallelize_module split (it gives each module its own DTensor: a tied embedding and LM head
    become two) where every name got the same layout; the first name's parameter is kept."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for group in ties:
        names = [n for n in params if n in group]  # in module order
        keep = params[names[0]]
        if all(params[n] is keep for n in names) or not all(_same_layout(params[n], keep) for n in names):
            continue  # intact, or split for real (model_parallel reports it)
        for name in names[1:]:
            path, _, attr = name.rpartition(".")
            setattr(model.get_submodule(path), attr, keep)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    if is_distributed(a) != is_distributed(b):
        return False
    if not is_distributed(a):
        return True
    return a.device_mesh == b.device_mesh and tuple(a.placements) == tuple(b.placements)
