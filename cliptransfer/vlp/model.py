"""The pretraining model: the `vlbert` head plus LXMERT's pretraining heads, and the objectives'
losses as named terms.

- MLM: BERT's prediction head (Linear - GeLU - LayerNorm, then the word embeddings transposed
  plus a bias) on every text position (as LXMERT); loss on the masked positions only.
- ITM: Linear(H, 2) on the pooled state (LXMERT's `seq_relationship`).
- QA: the head's own answer MLP (`classifier`, LXMERT's `logit_fc`) over the pretraining
  answer table, so fine-tuning VQA starts from it for the answers both tables share
  (`cliptransfer.vlp.transfer`).
- Optional (LXMERT's masked feature regression, `feature_regression`): the cells in
  `masked_cells` enter as zeros and their original features are regressed from their final
  states (Linear - GeLU - LayerNorm - Linear; mean squared error per cell).
- Optional (ALBEF, `cliptransfer.vlp.contrast`): ITC on the pooled embedding layers
  (`itc_dim` > 0), and in training ITM hard negatives: for the matched items, one sentence of
  another image per image and one image of another picture per sentence, drawn in proportion to
  the ITC similarity and scored by the same fusion forward (`itm` then has B + 2M rows and
  `itm_target` their labels).

The MLM and QA terms are token/item means over the *global* batch (`mlm_loss` divides the local
sum by the gathered count), so they are exact across processes, as is ITC (gathered features);
ITM is a mean over every item. Hard negatives are drawn per process among its own matched
items (as ALBEF), so with them the ITM term is not the 1-process value.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.contrastive.losses.declip import mlm_loss
from cliptransfer.engine.distributed import global_mean
from cliptransfer.heads.vlbert import VLBert, VLBertConfig
from cliptransfer.vlp.contrast import itc_loss, masked_mean, sample_hard_negatives
from cliptransfer.vlp.objectives import IGNORE

__all__ = ["VLPHead", "feature_regression_loss", "vlp_losses"]


class VLPHead(VLBert):
    """`VLBert` (same parameter names, so its weights load into the task head) with the MLM and
    ITM heads (and ALBEF's ITC projections when `itc_dim` > 0); `forward` returns {"mlm": (B, L,
    V), "itm": (B (+ 2M), 2), "qa": (B, A)} logits (+ "itc_image", "itc_text" (B, itc_dim),
    "itm_target" (B + 2M,))."""

    # The batch keys beyond the visual inputs and text that `VLModel` passes on.
    batch_keys = ("itm", "image", "text_image", "masked_cells")

    def __init__(self, cfg: VLBertConfig, vocab_size: int, visual_dim: int, num_answers: int,
                 pad_id: int = 0, itc_dim: int = 0, itc_temperature: float = 0.07,
                 hard_negatives: bool = False,
                 feature_regression: bool = False) -> None:  # fmt: skip
        super().__init__(cfg, vocab_size, visual_dim, max(num_answers, 1), pad_id)
        if hard_negatives and not itc_dim:
            raise ValueError("VLPHead: hard negatives are drawn by ITC similarity: set itc_dim")
        h = self.hidden
        self.mlm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h))
        self.mlm_bias = nn.Parameter(torch.zeros(self.bert.config.vocab_size))
        self.itm = nn.Linear(h, 2)
        self.itc_temperature, self.hard_negatives = itc_temperature, hard_negatives
        if itc_dim:
            self.itc_image, self.itc_text = nn.Linear(h, itc_dim), nn.Linear(h, itc_dim)
        if feature_regression:
            self.feature_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h),
                                              nn.Linear(h, visual_dim))  # fmt: skip

    def pooled_sides(
        self, features, mask, text_ids, text_mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, itc_dim) each, L2-normalised: the masked means of the projected cells and of the
        word embeddings, each through its own Linear."""
        cells = self.visual_proj(features)  # (B, N, H), no position embeddings
        words = self.bert.embeddings.word_embeddings(text_ids)  # (B, L, H)
        image = self.itc_image(masked_mean(cells, mask.bool()))
        text = self.itc_text(masked_mean(words, text_mask.bool()))
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def forward(self, features, mask, text_ids, text_mask, spatial, itm=None, image=None,
                text_image=None, masked_cells=None) -> dict[str, torch.Tensor]:  # fmt: skip
        out: dict[str, torch.Tensor] = {}
        B = text_ids.shape[0]
        if masked_cells is not None:  # zeroed in every use of the batch (also ITC, negatives)
            features = features.masked_fill(masked_cells.unsqueeze(-1), 0.0)
        rows = [features, mask, text_ids, text_mask, spatial]
        if hasattr(self, "itc_image"):
            out["itc_image"], out["itc_text"] = self.pooled_sides(features, mask, text_ids,
                                                                  text_mask)  # fmt: skip
        negatives = 0
        if self.hard_negatives and self.training and itm is not None:
            m = itm.bool().nonzero().flatten()  # the matched items
            r_i, t_i, r_t, i_t = sample_hard_negatives(out["itc_image"][m], out["itc_text"][m],
                                                       image[m], self.itc_temperature)  # fmt: skip
            vis, txt = torch.cat([m[r_i], m[i_t]]), torch.cat([m[t_i], m[r_t]])  # image, sentence
            rows = [torch.cat([x, x[vis]]) for x in (features, mask)] + [
                torch.cat([x, x[txt]]) for x in (text_ids, text_mask)] + [
                torch.cat([spatial, spatial[vis]])]  # fmt: skip
            negatives = len(vis)
            out["itm_target"] = torch.cat([itm, itm.new_zeros(negatives)])
        states, pooled = self.encode(*rows)  # (B + negatives, L + N, H), (B + negatives, H)
        words = self.bert.embeddings.word_embeddings.weight  # (V, H), tied as in BERT
        text = self.mlm_transform(states[:B, : text_ids.shape[1]])  # (B, L, H)
        out.update(mlm=text @ words.t() + self.mlm_bias, itm=self.itm(pooled),
                   qa=self.classifier(pooled[:B]))  # fmt: skip
        if hasattr(self, "feature_head"):
            out["cells"] = self.feature_head(states[:B, text_ids.shape[1] :])  # (B, N, C)
        return out


