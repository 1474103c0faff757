"""SLIP (Mu et al. 2021): CLIP + SimCLR NT-Xent on two augmented image views, weighted 1:1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptransfer.contrastive.losses.clip import at_least_fp32, check_pair, clip_loss, local_targets
from cliptransfer.engine.distributed import gather_with_grad

__all__ = ["simclr_loss", "slip_loss"]


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over 2N views with negatives from all ranks (SLIP's formulation).

    z1, z2: (B, D) embeddings of two views of the same B images (L2-normalised here).
    For each view-1 embedding the candidates are all view-2 embeddings and all other view-1
    embeddings (its own self-similarity is masked out); symmetrically for view 2.
    """
    check_pair("simclr_loss", z1, z2)
    if temperature <= 0:
        raise ValueError(f"simclr_loss: temperature must be > 0, got {temperature}")
    z1 = F.normalize(z1, dim=-1)
    z2 = F.normalize(z2, dim=-1)
    all_z1 = gather_with_grad(z1)  # (world*B, D)
    all_z2 = gather_with_grad(z2)  # (world*B, D)
    targets = local_targets(z1.shape[0], z1.device)
    # Self-similarity column of each local row in the gathered matrix.
    self_mask = F.one_hot(targets, all_z1.shape[0]).bool()  # (B, world*B)

    def view_loss(q: torch.Tensor, k_other: torch.Tensor, k_same: torch.Tensor) -> torch.Tensor:
        logits_pos = q @ k_other.T / temperature  # (B, world*B): positive on the target column
        logits_same = (q @ k_same.T / temperature).masked_fill(self_mask, float("-inf"))
        logits = at_least_fp32(torch.cat([logits_pos, logits_same], dim=1))  # (B, 2*world*B)
        return F.cross_entropy(logits, targets)

    return (view_loss(z1, all_z2, all_z1) + view_loss(z2, all_z1, all_z2)) / 2


def slip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    logit_scale: torch.Tensor | float,
    temperature: float = 0.1,
    ssl_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """SLIP objective: {"loss": clip + ssl_weight * ssl, "clip": ..., "ssl": ...}.

    img, txt: (B, D) CLIP embeddings; z1, z2: (B, D') SimCLR projections of two image views.
    """
    loss_clip = clip_loss(img, txt, logit_scale)
    loss_ssl = simclr_loss(z1, z2, temperature)
    return {"loss": loss_clip + ssl_weight * loss_ssl, "clip": loss_clip, "ssl": loss_ssl}
