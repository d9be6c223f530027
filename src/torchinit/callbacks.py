"""`Fabric(callbacks=...)` and `fabric.call(hook, ...)`: any object with methods named after hooks (Lightning's
interface). A callback gets only the keyword arguments its method accepts."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["Callbacks"]


def _accepted(method: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return kwargs
    names = {p.name for p in parameters}
    return {k: v for k, v in kwargs.items() if k in names}


class Callbacks(list):
    """The callbacks, in order; `call` runs the hook on each that has it."""

    def __init__(self, callbacks: Any = None):
        super().__init__([] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks])

    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        for callback in self:
            method = getattr(callback, hook_name, None)
            if method is None:
                continue
            if not callable(method):
                warnings.warn(f"Skipping the callback `{type(callback).__name__}.{hook_name}` because it is not "
                              "callable.", stacklevel=3)
                continue
            method(*args, **_accepted(method, kwargs))
