"""DeCLIP (Li et al. 2022) supervision: multi-view (MVS), SimSiam, masked LM and nearest-neighbour.

total = 0.4 MVS + 0.2 SimSiam + 0.2 MLM + 0.2 NNS (Sense-GVT/DeCLIP defaults); DeFILIP adds
0.2 FILIP (`DEFILIP_WEIGHTS`, with the FILIP term from `cliptransfer.contrastive.losses.filip`).

NNS follows the reference (`declip.py` + lightly's NNMemoryBankModule): each text embedding is
replaced by its cosine nearest neighbour in a queue of past text embeddings (looked up before
the current batch is enqueued), and the loss is the image->NN-text cross-entropy only, averaged
over both image views x (caption, EDA caption). Deviations, on purpose: the queue stores the
*gathered* text features so every rank holds the same queue (the reference kept one per rank),
and enqueueing wraps around instead of dropping the part of a batch that crosses the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.contrastive.losses.clip import (
    at_least_fp32,
    check_pair,
    contrastive_ce,
    local_targets,
)
from cliptransfer.engine.distributed import (
    gather_no_grad,
    gather_with_grad,
    global_mean,
)

__all__ = [
    "DEFILIP_WEIGHTS",
    "DeCLIPWeights",
    "FeatureQueue",
    "SimSiamHead",
    "declip_loss",
    "mask_tokens",
    "mlm_loss",
    "mvs_loss",
    "nns_loss",
    "simsiam_loss",
    "weighted_sum",
]


@dataclass(frozen=True)
class DeCLIPWeights:
    """Weights of the DeCLIP terms; `filip` > 0 turns DeCLIP into DeFILIP."""

    mvs: float = 0.4
    simsiam: float = 0.2
    mlm: float = 0.2
    nns: float = 0.2
    filip: float = 0.0


DEFILIP_WEIGHTS = DeCLIPWeights(filip=0.2)


def weighted_sum(terms: Mapping[str, torch.Tensor], weights: DeCLIPWeights) -> torch.Tensor:
    """sum(weight * term) over the weights; a term with a nonzero weight must be present."""
    total = None
    for name, weight in asdict(weights).items():
        if weight == 0:
            continue
        if name not in terms:
            raise ValueError(
                f"weighted_sum: term {name!r} has weight {weight} but was not computed "
                f"(got terms {sorted(terms)}); pass its inputs or set its weight to 0"
            )
        total = weight * terms[name] if total is None else total + weight * terms[name]
    if total is None:
        raise ValueError("weighted_sum: every DeCLIP weight is 0")
    return total


# ---------------------------------------------------------------- multi-view supervision (MVS)


def mvs_loss(
    img_views: Sequence[torch.Tensor],
    txt_views: Sequence[torch.Tensor],
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Mean of the CLIP losses over every (image view, text view) pair, negatives from all ranks.

    img_views: e.g. 2 x (B, D) embeddings of two augmentations; txt_views: e.g. (caption, EDA
    caption) x (B, D). Each view is normalised and gathered once.
    """
    if not img_views or not txt_views:
        raise ValueError("mvs_loss: need at least one image view and one text view")
    for img in img_views:
        for txt in txt_views:
            check_pair("mvs_loss", img, txt)
    imgs = [F.normalize(x, dim=-1) for x in img_views]
    txts = [F.normalize(x, dim=-1) for x in txt_views]
    all_imgs = [gather_with_grad(x) for x in imgs]  # (world*B, D) each
    all_txts = [gather_with_grad(x) for x in txts]
    targets = local_targets(imgs[0].shape[0], imgs[0].device)
    losses = []
    for img, all_img in zip(imgs, all_imgs):
        for txt, all_txt in zip(txts, all_txts):
            i2t = contrastive_ce(img, all_txt, logit_scale, targets)
            t2i = contrastive_ce(txt, all_img, logit_scale, targets)
            losses.append((i2t + t2i) / 2)
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- SimSiam


