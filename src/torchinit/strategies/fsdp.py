"""FSDP2: shard with `fully_shard`, one wrap unit at a time, so a rank never holds more than its shards plus one
unit in full.

1. Choose the units (the policy; by default every block of every ModuleList), skipping any unit that would
   split a tied parameter from its other uses: FSDP2 needs a tie inside one group.
2. For each unit, children first: `materialize` it on the device (its parameters in full, each filled by its
   one source, with the same random stream on every rank), then `fully_shard` it (each rank keeps its slice
   and the full tensors are freed). Values therefore do not depend on the world size (G7).
3. The root last; then the Parameter objects FSDP made are mapped from the ones the user had, so optimizers
   made before `setup` can be pointed at them.

Lightning's arguments (options.py) map onto FSDP2: the units come from `auto_wrap_policy` (policies.py), the
modules of `activation_checkpointing_policy` recompute their activations in backward, `sharding_strategy` is the
mesh and `reshard_after_forward` (the hybrid ones and "NO_SHARD" a 2-D (replicate, shard) mesh, made once in
`start`), `mixed_precision` / `cpu_offload` FSDP2's policies; `state_dict_type="full"` makes the layout one file.

A model built in record mode, with every meta tensor covered by its record, goes another way: every unit is
sharded while still on meta (no memory), then the record is replayed once, in construction order, and each rank
keeps its rows of each full tensor as soon as it is complete. Peak: the local shards plus one full parameter
(and its temporaries); the values are the eager model's, whatever the world size (G3, G7).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from torchinit.core.errors import ConfigurationError, UnsupportedError
from torchinit.materialize.materialize import materialize
from torchinit.materialize.verify import tie_groups, verify
from torchinit.options import FSDPStrategy, WrapPolicy
from torchinit.plan import Plan
from torchinit.record.recording import records_of
from torchinit.strategies.base import Common, Layout, sharded_init_context
from torchinit.strategies.policies import checkpoint_activations, picked
from torchinit.strategies.precision import Precision
from torchinit.strategies.wrappers import FabricModule

__all__ = ["FSDP", "MESH_NAMES", "covers_all_meta", "device_mesh", "shard", "skip_gradient_sync", "units"]

MESH_NAMES = ("replicate", "shard")  # the hybrid strategies' 2-D mesh


class FSDP(Common):
    """FSDP2: setup shards the module in place (DTensor parameters); state is saved as DCP shards, or as one file
    (`state_dict_type="full"`). The mesh is made in `start` (collective)."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.mesh: DeviceMesh | None = None

    @property
    def layout(self) -> Layout:
        return Layout.FULL if self.plan.options.state_dict_type == "full" else Layout.DCP

    def start(self) -> None:
        self.mesh = device_mesh(self.plan)

    def init_context(self, empty_init: bool):
        return sharded_init_context(self.plan, self.plan.options.record_init)

    def make_precision(self, plan: Plan) -> Precision:
        """Lightning's FSDP rule: true precisions (32-true too) cast inputs and run forward in their dtype."""
        dtype = None if plan.mixed else plan.param_dtype
        return Precision(plan, input_dtype=dtype, forward_dtype=dtype)

    def wrap(self, module: nn.Module, move_to_device: bool = True) -> FabricModule:
        if self.mesh is None:
            self.start()
        self.sharded.update(shard(module, self.plan, self.plan.options, self.mesh))
        return FabricModule(module, self.precision)

    def no_backward_sync(self, module: FabricModule, enabled: bool) -> AbstractContextManager:
        return skip_gradient_sync(module.module) if enabled else nullcontext()


@contextlib.contextmanager
def skip_gradient_sync(module: nn.Module) -> Iterator[None]:
    """FSDP2 modules inside keep their gradients unsharded and unreduced (accumulated) until a backward outside."""
    fsdp_modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.set_requires_gradient_sync(True, recurse=False)


def device_mesh(plan: Plan) -> DeviceMesh:
    """1-D over all ranks; 2-D (replicate, shard) for the hybrid strategies and "NO_SHARD" (every rank must call
    it: it makes process groups)."""
    options: FSDPStrategy = plan.options
    if isinstance(options.device_mesh, DeviceMesh):
        return options.device_mesh
    if not options.hybrid:
        return init_device_mesh(plan.device.type, (plan.world_size,))
    try:
        return init_device_mesh(plan.device.type, tuple(options.device_mesh), mesh_dim_names=MESH_NAMES)
    except RuntimeError as error:
        raise UnsupportedError(f"FSDPStrategy(sharding_strategy={options.sharding_strategy!r}) needs a 2-D device "
                               f"mesh {tuple(options.device_mesh)} (replicas, shards), which torch could not make "
                               f"here ({error}). Use sharding_strategy='FULL_SHARD'.") from error


