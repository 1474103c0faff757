"""Zero-shot classification with prompt templates (CLIP's protocol)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def class_embeddings(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """(C, D): per class, the mean of its L2-normalised template embeddings, renormalised."""
    out = []
    for name in classnames:
        ids = tokenize([t.format(name) for t in templates])  # (T, L)
        emb = F.normalize(encode_text(ids).float(), dim=-1)  # (T, D)
        out.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(out)


def zeroshot_accuracy(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1,)
) -> dict[str, float]:
    """Top-K accuracy in percent of images (N, D) against class embeddings (C, D)."""
    logits = F.normalize(image_emb.float(), dim=-1) @ class_emb.T  # (N, C)
    out = {}
    for k in ks:
        if k > class_emb.shape[0]:
            continue
        topk = logits.topk(k, dim=1).indices  # (N, k)
        out[f"top{k}"] = 100.0 * (topk == labels[:, None]).any(dim=1).float().mean().item()
    return out