class SimSiamHead(nn.Module):
    """SimSiam projector (3-layer MLP, BN on every layer) and bottleneck predictor (2 layers).

    Sizes follow the DeCLIP reference (1024-d projection, 512-d predictor bottleneck). Under DDP,
    convert the BatchNorms with `nn.SyncBatchNorm.convert_sync_batchnorm` for global statistics.
    """

    def __init__(self, dim: int, proj_dim: int = 1024, pred_dim: int = 512) -> None:
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(dim, proj_dim),
            nn.BatchNorm1d(proj_dim),
            nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim),
            nn.BatchNorm1d(proj_dim),
            nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim),
            nn.BatchNorm1d(proj_dim),
        )
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, proj_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, dim) image features -> (p, z), both (B, proj_dim)."""
        z = self.projector(x)
        return self.predictor(z), z


def simsiam_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """Symmetric negative cosine: -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2, mean over the batch.

    Per-sample, so the mean over ranks of equal local batches equals the global value.
    """
    for name, t in (("p2", p2), ("z1", z1), ("z2", z2)):
        if t.shape != p1.shape or t.ndim != 2:
            raise ValueError(
                f"simsiam_loss: p1, p2, z1, z2 must all be (B, D); p1 is {tuple(p1.shape)}, "
                f"{name} is {tuple(t.shape)}"
            )
    d1 = F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
    d2 = F.cosine_similarity(p2, z1.detach(), dim=-1).mean()
    return -(d1 + d2) / 2


# ---------------------------------------------------------------- masked language modelling


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy on masked positions only (labels != ignore_index).

    logits: (..., V); labels: (...) token ids or ignore_index. Across ranks the number of
    masked tokens differs, so the local sum is divided by the *global* count times world size:
    the mean over ranks is then the exact token mean over the global batch. With no masked token
    anywhere the loss is 0 (with a graph, so backward still works).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"mlm_loss: logits {tuple(logits.shape)} must be labels {tuple(labels.shape)} + (V,)"
        )
    flat_logits = at_least_fp32(logits.reshape(-1, logits.shape[-1]))
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    return global_mean(total, (flat_labels != ignore_index).sum(), flat_logits)


def mask_tokens(
    ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    word_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick each non-special token with `prob`; of those 80% -> mask_id, 10% ->
    a random non-special token, 10% unchanged. Returns (masked ids, labels with -100 elsewhere).

    Whole-word masking: `word_start` (bool, like `ids`) marks the first piece of each word; a
    word is picked or not as a unit (by its first piece's draw), then each of its pieces gets
    its own 80/10/10 replacement, as BERT's whole-word release does.

    Meant for dataloader workers (CPU); pass a seeded `generator` for determinism. Random
    replacements never draw a special id (e.g. EOT), unlike the reference, so a text tower that
    pools at the EOT token is not confused. `ids` is not modified.
    """
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mask_tokens: ids must be an int32/int64 tensor, got {ids.dtype}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mask_tokens: prob must be in [0, 1], got {prob}")
    special = torch.tensor(sorted(set(special_ids)) + [mask_id], dtype=ids.dtype)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[(special >= 0) & (special < vocab_size)].long()] = False
    candidates = allowed.nonzero().flatten().to(ids.dtype)  # ids a random replacement may take
    if candidates.numel() == 0:
        raise ValueError(f"mask_tokens: no non-special token among vocab_size={vocab_size}")
    is_special = torch.isin(ids, special.to(ids.device))

    def uniform() -> torch.Tensor:
        return torch.rand(ids.shape, generator=generator, device=ids.device)

    select = uniform()
    if word_start is not None:
        if word_start.shape != ids.shape or word_start.dtype != torch.bool:
            raise ValueError(f"mask_tokens: word_start must be a bool tensor shaped like ids "
                             f"{tuple(ids.shape)}, got {word_start.dtype} {tuple(word_start.shape)}")  # fmt: skip
        # Each position reads the draw of its word's first piece (the last start at or before it).
        pos = torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape)
        first = torch.cummax(torch.where(word_start, pos, torch.zeros_like(pos)), -1).values
        select = select.gather(-1, first)
    picked = (select < prob) & ~is_special
    to_mask = picked & (uniform() < 0.8)
    to_random = picked & ~to_mask & (uniform() < 0.5)  # half of the remaining 20%
    draws = torch.randint(candidates.numel(), ids.shape, generator=generator, device=ids.device)
    out = ids.clone()
    out[to_mask] = mask_id
    out[to_random] = candidates.to(ids.device)[draws[to_random]]
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    return out, labels


# ---------------------------------------------------------------- nearest-neighbour supervision