def shard(module: nn.Module, plan: Plan, options: FSDPStrategy, mesh: DeviceMesh | None = None) -> \
        dict[int, nn.Parameter]:
    """Materialize and shard `module` in place; returns {id(old Parameter): new sharded Parameter}.

    The old Parameter objects keep no memory afterwards (an optimizer made from them is remapped by id, and
    holding them keeps the ids unique).
    """
    before = {id(p): (name, p) for name, p in module.named_parameters()}
    ties = tie_groups(module)
    kwargs = _shard_kwargs(plan, options, mesh)
    shard_units = [*units(module, options.wrap), module]
    if options.activation_checkpointing_policy is not None:
        checkpoint_activations(module, options.activation_checkpointing_policy)
    if options.sync_module_states:
        _broadcast_real(module, plan)
    # offloaded shards live on the CPU (FSDP2 checks it, and pins them); a recorded init still draws on its device
    device = torch.device("cpu") if options.cpu_offload else plan.device
    recorded = records_of(module)
    if recorded is not None and covers_all_meta(module, recorded):
        for unit in shard_units:
            fully_shard(unit, **kwargs)
        old = {name: p for name, p in before.values()}
        for name, p in module.named_parameters():
            recorded.rebind(old[name], p)
        materialize(module, device, plan.param_dtype, recorded=recorded, check_values=False)
    else:
        for unit in shard_units:
            full = [p for p in unit.parameters() if not isinstance(p, DTensor)]
            materialize(unit, device, plan.param_dtype, check_values=False)  # children sharded: kept where they are
            fully_shard(unit, **kwargs)
            for p in full:  # FSDP copied this rank's slice; the old objects stay only as keys for optimizers
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    verify(module, ties)
    now = dict(module.named_parameters())
    return {old: now[name] for old, (name, _) in before.items() if name in now}


def covers_all_meta(module: nn.Module, recorded) -> bool:
    """Whether the record can give every meta tensor its value (else: unit by unit, through each module's init)."""
    tensors = [*module.parameters(), *module.buffers()]
    return all(recorded.covers(t) for t in tensors if t.device.type == "meta")


def _broadcast_real(module: nn.Module, plan: Plan) -> None:
    """`sync_module_states`: every real parameter and buffer takes rank 0's values (meta ones get theirs from the
    record or their init, the same on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type != "meta" and not isinstance(t, DTensor):
                carried = t.detach().to(plan.device)
                dist.broadcast(carried, src=0)
                t.copy_(carried)


def _shard_kwargs(plan: Plan, options: FSDPStrategy, mesh: DeviceMesh | None = None) -> dict:
    if options.cpu_offload and plan.device.type != "cuda":
        raise ConfigurationError(
            "FSDPStrategy(cpu_offload=True) moves shards from a GPU to the CPU; on CPU there is nothing "
            "to offload. Use cpu_offload=False.")
    offload = options.cpu_offload if isinstance(options.cpu_offload, CPUOffloadPolicy) else \
        CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy()
    mixed = options.mixed_precision if options.mixed_precision is not None else (
        MixedPrecisionPolicy(param_dtype=plan.autocast_dtype, reduce_dtype=torch.float32) if plan.mixed
        else MixedPrecisionPolicy())
    return dict(mesh=mesh if mesh is not None else device_mesh(plan), reshard_after_forward=options.resharded,
                mp_policy=mixed, offload_policy=offload)


def units(module: nn.Module, wrap: WrapPolicy) -> list[nn.Module]:
    """The modules to shard on their own, children first, root excluded; none that would split a tie."""
    homes: dict[int, set[int]] = {}  # parameter -> modules holding it directly
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None:
                homes.setdefault(id(p), set()).add(id(sub))
    chosen_units, split = [], []
    for path, sub in picked(module, wrap):
        inside = {id(m) for m in sub.modules()}
        tied_out = [name for name, p in sub.named_parameters() if not homes[id(p)] <= inside]
        if tied_out:
            split.append(f"'{path}' ({', '.join(tied_out)})")
            continue
        chosen_units.append(sub)
    if split and wrap is not None:
        warnings.warn(
            f"Not sharding {', '.join(split)} as their own FSDP groups: these parameters are tied to modules outside "
            "them, and a tie must live in one group. They are sharded with their parent instead.",
            stacklevel=4,
        )
    return chosen_units
