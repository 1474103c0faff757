from __future__ import annotations

import pytest
import torch

from cliptransfer.clip.retrieval import retrieval_recall
from cliptransfer.clip.zeroshot import class_embeddings, zeroshot_accuracy


def test_retrieval_recall_hand_example():
    # 2 images, 3 captions (captions 0,1 -> image 0; caption 2 -> image 1), unit-norm 2-d vectors.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    owner = torch.tensor([0, 0, 1])
    # sim = img @ txt.T = [[0, .8, .6], [1, .6, .8]]
    # image 0: best gt .8 (caption 1), wrong captions >= .8: none -> rank 0 (hit @1)
    # image 1: gt caption 2 = .8, wrong >= .8: caption 0 (1.0) -> rank 1 (miss @1, hit @2)
    # caption 0 (gt image 0, sim 0): wrong image 1 has 1 >= 0 -> rank 1
    # caption 1 (gt image 0, .8): image 1 has .6 -> rank 0
    # caption 2 (gt image 1, .8): image 0 has .6 -> rank 0
    r = retrieval_recall(img, txt, owner, ks=(1, 2))
    assert r["image_to_text_R@1"] == pytest.approx(50.0)
    assert r["image_to_text_R@2"] == pytest.approx(100.0)
    assert r["text_to_image_R@1"] == pytest.approx(200 / 3)
    assert r["text_to_image_R@2"] == pytest.approx(100.0)
    assert r["mean_recall"] == pytest.approx((50 + 100 + 200 / 3 + 100) / 4)


def test_retrieval_ties_are_pessimistic_and_bad_mapping_errors():
    img = torch.ones(3, 4)
    txt = torch.ones(3, 4)
    r = retrieval_recall(img, txt, torch.arange(3), ks=(1, 3))
    assert r["image_to_text_R@1"] == 0.0 and r["text_to_image_R@3"] == 100.0
    with pytest.raises(ValueError, match="map each of the 3 captions"):
        retrieval_recall(img, txt, torch.tensor([0, 1, 5]))


def test_zeroshot_templates_averaged_and_accuracy():
    # A fake text encoder: the embedding of a prompt is the one-hot of its class word, plus a
    # template-specific offset; averaging over templates must cancel the offsets' effect.
    vocab = {"red": 0, "blue": 1}

    def tokenize(texts):
        return torch.tensor([[vocab[t.split()[-1]], 0 if t.startswith("a") else 1] for t in texts])

    def encode_text(ids):
        out = torch.zeros(len(ids), 3)
        out[torch.arange(len(ids)), ids[:, 0]] = 1.0
        out[:, 2] = torch.where(ids[:, 1] == 0, 1.0, -1.0)
        return out

    cls = class_embeddings(encode_text, tokenize, ["red", "blue"], ["a {}", "the {}"])
    # mean of (1,0,1)/sqrt2 and (1,0,-1)/sqrt2 = (1/sqrt2, 0, 0) -> renormalised (1, 0, 0)
    assert torch.allclose(cls, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    images = torch.tensor([[2.0, 1.0, 0], [0.1, 1.0, 5.0], [1.0, 0.0, 0.0]])
    acc = zeroshot_accuracy(images, cls, torch.tensor([0, 1, 1]), ks=(1, 2, 5))
    assert acc == {"top1": pytest.approx(200 / 3), "top2": pytest.approx(100.0)}
