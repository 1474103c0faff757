"""`model.arch=vlbert`: a single-stream transformer over the sentence and the image's cells
(CLIP-ViL_p's fusion model on CLIP grids, as a `transformers.BertModel` built from a config).

Sequence: the tokenizer's [SOT] words [EOT] (BERT: [CLS] ... [SEP]), then the visual cells.
Visual side as CLIP-ViL_p: each cell's feature -> Linear + LayerNorm, plus learned x / y
embeddings of the cell's position; the position comes from the cell's normalised box centre in
`grid_size` buckets per axis, so a 5x7 CLIP grid gets one bucket per cell and BottomUp regions
(the same `(features, mask, spatial)` interface as the other heads) get their centre's.
Padding cells are masked out of attention (CLIP-ViL_p attended to them). The task output is
LXMERT's `logit_fc` (Linear - GeLU - LayerNorm - Linear; `classifier` here, the name the PEFT
presets train in full) on the pooled [SOT] state.

`bert` names a local Hugging Face BERT folder (real data): its config sizes the transformer and
its weights initialise it; the word vocabulary is then the folder's tokenizer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from cliptransfer.config import check, check_range
from cliptransfer.heads.registry import register_head

if TYPE_CHECKING:
    from cliptransfer.heads.model import HeadConfig

__all__ = ["VLBert", "VLBertConfig", "answer_mlp"]


@dataclass
class VLBertConfig:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 512
    dropout: float = 0.1
    max_text: int = 64  # text positions
    grid_size: int = 32  # x / y position buckets
    bert: str = ""  # a local HF BERT folder (config + weights); empty = built from the above

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "intermediate", "max_text", "grid_size"):
            check_range(name, getattr(self, name), gt=0)
        check_range("dropout", self.dropout, ge=0, lt=1)
        check(self.hidden % self.heads == 0, "hidden", f"must be a multiple of heads={self.heads}",
              self.hidden)  # fmt: skip


def answer_mlp(hidden: int, num_outputs: int) -> nn.Sequential:
    """LXMERT's logit_fc: Linear(H, 2H) - GeLU - LayerNorm(2H) - Linear(2H, K)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden),
                         nn.Linear(2 * hidden, num_outputs))  # fmt: skip


def _bert(cfg: VLBertConfig, vocab_size: int, pad_id: int):
    from transformers import BertConfig, BertModel

    if cfg.bert:
        try:
            return BertModel.from_pretrained(cfg.bert, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"model.vlbert.bert={cfg.bert}: no loadable BERT ({e})") from e
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_text, type_vocab_size=2, pad_token_id=pad_id,
    )  # fmt: skip
    return BertModel(config, add_pooling_layer=True)


class VLBert(nn.Module):
    """`encode(features (B, N, C), mask (B, N), text_ids (B, L), text_mask (B, L), spatial
    (B, N, 4)) -> (states (B, L + N, H), pooled (B, H))`; `forward` adds the answer MLP."""

    def __init__(self, cfg: VLBertConfig, vocab_size: int, visual_dim: int, num_outputs: int,
                 pad_id: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.cfg = cfg
        self.bert = _bert(cfg, vocab_size, pad_id)
        h = self.bert.config.hidden_size
        self.visual_proj = nn.Sequential(nn.Linear(visual_dim, h), nn.LayerNorm(h))
        self.pos_x = nn.Embedding(cfg.grid_size, h)
        self.pos_y = nn.Embedding(cfg.grid_size, h)
        self.classifier = answer_mlp(h, num_outputs)

    @property
    def hidden(self) -> int:
        return self.bert.config.hidden_size

    def visual_embeddings(self, features: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
        """(B, N, H): projected features + x / y embeddings of the box centres' buckets."""
        g = self.cfg.grid_size
        centre = (spatial[..., :2] + spatial[..., 2:4]) / 2  # (B, N, 2) in [0, 1]
        bucket = (centre * g).long().clamp(0, g - 1)
        return self.visual_proj(features) + self.pos_x(bucket[..., 0]) + self.pos_y(bucket[..., 1])

    def encode(self, features, mask, text_ids, text_mask, spatial):
        B, L = text_ids.shape
        N = features.shape[1]
        words = self.bert.embeddings.word_embeddings(text_ids)  # (B, L, H)
        cells = self.visual_embeddings(features, spatial).to(words.dtype)  # (B, N, H)
        device = text_ids.device
        # Text positions 0..L-1, segment 0; cells position 0, segment 1 (their place is in pos_x/y).
        position_ids = torch.cat([torch.arange(L, device=device),
                                  torch.zeros(N, dtype=torch.long, device=device)]).expand(B, -1)  # fmt: skip
        token_type = torch.cat([torch.zeros(B, L, dtype=torch.long, device=device),
                                torch.ones(B, N, dtype=torch.long, device=device)], 1)  # fmt: skip
        attention = torch.cat([text_mask, mask], 1).long()  # padding cells masked
        out = self.bert(inputs_embeds=torch.cat([words, cells], 1), attention_mask=attention,
                        token_type_ids=token_type, position_ids=position_ids)  # fmt: skip
        return out.last_hidden_state, out.pooler_output

    def forward(self, features, mask, text_ids, text_mask, spatial) -> torch.Tensor:
        return self.classifier(self.encode(features, mask, text_ids, text_mask, spatial)[1])


@register_head("vlbert")
def vlbert(cfg: HeadConfig, question: nn.Module, visual_dim: int, num_outputs: int, spatial: int):
    # The transformer embeds the words itself: the text encoder built for the other heads is
    # not part of this model; only its vocabulary size is read.
    return VLBert(cfg.vlbert, question.vocab_size, visual_dim, num_outputs)
