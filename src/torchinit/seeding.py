"""Seeding as Lightning does it (`seed_everything`, `PL_GLOBAL_SEED`, `PL_SEED_WORKERS`), the per-worker seeds of
data loader workers, and the random state a spawned process starts from (the launching process's)."""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from typing import Any

import torch

from torchinit.core.errors import ConfigurationError

__all__ = ["rng_states", "seed_everything", "set_rng_states", "worker_init"]

MAX_SEED = 2**32 - 1


def seed_everything(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python's `random`, NumPy (if installed) and torch (every device) with `seed`; returns it.

    `seed=None` takes `PL_GLOBAL_SEED` from the environment, else 0. The seed is kept in `PL_GLOBAL_SEED` (spawned
    processes and `setup_dataloaders` read it); `workers=True` (`PL_SEED_WORKERS=1`) gives each data loader worker
    of `setup_dataloaders` its own seed, derived from the seed, the worker and the rank."""
    if seed is None:
        from_env = os.environ.get("PL_GLOBAL_SEED")
        if from_env is None:
            seed = 0
            if verbose:
                warnings.warn("No seed found, seed set to 0", stacklevel=2)
        else:
            try:
                seed = int(from_env)
            except ValueError:
                raise ConfigurationError(f"Invalid seed specified via PL_GLOBAL_SEED: {from_env!r}") from None
    elif not isinstance(seed, int):
        seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ConfigurationError(f"{seed} is not in bounds, numpy accepts from 0 to {MAX_SEED}")
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    return seed


def worker_init(worker_id: int, rank: int = 0) -> None:
    """A data loader worker's seeds, distinct per (base seed, worker, rank): torch's, Python's and NumPy's."""
    base = torch.initial_seed() - worker_id  # torch gives worker i the loader's base seed + i
    digest = hashlib.sha256(f"{base}/{worker_id}/{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))
    random.seed(int.from_bytes(digest[8:24], "little"))
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(int.from_bytes(digest[24:28], "little"))


def rng_states() -> dict[str, Any]:
    """This process's random state (Python, NumPy, torch's CPU generator, CUDA's if CUDA is in use)."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy
    except ImportError:
        pass
    else:
        states["numpy"] = numpy.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (a spawned process starts where its launcher was, as in Lightning)."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy

        numpy.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
