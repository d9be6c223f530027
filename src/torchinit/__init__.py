"""torchinit: build and load PyTorch models of any size, exactly and at hardware speed."""

from torchinit.checkpoint.base import Checkpoint
from torchinit.checkpoint.header import CheckpointError
from torchinit.checkpoint.load_model import LoadReport, load_checkpoint
from torchinit.checkpoint.opener import open_checkpoint
from torchinit.fabric import Fabric, seed_everything
from torchinit.init.context import InitContext, nan_poison
from torchinit.init.record import RecordContext, RecordError
from torchinit.materialize.inits import register_init
from torchinit.materialize.materialize import (
    MaterializeError,
    MaterializeReport,
    RecordedInit,
    materialize,
)
from torchinit.materialize.memory import InsufficientMemoryError
from torchinit.materialize.unwritten import unwritten_names
from torchinit.materialize.verify import VerificationError, tie_groups, verify
from torchinit.plan import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

__all__ = [
    "Checkpoint", "CheckpointError", "DeepSpeedStrategy", "FSDPStrategy", "Fabric", "InitContext",
    "InsufficientMemoryError", "LoadReport", "MaterializeError", "MaterializeReport", "ModelParallelStrategy",
    "RecordContext", "RecordError", "RecordedInit", "VerificationError", "load_checkpoint", "materialize",
    "nan_poison", "open_checkpoint", "register_init", "seed_everything", "tie_groups", "unwritten_names", "verify",
]
__version__ = "0.1.0"
