"""torchinit: build and load PyTorch models of any size, exactly and at hardware speed."""

from torchinit.fabric import Fabric, seed_everything
from torchinit.init.context import InitContext, nan_poison
from torchinit.materialize.unwritten import initialize_unwritten, unwritten_names

__all__ = ["Fabric", "InitContext", "initialize_unwritten", "nan_poison", "seed_everything", "unwritten_names"]
__version__ = "0.1.0"
