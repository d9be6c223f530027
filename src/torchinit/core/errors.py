"""One error family: every error torchinit raises is a `TorchinitError`, and also keeps the builtin base callers
caught before (`except ValueError` still works). Messages name the tensor, file or module and say what to do."""

from __future__ import annotations

__all__ = [
    "CheckpointError", "ConfigurationError", "InsufficientMemoryError", "MaterializeError", "RecordError",
    "TorchinitError", "UsageError", "VerificationError",
]


class TorchinitError(Exception):
    """Base of every error torchinit raises."""


class ConfigurationError(TorchinitError, ValueError):
    """An argument or combination of arguments that cannot work (precision, strategy, devices, mesh sizes...)."""


class UsageError(TorchinitError, RuntimeError):
    """A call made in an order or state where it cannot work (setup before launch, a model set up twice...)."""


class RecordError(TorchinitError, RuntimeError):
    """An operation that cannot be recorded for replay; the message names the module and the op."""


class MaterializeError(TorchinitError, RuntimeError):
    """The model cannot be materialized as asked; the message names the tensors and modules. Model unchanged."""


class VerificationError(TorchinitError, RuntimeError):
    """A materialized model is not what was asked for; the message names every offending tensor."""


class InsufficientMemoryError(TorchinitError, MemoryError):
    """The pre-flight found that the tensors to allocate do not fit the device's free memory."""


class CheckpointError(TorchinitError, ValueError):
    """A checkpoint that cannot be read as what it claims to be; the message names the file and the key."""
