"""Gradient clipping for every layout of gradients: plain tensors (one device, DDP) and DTensors (FSDP2 shards, tensor
parallel, both on meshes of their own), with torch's formulas, so a one-device result equals
`torch.nn.utils.clip_grad_norm_` bit for bit and a sharded one is the norm of the full gradients."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from torchinit.core.errors import UsageError

__all__ = ["clip_grad_norm", "clip_grad_value", "total_norm"]


def _grads(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The `norm_type`-norm of all `grads` together. DTensors are grouped by mesh and placements (torch cannot mix
    them in one op); each group's norm is made whole (`full_tensor`: one small collective per group), then the
    groups' norms are combined as plain numbers."""
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    parts = []
    for members in groups.values():
        norm = torch.nn.utils.get_total_norm(members, norm_type, error_if_nonfinite=False)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(parts) == 1:
        return parts[0]
    device = parts[0].device
    return torch.linalg.vector_norm(torch.stack([p.to(device) for p in parts]), norm_type)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                   error_if_nonfinite: bool = True) -> torch.Tensor:
    """Scale the gradients so that their total norm is at most `max_norm`; returns the norm before clipping."""
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    norm = total_norm(grads, norm_type)
    if error_if_nonfinite and torch.logical_or(norm.isnan(), norm.isinf()):
        raise UsageError(f"The total norm of order {norm_type} of the gradients is non-finite, so it cannot be "
                         "clipped. Pass error_if_nonfinite=False to clip anyway (the gradients become NaN).")
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for g in grads:
            local = g.to_local() if isinstance(g, DTensor) else g
            local.mul_(coef.to(local.device))
    return norm


def clip_grad_value(parameters: Iterable[torch.Tensor], clip_value: float) -> None:
    """Clamp every gradient element to [-clip_value, clip_value] (each rank its own shard: elementwise)."""
    with torch.no_grad():
        for g in _grads(parameters):
            local = g.to_local() if isinstance(g, DTensor) else g
            local.clamp_(min=-clip_value, max=clip_value)
