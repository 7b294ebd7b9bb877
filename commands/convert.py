"""`tgis convert-to-safetensors`: PyTorch `.bin` weights (or a GGUF file) → safetensors, verified."""

from __future__ import annotations

from pathlib import Path

import typer


def convert_to_safetensors(
    model: str = typer.Argument(..., help="Model directory, cached hub id, a .gguf file or a directory holding one."),
    revision: str | None = typer.Option(None, "--revision", envvar="REVISION", help="Hub revision (cached ids)."),
) -> None:
    """Convert `.bin` checkpoints (sharded or not, index rewritten, tied aliases de-duplicated) or a `.gguf` file
    (dequantized; config, tokenizer and chat template written beside it). Every tensor is reloaded and compared."""
    from runtime.hub import ModelNotFoundError, snapshot_dir
    from runtime.models.convert import convert_bin_dir
    from runtime.models.gguf import convert_gguf_beside

    path = Path(model)
    ggufs = [path] if path.suffix == ".gguf" and path.is_file() else sorted(path.glob("*.gguf"))
    if ggufs and not (path.is_dir() and any(path.glob("*.bin"))):
        out = convert_gguf_beside(ggufs[0])
        print(f"converted {ggufs[0].name} -> {out}")
        return
    directory = path if path.is_dir() else snapshot_dir(model, revision)
    if directory is None:
        raise ModelNotFoundError(f"Model {model} not found (not a directory, not in the HF cache); fetch it with "
                                 f"`tgis download-weights {model} --extension .bin`")
    for target in convert_bin_dir(directory):
        print(f"wrote {target}")
