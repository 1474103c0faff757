"""2-process (gloo, CPU) runs of every objective equal the 1-process run over the global batch.

Each rank takes its half of a fixed global batch, computes the local loss, backpropagates and
averages the parameter gradients over ranks (what DDP does). The mean loss over ranks and the
averaged gradients must match one process on the whole batch; the DeCLIP queue must be the same
on both ranks and equal to the single-process queue.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from cliptransfer.contrastive.losses import (
    FeatureQueue,
    clip_loss,
    declip_loss,
    filip_loss,
    mlm_loss,
    siglip_loss,
    simclr_loss,
)
from cliptransfer.engine.distributed import world_info

B, D_IN, D, N_TOK, K_TOK, VOCAB = 8, 6, 4, 3, 5, 7
WORLD = 2


def _inputs(step: int) -> dict[str, torch.Tensor]:
    """Fixed global batch (same on every process)."""
    gen = torch.Generator().manual_seed(100 + step)
    lengths = torch.tensor([1, 5, 2, 3, 5, 4, 1, 2])  # padded texts on both ranks
    labels = torch.randint(0, VOCAB, (B, K_TOK), generator=gen)
    # Uneven numbers of masked tokens per rank (rank 0: 3, rank 1: 9): MLM must stay exact.
    keep = torch.zeros(B, K_TOK, dtype=torch.bool)
    keep[0, 0] = keep[2, 1] = keep[3, 4] = True
    keep[4:] = torch.rand(4, K_TOK, generator=gen) < 0.5
    keep[4, :] = True
    return {
        "img": torch.randn(B, D_IN, generator=gen),
        "img2": torch.randn(B, D_IN, generator=gen),
        "txt": torch.randn(B, D_IN, generator=gen),
        "txt2": torch.randn(B, D_IN, generator=gen),
        "img_tok": torch.randn(B, N_TOK, D_IN, generator=gen),
        "txt_tok": torch.randn(B, K_TOK, D_IN, generator=gen),
        "txt_mask": torch.arange(K_TOK)[None, :] < lengths[:, None],
        "mlm_labels": torch.where(keep, labels, torch.full_like(labels, -100)),
    }


class Tiny(nn.Module):
    """Linear feature producers, so the losses have parameter gradients to compare."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.head = nn.Linear(D, VOCAB)
        self.pred = nn.Linear(D, D)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))


def _step_loss(name: str, m: Tiny, x: dict[str, torch.Tensor], queue: FeatureQueue) -> torch.Tensor:
    scale = m.logit_scale.exp()
    img, txt = m.img(x["img"]), m.txt(x["txt"])
    if name == "clip":
        return clip_loss(img, txt, scale)
    if name == "siglip":  # blocks of 3 straddle the rank boundary at column 4
        return siglip_loss(img, txt, scale, m.logit_bias, chunk_size=3)
    if name == "filip":
        return filip_loss(m.img(x["img_tok"]), m.txt(x["txt_tok"]), x["txt_mask"], scale, 3)
    if name == "simclr":
        return simclr_loss(img, m.img(x["img2"]), temperature=0.1)
    if name == "mlm":
        return mlm_loss(m.head(m.txt(x["txt_tok"])), x["mlm_labels"])
    if name == "declip":
        img2, txt2 = m.img(x["img2"]), m.txt(x["txt2"])
        simsiam = (m.pred(img), m.pred(img2), img, img2)
        mlm = (m.head(m.txt(x["txt_tok"])), x["mlm_labels"])
        return declip_loss([img, img2], [txt, txt2], scale, simsiam, mlm, queue)["loss"]
    raise KeyError(name)


OBJECTIVES = ("clip", "siglip", "filip", "simclr", "mlm", "declip")


def run_objectives() -> dict[str, torch.Tensor]:
    """Two steps of every objective on this process's share of the batch; DDP-style averaging."""
    rank, world = world_info()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    out: dict[str, torch.Tensor] = {}
    for name in OBJECTIVES:
        model = Tiny()
        queue = FeatureQueue(size=24, dim=D, seed=0)  # 2 steps x 2 views x 8 = 32: wraps around
        total = torch.zeros(())
        for step in range(2):
            x = {k: v[rows] for k, v in _inputs(step).items()}
            loss = _step_loss(name, model, x, queue)
            loss.backward()
            total = total + loss.detach()
        if world > 1:
            dist.all_reduce(total)
        out[f"{name}/loss"] = total / world
        for pname, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if world > 1:
                dist.all_reduce(grad)
            out[f"{name}/grad/{pname}"] = grad / world
        if name == "declip":
            out["queue/features"] = queue.features.clone()
            out["queue/ptr"] = queue.ptr.clone()
    return out


def test_two_processes_equal_one(fork_ranks):
    # Reference first, in this process (torch.distributed not initialised -> world 1). It also
    # warms up the lazy imports (torch.utils.checkpoint pulls in torch._dynamo), so the forked
    # ranks start at once.
    single = run_objectives()
    ranks = fork_ranks(run_objectives, WORLD)

    assert set(ranks[0]) == set(single)
    for key, ref in single.items():
        for r, res in enumerate(ranks):
            torch.testing.assert_close(res[key], ref, atol=1e-6, rtol=1e-5, msg=f"{key} rank {r}")
    # The queue really changed (and wrapped): identical across ranks is not trivially true.
    assert ranks[0]["queue/ptr"].item() == (2 * 2 * B) % 24
    assert torch.equal(ranks[0]["queue/features"], ranks[1]["queue/features"])
    for name in OBJECTIVES:  # every objective produced real gradients, so equality means something
        grads = [v for k, v in single.items() if k.startswith(f"{name}/grad/")]
        assert sum(g.abs().sum().item() for g in grads) > 0, name
