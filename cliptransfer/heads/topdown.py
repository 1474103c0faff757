"""Top-down attention VQA model (Anderson et al. 2018; Teney et al. 2018; Pythia v0.1).

question GRU -> q (B, D)
attention:  a = softmax_N( w . dropout(f_v(v_i) * f_q(q)) )    over valid cells/regions only
fusion:     h = f_q'(q) * f_v'(sum_i a_i v_i)                  element-wise
classifier: logits = W2 dropout(f(h))                          (B, num_answers), for sigmoid BCE

Every f is a weight-normed layer with a gated tanh (y = tanh(Wx) * sigmoid(W'x), Teney et al.)
or ReLU (the BUTD repository). Reference: hengyuan-hu/bottom-up-attention-vqa (`base_model.py`,
`attention.py` NewAttention, `classifier.py`, `fc.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from cliptransfer.config import check_range

__all__ = ["GatedTanh", "TopDown", "TopDownConfig", "masked_softmax", "wn_linear"]


@dataclass
class TopDownConfig:
    hidden: int = 512
    glimpses: int = 1  # attention maps; their attended features are concatenated
    nonlinearity: Literal["gated_tanh", "relu"] = "gated_tanh"
    dropout: float = 0.2  # inside the attention and on the fused vector
    classifier_dropout: float = 0.5
    # LayerNorm on the visual input: CLIP layer4 activations have a large, backbone-dependent
    # scale (BUTD's region features were ReLU means of similar scale everywhere).
    visual_norm: bool = True

    def __post_init__(self) -> None:
        check_range("hidden", self.hidden, ge=1)
        check_range("glimpses", self.glimpses, ge=1)
        check_range("dropout", self.dropout, ge=0, lt=1)  # 1 would zero every activation
        check_range("classifier_dropout", self.classifier_dropout, ge=0, lt=1)


def wn_linear(d_in: int, d_out: int) -> nn.Linear:
    """Weight-normed linear layer, one scalar gain per matrix (BUTD's `weight_norm(dim=None)`)."""
    return weight_norm(nn.Linear(d_in, d_out), dim=None)


class GatedTanh(nn.Module):
    """y = tanh(W x + b) * sigmoid(W' x + b')."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = wn_linear(d_in, d_out)
        self.gate = wn_linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)) * torch.sigmoid(self.gate(x))


def _layer(d_in: int, d_out: int, nonlinearity: str) -> nn.Module:
    if nonlinearity == "gated_tanh":
        return GatedTanh(d_in, d_out)
    if nonlinearity == "relu":
        return nn.Sequential(wn_linear(d_in, d_out), nn.ReLU())
    raise ValueError(f"nonlinearity must be 'gated_tanh' or 'relu', got {nonlinearity!r}")


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax over `dim` with masked-out entries (mask False) at exactly zero weight."""
    return logits.masked_fill(~mask, float("-inf")).softmax(dim=dim)


class TopDown(nn.Module):
    """`forward(features (B, N, C), mask (B, N), q_ids (B, L), q_mask (B, L), spatial (B, N, 4))`
    -> logits (B, num_answers). `question` is a question encoder (see `models.question`)."""

    def __init__(
        self,
        question: nn.Module,
        visual_dim: int,
        num_answers: int,
        cfg: TopDownConfig | None = None,
        spatial_dim: int = 0,
    ) -> None:
        super().__init__()
        cfg = cfg or TopDownConfig()
        self.cfg, self.spatial_dim = cfg, spatial_dim
        H, q_dim, nl = cfg.hidden, question.dim, cfg.nonlinearity
        v_dim = visual_dim + spatial_dim
        self.question = question
        self.visual_norm = nn.LayerNorm(visual_dim) if cfg.visual_norm else nn.Identity()
        self.att_v = _layer(v_dim, H, nl)
        self.att_q = _layer(q_dim, H, nl)
        self.att_drop = nn.Dropout(cfg.dropout)
        self.att_logits = wn_linear(H, cfg.glimpses)
        self.q_net = _layer(q_dim, H, nl)
        self.v_net = _layer(v_dim * cfg.glimpses, H, nl)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Sequential(
            _layer(H, 2 * H, nl),
            nn.Dropout(cfg.classifier_dropout),
            wn_linear(2 * H, num_answers),
        )

    def attention(self, v: torch.Tensor, mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, N, G) over the valid cells/regions."""
        joint = self.att_v(v) * self.att_q(q).unsqueeze(1)  # (B, N, H)
        logits = self.att_logits(self.att_drop(joint))  # (B, N, G)
        return masked_softmax(logits, mask.unsqueeze(-1), dim=1)

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        q_ids: torch.Tensor,
        q_mask: torch.Tensor,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, q = self.question(q_ids, q_mask)  # (B, Dq)
        v = self.visual_norm(features)  # (B, N, C)
        if self.spatial_dim:
            if spatial is None:
                raise ValueError("this model was built with spatial features: pass `spatial`")
            v = torch.cat([v, spatial.to(v.dtype)], dim=-1)  # (B, N, C + 4)
        att = self.attention(v, mask, q)  # (B, N, G)
        v_att = torch.einsum("bng,bnc->bgc", att, v).flatten(1)  # (B, G * (C + 4))
        joint = self.drop(self.q_net(q) * self.v_net(v_att))  # (B, H)
        return self.classifier(joint)  # (B, A)
