"""Tensor parallel x FSDP2 on a 2-D device mesh ("data_parallel", "tensor_parallel"), as Lightning's
ModelParallelStrategy lays it out, with the eager model's values on every mesh.

1. The mesh: `init_device_mesh` over all ranks, data-parallel outer (across nodes), tensor-parallel inner.
2. Shard on meta: `parallelize_fn(model, mesh)` (the user's, or one made from a transformers model's own TP plan,
   tp_plan.py) runs while every tensor is a placeholder; it swaps in DTensor parameters (TP, then FSDP2), which
   costs no memory. Then the checks that need the placements: each TP-sharded attention module's head counts
   divide by the TP size, and ties are as before (a tie split by the plan is an error naming it).
3. Materialize, as FSDP does: in record mode the record is replayed once, in construction order; each rank
   computes every full tensor once and keeps only its part for the placement it got (core/placement.py),
   so a rank holds its shards plus one full tensor at a time, and the gathered values are eager's for every mesh
   shape (G3, G7). With `record_init=False` each module's own init runs on full tensors of that module alone,
   the same on every rank, and each rank keeps its part: the values of a single-process materialize.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchinit.core.errors import ArgumentTypeError, ConfigurationError
from torchinit.core.placement import is_distributed, local_part
from torchinit.materialize.inits import post_order
from torchinit.materialize.materialize import materialize, swap_in
from torchinit.materialize.verify import tie_groups, verify
from torchinit.options import ModelParallelStrategy
from torchinit.plan import Plan
from torchinit.record.recording import records_of
from torchinit.strategies import fsdp, tp_plan
from torchinit.strategies.base import Common, Layout, sharded_init_context
from torchinit.strategies.wrappers import FabricModule

__all__ = ["ModelParallel", "MESH_NAMES", "device_mesh", "shard"]

MESH_NAMES = ("data_parallel", "tensor_parallel")
HEAD_ATTRIBUTES = ("num_heads", "n_heads", "num_attention_heads", "num_kv_heads", "n_kv_heads",
                   "num_key_value_heads")


class ModelParallel(Common):
    """Tensor parallel x FSDP2: setup parallelizes on meta and materializes the shards; state is saved as DCP
    shards (or one file: `save_distributed_checkpoint=False`). The mesh is made in `start` (collective), or given."""

    def __init__(self, plan: Plan, mesh: DeviceMesh | None = None):
        super().__init__(plan)
        self.mesh = mesh

    @property
    def layout(self) -> Layout:
        return Layout.DCP if self.plan.options.save_distributed_checkpoint else Layout.FULL

    def start(self) -> None:
        self.mesh = device_mesh(self.plan)

    def init_context(self, empty_init: bool):
        return sharded_init_context(self.plan, self.plan.options.record_init)

    def no_backward_sync(self, module: FabricModule, enabled: bool) -> AbstractContextManager:
        return fsdp.skip_gradient_sync(module.module) if enabled else nullcontext()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int] | None:
        """The data is split over the data-parallel dimension only: tensor-parallel peers read the same batches."""
        if self.mesh is None:
            self.start()
        dp = self.mesh["data_parallel"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}

    def wrap(self, module: nn.Module, move_to_device: bool = True) -> FabricModule:
        if self.mesh is None:  # one process, never launched: the mesh of this one rank
            self.start()
        forward, sharded = shard(module, self.plan, self.mesh)
        self.sharded.update(sharded)
        return FabricModule(forward, self.precision, original=module)


def device_mesh(plan: Plan) -> DeviceMesh:
    """The 2-D mesh of all ranks (every rank must call it: it makes process groups)."""
    options: ModelParallelStrategy = plan.options
    return init_device_mesh(plan.device.type, (options.data_parallel_size, options.tensor_parallel_size),
                            mesh_dim_names=MESH_NAMES)


def shard(module: nn.Module, plan: Plan, mesh: DeviceMesh) -> tuple[nn.Module, dict[int, nn.Parameter]]:
    """Parallelize `module` on meta and materialize its shards; returns the module to run forward through (what
    `parallelize_fn` returned) and {id(old Parameter): new sharded Parameter} for optimizers made before."""
    options: ModelParallelStrategy = plan.options
    before = {id(p): (name, p) for name, p in module.named_parameters()}
    ties = tie_groups(module)
    heads = _head_counts(module)
    fn = options.parallelize_fn or tp_plan.parallelize_fn_for(module, mesh, plan)
    parallelized = fn(module, mesh)
    if not isinstance(parallelized, nn.Module):
        raise ArgumentTypeError(
            f"parallelize_fn must return the parallelized nn.Module (usually the model it was given), "
            f"but {getattr(fn, '__name__', fn)!r} returned {type(parallelized).__name__}. Add "
            "`return model` at its end.")
    _check_heads(module, heads, mesh)
    _check_ties(module, ties)
    recorded = records_of(module)
    if recorded is not None:
        old = {name: p for name, p in before.values()}
        for name, p in module.named_parameters():
            if name in old and old[name] is not p:
                recorded.rebind(old[name], p)
    if recorded is not None and fsdp.covers_all_meta(module, recorded):
        materialize(module, plan.device, plan.param_dtype, recorded=recorded, check_values=False)
    else:
        _materialize_by_module(module, plan, recorded)
    verify(module, ties)
    now = dict(module.named_parameters())
    return parallelized, {old_id: now[name] for old_id, (name, _) in before.items() if name in now}


def _head_counts(module: nn.Module) -> dict[int, dict[str, int]]:
    """Head counts of attention modules before parallelize_fn (which may set them to the local counts)."""
    found = {}
    for sub in module.modules():
        counts = {a: getattr(sub, a) for a in HEAD_ATTRIBUTES if isinstance(getattr(sub, a, None), int)}
        config = getattr(sub, "config", None)
        for a in ("num_attention_heads", "num_key_value_heads"):
            if isinstance(getattr(config, a, None), int):
                counts.setdefault(a, getattr(config, a))
        if counts:
            found[id(sub)] = counts
    return found


def _check_heads(module: nn.Module, heads: dict[int, dict[str, int]], mesh: DeviceMesh) -> None:
    """Every module with head counts whose projections the plan shards on the TP dimension must split its heads
    evenly: a rank cannot hold part of a head."""
    tp = mesh["tensor_parallel"].size()
    if tp == 1:
        return
    bad: dict[str, list[str]] = {}
    for path, sub in module.named_modules():
        counts = heads.get(id(sub))
        if not counts or not any(_tensor_parallel(p, mesh) for p in sub.parameters()):
            continue
        wrong = [f"{a}={n}" for a, n in counts.items() if n % tp]
        if wrong:
            bad[path] = wrong
    innermost = [p for p in bad if not any(o != p and o.startswith(f"{p}.") or (not p and o) for o in bad)]
    if innermost:
        bad = [f"'{p or '<root>'}' ({type(module.get_submodule(p)).__name__}: {', '.join(bad[p])})" for p in innermost]
        raise ConfigurationError(
            f"tensor_parallel_size={tp} does not divide the head counts of {', '.join(bad[:5])}: each "
            "rank must hold whole attention heads. Choose a tensor_parallel_size that divides them.")


def _tensor_parallel(p: torch.Tensor, mesh: DeviceMesh) -> bool:
    """Whether `p` is sharded (not replicated) on the mesh's tensor-parallel dimension."""
    if not is_distributed(p):
        return False
    names = p.device_mesh.mesh_dim_names or ()
    return "tensor_parallel" in names and p.placements[names.index("tensor_parallel")].is_shard()


