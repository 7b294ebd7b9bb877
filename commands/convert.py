"""`tgis convert-to-safetensors`."""

from __future__ import annotations

from commands._common import not_implemented


def convert_to_safetensors() -> None:
    """Not implemented yet."""
    not_implemented("convert-to-safetensors")
