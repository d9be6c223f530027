"""One intra-op thread for a cast that runs beside other work (the reader threads of a load, the draws of a
replay): on few cores an OpenMP team whose second thread waits for a core doubled the cast's CPU time
(measured: load_bench.py --file-precision 32-true)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_intraop_thread() -> Iterator[None]:
    """torch.set_num_threads(1) while open, restored at exit. It sets this thread's OpenMP team size and the
    default for threads that start meanwhile, so keep it short (one batch, one tensor)."""
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)
