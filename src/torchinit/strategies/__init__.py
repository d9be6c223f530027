"""Strategies: how a set-up module is placed and run. `base.py` is the protocol Fabric drives; each strategy module
only materializes, shards or wraps; `select.py` picks one for a plan; `wrappers.py` holds what setup returns."""
