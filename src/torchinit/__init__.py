"""torchinit: build and load PyTorch models of any size, exactly and at hardware speed."""

from torchinit.checkpoint.base import Checkpoint
from torchinit.checkpoint.load_model import LoadReport, load_checkpoint
from torchinit.checkpoint.opener import open_checkpoint
from torchinit.core.errors import (
    ArgumentTypeError,
    CheckpointError,
    ConfigurationError,
    InsufficientMemoryError,
    MaterializeError,
    MissingKeyError,
    RankError,
    RecordError,
    SaveError,
    TorchinitError,
    UnsupportedError,
    UsageError,
    VerificationError,
)
from torchinit.core.flags import nan_poison
from torchinit.fabric import Fabric
from torchinit.init.context import InitContext
from torchinit.init.record import RecordContext
from torchinit.loggers import CSVLogger, TensorBoardLogger
from torchinit.materialize.inits import register_init
from torchinit.materialize.materialize import MaterializeReport, materialize
from torchinit.materialize.verify import tie_groups, verify
from torchinit.options import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torchinit.record.pending import unwritten_names
from torchinit.record.recording import RecordedInit
from torchinit.seeding import seed_everything

__all__ = [
    "ArgumentTypeError", "CSVLogger", "Checkpoint", "CheckpointError", "ConfigurationError", "DDPStrategy",
    "DeepSpeedStrategy", "FSDPStrategy", "Fabric", "InitContext", "InsufficientMemoryError", "LoadReport",
    "MaterializeError", "MaterializeReport", "MissingKeyError", "ModelParallelStrategy", "RankError", "RecordContext",
    "RecordError", "RecordedInit", "SaveError", "TensorBoardLogger", "TorchinitError", "UnsupportedError",
    "UsageError", "VerificationError", "load_checkpoint", "materialize", "nan_poison", "open_checkpoint",
    "register_init", "seed_everything", "tie_groups", "unwritten_names", "verify",
]
__version__ = "0.1.0"
