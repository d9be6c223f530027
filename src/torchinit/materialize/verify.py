"""Verify a materialized model: nothing on meta, nothing unwritten, ties as before, values finite."""

from __future__ import annotations

import torch
from torch import nn

from torchinit.core.errors import VerificationError
from torchinit.core.text import shorten
from torchinit.core.values import INF, NAN, nonfinite
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
    verdicts = nonfinite([t for _, t in tensors])
    nan = [name for (name, _), v in zip(tensors, verdicts, strict=True) if v == NAN]
    not_finite = [name for (name, t), v in zip(tensors, verdicts, strict=True) if v == INF and id(t) in params]
    problems = []
    if nan:
        problems.append(f"NaN (uninitialized or NaN-poisoned memory, or a broken init) in: {shorten(nan)}")
    if not_finite:
        problems.append(f"infinite values in parameters: {shorten(not_finite)}")
    return problems
