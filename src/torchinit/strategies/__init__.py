"""Strategies: how a set-up module is placed and run. `base.py` is the protocol Fabric drives; each strategy module
only materializes, shards or wraps; `select.py` picks one for a plan; `wrappers.py` holds what setup returns.

The option classes are importable from here too, where Lightning keeps them (`lightning.fabric.strategies`)."""

from torchinit.options import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

__all__ = ["DDPStrategy", "DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy"]
