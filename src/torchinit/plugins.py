"""`Fabric(plugins=...)` and `fabric.accelerator`: what a Lightning program passes in or reads, understood or refused
by name (never silently ignored)."""

from __future__ import annotations

from typing import Any

import torch

from torchinit.core.errors import ArgumentTypeError, UnsupportedError

__all__ = ["Accelerator", "check_plugins"]

# cluster environments whose variables torchinit's launcher reads itself (torchrun's RANK, WORLD_SIZE, ...)
READ_ALREADY = ("LightningEnvironment", "TorchElasticEnvironment")


def _lineage(plugin: Any) -> list[str]:
    return [f"{c.__module__}.{c.__name__}" for c in type(plugin).__mro__]


def check_plugins(plugins: Any) -> list[Any]:
    """The plugins as a list, each one checked: cluster environments that describe what the launcher already reads
    are accepted; precision plugins, other cluster environments, checkpoint IO and anything else are refused,
    naming the plugin."""
    if plugins is None:
        return []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    for plugin in plugins:
        name, lineage = type(plugin).__name__, _lineage(plugin)
        if any(".precision." in c or c.endswith(".Precision") for c in lineage):
            raise UnsupportedError(
                f"Fabric(plugins=[{name}(...)]): precision plugins are not supported yet. For the standard precisions "
                "pass precision='32-true', 'bf16-true', '16-true', '64-true', 'bf16-mixed' or '16-mixed' instead; "
                f"quantized precisions ({name}) are not available in torchinit yet.")
        if any(".environments." in c for c in lineage):
            if name in READ_ALREADY:
                continue
            raise UnsupportedError(
                f"Fabric(plugins=[{name}(...)]): torchinit reads the launcher's environment itself (torchrun's "
                f"RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT); the cluster environment {name} is not "
                "supported. Start the processes with torchrun, or with fabric.launch().")
        raise ArgumentTypeError(
            f"Fabric(plugins=[{name}(...)]) is not supported: torchinit takes cluster environments that describe "
            "torchrun's variables (LightningEnvironment, TorchElasticEnvironment) and no other plugins.")
    return plugins


class Accelerator:
    """`fabric.accelerator`: the hardware the plan resolved ("cpu", "cuda", "mps"), with the questions Lightning
    programs ask of it. Compares equal to its name."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Accelerator({self.name!r})"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name or (other == "gpu" and self.name in ("cuda", "mps"))
        return isinstance(other, Accelerator) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def is_available(self) -> bool:
        if self.name == "cuda":
            return torch.cuda.is_available()
        if self.name == "mps":
            return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return True

    def auto_device_count(self) -> int:
        """Devices `devices="auto"` would use on this machine."""
        return torch.cuda.device_count() if self.name == "cuda" else 1

    def setup_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
