"""One error family: every error torchinit raises is a `TorchinitError`, and also keeps the builtin base callers
caught before (`except ValueError` still works). Messages name the tensor, file or module and say what to do."""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError", "CheckpointError", "ConfigurationError", "InsufficientMemoryError", "MaterializeError",
    "MissingKeyError", "RankError", "RecordError", "SaveError", "TorchinitError", "UnsupportedError", "UsageError",
    "VerificationError",
]


class TorchinitError(Exception):
    """Base of every error torchinit raises."""


class ConfigurationError(TorchinitError, ValueError):
    """An argument or combination of arguments that cannot work (precision, strategy, devices, mesh sizes...)."""


class ArgumentTypeError(TorchinitError, TypeError):
    """An argument of the wrong kind (a strategy option, what a user function returned); the message says what fits."""


class UsageError(TorchinitError, RuntimeError):
    """A call made in an order or state where it cannot work (setup before launch, a model set up twice...)."""


class UnsupportedError(TorchinitError, RuntimeError):
    """What was asked needs something this machine does not have (a device, DeepSpeed) or that torchinit does not
    support (a write into a ZeRO-3 partition through a view...); the message says what to use instead."""


class RankError(TorchinitError, RuntimeError):
    """Another process of the job failed (a launched rank, a rank's part of a collective save); the message names
    the rank and its error, raised alike on every rank so that none waits forever."""


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


class MissingKeyError(CheckpointError, KeyError):
    """A checkpoint lacks an entry the state asks for (a `KeyError` too, for callers that caught one). Its message is
    a sentence, shown as it is (a plain KeyError would show it quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class SaveError(TorchinitError, OSError):
    """Writing a checkpoint failed on the disk (full, not writable...): an `OSError` with its `errno`, naming the path
    and saying that the checkpoint that was there is as it was."""
