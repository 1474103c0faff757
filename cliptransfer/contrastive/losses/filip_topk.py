"""FILIP as the Sense-GVT/DeCLIP reference computes it: top-k partner tokens as candidates only.

Transcribes `get_weighted_dense_logits` of the reference (Sense-GVT/DeCLIP commit 5d99a85,
prototype/model/filip.py lines 71-106; defilip.py lines 224-269 is the same code):

1. Image tokens x_i1..x_in and text tokens y_i1..y_iL are L2-normalised (every text position,
   padding included: the reference has no text mask).
2. Selection (lines 78-87), per *matched* pair i only: S_i = X_i Y_i^T (n, L); image token a is
   ranked by sum_b S_i[a, b], text token b by sum_a S_i[a, b]; the top k of each are kept.
3. Only the candidate side uses the kept tokens (lines 92-105): for a local image i and any
   gathered text j, sim_i2t(i, j) = mean over *all* n tokens a of max over j's k kept tokens;
   for a local text j and any gathered image i, sim_t2i(j, i) = mean over *all* L positions b
   of max over i's k kept image tokens.
4. logits = exp(logit_scale_dense) * sim, CLIP-style cross-entropy both ways, averaged.

The selection depends only on each pair itself, so the local-loss form is exact across ranks
(tests/test_contrastive_reference.py checks 2 processes against 1). With fewer than k tokens on
a side all of them are kept (the reference's `torch.topk` would raise instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The blocked, checkpointed similarity kernels of the default FILIP loss: with an all-True mask
# `_i2t_block` is mean-over-rows of max-over-candidates and `_t2i_block` the same the other way.
from cliptransfer.contrastive.losses.filip import (
    _blocked,
    _i2t_block,
    _t2i_block,
    symmetric_loss,
)
from cliptransfer.engine.distributed import gather_with_grad

__all__ = ["REFERENCE_FILIP_TOP_K", "filip_topk_loss", "select_partner_tokens"]

# `get_weighted_dense_logits(..., top_k=16)` in the reference.
REFERENCE_FILIP_TOP_K = 16


@torch.no_grad()
def _partner_indices(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, ka), (B, kb) of the top-k tokens of a and b by summed similarity to the pair's
    other side (reference filip.py lines 79-81)."""
    sim = torch.einsum("bnd,bmd->bnm", a, b)  # (B, n, m): pair i with itself only
    ia = sim.sum(dim=2).topk(min(k, a.shape[1]), dim=1).indices  # (B, ka)
    ib = sim.sum(dim=1).topk(min(k, b.shape[1]), dim=1).indices  # (B, kb)
    return ia, ib


def select_partner_tokens(
    img: torch.Tensor, txt: torch.Tensor, k: int = REFERENCE_FILIP_TOP_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each pair's k image and k text tokens with the largest summed similarity to the
    matched partner. img (B, n, D), txt (B, L, D), both normalised; returns (B, min(k, n), D)
    and (B, min(k, L), D) in descending score order. Indices carry no gradient, the kept
    features do (as the reference's indexing)."""
    if (
        img.ndim != 3
        or txt.ndim != 3
        or img.shape[0] != txt.shape[0]
        or img.shape[2] != txt.shape[2]
    ):
        raise ValueError(
            f"select_partner_tokens: expected image tokens (B, n, D) and text tokens (B, L, D), "
            f"got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if k < 1:
        raise ValueError(f"select_partner_tokens: k must be >= 1, got {k}")
    ia, ib = _partner_indices(img, txt, k)
    return (
        torch.take_along_dim(img, ia[..., None], dim=1),  # (B, ka, D)
        torch.take_along_dim(txt, ib[..., None], dim=1),  # (B, kb, D)
    )


def filip_topk_loss(
    img_tokens: torch.Tensor,
    txt_tokens: torch.Tensor,
    logit_scale: torch.Tensor | float,
    top_k: int = REFERENCE_FILIP_TOP_K,
    chunk_size: int | None = 64,
) -> torch.Tensor:
    """The reference's FILIP loss of paired token sequences, negatives from all ranks.

    img_tokens: (B, n, D) local image tokens; txt_tokens: (B, L, D) local text tokens, every
    position (the same L on every rank); logit_scale: the multiplicative dense scale
    (`logit_scale_dense.exp()`); chunk_size: candidates per checkpointed block (None: at once).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"filip_topk_loss: chunk_size must be >= 1 or None, got {chunk_size}")
    if img_tokens.shape[0] == 0:
        raise ValueError("filip_topk_loss: empty batch")
    img = F.normalize(img_tokens, dim=-1)  # (B, n, D)
    txt = F.normalize(txt_tokens, dim=-1)  # (B, L, D)
    img_kept, txt_kept = select_partner_tokens(img, txt, top_k)  # (B, ka, D), (B, kb, D)
    all_img = gather_with_grad(img_kept)  # (world*B, ka, D)
    all_txt = gather_with_grad(txt_kept)  # (world*B, kb, D)
    # All-True masks: the reference masks nothing (rows keep every position, padding included).
    cand_mask = torch.ones(all_txt.shape[:2], dtype=torch.bool, device=txt.device)
    row_mask = torch.ones(txt.shape[:2], dtype=torch.bool, device=txt.device)
    i2t = _blocked(_i2t_block, (img,), (all_txt, cand_mask), chunk_size)  # (B, world*B)
    t2i = _blocked(_t2i_block, (txt, row_mask), (all_img,), chunk_size)  # (B, world*B)
    return symmetric_loss(i2t, t2i, logit_scale)
