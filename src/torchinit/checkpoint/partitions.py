"""Loading into DeepSpeed's live partitions, each rank only its own elements (no gather, no broadcast): a
checkpoint's values into ZeRO-3's parameter partitions (`load_partitions`), and into the optimizer's fp32 master
partitions (`load_masters`, ZeRO 1-3). The partition layout is DeepSpeed's (`core.compat_deepspeed`:
`zero3_partition_range`; `strategies.deepspeed.Engine.flat_partitions`); the saved ZeRO folder's layout is zero.py's.
"""

from __future__ import annotations

from torch import nn

from torchinit.checkpoint.base import Checkpoint
from torchinit.core.compat_deepspeed import (
    is_zero3_param,
    zero3_gathered,
    zero3_local,
    zero3_partition_range,
    zero3_release,
)
from torchinit.strategies.deepspeed import Engine


def load_partitions(module: nn.Module, checkpoint: Checkpoint) -> int:
    """Copy this rank's slice of each checkpoint value (keyed by the module's state-dict names) into the ZeRO-3
    partitions; buffers, which ZeRO-3 does not partition, whole. No gather, no broadcast: each rank reads
    only its own elements. Returns the bytes read.

    Full copies that a forward left gathered (persistent small parameters) are released first, or they would
    keep the old values; the next forward gathers the new ones.
    """
    targets = {k: t for k, t in module.state_dict(keep_vars=True).items() if k in checkpoint}
    params = list({id(t): t for t in targets.values() if is_zero3_param(t)}.values())
    zero3_release([p for p in params if zero3_gathered(p)])
    slices, whole, seen = [], [], set()
    for key, t in targets.items():
        if id(t) in seen:  # a tie: its first name is enough
            continue
        seen.add(id(t))
        if is_zero3_param(t):
            start, end = zero3_partition_range(t)
            slices.append((key, start, end, zero3_local(t).data[: end - start]))
        else:
            whole.append((key, t.data))
    return checkpoint.load_slices(slices) + checkpoint.load_into(whole)


def load_masters(engine: Engine, checkpoint: Checkpoint) -> None:
    """The fp32 master copies straight from the saved values (a bf16 model would round them)."""
    if engine.engine is None or not hasattr(engine.engine.optimizer, "optimizer"):
        return
    names = {id(p): [n for n, q in engine.module.named_parameters(remove_duplicate=False) if q is p]
             for p in engine.module.parameters()}
    items = []
    for flat, members in engine.flat_partitions():
        for p, start, end, offset in members:
            key = next((n for n in names[id(p)] if n in checkpoint), None)
            if key is not None:
                items.append((key, start, end, flat.data[offset:offset + end - start]))
    checkpoint.load_slices(items)
