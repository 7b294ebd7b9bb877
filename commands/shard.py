"""`tgis shard`: pre-split a checkpoint into one safetensors directory per tensor-parallel rank."""

from __future__ import annotations

from pathlib import Path

import typer

from commands._common import resolve_model


def shard(
    model: str = typer.Argument(..., help="Model directory or cached hub id (safetensors weights)."),
    num_shards: int = typer.Option(..., "--num-shards", "-n", min=1, envvar="NUM_SHARD",
                                   help="Tensor-parallel world size."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory (rank-<r>/ per rank + manifest.json)."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (cached ids)."),
) -> None:
    """Split attention by (KV) heads, MLP gate/up by columns and down by rows, o_proj by rows, embeddings and
    lm_head by vocabulary; record rules and source checksums; verify the shards reassemble bit-exactly.
    Serve the output directory with `tgis serve --model-name DIR --num-gpus N`: each rank then reads only its file."""
    from runtime.parallel.sharding import shard_checkpoint

    manifest = shard_checkpoint(resolve_model(model, revision), num_shards, output)
    split = sum(rule["split"] != "replicate" for rule in manifest["rules"].values())
    print(f"wrote {num_shards} shards to {output}: {split} tensors split, "
          f"{len(manifest['rules']) - split} replicated; reassembly verified")
