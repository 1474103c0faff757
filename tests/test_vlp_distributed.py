"""2-process (gloo, CPU) V&L pretraining objectives equal the 1-process values on one global batch
(dropout off): each rank takes half, the terms averaged over ranks and the DDP-averaged gradients
match one process on the whole batch, with uneven masked-token, QA and matched-pair counts per
rank; ITC (ALBEF, gathered features) and masked feature regression included."""

from __future__ import annotations

import torch
import torch.distributed as dist

from cliptransfer.engine.distributed import world_info
from cliptransfer.heads.vlbert import VLBertConfig
from cliptransfer.vlp.model import VLPHead, vlp_losses
from cliptransfer.vlp.objectives import IGNORE

B, L, N, C, V, A = 8, 6, 5, 4, 20, 3
WORLD = 2


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, V, (B, L), generator=gen)
    picked = torch.zeros(B, L, dtype=torch.bool)
    picked[0, 1] = True  # rank 0: 1 masked token; rank 1: 7
    picked[4:, 2] = picked[5:7, 4] = picked[7, 0] = True
    return {
        "features": torch.randn(B, N, C, generator=gen),
        "visual_mask": torch.arange(N)[None] < torch.tensor([5, 3, 5, 2, 4, 5, 1, 5])[:, None],
        "spatial": torch.rand(B, N, 4, generator=gen),
        "text_ids": ids, "text_mask": torch.ones(B, L, dtype=torch.bool),
        "mlm_labels": torch.where(picked, ids, torch.full_like(ids, IGNORE)),
        "itm": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]),
        "qa": torch.tensor([2, IGNORE, IGNORE, IGNORE, 0, IGNORE, 1, 2]),  # 1 vs 3 per rank
        # images; sentences of image 0 on both ranks (masked across ranks for ITC)
        "image": torch.tensor([0, 1, 2, 0, 3, 4, 0, 5]),
        "text_image": torch.tensor([0, 3, 2, 0, 1, 2, 0, 1]),
        # masked cells for feature regression: 1 on rank 0, 4 on rank 1
        "masked_cells": torch.tensor([[1, 0, 0, 0, 0]] + [[0] * 5] * 3 + [[1, 1, 0, 0, 0]] * 2
                                     + [[0] * 5] * 2, dtype=torch.bool),
    }  # fmt: skip


def run_objectives() -> dict[str, torch.Tensor]:
    rank, world = world_info()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    torch.manual_seed(0)
    cfg = VLBertConfig(hidden=16, layers=1, heads=2, intermediate=32, max_text=8, dropout=0.0)
    model = VLPHead(cfg, V, C, A, itc_dim=8, feature_regression=True)
    b = {k: v[rows] for k, v in _batch().items()}
    out = model(b["features"], b["visual_mask"], b["text_ids"], b["text_mask"], b["spatial"],
                itm=b["itm"], image=b["image"], text_image=b["text_image"],
                masked_cells=b["masked_cells"])  # fmt: skip
    weights = {"mlm": 1.0, "itm": 1.0, "qa": 1.0, "itc": 1.0, "mfr": 1.0}
    terms = vlp_losses(out, b, weights, 0.1)
    terms["loss"].backward()
    result = {}
    for name, value in terms.items():
        value = value.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        result[name] = value / world
    for name, p in model.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if world > 1:
            dist.all_reduce(grad)
        result[f"grad/{name}"] = grad / world
    return result


def test_two_processes_equal_one(fork_ranks):
    single = run_objectives()
    ranks = fork_ranks(run_objectives, WORLD)
    assert set(single) >= {"loss", "mlm", "itm", "qa", "itc", "mfr"} and set(ranks[0]) == set(
        single
    )
    for key, ref in single.items():
        for r, res in enumerate(ranks):
            torch.testing.assert_close(res[key], ref, atol=1e-6, rtol=1e-5, msg=f"{key} rank {r}")
    assert single["grad/itm.weight"].abs().sum() > 0 and single["grad/mlm_bias"].abs().sum() > 0
    assert single["grad/itc_text.weight"].abs().sum() > 0
    assert single["grad/feature_head.3.weight"].abs().sum() > 0
