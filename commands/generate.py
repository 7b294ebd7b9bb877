"""`tgis generate`."""

from __future__ import annotations

from commands._common import not_implemented


def generate() -> None:
    """Not implemented yet."""
    not_implemented("generate")
