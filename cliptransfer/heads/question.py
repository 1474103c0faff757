"""Question encoders: learned word embeddings + GRU/LSTM over the project tokenizer (BUTD/MCAN),
a CLIP text tower (`encoder="clip"`: the packaged CLIP's, over its tokenizer; `"clip:/path"`: a
CLIP checkpoint's, with `tokenizer` naming its tokenizer) or a local Hugging Face text encoder
(`encoder="hf:/path/to/bert"`).

Every encoder maps `(ids (B, L), mask (B, L) bool)` to per-token states `(B, L, D)` (zero on
padding) and a pooled vector `(B, D)`; neither depends on how much padding a batch carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cliptransfer.config import check, check_range

__all__ = [
    "ClipQuestionEncoder",
    "HFQuestionEncoder",
    "HFQuestionTokenizer",
    "ProjectQuestionTokenizer",
    "QuestionConfig",
    "RNNQuestionEncoder",
    "build_question_encoder",
    "build_question_tokenizer",
]


@dataclass
class QuestionConfig:
    # "gru" | "lstm": learned embeddings over `tokenizer`; "clip" | "clip:/path": a CLIP text
    # tower (the packaged CLIP's, or a checkpoint's) over `tokenizer`, fine-tuned unless
    # `freeze`; "hf:/path": a local HF encoder folder (model + tokenizer), local_files_only.
    encoder: str = "gru"
    tokenizer: str = "shapes"  # "shapes" (packaged) or a tokenizer folder (learned encoders)
    max_length: int = 24  # tokens including special tokens; longer questions are truncated
    embed_dim: int = 128
    hidden: int = 256
    freeze: bool = False  # clip / hf: keep the pretrained encoder frozen

    def __post_init__(self) -> None:
        ok = (
            self.encoder in _RNNS
            or _clip_name(self.encoder) is not None
            or self.encoder.startswith("hf:")
        )
        check(ok, "encoder", f"must be {_ENCODERS}", self.encoder)
        check_range("max_length", self.max_length, ge=2)  # SOT + EOT
        check_range("embed_dim", self.embed_dim, ge=1)
        check_range("hidden", self.hidden, ge=1)


_RNNS = ("gru", "lstm")
_ENCODERS = "'gru', 'lstm', 'clip', 'clip:/path' or 'hf:/path'"


def _unknown_encoder(encoder: str) -> ValueError:
    return ValueError(f"text.encoder must be {_ENCODERS}, got {encoder!r}")


def _clip_name(encoder: str) -> str | None:
    """The CLIP checkpoint `encoder` names: "default" (the packaged CLIP) for "clip", the path
    of "clip:/path", None for any other encoder."""
    if encoder == "clip":
        return "default"
    return encoder[5:] if encoder.startswith("clip:") else None


def _hf_path(encoder: str) -> Path | None:
    if not encoder.startswith("hf:"):
        return None
    path = Path(encoder[3:]).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text.encoder {encoder!r}: folder {path} not found")
    return path


class ProjectQuestionTokenizer:
    """The project tokenizer (SentencePiece / CLIP BPE): ids `[SOT, ..., EOT, pad...]`."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.vocab_size = tokenizer.vocab_size

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, truncated = self.tokenizer.encode(
            texts, context_length=self.max_length, return_truncated=True
        )
        # attention_mask is position-based (through EOT), right for CLIP BPE where 0 is "!".
        return ids, self.tokenizer.attention_mask(ids), truncated

    def save(self, folder: str | Path) -> None:
        self.tokenizer.save(folder)


