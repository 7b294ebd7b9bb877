"""Prompt-tuning prefixes (TGIS `prefix_id`, spec §5.4): virtual-token embeddings loaded from PREFIX_STORE_PATH.

A prefix is a [n, embedding_dim] tensor placed before the input's embeddings (decoder-only: before the prompt;
encoder-decoder: an encoder part before the encoder input and/or a decoder part before the decoder start token).
Files per id: `<store>/<id>/decoder.pt` and/or `encoder.pt`, or a PEFT prompt-tuning adapter
(`adapter_model.safetensors` / `.bin`, key `prompt_embeddings`). Loaded tensors are checked, cast to the model dtype
and kept on the CPU in an LRU cache bounded by memory (PROMPT_CACHE_SIZE_MB).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.echo import echo

ID_PATTERN = re.compile(r"[/\w\-]+")
NAME_MAX, PATH_MAX = 255, 4096  # Linux limits: longer ids could never name a file (ENAMETOOLONG)


class PrefixError(Exception):
    """A prefix that cannot be used; the text follows TGIS' shard messages."""


class PrefixNotFound(PrefixError):
    pass


@dataclass(frozen=True)
class PromptPrefix:
    decoder: torch.Tensor | None  # [n, d] virtual decoder (or decoder-only) positions
    encoder: torch.Tensor | None  # [n, d] virtual encoder positions (encoder-decoder only)
    placeholder_id: int  # the id that stands for a virtual position in token lists (TGIS shows the pad token)
    encoder_decoder: bool
    name: str = ""  # the prefix id: cached KV is shared only between requests with the same prefix

    @property
    def decoder_length(self) -> int:
        return 0 if self.decoder is None else self.decoder.shape[0]

    @property
    def encoder_length(self) -> int:
        return 0 if self.encoder is None else self.encoder.shape[0]

    @property
    def length(self) -> int:
        """What length checks count: encoder-decoder decoder prefixes include the start token, as in TGIS."""
        extra = 1 if self.encoder_decoder and self.decoder is not None else 0
        return self.decoder_length + extra + self.encoder_length


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else -(-t.numel() * t.element_size() // 512) * 512


class PrefixStore:
    def __init__(self, root: str | Path, embedding_dim: int, dtype: torch.dtype, encoder_decoder: bool,
                 max_length: int, cache_bytes: int, placeholder_id: int):
        self.root = Path(root).resolve()
        self.embedding_dim, self.dtype, self.encoder_decoder = embedding_dim, dtype, encoder_decoder
        self.max_length, self.cache_bytes, self.placeholder_id = max_length, cache_bytes, placeholder_id
        self._cache: OrderedDict[str, tuple[PromptPrefix, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, prefix_id: str) -> tuple[PromptPrefix, bool]:
        """(prefix, loaded from disk now); raises PrefixError."""
        with self._lock:
            hit = self._cache.get(prefix_id)
            if hit is not None:
                self._cache.move_to_end(prefix_id)
                return hit[0], False
        prefix = self._load(prefix_id)
        size = _nbytes(prefix.decoder) + _nbytes(prefix.encoder)
        if size > self.cache_bytes:
            raise PrefixError(f"Prefix ID object {echo(prefix_id)} exceeds the allowed cache size")
        with self._lock:
            if prefix_id not in self._cache:
                while self._used + size > self.cache_bytes:
                    _, (_, evicted) = self._cache.popitem(last=False)
                    self._used -= evicted
                self._cache[prefix_id] = (prefix, size)
                self._used += size
        return prefix, True

    def folder(self, prefix_id: str) -> Path:
        """The id's directory in the store; PrefixError for ids that are malformed, too long to name a file, or
        leave the store."""
        if not ID_PATTERN.fullmatch(prefix_id):
            raise PrefixError(f"Invalid prefix id {echo(prefix_id)}, must contain only alphanumeric, _ and - and /")
        path = self.root / prefix_id
        if any(len(part.encode()) > NAME_MAX for part in prefix_id.split("/")) or len(bytes(path)) >= PATH_MAX:
            raise PrefixError(f"Invalid prefix id {echo(prefix_id)}, too long (at most {NAME_MAX} bytes between "
                              "slashes)")
        folder = path.resolve()
        if not folder.is_relative_to(self.root):
            raise PrefixError(f"Invalid prefix id {echo(prefix_id)}")
        return folder

    def _load(self, prefix_id: str) -> PromptPrefix:
        folder = self.folder(prefix_id)
        if folder.is_dir() and any(p.stem == "adapter_model" for p in folder.iterdir()):
            decoder, encoder = self._load_peft(folder, prefix_id), None
        else:
            decoder, encoder = (self._load_pt(folder / f"{part}.pt") for part in ("decoder", "encoder"))
            if decoder is None and (encoder is None or not self.encoder_decoder):
                raise PrefixNotFound(f"Prefix id {echo(prefix_id)} not found")
        return PromptPrefix(self._check(decoder), self._check(encoder), self.placeholder_id, self.encoder_decoder,
                            prefix_id)

    def _load_peft(self, folder: Path, prefix_id: str) -> torch.Tensor:
        if self.encoder_decoder:
            raise PrefixError("encoder-decoder architectures not supported for peft models")
        if (folder / "adapter_model.safetensors").is_file():
            from safetensors.torch import load_file

            weights = load_file(folder / "adapter_model.safetensors")
        elif (folder / "adapter_model.bin").is_file():
            weights = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise PrefixNotFound(f"Prefix id {echo(prefix_id)} not found")
        return weights["prompt_embeddings"]

    @staticmethod
    def _load_pt(path: Path) -> torch.Tensor | None:
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def _check(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise PrefixError("Invalid prefix embedding tensor")
        if not 0 < t.shape[0] <= self.max_length:
            raise PrefixError(f"Invalid prefix embedding length of {t.shape[0]}")
        if self.encoder_decoder and t.shape[0] % 2:
            raise PrefixError("Encoder/decoder prefix tensor must be of even length")
        if t.shape[1] != self.embedding_dim:
            raise PrefixError(f"Prefix embedding tensor dim {t.shape[1]} does not match model ({self.embedding_dim})")
        if not torch.isfinite(t).all():
            raise PrefixError("Prefix contains non-finite elements")
        cast = t.to(self.dtype)
        if not torch.isfinite(cast).all():
            raise PrefixError(f"Prefix contains non-finite elements after conversion from {t.dtype} to {self.dtype}")
        return cast.contiguous()