def _check_ties(module: nn.Module, ties) -> None:
    now = tie_groups(module)
    lost = [" = ".join(sorted(g)) for g in ties - now]
    if lost:
        raise ConfigurationError(
            f"parallelize_fn split tied parameters ({', '.join(lost)}): they are one tensor in the model, "
            "and sharding one name but not the other makes two. Leave them out of the TP plan, or shard "
            "every module that uses them in the same way.")


def _materialize_by_module(module: nn.Module, plan: Plan, recorded) -> None:
    """Without a record covering every tensor: children first, each module's meta tensors get full plain
    placeholders, filled from the record where it covers them and else by the module's own init (the same random
    stream on every rank), and each rank keeps its part of every DTensor."""
    for _, sub in post_order(module):
        swapped = []
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None and t.device.type == "meta" and is_distributed(t):
                    full = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    table[name] = nn.Parameter(full, requires_grad=t.requires_grad) if table is sub._parameters \
                        else full
                    if recorded is not None:
                        recorded.rebind(t, table[name])  # the record fills the full placeholder
                    swapped.append((table, name, t))
        if _has_meta(sub):
            materialize(sub, plan.device, plan.param_dtype, check_values=False)
        for table, name, t in swapped:
            full = table[name]
            local = local_part(t, full.detach())
            fresh = torch.empty_like(t, device=plan.device, dtype=full.dtype)
            swap_in(t, fresh)
            with torch.no_grad():
                t.to_local().copy_(local)
            table[name] = t


def _has_meta(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in (*module._parameters.values(), *module._buffers.values())
               if t is not None)

