"""Readable lists in error messages and warnings: the first names and how many more."""

from __future__ import annotations

__all__ = ["shorten"]


def shorten(names: list[str], limit: int = 20) -> str:
    """The first `limit` names, comma-separated, and how many more ("none" for an empty list)."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
