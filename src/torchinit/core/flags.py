"""Debug switches read by several layers."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["nan_poison", "poison_enabled"]

_POISON = contextvars.ContextVar("torchinit_nan_poison", default=os.environ.get("TORCHINIT_NAN_POISON") == "1")


def poison_enabled() -> bool:
    return _POISON.get()


@contextmanager
def nan_poison(enabled: bool = True) -> Iterator[None]:
    """Debug switch: fill memory that empty init leaves uninitialized, and every fresh allocation of
    `materialize`, with NaN, so that garbage cannot hide.

    Also on with the environment variable TORCHINIT_NAN_POISON=1.
    """
    token = _POISON.set(enabled)
    try:
        yield
    finally:
        _POISON.reset(token)
