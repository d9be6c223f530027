"""Which modules a policy picks (FSDP units, activation checkpointing), in every form Lightning and FSDP1 take, and
activation checkpointing itself.

A policy is a set of module classes, a predicate `fn(module)`, an FSDP1 callable `fn(module, recurse,
nonwrapped_numel)` (`size_based_auto_wrap_policy`, `transformer_auto_wrap_policy`, `ModuleWrapPolicy`, ...), an
FSDP1 policy object (`CustomPolicy`), or None (every element of every `nn.ModuleList`: transformer blocks). FSDP1
callables are asked exactly as FSDP1's recursive wrap asks them (`recurse=True` on the way down, then
`recurse=False` with the parameters not picked below), so a size-based policy picks the same modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchinit.core.compat import fsdp1_policy_targets, is_fsdp1_policy
from torchinit.core.errors import ArgumentTypeError, ConfigurationError
from torchinit.materialize.inits import post_order

__all__ = ["Checkpointed", "checkpoint_activations", "picked"]


def picked(root: nn.Module, policy: Any, argument: str = "auto_wrap_policy") -> list[tuple[str, nn.Module]]:
    """(path, module) of every module `policy` picks under `root`, children first, the root excluded."""
    chosen = _chooser(root, policy, argument)
    return [(path, m) for path, m in post_order(root) if m is not root and chosen(m)]


def _chooser(root: nn.Module, policy: Any, argument: str) -> Callable[[nn.Module], bool]:
    if policy is None:
        blocks = {id(m) for sub in root.modules() if isinstance(sub, nn.ModuleList) for m in sub}
        return lambda m: id(m) in blocks
    if isinstance(policy, (set, frozenset, list, tuple)):
        classes = tuple(policy)
        if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
            raise _wrong(policy, argument)
        return lambda m: isinstance(m, classes)
    if is_fsdp1_policy(policy):
        targets = fsdp1_policy_targets(policy, root)
        overrides = sorted({key for kwargs in targets.values() for key in kwargs})
        if overrides:
            raise ConfigurationError(f"FSDPStrategy({argument}={policy!r}) sets FSDP1 arguments per module "
                                     f"({', '.join(overrides)}); FSDP2 units all share the strategy's. Return "
                                     "True / False from the policy instead.")
        return lambda m: id(m) in targets
    if not callable(policy):
        raise _wrong(policy, argument)
    if _asks_recurse(policy):
        chosen = _recursive(root, policy)
        return lambda m: id(m) in chosen
    return policy


def _wrong(policy: Any, argument: str) -> ArgumentTypeError:
    return ArgumentTypeError(f"FSDPStrategy({argument}=...) takes module classes, a predicate, an FSDP1 policy or "
                             f"None, not {policy!r}: pass e.g. {argument}={{MyBlock}} or {argument}=lambda module: "
                             "....")


def _asks_recurse(fn: Callable) -> bool:
    """Whether `fn` is an FSDP1 policy callable (`module, recurse, nonwrapped_numel`), not a predicate."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    return "recurse" in parameters or len(positional) >= 2


def _recursive(root: nn.Module, policy: Callable) -> set[int]:
    """The modules FSDP1's `_recursive_wrap` would wrap under `root` (root excluded)."""
    chosen: set[int] = set()

    def visit(module: nn.Module) -> int:  # the parameter count wrapped at or under `module`
        total = sum(p.numel() for p in module.parameters())
        if not policy(module=module, recurse=True, nonwrapped_numel=total):
            return 0
        wrapped = sum(visit(child) for child in module.children())
        if module is not root and policy(module=module, recurse=False, nonwrapped_numel=total - wrapped):
            chosen.add(id(module))
            return total
        return wrapped

    visit(root)
    return chosen


class Checkpointed:
    """A module's forward whose activations are recomputed in backward (`torch.utils.checkpoint`, non-reentrant,
    the random state preserved: values and gradients are those of the plain forward). Set as the module's
    `forward` attribute, so names, state dicts and FSDP's hooks stay as they were."""

    def __init__(self, forward: Callable):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing to save for backward: no recomputation
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(root: nn.Module, policy: Any) -> list[str]:
    """Make every module `policy` picks recompute its activations in backward; returns their paths."""
    paths = []
    for path, module in picked(root, policy, "activation_checkpointing_policy"):
        if not isinstance(module.__dict__.get("forward"), Checkpointed):
            module.forward = Checkpointed(module.forward)
            paths.append(path)
    return paths
