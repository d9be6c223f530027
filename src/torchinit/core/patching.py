"""The one way torchinit patches a global function: for the duration of a `with`, restored on every path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["init_functions", "patched"]


@contextmanager
def patched(targets: Iterable[tuple[object, str]], wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace each `owner.name` by `wrap(original)` while open; every original is back at exit (also when
    entering or the body raises), in reverse order."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets]
    try:
        for owner, name, fn in originals:
            setattr(owner, name, wrap(fn))
        yield
    finally:
        for owner, name, fn in reversed(originals):
            setattr(owner, name, fn)


def init_functions(*private: str) -> list[tuple[object, str]]:
    """`torch.nn.init`'s public in-place init functions (`normal_`, `trunc_normal_`, ...) and the named private
    ones, as `patched` targets."""
    return [(nn.init, name) for name, fn in vars(nn.init).items()
            if callable(fn) and name.endswith("_") and not name.startswith("__")
            and (not name.startswith("_") or name in private)]
