"""FILIP (Yao et al. 2021) token-wise late-interaction contrastive loss, exact across ranks.

For image i (tokens x_i1..x_in) and text j (valid tokens y_j1..y_jk), with cosine similarities:
    sim_i2t(i, j) = mean_a max_{b valid} x_ia . y_jb
    sim_t2i(j, i) = mean_{b valid} max_a  y_jb . x_ia
logits = scale * sim, CLIP-style CE in both directions over local rows x gathered candidates.
Padding text tokens are masked out of both the max and the mean (the DeCLIP reference did not).

Memory: similarities are computed in blocks of `chunk_size` candidates, each checkpointed, so
neither the full (B*n) x (N*k) similarity nor every block's argmax survives until backward;
the peak is one (B, chunk, n, k) block, linear in the batch for a fixed chunk size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cliptransfer.contrastive.losses.clip import at_least_fp32, local_targets
from cliptransfer.engine.distributed import gather_no_grad, gather_with_grad

__all__ = ["filip_loss", "filip_similarity", "select_image_tokens"]


def _i2t_block(img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """img (B, n, D) x txt (C, k, D), mask (C, k) -> (B, C): mean over n of max over valid k."""
    sim = torch.einsum("bnd,ckd->bcnk", img, txt)  # (B, C, n, k)
    sim = sim.masked_fill(~mask[None, :, None, :], float("-inf"))
    return sim.amax(dim=-1).mean(dim=-1)


def _t2i_block(txt: torch.Tensor, mask: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """txt (B, k, D), mask (B, k) x img (C, n, D) -> (B, C): mean over valid k of max over n."""
    best = torch.einsum("bkd,cnd->bckn", txt, img).amax(dim=-1)  # (B, C, k)
    # masked_fill (not multiply) so nothing from a padded position can leak, not even NaN.
    best = best.masked_fill(~mask[:, None, :], 0.0)
    return best.sum(dim=-1) / mask.sum(dim=-1, keepdim=True).to(best.dtype)


def _blocked(
    fn: Callable[..., torch.Tensor],
    rows: tuple[torch.Tensor, ...],
    cands: tuple[torch.Tensor, ...],
    chunk_size: int | None,
) -> torch.Tensor:
    """Concatenate fn(*rows, *cands[s:s+chunk]) over candidate blocks along dim 1 -> (B, N)."""
    total = cands[0].shape[0]
    step = chunk_size or total
    use_ckpt = chunk_size is not None and torch.is_grad_enabled()
    outs = []
    for start in range(0, total, step):
        block = tuple(c[start : start + step] for c in cands)
        if use_ckpt:
            outs.append(checkpoint(fn, *rows, *block, use_reentrant=False))
        else:
            outs.append(fn(*rows, *block))
    return torch.cat(outs, dim=1)


def _prepare(
    name: str, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return normalised image tokens, normalised (padding zeroed) text tokens
    and the boolean mask."""
    if img_tokens.ndim != 3 or txt_tokens.ndim != 3 or img_tokens.shape[-1] != txt_tokens.shape[-1]:
        raise ValueError(
            f"{name}: expected image tokens (B, n, D) and text tokens (B, k, D), got "
            f"{tuple(img_tokens.shape)} and {tuple(txt_tokens.shape)}"
        )
    if txt_mask.shape != txt_tokens.shape[:2]:
        raise ValueError(
            f"{name}: txt_mask {tuple(txt_mask.shape)} must match text tokens "
            f"{tuple(txt_tokens.shape[:2])}"
        )
    mask = txt_mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name}: texts {empty.tolist()} have no valid token in txt_mask")
    img = F.normalize(img_tokens, dim=-1)
    # Zero padded tokens *before* normalising: their values (even NaN) then get exactly zero grad.
    txt = F.normalize(txt_tokens.masked_fill(~mask[..., None], 0.0), dim=-1)
    return img, txt, mask


