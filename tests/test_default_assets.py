"""The packaged assets: the Shapes tokenizer and the default tiny CLIP pretrained on Shapes."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator

from cliptransfer.clip import create_clip
from cliptransfer.clip.evaluation import ClassifySet, evaluate_clip
from cliptransfer.defaults import DEFAULT_CLIP, resolve_clip, resolve_tokenizer


def test_default_clip_beats_its_random_init_zero_shot(tiny_world):
    model, tok = resolve_clip("default"), resolve_tokenizer("shapes")
    assert model.config.text.vocab_size == tok.vocab_size and model.context_length == 48
    classify = ClassifySet.from_world(tiny_world)
    acc = Accelerator(cpu=True)
    trained = evaluate_clip(acc, model, tok, None, classify, model.image_size)["zeroshot"]
    torch.manual_seed(0)
    random = create_clip(model.config)
    base = evaluate_clip(acc, random, tok, None, classify, model.image_size)["zeroshot"]
    # The packaged CLIP (96 px, Shapes scenes + sharp object regions + house views) on `small`:
    # colour 99.6 %, shape 63.1 % (chance 12.5 / 16.7); the tiny world's 48 images agree.
    assert trained["color"]["top1"] >= 90 and base["color"]["top1"] <= 30
    assert trained["shape"]["top1"] >= base["shape"]["top1"] + 15
    recorded = json.loads((DEFAULT_CLIP / "metrics.json").read_text())
    assert recorded["trained"]["zeroshot"]["shape"]["top1"] > 60  # the targets
    assert recorded["trained"]["zeroshot"]["color"]["top1"] > 80
    assert recorded["trained"]["retrieval"]["mean_recall"] > 3 * recorded[
        "previous_asset_clip_rn_tiny_shapes"]["retrieval"]["mean_recall"]  # fmt: skip


def test_default_clip_text_tower_tells_shape_words_apart():
    """The first asset mapped every shape word to one embedding (mean cosine 0.996 between
    "a circle." and "a star."): the shortcut its scene-only captions allowed."""
    import torch.nn.functional as F

    model, tok = resolve_clip("default"), resolve_tokenizer("shapes")
    shapes = ["circle", "square", "triangle", "star", "diamond", "cross"]
    with torch.no_grad():
        emb = F.normalize(model.encode_text(tok([f"a {s}." for s in shapes])).float(), dim=-1)
    cos = emb @ emb.T
    assert cos[~torch.eye(6, dtype=torch.bool)].mean() < 0.5
