"""`tgis tokenize`."""

from __future__ import annotations

from commands._common import not_implemented


def tokenize() -> None:
    """Not implemented yet."""
    not_implemented("tokenize")