@torch.no_grad()
def _token_scores(
    img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """(B, n): max cosine of each image token over every valid token of every given text."""
    step = chunk_size or txt.shape[0]
    scores = torch.full(img.shape[:2], float("-inf"), device=img.device, dtype=img.dtype)
    for start in range(0, txt.shape[0], step):
        sim = torch.einsum("bnd,ckd->bnck", img, txt[start : start + step])  # (B, n, C, k)
        sim = sim.masked_fill(~mask[None, None, start : start + step], float("-inf"))
        scores = torch.maximum(scores, sim.amax(dim=(2, 3)))
    return scores


def select_image_tokens(
    img: torch.Tensor,
    txt: torch.Tensor,
    txt_mask: torch.Tensor,
    keep: float,
    chunk_size: int | None = 64,
) -> torch.Tensor:
    """FILIP token selection: keep round(keep*n) (>= 1) image tokens per image, those with the
    highest max similarity to any valid token of the given (local) texts.

    img (B, n, D), txt (C, k, D) normalised; txt_mask (C, k) bool. Returns (B, m, D) in the
    original token order; gradients flow through the kept tokens.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"select_image_tokens: keep must be in (0, 1], got {keep}")
    num = img.shape[1]
    m = max(1, round(keep * num))
    if m >= num:
        return img
    scores = _token_scores(img, txt, txt_mask.bool(), chunk_size)  # (B, n)
    idx = scores.topk(m, dim=1).indices.sort(dim=1).values  # (B, m)
    return torch.take_along_dim(img, idx[..., None], dim=1)


def filip_similarity(
    img_tokens: torch.Tensor,
    txt_tokens: torch.Tensor,
    txt_mask: torch.Tensor,
    chunk_size: int | None = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise similarities of every image with every text (e.g. for retrieval evaluation).

    img_tokens (Ni, n, D), txt_tokens (Nt, k, D), txt_mask (Nt, k) (True/1 = real token).
    Returns sim_i2t (Ni, Nt) and sim_t2i (Nt, Ni), both unscaled cosines in [-1, 1].
    """
    img, txt, mask = _prepare("filip_similarity", img_tokens, txt_tokens, txt_mask)
    i2t = _blocked(_i2t_block, (img,), (txt, mask), chunk_size)
    t2i = _blocked(_t2i_block, (txt, mask), (img,), chunk_size)
    return i2t, t2i


def symmetric_loss(i2t: torch.Tensor, t2i: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of this rank's rows, each
    (B, world*B) similarity scaled by `logit_scale`; a row's target is its own pair's column."""
    targets = local_targets(i2t.shape[0], i2t.device)
    loss_i2t = F.cross_entropy(at_least_fp32(logit_scale * i2t), targets)
    loss_t2i = F.cross_entropy(at_least_fp32(logit_scale * t2i), targets)
    return (loss_i2t + loss_t2i) / 2


def filip_loss(
    img_tokens: torch.Tensor,
    txt_tokens: torch.Tensor,
    txt_mask: torch.Tensor,
    logit_scale: torch.Tensor | float,
    chunk_size: int | None = 64,
    image_token_keep: float = 1.0,
) -> torch.Tensor:
    """FILIP contrastive loss of paired token sequences, with negatives from all ranks.

    img_tokens: (B, n, D) local image tokens; txt_tokens: (B, k, D) local text tokens (same k on
    every rank); txt_mask: (B, k), True/1 for real tokens, False/0 for padding.
    logit_scale: multiplicative scale (FILIP's own `exp(logit_scale_dense)` in the reference).
    chunk_size: candidates per checkpointed block (None: all at once, no checkpointing).
    image_token_keep: fraction of image tokens kept before gathering (FILIP uses 0.25), chosen
    by max similarity to this rank's texts, so with < 1 the result depends on the sharding.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"filip_loss: chunk_size must be >= 1 or None, got {chunk_size}")
    if img_tokens.shape[0] != txt_tokens.shape[0] or img_tokens.shape[0] == 0:
        raise ValueError(
            f"filip_loss: need the same B > 0 images and texts, got {tuple(img_tokens.shape)} "
            f"and {tuple(txt_tokens.shape)}"
        )
    img, txt, mask = _prepare("filip_loss", img_tokens, txt_tokens, txt_mask)
    if image_token_keep < 1.0:
        img = select_image_tokens(img, txt, mask, image_token_keep, chunk_size)  # (B, m, D)
    all_img = gather_with_grad(img)  # (world*B, n, D)
    all_txt = gather_with_grad(txt)  # (world*B, k, D)
    all_mask = gather_no_grad(mask.to(torch.uint8)).bool()  # (world*B, k)
    i2t = _blocked(_i2t_block, (img,), (all_txt, all_mask), chunk_size)  # (B, world*B)
    t2i = _blocked(_t2i_block, (txt, mask), (all_img,), chunk_size)  # (B, world*B)
    return symmetric_loss(i2t, t2i, logit_scale)
