"""`tgis download-weights`."""

from __future__ import annotations

from commands._common import not_implemented


def download_weights() -> None:
    """Not implemented yet."""
    not_implemented("download-weights")
