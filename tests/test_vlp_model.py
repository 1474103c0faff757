"""The pretraining model: logits of every objective, losses equal to their definitions on one
batch, and weights that load into the task's `vlbert` head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cliptransfer.heads.vlbert import VLBert, VLBertConfig
from cliptransfer.vlp.model import VLPHead, feature_regression_loss, vlp_losses
from cliptransfer.vlp.objectives import IGNORE

CFG = VLBertConfig(hidden=16, layers=1, heads=2, intermediate=32, max_text=16, dropout=0.0)
V, C, A = 30, 6, 5


def _batch(gen):
    ids = torch.randint(4, V, (3, 7), generator=gen)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 2], labels[1, 5], labels[2, 1] = ids[0, 2], ids[1, 5], ids[2, 1]
    return {
        "features": torch.randn(3, 4, C, generator=gen), "visual_mask": torch.ones(3, 4, dtype=torch.bool),
        "spatial": torch.rand(3, 4, 4, generator=gen), "text_ids": ids,
        "text_mask": torch.ones(3, 7, dtype=torch.bool), "mlm_labels": labels,
        "itm": torch.tensor([1, 0, 1]), "qa": torch.tensor([2, IGNORE, 4]),
    }  # fmt: skip


def _run(model, b):
    return model(b["features"], b["visual_mask"], b["text_ids"], b["text_mask"], b["spatial"])


def test_losses_are_their_definitions():
    torch.manual_seed(0)
    model = VLPHead(CFG, V, C, A).eval()
    b = _batch(torch.Generator().manual_seed(1))
    out = _run(model, b)
    assert (
        out["mlm"].shape == (3, 7, V) and out["itm"].shape == (3, 2) and out["qa"].shape == (3, A)
    )
    terms = vlp_losses(out, b, {"mlm": 1.0, "itm": 1.0, "qa": 0.5})
    picked = b["mlm_labels"] != IGNORE
    mlm = F.cross_entropy(out["mlm"][picked], b["mlm_labels"][picked])  # mean over 3 tokens
    itm = F.cross_entropy(out["itm"], b["itm"])
    qa = F.cross_entropy(out["qa"][[0, 2]], b["qa"][[0, 2]])  # the mismatched item ignored
    torch.testing.assert_close(terms["mlm"], mlm)
    torch.testing.assert_close(terms["itm"], itm)
    torch.testing.assert_close(terms["qa"], qa)
    torch.testing.assert_close(terms["loss"], mlm + itm + 0.5 * qa)
    assert set(vlp_losses(out, b, {"mlm": 1.0, "itm": 0.0})) == {"loss", "mlm"}
    with pytest.raises(ValueError, match="no objective"):
        vlp_losses(out, b, {"mlm": 0.0})
    # MLM logits are tied to the word embeddings.
    terms["loss"].backward()
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_pretrained_weights_load_into_the_task_head():
    torch.manual_seed(0)
    pre = VLPHead(CFG, V, C, A).eval()
    task = VLBert(CFG, V, C, A).eval()
    extra = [k for k in pre.state_dict() if k.split(".")[0] in ("mlm_transform", "mlm_bias", "itm")]
    state = {k: v for k, v in pre.state_dict().items() if k not in extra}
    task.load_state_dict(state, strict=True)  # same names, same shapes
    b = _batch(torch.Generator().manual_seed(2))
    torch.testing.assert_close(_run(task, b), _run(pre, b)["qa"])


def test_feature_regression_by_hand_and_masked_cells_enter_as_zeros():
    pred = torch.tensor(
        [[[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]], [[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]]]
    )
    target = torch.tensor(
        [[[0.0, 0.0], [5.0, 5.0], [1.0, 3.0]], [[1.0, 1.0], [0.0, 0.0], [0.0, 4.0]]]
    )
    masked = torch.tensor([[True, False, True], [False, True, True]])
    # per masked cell, mean over the 2 channels: (1 + 4) / 2, (4 + 0) / 2, (4 + 0) / 2, (0 + 16) / 2
    expected = torch.tensor((2.5 + 2.0 + 2.0 + 8.0) / 4)
    torch.testing.assert_close(feature_regression_loss(pred, target, masked), expected)
    assert feature_regression_loss(pred, target, torch.zeros_like(masked)).item() == 0.0

    torch.manual_seed(0)
    model = VLPHead(CFG, V, C, A, feature_regression=True).eval()
    b = _batch(torch.Generator().manual_seed(3))
    cells = torch.tensor([[True, False, False, True], [False] * 4, [False, True, False, False]])
    out = model(b["features"], b["visual_mask"], b["text_ids"], b["text_mask"], b["spatial"],
                masked_cells=cells)  # fmt: skip
    zeroed = _run(model, {**b, "features": b["features"].masked_fill(cells[..., None], 0.0)})
    for key in ("mlm", "itm", "qa", "cells"):
        torch.testing.assert_close(out[key], zeroed[key])
    assert out["cells"].shape == (3, 4, C)
    terms = vlp_losses(out, {**b, "masked_cells": cells}, {"mfr": 1.0})
    torch.testing.assert_close(
        terms["mfr"], feature_regression_loss(out["cells"], b["features"], cells)
    )