class HFQuestionTokenizer:
    """An `AutoTokenizer` from a local folder, padded to `max_length`."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path}: no usable Hugging Face tokenizer ({e})") from e
        self.max_length = int(max_length)
        self.vocab_size = len(self.tokenizer)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        full = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        truncated = torch.tensor([len(ids) > self.max_length for ids in full])
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"].bool(), truncated

    def save(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


def build_question_tokenizer(
    cfg: QuestionConfig, folder: str | Path | None = None
) -> ProjectQuestionTokenizer | HFQuestionTokenizer:
    """The tokenizer `cfg` names; `folder` overrides where it is read from (a saved run)."""
    hf = _hf_path(cfg.encoder)
    if hf is not None:
        return HFQuestionTokenizer(folder or hf, cfg.max_length)
    if cfg.encoder not in _RNNS and _clip_name(cfg.encoder) is None:
        raise _unknown_encoder(cfg.encoder)
    from cliptransfer.defaults import resolve_tokenizer

    return ProjectQuestionTokenizer(resolve_tokenizer(folder or cfg.tokenizer), cfg.max_length)


class RNNQuestionEncoder(nn.Module):
    """Word embeddings + one-layer GRU/LSTM (BUTD: GRU, MCAN: LSTM); pooled = the last state."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, rnn: str = "gru") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        cls = {"gru": nn.GRU, "lstm": nn.LSTM}[rnn]
        self.rnn = cls(embed_dim, hidden, batch_first=True)
        self.dim, self.vocab_size = hidden, vocab_size

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = ids.shape[1]
        lengths = mask.sum(1).clamp(min=1).cpu()
        # Packing runs each question over its own tokens only: padding changes nothing.
        packed = pack_padded_sequence(
            self.embed(ids), lengths, batch_first=True, enforce_sorted=False
        )
        out, h = self.rnn(packed)
        if isinstance(h, tuple):  # LSTM: (h_n, c_n)
            h = h[0]
        tokens, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, H)
        return tokens, h[-1]  # (B, L, H), (B, H)


class HFQuestionEncoder(nn.Module):
    """A local HF encoder (BERT-like); pooled = mean of the valid token states."""

    def __init__(self, path: str | Path, freeze: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel

        try:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path}: no loadable Hugging Face model ({e})") from e
        self.dim = int(self.model.config.hidden_size)
        self.vocab_size = int(self.model.config.vocab_size)
        if freeze:
            for p in self.model.parameters():
                p.requires_grad = False

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        tokens = tokens * m
        pooled = tokens.sum(1) / m.sum(1).clamp(min=1)
        return tokens, pooled  # (B, L, D), (B, D)


class ClipQuestionEncoder(nn.Module):
    """A CLIP text tower's final-layer-normed token states (causal, as CLIP was trained) zeroed
    on padding; pooled = the state at EOT (the last valid token), where CLIP pools."""

    def __init__(self, name: str, freeze: bool = False) -> None:
        super().__init__()
        from cliptransfer.defaults import resolve_clip

        clip = resolve_clip(name)
        clip.visual = nn.Identity()  # the text tower only (CLIP subclasses TextTower)
        self.text = clip
        self.dim = int(clip.ln_final.normalized_shape[0])
        self.vocab_size = int(clip.vocab_size)
        # The token states skip the projection and the temperature: no gradient reaches them
        # (an unused trainable parameter would stall DDP's reduction).
        unused = {"text_projection", "logit_scale"}
        for n, p in clip.named_parameters():
            p.requires_grad = not freeze and n not in unused

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.text.encode_text_hidden(ids)  # (B, L, W)
        tokens = tokens * mask.unsqueeze(-1).to(tokens.dtype)
        last = (mask.sum(1) - 1).clamp(min=0)  # (B,) the EOT position
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), last]
        return tokens, pooled  # (B, L, W), (B, W)


def build_question_encoder(cfg: QuestionConfig, vocab_size: int) -> nn.Module:
    """The encoder `cfg.encoder` names; `vocab_size` from the matching tokenizer."""
    hf = _hf_path(cfg.encoder)
    if hf is not None:
        return HFQuestionEncoder(hf, cfg.freeze)
    clip = _clip_name(cfg.encoder)
    if clip is not None:
        encoder = ClipQuestionEncoder(clip, cfg.freeze)
        if encoder.vocab_size < vocab_size:
            raise ValueError(f"text.encoder {cfg.encoder!r}: the CLIP text tower has "
                             f"{encoder.vocab_size} token ids, the tokenizer {vocab_size}")  # fmt: skip
        return encoder
    if cfg.encoder not in _RNNS:
        raise _unknown_encoder(cfg.encoder)
    return RNNQuestionEncoder(vocab_size, cfg.embed_dim, cfg.hidden, cfg.encoder)
