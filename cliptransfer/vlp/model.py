"""The pretraining model: the `vlbert` head plus LXMERT's pretraining heads, and the objectives'
losses as named terms.

- MLM: BERT's prediction head (Linear - GeLU - LayerNorm, then the word embeddings transposed
  plus a bias) on every text position (as LXMERT); loss on the masked positions only.
- ITM: Linear(H, 2) on the pooled state (LXMERT's `seq_relationship`).
- QA: the head's own answer MLP (`classifier`, LXMERT's `logit_fc`) over the pretraining
  answer table, so fine-tuning VQA starts from it for the answers both tables share
  (`cliptransfer.vlp.transfer`).

The MLM and QA terms are token/item means over the *global* batch (`mlm_loss` divides the local
sum by the gathered count), so they are exact across processes; ITM is a mean over every item.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.contrastive.losses.declip import mlm_loss
from cliptransfer.heads.vlbert import VLBert, VLBertConfig
from cliptransfer.vlp.objectives import IGNORE

__all__ = ["VLPHead", "vlp_losses"]


class VLPHead(VLBert):
    """`VLBert` (same parameter names, so its weights load into the task head) with the MLM and
    ITM heads; `forward` returns {"mlm": (B, L, V), "itm": (B, 2), "qa": (B, A)} logits."""

    def __init__(self, cfg: VLBertConfig, vocab_size: int, visual_dim: int, num_answers: int,
                 pad_id: int = 0) -> None:  # fmt: skip
        super().__init__(cfg, vocab_size, visual_dim, max(num_answers, 1), pad_id)
        h = self.hidden
        self.mlm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h))
        self.mlm_bias = nn.Parameter(torch.zeros(self.bert.config.vocab_size))
        self.itm = nn.Linear(h, 2)

    def forward(self, features, mask, text_ids, text_mask, spatial) -> dict[str, torch.Tensor]:
        states, pooled = self.encode(features, mask, text_ids, text_mask, spatial)
        words = self.bert.embeddings.word_embeddings.weight  # (V, H), tied as in BERT
        text = self.mlm_transform(states[:, : text_ids.shape[1]])  # (B, L, H)
        return {"mlm": text @ words.t() + self.mlm_bias, "itm": self.itm(pooled),
                "qa": self.classifier(pooled)}  # fmt: skip


def vlp_losses(out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
               weights: Mapping[str, float]) -> dict[str, torch.Tensor]:  # fmt: skip
    """{"loss": weighted sum, "mlm", "itm", "qa"} for the terms whose weight is > 0."""
    terms: dict[str, torch.Tensor] = {}
    if weights.get("mlm", 0) > 0:
        terms["mlm"] = mlm_loss(out["mlm"], batch["mlm_labels"], IGNORE)
    if weights.get("itm", 0) > 0:
        terms["itm"] = F.cross_entropy(out["itm"].float(), batch["itm"])
    if weights.get("qa", 0) > 0:
        terms["qa"] = mlm_loss(out["qa"], batch["qa"], IGNORE)  # matched questions only
    if not terms:
        raise ValueError("vlp_losses: no objective has a weight > 0")
    total = sum(weights[k] * v for k, v in terms.items())
    return {"loss": total, **terms}
