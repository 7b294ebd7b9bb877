"""`tgis shard`."""

from __future__ import annotations

from commands._common import not_implemented


def shard() -> None:
    """Not implemented yet."""
    not_implemented("shard")