def vlp_losses(out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
               weights: Mapping[str, float], itc_temperature: float = 0.07,
               ) -> dict[str, torch.Tensor]:  # fmt: skip
    """{"loss": weighted sum, "mlm", "itm", "qa", "mfr", "itc"} for the terms whose weight is
    > 0."""
    terms: dict[str, torch.Tensor] = {}
    if weights.get("mlm", 0) > 0:
        terms["mlm"] = mlm_loss(out["mlm"], batch["mlm_labels"], IGNORE)
    if weights.get("itm", 0) > 0:
        target = out.get("itm_target", batch["itm"])  # + the hard negatives' zeros
        terms["itm"] = F.cross_entropy(out["itm"].float(), target)
    if weights.get("qa", 0) > 0:
        terms["qa"] = mlm_loss(out["qa"], batch["qa"], IGNORE)  # matched questions only
    if weights.get("mfr", 0) > 0:
        terms["mfr"] = feature_regression_loss(out["cells"], batch["features"],
                                               batch["masked_cells"])  # fmt: skip
    if weights.get("itc", 0) > 0:
        terms["itc"] = itc_loss(out["itc_image"], out["itc_text"], batch["image"],
                                batch["text_image"], batch["itm"], itc_temperature)  # fmt: skip
    if not terms:
        raise ValueError("vlp_losses: no objective has a weight > 0")
    total = sum(weights[k] * v for k, v in terms.items())
    return {"loss": total, **terms}


def feature_regression_loss(pred: torch.Tensor, target: torch.Tensor,
                            masked: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Mean over the masked cells of the global batch of each cell's mean squared error over
    channels (LXMERT's "feat" loss); pred, target (B, N, C), masked (B, N). The local sum is
    divided by the global count times the world size (`global_mean`: exact across processes)."""
    per_cell = (pred.float() - target.float().detach()).pow(2).mean(-1)  # (B, N)
    return global_mean(per_cell[masked.bool()].sum(), masked.sum(), pred)
