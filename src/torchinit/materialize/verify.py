"""Verify a materialized model: nothing on meta, nothing unwritten, ties as before, values finite."""

from __future__ import annotations

import torch
from torch import nn

from torchinit.core.errors import VerificationError
from torchinit.core.placement import local_tensor
from torchinit.core.text import shorten
from torchinit.record import pending

__all__ = ["Ties", "tie_groups", "verify"]

Ties = frozenset[frozenset[str]]


def tie_groups(module: nn.Module) -> Ties:
    """Parameter names that share one object (G4), as a set of groups of two or more names."""
    groups: dict[int, set[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return frozenset(frozenset(names) for names in groups.values() if len(names) > 1)


def verify(module: nn.Module, ties: Ties | None = None, check_values: bool = True,
           checked: frozenset[int] = frozenset()) -> None:
    """Raise `VerificationError` naming every problem at once:

    1. a parameter or buffer still on meta;
    2. a parameter that empty init left unwritten and nothing wrote since;
    3. ties different from `ties` (a snapshot from `tie_groups` taken before);
    4. with `check_values`: a parameter that is not finite, or a buffer holding NaN (buffers may hold -inf
       on purpose, as attention masks do), except the tensors in `checked` (ids), whose values their source
       checked already (the checkpoint reader, naming the file). One min/max pass per tensor, one device sync.
    """
    problems = []
    tensors = _named_tensors(module)
    on_meta = [name for name, t in tensors if t.device.type == "meta"]
    if on_meta:
        problems.append(f"still on the meta device: {shorten(on_meta)}")
    unwritten = pending.unwritten_names(module)
    if unwritten:
        problems.append(f"never written (uninitialized memory): {shorten(unwritten)}")
    if ties is not None:
        now = tie_groups(module)
        if now != ties:
            lost = [" = ".join(sorted(g)) for g in ties - now]
            new = [" = ".join(sorted(g)) for g in now - ties]
            problems.append(f"ties changed: lost {lost or 'none'}, new {new or 'none'}")
    if check_values:
        problems += _bad_values([(n, t) for n, t in tensors if t.device.type != "meta" and id(t) not in checked],
                                module)
    if problems:
        raise VerificationError("The materialized model is not sound: " + "; ".join(problems) + ".")


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if b is not None)]


def _bad_values(tensors: list[tuple[str, torch.Tensor]], module: nn.Module) -> list[str]:
    params = {id(p) for p in module.parameters()}
    floating = [(n, t) for n, t in tensors if (t.is_floating_point() or t.is_complex()) and t.numel()]
    extremes: dict[torch.device, list[torch.Tensor]] = {}
    order: dict[torch.device, list[tuple[str, bool]]] = {}
    with torch.no_grad():
        for name, t in floating:
            is_param = id(t) in params
            t = local_tensor(t)  # a DTensor: check this rank's shard
            if not t.numel():
                continue
            flat = torch.view_as_real(t.detach()).reshape(-1) if t.is_complex() else t.detach().reshape(-1)
            flat = flat.half() if flat.itemsize == 1 else flat  # float8s have no aminmax; the cast keeps NaN/inf
            low, high = torch.aminmax(flat)  # NaN propagates into both; +-inf shows in one
            extremes.setdefault(t.device, []).append(torch.stack([low, high]).float())
            order.setdefault(t.device, []).append((name, is_param))
    not_finite, nan = [], []
    for device, pairs in extremes.items():
        values = torch.stack(pairs).cpu().tolist()
        for (name, is_param), (low, high) in zip(order[device], values, strict=True):
            if low != low or high != high:
                nan.append(name)
            elif is_param and (abs(low) == float("inf") or abs(high) == float("inf")):
                not_finite.append(name)
    problems = []
    if nan:
        problems.append(f"NaN (uninitialized or NaN-poisoned memory, or a broken init) in: {shorten(nan)}")
    if not_finite:
        problems.append(f"infinite values in parameters: {shorten(not_finite)}")
    return problems
