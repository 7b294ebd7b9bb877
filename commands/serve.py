"""`tgis serve`."""

from __future__ import annotations

from commands._common import not_implemented


def serve() -> None:
    """Not implemented yet."""
    not_implemented("serve")
