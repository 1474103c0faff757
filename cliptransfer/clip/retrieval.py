"""Image <-> text retrieval recall@K (COCO/Flickr protocol: several captions per image)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent for both directions.

    image_emb: (N_img, D); text_emb: (N_txt, D); text_to_image: (N_txt,) index of each caption's
    image. Image->text counts a hit when ANY of the image's captions is in the top K; text->image
    when the caption's image is. Ties are broken pessimistically (a tied wrong item ranks first),
    so a constant model scores at chance, not at 100.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    sim = img @ txt.T  # (N_img, N_txt)
    n_img = img.shape[0]
    owner = text_to_image.long().to(sim.device)
    if owner.numel() != txt.shape[0] or (
        owner.numel() and (owner.min() < 0 or owner.max() >= n_img)
    ):
        raise ValueError(
            f"text_to_image must map each of the {txt.shape[0]} captions to one of {n_img} images"
        )
    # Rank of the best ground truth = number of wrong items scoring >= it.
    gt = owner.unsqueeze(0) == torch.arange(n_img, device=sim.device).unsqueeze(1)  # (N_img, N_txt)
    best_gt_i2t = sim.masked_fill(~gt, float("-inf")).max(dim=1).values  # (N_img,)
    rank_i2t = ((sim >= best_gt_i2t[:, None]) & ~gt).sum(dim=1)  # (N_img,)
    gt_t2i = sim.T.gather(1, owner[:, None])  # (N_txt, 1)
    rank_t2i = ((sim.T >= gt_t2i) & ~gt.T).sum(dim=1)  # (N_txt,)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * (rank_i2t < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * (rank_t2i < k).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
