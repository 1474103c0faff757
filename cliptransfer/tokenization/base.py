"""The shared tokenizer interface and OpenAI CLIP's id convention.

Every tokenizer returns `[SOT, tokens..., EOT, 0, 0, ...]`: padded with id 0 to the context length,
with EOT the highest id in the vocabulary, so a text encoder pools at `token_ids.argmax(-1)`.
Truncation keeps SOT and EOT (drops tokens from the end), like open_clip's `tokenize`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cliptransfer.fileio import read_json

DEFAULT_CONTEXT_LENGTH = 77
CONFIG_FILE = "tokenizer_config.json"


def attention_mask(token_ids: torch.Tensor) -> torch.Tensor:
    """True up to and including EOT (the argmax), False on padding. (B, L) -> (B, L) bool."""
    length = token_ids.shape[-1]
    eot_pos = token_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
    return torch.arange(length, device=token_ids.device) <= eot_pos


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return texts


class Tokenizer(ABC):
    """Shared encode/decode logic; subclasses provide word ids and set the id attributes."""

    vocab_size: int
    context_length: int
    sot_id: int
    eot_id: int
    pad_id: int = 0
    mask_id: int | None = None
    # CLIP's BPE id 0 is the real token "!", so padding can only be told apart by position.
    pad_is_token: bool = False

    @abstractmethod
    def tokenize_words(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens and no truncation (for MLM / augmentation)."""

    @abstractmethod
    def _decode_words(self, ids: list[int]) -> str:
        """Text of ids that contain no special tokens."""

    @abstractmethod
    def save(self, folder: str | Path) -> Path:
        """Write the files `load_tokenizer(folder)` reads back; returns the folder."""

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize_words(text) for text in texts]

    def encode(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        return_truncated: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, L) int64 ids; with `return_truncated`, also a (B,) bool of captions cut short."""
        texts = _as_text_list(texts)
        length = self.context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {length}")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        truncated = torch.zeros(len(texts), dtype=torch.bool)
        for i, words in enumerate(self.tokenize_batch(texts)):
            truncated[i] = len(words) > length - 2
            tokens = [self.sot_id, *words[: length - 2], self.eot_id]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return (ids, truncated) if return_truncated else ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        return self.encode(texts, context_length)  # (B, L)

    attention_mask = staticmethod(attention_mask)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one sequence (L,): drops SOT, everything from the first EOT on, and padding."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one sequence of shape (L,), got {tuple(ids.shape)}; "
                    "use batch_decode for (B, L)"
                )
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        drop = {self.sot_id, self.eot_id}
        if self.mask_id is not None:
            drop.add(self.mask_id)
        if not self.pad_is_token:
            drop.add(self.pad_id)
        return self._decode_words([i for i in ids if i not in drop])

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in ids]  # ids: (B, L)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length="
            f"{self.context_length}, sot_id={self.sot_id}, eot_id={self.eot_id}, "
            f"mask_id={self.mask_id})"
        )


def read_json_object(path: Path) -> dict[str, Any]:
    """A tokenizer config: a JSON object (bad JSON raises fileio.JSONFileError, a ValueError)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
