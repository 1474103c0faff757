"""ALBEF's ITC and ITM hard negatives (`loss.itc`, `loss.hard_negatives`): the loss against its
definition worked out pair by pair, the sampling weights by hand, negatives never of the item's
own image, the fusion forward scoring exactly the drawn pairs, and a resumed run equal to the
uninterrupted one (the draws come from the checkpointed RNG)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cliptransfer.config import ConfigError
from cliptransfer.engine import run_task
from cliptransfer.heads.vlbert import VLBert, VLBertConfig
from cliptransfer.tasks.vlp.task import VLPLossConfig, VLPTask
from cliptransfer.vlp.contrast import (
    hard_negative_weights,
    itc_loss,
    masked_mean,
    sample_hard_negatives,
)
from cliptransfer.vlp.model import VLPHead, vlp_losses
from cliptransfer.vlp.transfer import load_pretrained_head

CFG = VLBertConfig(hidden=16, layers=1, heads=2, intermediate=32, max_text=16, dropout=0.0)


def test_masked_mean_by_hand():
    x = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [7.0, 8.0]]]
    )
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_itc_loss_pair_by_pair():
    # Items: (image, image its sentence was written for, matched)
    #   0: (0, 0, yes)  1: (0, 0, yes: another caption of image 0)  2: (1, 2, no)  3: (2, 2, yes)
    image_ids, text_ids = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 0, 2, 2])
    matched = torch.tensor([1, 1, 0, 1])
    gen = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(4, 5, generator=gen), dim=-1)
    t = 0.2
    # Allowed columns: the pair itself and everything of another picture.
    i2t_allowed = {0: [0, 2, 3], 1: [1, 2, 3], 3: [3, 0, 1]}  # texts 2, 3 are of image 2
    t2i_allowed = {0: [0, 2, 3], 1: [1, 2, 3], 3: [3, 0, 1, 2]}  # images 0, 0, 1 for text 3

    def ce(rows, cols, i, allowed):
        logits = torch.stack([rows[i] @ cols[j] / t for j in allowed])
        return torch.logsumexp(logits, 0) - rows[i] @ cols[i] / t

    expected = sum(ce(img, txt, i, a) for i, a in i2t_allowed.items())
    expected = (expected + sum(ce(txt, img, i, a) for i, a in t2i_allowed.items())) / 2 / 3
    got = itc_loss(img, txt, image_ids, text_ids, matched, t)
    torch.testing.assert_close(got, expected)
    zero = itc_loss(img.requires_grad_(), txt, image_ids, text_ids, torch.zeros(4), t)
    assert zero.item() == 0.0 and zero.requires_grad  # nothing matched: 0, still differentiable


def test_hard_negative_weights_by_hand():
    sim = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, 1.0], [1.0, 2.0, 4.0]])
    ids = torch.tensor([0, 0, 1])
    w = hard_negative_weights(sim, ids, ids)
    # Rows of image 0 may only pick column 2; row 2 (image 1) picks 0 or 1 by softmax(1, 2).
    e1, e2 = math.exp(1.0), math.exp(2.0)
    expected = torch.tensor(
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [e1 / (e1 + e2), e2 / (e1 + e2), 0.0]]
    )
    torch.testing.assert_close(w, expected)
    alone = hard_negative_weights(sim[:2, :2], ids[:2], ids[:2])  # one picture only
    assert torch.equal(alone, torch.zeros(2, 2))


def test_hard_negatives_never_of_the_same_image_and_follow_the_similarity():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    img = F.normalize(torch.randn(8, 6, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(8, 6, generator=gen), dim=-1)
    torch.manual_seed(0)
    for _ in range(50):
        rows_i, texts_i, rows_t, images_t = sample_hard_negatives(img, txt, ids, 0.5)
        assert len(rows_i) == len(rows_t) == 8
        assert (ids[rows_i] != ids[texts_i]).all() and (ids[rows_t] != ids[images_t]).all()
    # A near-zero temperature picks the most similar sentence of another picture.
    rows_i, texts_i, _, _ = sample_hard_negatives(img, txt, ids, 1e-4)
    sim = (img @ txt.t()).masked_fill(ids[:, None] == ids[None, :], -2.0)
    assert torch.equal(texts_i, sim.argmax(1))


def _batch(gen):
    ids = torch.randint(4, 30, (6, 7), generator=gen)
    return {
        "features": torch.randn(6, 4, 6, generator=gen),
        "visual_mask": torch.tensor([[1, 1, 1, 1]] * 3 + [[1, 1, 0, 0]] * 3, dtype=torch.bool),
        "spatial": torch.rand(6, 4, 4, generator=gen), "text_ids": ids,
        "text_mask": torch.ones(6, 7, dtype=torch.bool),
        "mlm_labels": torch.full_like(ids, -100), "qa": torch.full((6,), -100),
        "itm": torch.tensor([1, 1, 0, 1, 1, 1]), "image": torch.tensor([0, 0, 1, 2, 3, 3]),
        "text_image": torch.tensor([0, 0, 3, 2, 3, 3]),
    }  # fmt: skip


def _run(model, b):
    return model(b["features"], b["visual_mask"], b["text_ids"], b["text_mask"], b["spatial"],
                 itm=b["itm"], image=b["image"], text_image=b["text_image"])  # fmt: skip


def test_the_fusion_forward_scores_exactly_the_drawn_pairs():
    torch.manual_seed(0)
    model = VLPHead(CFG, 30, 6, 5, itc_dim=8, hard_negatives=True)
    b = _batch(torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    out = _run(model, b)
    matched = b["itm"].bool().nonzero().flatten()  # 5 matched items of images 0, 0, 2, 3, 3
    torch.manual_seed(5)
    r_i, t_i, r_t, i_t = sample_hard_negatives(out["itc_image"][matched].detach(),
                                               out["itc_text"][matched].detach(),
                                               b["image"][matched], 0.07)  # fmt: skip
    vis = matched[torch.cat([r_i, i_t])]
    txt = matched[torch.cat([t_i, r_t])]
    assert len(vis) == 10 and (b["image"][vis] != b["image"][txt]).all()
    assert out["itm"].shape == (16, 2) and out["mlm"].shape[0] == out["qa"].shape[0] == 6
    assert out["itm_target"].tolist() == b["itm"].tolist() + [0] * 10
    model.eval()  # dropout is 0: the same function, and no negatives in eval
    plain = _run(model, b)
    assert plain["itm"].shape == (6, 2) and "itm_target" not in plain
    torch.testing.assert_close(out["itm"][:6], plain["itm"])
    neg = model.itm(model.encode(b["features"][vis], b["visual_mask"][vis], b["text_ids"][txt],
                                 b["text_mask"][txt], b["spatial"][vis])[1])  # fmt: skip
    torch.testing.assert_close(out["itm"][6:], neg)
    terms = vlp_losses(out, b, {"itm": 1.0, "itc": 0.5})
    torch.testing.assert_close(terms["itm"], F.cross_entropy(out["itm"], out["itm_target"]))
    itc = itc_loss(out["itc_image"], out["itc_text"], b["image"], b["text_image"], b["itm"], 0.07)
    torch.testing.assert_close(terms["loss"], terms["itm"] + 0.5 * itc)


def test_settings_and_transfer_drop_the_itc_and_feature_heads(tmp_path: Path):
    with pytest.raises(ConfigError, match="loss.itc > 0"):
        VLPLossConfig(hard_negatives=True)
    with pytest.raises(ValueError, match="itc_dim"):
        VLPHead(CFG, 30, 6, 5, hard_negatives=True)
    from cliptransfer.tasks.vl_model import save_model_dir

    pre = VLPHead(CFG, 30, 6, 5, itc_dim=8, feature_regression=True)
    save_model_dir(tmp_path, {f"head.{k}": v for k, v in pre.state_dict().items()}, {})
    task = VLBert(CFG, 30, 6, 3)
    got = load_pretrained_head(task, tmp_path, None)
    assert got["loaded"] == len(task.state_dict()) - 2  # all but the fresh output layer
    torch.testing.assert_close(task.visual_proj[0].weight, pre.visual_proj[0].weight)


def _args(world: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    sets = [f"world.dir={world}", "world.size=tiny", "backbone=RN-tiny", "features.size=64x96",
            f"features.cache_dir={cache}", f"train.out_dir={out}", "train.batch_size=32",
            "train.eval_batch_size=64", "train.num_threads=1", "model.vlbert.hidden=16",
            "model.vlbert.heads=2", "model.vlbert.intermediate=32", "model.vlbert.layers=1",
            *extra]  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.usefixtures("one_thread")
def test_resumed_hard_negative_run_equals_uninterrupted(tiny_world: Path, tmp_path: Path):
    albef = ["loss.itc=1.0", "loss.hard_negatives=true", "loss.itc_dim=16", "train.max_steps=4",
             "train.save_every_steps=2", "train.keep_last=5", "loss.qa_from_epoch=0"]  # fmt: skip
    cache = tmp_path / "cache"
    a = run_task(VLPTask, _args(tiny_world, tmp_path / "a", cache, *albef))
    mid = tmp_path / "a" / "checkpoints" / "step-0000002"
    b = run_task(VLPTask, _args(tiny_world, tmp_path / "b", cache, *albef, f"train.resume={mid}"))
    assert a["steps"] == b["steps"] == 4 and a["pretrained"] == b["pretrained"]
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.startswith("head.itc_image.") for k in wa)
