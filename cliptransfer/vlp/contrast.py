"""ALBEF's additions to V&L pretraining (beyond CLIP-ViL_p, off by default): an image-text
contrastive loss (ITC) on the two sides' pooled features before fusion, and ITM hard negatives
drawn from the batch in proportion to that similarity (Li et al. 2021, "Align before Fuse").

The single-stream `vlbert` has no unimodal towers, so the two pooled features are the
masked means of its embedding layers: the projected cells (`visual_proj`, before the x / y
embeddings) and the caption's word embeddings, each through its own Linear into `itc_dim`.

Pairs: an item is a positive for ITC only when its sentence is its image's own (`itm` = 1);
other sentences of the same image in the batch (captions of one COCO image) are neither
positive nor negative for it (masked out), as are the swapped items' rows and columns.
Hard negatives are drawn among the matched items of each process's batch, as ALBEF, from the
process's torch RNG (checkpointed by the engine, so a resumed run draws the same ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptransfer.contrastive.losses.clip import local_targets
from cliptransfer.engine.distributed import gather_no_grad, gather_with_grad, global_mean

__all__ = ["hard_negative_weights", "itc_loss", "masked_mean", "sample_hard_negatives"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, H), (B, N) bool -> (B, H): the mean over the unmasked positions (zeros if none)."""
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def _same_image_off_diagonal(rows: torch.Tensor, cols: torch.Tensor,
                             own: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(B, G) bool: column j shows row i's image but is not row i's own pair (column own[i])."""
    same = rows[:, None] == cols[None, :]
    return same & (torch.arange(len(cols), device=rows.device)[None, :] != own[:, None])


def itc_loss(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor,
             text_image_ids: torch.Tensor, matched: torch.Tensor,
             temperature: float) -> torch.Tensor:  # fmt: skip
    """The symmetric InfoNCE over the global batch, on the matched items only.

    image, text: (B, D) L2-normalised pooled features of this process's items; image_ids (B,):
    each item's image; text_image_ids (B,): the image its sentence was written for; matched (B,)
    bool. Row i (image -> texts) and column i (text -> images) of a matched item have target i;
    entries of the same image other than the pair itself are masked. The local sum is divided by
    the global matched count times the world size, so DDP's gradient mean is the exact mean over
    the global batch (`global_mean`); 0 with a graph when nothing is matched anywhere.
    """
    B = image.shape[0]
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)  # (G, D)
    all_image_ids, all_text_ids = gather_no_grad(image_ids), gather_no_grad(text_image_ids)
    targets = local_targets(B, image.device)  # every rank holds B items (drop_last)
    i2t = image.float() @ all_text.float().t() / temperature  # (B, G)
    t2i = text.float() @ all_image.float().t() / temperature  # (B, G)
    i2t = i2t.masked_fill(_same_image_off_diagonal(image_ids, all_text_ids, targets), float("-inf"))
    t2i = t2i.masked_fill(_same_image_off_diagonal(text_image_ids, all_image_ids, targets),
                          float("-inf"))  # fmt: skip
    picked = matched.bool()
    loss = (
        F.cross_entropy(i2t[picked], targets[picked], reduction="sum")
        + F.cross_entropy(t2i[picked], targets[picked], reduction="sum")
    ) / 2
    return global_mean(loss, picked.sum(), image + text)


@torch.no_grad()
def hard_negative_weights(similarity: torch.Tensor, row_ids: torch.Tensor,
                          col_ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(M, M) similarity logits -> (M, M) sampling weights: softmax over each row with every
    column of the row's own image at 0 (never a negative of its own image). A row whose
    columns are all its own image has weight 0 everywhere."""
    logits = similarity.float().masked_fill(row_ids[:, None] == col_ids[None, :], float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return torch.nan_to_num(weights, nan=0.0)  # softmax of an all -inf row


@torch.no_grad()
def sample_hard_negatives(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:  # fmt: skip
    """ALBEF's hard negatives among M matched items (their image and sentence belong together).

    image, text: (M, D) normalised features; image_ids (M,). Returns (rows_i, texts_i) — for
    each image row with a candidate, a text of another image drawn with probability
    softmax(sim / T) — and (rows_t, images_t) — for each text, an image of another picture.
    """
    sim = image.float() @ text.float().t() / temperature  # (M, M) image -> text
    w_i2t = hard_negative_weights(sim, image_ids, image_ids)
    w_t2i = hard_negative_weights(sim.t(), image_ids, image_ids)
    rows_i = (w_i2t.sum(1) > 0).nonzero().flatten()
    rows_t = (w_t2i.sum(1) > 0).nonzero().flatten()
    texts_i = torch.multinomial(w_i2t[rows_i], 1).flatten() if len(rows_i) else rows_i
    images_t = torch.multinomial(w_t2i[rows_t], 1).flatten() if len(rows_t) else rows_t
    return rows_i, texts_i, rows_t, images_t
