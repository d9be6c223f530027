"""One tensor of a model being materialized: the object, every place it is registered, and its one source."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Slot"]


@dataclass(eq=False)
class Slot:
    """One tensor object and every place it is registered: (module path, module, attribute, is_param)."""

    tensor: torch.Tensor
    homes: list[tuple[str, nn.Module, str, bool]]
    needs_value: bool
    source: str = "kept"  # "checkpoint" | "recorded" | "init" | "kept"
    key: str = ""  # the checkpoint key it is read from
    memory: torch.Tensor | None = None  # the data it must end with (fresh allocation or its own)

    @property
    def name(self) -> str:
        path, _, attr, _ = self.homes[0]
        return f"{path}.{attr}" if path else attr

    @property
    def names(self) -> list[str]:
        return [f"{path}.{attr}" if path else attr for path, _, attr, _ in self.homes]

    @property
    def owner(self) -> tuple[str, nn.Module]:
        return self.homes[0][0], self.homes[0][1]
