"""`tgis bench`."""

from __future__ import annotations

from commands._common import not_implemented


def bench() -> None:
    """Not implemented yet."""
    not_implemented("bench")