class FeatureQueue(nn.Module):
    """FIFO queue of L2-normalised text embeddings, kept in registered buffers (checkpointed).

    features (size, dim) start as seeded random unit vectors (as lightly's memory bank does),
    so every rank starts from the same queue; `enqueue` stores the features gathered from all
    ranks, so the queues stay identical on every rank. `gather=False` keeps the reference's
    per-rank queue instead (each rank enqueues only its own rows, so the queues, and the NNS
    loss after the first step, depend on the number of processes).
    """

    features: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, seed: int = 0, gather: bool = True) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"FeatureQueue: size and dim must be >= 1, got {size}, {dim}")
        self.gather = gather
        gen = torch.Generator().manual_seed(seed)
        init = F.normalize(torch.randn(size, dim, generator=gen), dim=-1)
        self.register_buffer("features", init)  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def _check(self, x: torch.Tensor, who: str) -> None:
        if x.ndim != 2 or x.shape[1] != self.features.shape[1]:
            raise ValueError(
                f"FeatureQueue.{who}: expected (B, {self.features.shape[1]}) features, "
                f"got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) -> (B, D) queue entries with the highest cosine similarity to each row."""
        self._check(x, "nearest")
        feats = self.features.to(x.dtype)
        idx = (F.normalize(x, dim=-1) @ feats.T).argmax(dim=1)  # (B,)
        return feats[idx]

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Append the (normalised) rows of x gathered from all ranks (only this rank's with
        `gather=False`), overwriting the oldest."""
        self._check(x, "enqueue")
        rows = gather_no_grad(x) if self.gather else x  # (world*B, D) or (B, D)
        new = F.normalize(rows.to(self.features.dtype), dim=-1)
        size = self.features.shape[0]
        if new.shape[0] >= size:  # only the newest `size` rows survive
            self.features.copy_(new[-size:])
            self.ptr.zero_()
            return
        pos = (self.ptr + torch.arange(new.shape[0], device=self.features.device)) % size
        self.features[pos] = new
        self.ptr.copy_((self.ptr + new.shape[0]) % size)


def nns_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    queue: FeatureQueue,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Image -> nearest-neighbour-text cross-entropy (one direction, as in the reference).

    img, txt: (B, D) local embeddings. Does not enqueue: look up all text views first, then call
    `queue.enqueue` once per view (what `declip_loss` does).
    """
    check_pair("nns_loss", img, txt)
    img = F.normalize(img, dim=-1)
    all_nn = gather_no_grad(queue.nearest(txt))  # (world*B, D), no grad: queue entries
    return contrastive_ce(img, all_nn, logit_scale, local_targets(img.shape[0], img.device))


# ---------------------------------------------------------------- full objective


def declip_loss(
    img_views: Sequence[torch.Tensor],
    txt_views: Sequence[torch.Tensor],
    logit_scale: torch.Tensor | float,
    simsiam: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mlm: tuple[torch.Tensor, torch.Tensor] | None = None,
    queue: FeatureQueue | None = None,
    weights: DeCLIPWeights = DeCLIPWeights(),
    extra: Mapping[str, torch.Tensor] | None = None,
    update_queue: bool = True,
) -> dict[str, torch.Tensor]:
    """DeCLIP objective from tensors. Returns {"loss": weighted total, "mvs", "simsiam", ...}.

    img_views: 2 x (B, D) CLIP embeddings of two image augmentations.
    txt_views: (caption, EDA caption) x (B, D) CLIP text embeddings.
    simsiam: (p1, p2, z1, z2) from `SimSiamHead` on the two views' raw image features.
    mlm: (logits (B, L, V), labels (B, L)) from the masked-caption pass.
    queue: nearest-neighbour queue; looked up for every text view, then (if update_queue)
    the text views are enqueued one after the other.
    extra: already computed terms, e.g. {"filip": filip_loss(...)} for DeFILIP.
    """
    terms: dict[str, torch.Tensor] = {"mvs": mvs_loss(img_views, txt_views, logit_scale)}
    if simsiam is not None:
        terms["simsiam"] = simsiam_loss(*simsiam)
    if mlm is not None:
        terms["mlm"] = mlm_loss(*mlm)
    if queue is not None:
        # Same as averaging nns_loss over the pairs, with one lookup + gather per text view.
        all_nns = [gather_no_grad(queue.nearest(txt)) for txt in txt_views]  # (world*B, D)
        imgs = [F.normalize(img, dim=-1) for img in img_views]
        targets = local_targets(imgs[0].shape[0], imgs[0].device)
        nns = [contrastive_ce(img, nn_, logit_scale, targets) for nn_ in all_nns for img in imgs]
        terms["nns"] = torch.stack(nns).mean()
        if update_queue:
            for txt in txt_views:
                queue.enqueue(txt.detach())
    terms.update(extra or {})
    return {"loss": weighted_sum(terms, weights), **terms}
