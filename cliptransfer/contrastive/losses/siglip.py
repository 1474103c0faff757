"""SigLIP pairwise sigmoid loss (Zhai et al. 2023), exact across ranks.

loss = -1/B_global * sum_{i,j} log sigmoid(z_ij * (t * x_i . y_j + b)), z = +1 on matching pairs,
-1 elsewhere. Each rank sums over its B local images x all gathered texts and divides by its
local B, so the mean over ranks is the global loss. The text columns are processed in chunks
(each one checkpointed) so the (B, world*B) logits need not be kept for backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cliptransfer.contrastive.losses.clip import at_least_fp32, check_pair
from cliptransfer.engine.distributed import gather_with_grad, world_info

__all__ = ["SIGLIP_LOGIT_BIAS_INIT", "SIGLIP_LOGIT_SCALE_INIT", "siglip_loss"]

# Paper initialisation: t' = log 10 (t = exp(t') = 10) and b = -10.
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def _siglip_block(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    offset: int,
) -> torch.Tensor:
    """Sum of -log sigmoid(z * logits) over img (B, D) x txt (C, D); column c pairs row c+offset."""
    logits = at_least_fp32(logit_scale * img @ txt.T + logit_bias)  # (B, C)
    rows = torch.arange(img.shape[0], device=img.device)[:, None]
    cols = torch.arange(txt.shape[0], device=img.device)[None, :] + offset
    signs = torch.where(rows == cols, 1.0, -1.0).to(logits)
    return -F.logsigmoid(signs * logits).sum()


def siglip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sigmoid loss of paired features with negatives from all ranks.

    img, txt: (B, D) local features (L2-normalised here).
    logit_scale: t = exp(t'), the multiplicative scale; logit_bias: b (used as is).
    chunk_size: number of text columns per block (None: one block). Blocks are checkpointed
    when gradients are on, so backward keeps only the inputs, not every block's logits.
    """
    check_pair("siglip_loss", img, txt)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"siglip_loss: chunk_size must be >= 1 or None, got {chunk_size}")
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    rank, _ = world_info()
    batch = img.shape[0]
    all_txt = gather_with_grad(txt)  # (world*B, D)
    # All-gather + column blocks instead of the paper's ring exchange: same sum, simpler code.
    step = chunk_size or all_txt.shape[0]
    total = at_least_fp32(img.new_zeros(()))
    for start in range(0, all_txt.shape[0], step):
        block = all_txt[start : start + step]  # (C, D)
        offset = start - rank * batch
        if chunk_size is not None and torch.is_grad_enabled():
            total = total + checkpoint(
                _siglip_block, img, block, logit_scale, logit_bias, offset, use_reentrant=False
            )
        else:
            total = total + _siglip_block(img, block, logit_scale, logit_bias, offset)
    return total / batch
