"""MCAN: deep modular co-attention, encoder-decoder variant (Yu et al. 2019, MILVLG/mcan-vqa).

question tokens -> L x SA (self-attention)                           = encoder
image cells/regions -> L x SGA (self-attention, then attention guided by the final question
                        states, then FFN)                            = decoder
AttFlat on both (attentional reduction over valid positions), LayerNorm(sum), linear classifier.

Post-norm residual blocks as in the reference (`net.py`, `mca.py`); masked keys get zero weight,
so padded positions change nothing for the valid ones. Small defaults (2 layers x 128) for CPU;
the paper's large model is hidden 1024, 8 heads, FFN 4096, 6 layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.config import check, check_range

__all__ = ["MCAN", "MCANConfig", "AttFlat", "MHAtt", "SA", "SGA"]


@dataclass
class MCANConfig:
    hidden: int = 128
    heads: int = 4
    ffn: int = 256
    layers: int = 2
    dropout: float = 0.1
    flat_mlp: int = 128
    flat_glimpses: int = 1
    flat_out: int = 256
    visual_norm: bool = True  # LayerNorm on the raw visual input (see TopDownConfig)

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "ffn", "layers", "flat_mlp", "flat_glimpses", "flat_out"):
            check_range(name, getattr(self, name), ge=1)
        check(
            self.hidden % self.heads == 0,
            "hidden",
            f"must be a multiple of heads={self.heads}",
            self.hidden,
        )
        check_range("dropout", self.dropout, ge=0, lt=1)  # 1 would zero every activation


class MHAtt(nn.Module):
    """Multi-head attention; `mask` (B, Nk) True = a key that may be attended to."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.merge = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, h, N, d)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self._split(self.q(query)), self._split(self.k(key)), self._split(self.v(value))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, h, Nq, d)
        return self.merge(out.transpose(1, 2).flatten(2))  # (B, Nq, D)


class FFN(nn.Sequential):
    def __init__(self, hidden: int, ffn: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(hidden, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, hidden)
        )


class SA(nn.Module):
    """Self-attention unit: x = LN(x + SA(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: MCANConfig) -> None:
        super().__init__()
        self.att = MHAtt(cfg.hidden, cfg.heads, cfg.dropout)
        self.ffn = FFN(cfg.hidden, cfg.ffn, cfg.dropout)
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop1(self.att(x, x, x, mask)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class SGA(nn.Module):
    """Self-guided-attention unit: SA on y, then y attends to x (guided attention), then FFN."""

    def __init__(self, cfg: MCANConfig) -> None:
        super().__init__()
        self.self_att = MHAtt(cfg.hidden, cfg.heads, cfg.dropout)
        self.guided_att = MHAtt(cfg.hidden, cfg.heads, cfg.dropout)
        self.ffn = FFN(cfg.hidden, cfg.ffn, cfg.dropout)
        self.drops = nn.ModuleList(nn.Dropout(cfg.dropout) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.hidden) for _ in range(3))

    def forward(
        self, y: torch.Tensor, x: torch.Tensor, y_mask: torch.Tensor, x_mask: torch.Tensor
    ) -> torch.Tensor:
        y = self.norms[0](y + self.drops[0](self.self_att(y, y, y, y_mask)))
        y = self.norms[1](y + self.drops[1](self.guided_att(y, x, x, x_mask)))
        return self.norms[2](y + self.drops[2](self.ffn(y)))


class AttFlat(nn.Module):
    """Attentional reduction: softmax over valid positions of an MLP score, per glimpse."""

    def __init__(self, cfg: MCANConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.flat_mlp),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.flat_mlp, cfg.flat_glimpses),
        )
        self.merge = nn.Linear(cfg.hidden * cfg.flat_glimpses, cfg.flat_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        att = self.mlp(x).masked_fill(~mask.unsqueeze(-1), float("-inf")).softmax(dim=1)
        pooled = torch.einsum("bng,bnd->bgd", att, x).flatten(1)  # (B, G * D)
        return self.merge(pooled)  # (B, flat_out)


class MCAN(nn.Module):
    """`forward(features (B, N, C), mask (B, N), q_ids (B, L), q_mask (B, L), spatial (B, N, 4))`
    -> logits (B, num_answers)."""

    def __init__(
        self,
        question: nn.Module,
        visual_dim: int,
        num_answers: int,
        cfg: MCANConfig | None = None,
        spatial_dim: int = 0,
    ) -> None:
        super().__init__()
        cfg = cfg or MCANConfig()
        self.cfg, self.spatial_dim = cfg, spatial_dim
        self.question = question
        self.q_proj = (
            nn.Identity() if question.dim == cfg.hidden else nn.Linear(question.dim, cfg.hidden)
        )
        self.visual_norm = nn.LayerNorm(visual_dim) if cfg.visual_norm else nn.Identity()
        self.v_proj = nn.Linear(visual_dim, cfg.hidden)
        self.spatial_proj = nn.Linear(spatial_dim, cfg.hidden) if spatial_dim else None
        self.encoder = nn.ModuleList(SA(cfg) for _ in range(cfg.layers))
        self.decoder = nn.ModuleList(SGA(cfg) for _ in range(cfg.layers))
        self.flat_q, self.flat_v = AttFlat(cfg), AttFlat(cfg)
        self.norm = nn.LayerNorm(cfg.flat_out)
        self.classifier = nn.Linear(cfg.flat_out, num_answers)

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        q_ids: torch.Tensor,
        q_mask: torch.Tensor,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens, _ = self.question(q_ids, q_mask)
        x = self.q_proj(tokens)  # (B, L, D)
        y = self.v_proj(self.visual_norm(features))  # (B, N, D)
        if self.spatial_proj is not None:
            if spatial is None:
                raise ValueError("this model was built with spatial features: pass `spatial`")
            y = y + self.spatial_proj(spatial.to(y.dtype))
        for layer in self.encoder:
            x = layer(x, q_mask)
        for layer in self.decoder:
            y = layer(y, x, mask, q_mask)
        fused = self.norm(self.flat_q(x, q_mask) + self.flat_v(y, mask))  # (B, flat_out)
        return self.classifier(fused)  # (B, A)
