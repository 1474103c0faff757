"""Top-down and MCAN heads: shapes, gradients, and padding that changes nothing for valid items."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cliptransfer import adapters
from cliptransfer.adapters import AdapterConfig
from cliptransfer.clip import create_clip
from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.config import ConfigError
from cliptransfer.heads.mcan import MCAN, MCANConfig
from cliptransfer.heads.model import VLModel
from cliptransfer.heads.question import (
    QuestionConfig,
    RNNQuestionEncoder,
    build_question_encoder,
    build_question_tokenizer,
)
from cliptransfer.heads.scan import SCANConfig, WordRegionFusion
from cliptransfer.heads.topdown import TopDown, TopDownConfig, masked_softmax
from cliptransfer.heads.vlbert import VLBert, VLBertConfig
from cliptransfer.visual.backbone import GridBackbone
from cliptransfer.visual.inputs import grid_boxes, grid_inputs, pad_visual

C, A, V = 12, 7, 30


pytestmark = pytest.mark.usefixtures("one_thread")


def _heads(spatial: int = 4) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    td = TopDown(RNNQuestionEncoder(V, 8, 16), C, A, TopDownConfig(hidden=16, glimpses=2), spatial)
    mc_cfg = MCANConfig(hidden=16, heads=2, ffn=32, flat_mlp=16, flat_out=24)
    mc = MCAN(RNNQuestionEncoder(V, 8, 16, "lstm"), C, A, mc_cfg, spatial)
    vb = VLBert(VLBertConfig(hidden=16, layers=1, heads=2, intermediate=32, max_text=16), V, C, A)
    sc = WordRegionFusion(RNNQuestionEncoder(V, 8, 16), C, A, SCANConfig(hidden=16), spatial)
    return {"topdown": td.eval(), "mcan": mc.eval(), "vlbert": vb.eval(), "scan": sc.eval()}


def _question(lengths: list[int], L: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, V, (n,), generator=gen)
    return ids, torch.arange(L)[None] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("arch", ["topdown", "mcan", "vlbert", "scan"])
def test_forward_backward_shapes(arch: str):
    model = _heads()[arch].train()
    gen = torch.Generator().manual_seed(1)
    feats, mask, spatial = pad_visual(
        [torch.randn(n, C, generator=gen) for n in (3, 5, 2)],
        [torch.rand(n, 4, generator=gen) for n in (3, 5, 2)],
    )
    ids, q_mask = _question([4, 2, 6], 8, gen)
    logits = model(feats, mask, ids, q_mask, spatial)
    assert logits.shape == (3, A)
    logits.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert torch.isfinite(logits).all()
    if arch == "topdown":  # weight-normed layers, as in BUTD
        names = [n for n, _ in model.named_parameters()]
        assert "classifier.2.parametrizations.weight.original0" in names


@pytest.mark.parametrize("arch", ["topdown", "mcan", "vlbert", "scan"])
def test_padding_changes_nothing_for_valid_items(arch: str):
    """Each item alone (no padding) equals the same item inside a padded batch."""
    model = _heads()[arch]
    gen = torch.Generator().manual_seed(2)
    n_regions, q_lens = [3, 7, 1], [5, 2, 9]
    feats = [torch.randn(n, C, generator=gen) for n in n_regions]
    boxes = [torch.rand(n, 4, generator=gen) for n in n_regions]
    ids, q_mask = _question(q_lens, 12, gen)
    with torch.no_grad():
        batch = model(*pad_visual(feats, boxes)[:2], ids, q_mask, pad_visual(feats, boxes)[2])
        for i, (n, qn) in enumerate(zip(n_regions, q_lens)):
            alone = model(
                feats[i][None], torch.ones(1, n, dtype=torch.bool), ids[i : i + 1, :qn],
                q_mask[i : i + 1, :qn], boxes[i][None],
            )  # fmt: skip
            torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=1e-5)
        # Garbage in the padded slots must not leak in either.
        f, m, s = pad_visual(feats, boxes)
        f = torch.where(m[..., None], f, torch.full_like(f, 1e4))
        torch.testing.assert_close(model(f, m, ids, q_mask, s), batch, atol=1e-5, rtol=1e-5)


def test_word_region_fusion_by_hand():
    # model.arch=scan: each word's softmax over the valid regions, fused element-wise with the
    # word, mean- and max-pooled over the words; written out with loops over words and regions.
    model = _heads()["scan"]
    gen = torch.Generator().manual_seed(3)
    feats, mask, spatial = pad_visual([torch.randn(4, C, generator=gen)],
                                      [torch.rand(4, 4, generator=gen)])  # fmt: skip
    mask[0, 2] = False  # region 2 is padding: no word may attend to it
    ids, q_mask = _question([3], 5, gen)
    with torch.no_grad():
        got = model(feats, mask, ids, q_mask, spatial)[0]
        tokens, _ = model.question(ids, q_mask)
        v = model.visual_in(torch.cat([model.visual_norm(feats), spatial], -1))[0]  # (4, H)
        t = model.text_in(tokens)[0]  # (5, H)
        fused = []
        for word in range(3):
            scores = [float(t[word] @ v[n]) / 16**0.5 for n in (0, 1, 3)]
            weights = torch.tensor(scores).softmax(0)
            attended = sum(w * v[n] for w, n in zip(weights, (0, 1, 3), strict=True))
            fused.append(t[word] * attended)
        fused = torch.stack(fused)
        want = model.classifier(torch.cat([fused.mean(0), fused.amax(0)]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.word_attention(t[None], v[None], mask)[0, :, 2].abs().max() == 0


def test_vlbert_cells_get_their_grid_positions():
    # A 5x7 grid's cell centres fall in distinct buckets of 32 per axis: column c of 7 has
    # centre (c + 0.5) / 7 -> bucket floor(32 (c + 0.5) / 7) = 2, 6, 11, 16, 20, 25, 29.
    model = _heads()["vlbert"]
    boxes = grid_boxes(5, 7)[None]  # (1, 35, 4)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    bucket = (centre * 32).long()
    assert bucket[0, :7, 0].tolist() == [2, 6, 11, 16, 20, 25, 29]
    assert bucket[0, ::7, 1].tolist() == [3, 9, 16, 22, 28]
    emb = model.visual_embeddings(torch.zeros(1, 35, C), boxes)
    expected = (
        model.visual_proj(torch.zeros(1, 35, C))
        + model.pos_x(bucket[..., 0])
        + model.pos_y(bucket[..., 1])
    )
    torch.testing.assert_close(emb, expected)
    assert len({tuple(r) for r in bucket[0].tolist()}) == 35


def test_masked_softmax_and_attention_weights():
    logits = torch.tensor([[1.0, 2.0, 30.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w = masked_softmax(logits, mask, dim=1)
    assert w[0, 2] == 0 and torch.allclose(w[0, :2], torch.softmax(logits[0, :2], 0))
    assert torch.allclose(w[1], torch.full((3,), 1 / 3))
    model = _heads()["topdown"]
    f, m, s = pad_visual(
        [torch.randn(2, C), torch.randn(4, C)], [torch.rand(2, 4)] * 1 + [torch.rand(4, 4)]
    )
    ids, q_mask = _question([3, 3], 5, torch.Generator().manual_seed(0))
    v = torch.cat([model.visual_norm(f), s], -1)
    _, q = model.question(ids, q_mask)
    att = model.attention(v, m, q)  # (B, N, G)
    assert att.shape == (2, 4, 2) and (att[0, 2:] == 0).all()
    torch.testing.assert_close(att.sum(1), torch.ones(2, 2))


def test_grid_boxes_and_inputs():
    boxes = grid_boxes(2, 3)
    assert boxes.shape == (6, 4)
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 1 / 3, 0.5]))
    torch.testing.assert_close(boxes[5], torch.tensor([2 / 3, 0.5, 1.0, 1.0]))  # row-major
    mask, spatial = grid_inputs(torch.zeros(2, 6, 5), (2, 3))
    assert mask.all() and spatial.shape == (2, 6, 4) and torch.equal(spatial[1], boxes)


def test_hf_text_encoder(tmp_path: Path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "how", "many", "red", "stars", "?",
             "is", "there", "a", "circle"]  # fmt: skip
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    BertModel(cfg).save_pretrained(str(tmp_path / "bert"))

    qcfg = QuestionConfig(encoder=f"hf:{tmp_path / 'bert'}", max_length=8)
    tok = build_question_tokenizer(qcfg)
    ids, mask, truncated = tok(["how many red stars?", "is there a circle? " * 3])
    assert ids.shape == (2, 8) and truncated.tolist() == [False, True]
    assert ids[0, :7].tolist() == [2, 5, 6, 7, 8, 9, 3] and mask[0].sum() == 7
    encoder = build_question_encoder(qcfg, tok.vocab_size)
    assert encoder.dim == 16
    model = MCAN(encoder, C, A, MCANConfig(hidden=16, heads=2, ffn=32, flat_out=8), 4).eval()
    feats, vmask, spatial = pad_visual(
        [torch.randn(3, C), torch.randn(5, C)], [torch.rand(3, 4), torch.rand(5, 4)]
    )
    with torch.no_grad():
        out = model(feats, vmask, ids, mask, spatial)
        alone = model(feats[:1, :3], vmask[:1, :3], ids[:1, :7], mask[:1, :7], spatial[:1, :3])
    assert out.shape == (2, A)
    torch.testing.assert_close(alone[0], out[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_question_tokenizer(QuestionConfig(encoder=f"hf:{tmp_path / 'nope'}"))
    # An unknown encoder is refused when the config is built (before any data is read).
    with pytest.raises(ConfigError) as e:
        QuestionConfig(encoder="transformer")
    assert str(e.value) == (
        "encoder: must be 'gru', 'lstm', 'clip', 'clip:/path' or 'hf:/path', got 'transformer'"
    )


def test_clip_text_tower_as_question_encoder(tmp_path: Path):
    # text.encoder=clip: the packaged CLIP's text tower over its own tokenizer. Its pooled state
    # projected is exactly CLIP's text embedding; padding changes nothing (causal attention).
    from cliptransfer.defaults import resolve_clip

    qcfg = QuestionConfig(encoder="clip")
    tok = build_question_tokenizer(qcfg)
    encoder = build_question_encoder(qcfg, tok.vocab_size)
    texts = ["is there a red star?", "the large blue circle is to the left of the small cross"]
    ids, mask, _ = tok(texts)
    with torch.no_grad():
        states, pooled = encoder(ids, mask)
        reference = resolve_clip("default").encode_text(ids)
        alone, _ = encoder(ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
    assert states.shape == (2, 24, encoder.dim) and pooled.shape == (2, encoder.dim)
    assert not states[~mask].any()
    torch.testing.assert_close(pooled @ encoder.text.text_projection, reference)
    torch.testing.assert_close(alone[0], states[0, : int(mask[0].sum())])
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert "text.token_embedding.weight" in trainable and "text.text_projection" not in trainable
    frozen = build_question_encoder(QuestionConfig(encoder="clip", freeze=True), tok.vocab_size)
    assert not any(p.requires_grad for p in frozen.parameters())
    model = MCAN(encoder, C, A, MCANConfig(hidden=16, heads=2, ffn=32, flat_out=8), 4)
    feats, vmask, spatial = pad_visual(
        [torch.randn(3, C), torch.randn(5, C)], [torch.rand(3, 4), torch.rand(5, 4)]
    )
    model(feats, vmask, ids, mask, spatial).sum().backward()
    assert encoder.text.token_embedding.weight.grad is not None


@pytest.mark.parametrize("mode", ["full", "lock", "lora"])
def test_end2end_backbone_tuning(mode: str):
    torch.manual_seed(0)
    tuning = {"full": TuningConfig(), "lock": TuningConfig(lock_image=True),
              "lora": TuningConfig()}[mode]  # fmt: skip
    backbone = GridBackbone(create_clip("RN-tiny"), tuning)
    head = TopDown(RNNQuestionEncoder(V, 8, 16), backbone.channels, A, TopDownConfig(hidden=16), 4)
    model = VLModel(head, backbone).train()
    if mode == "lora":  # the one PEFT path: adapters on the backbone, the head trained in full
        model, _ = adapters.wrap(model, AdapterConfig("lora", r=2))
    assert not any(
        n.startswith("backbone.") and "transformer" in n for n, _ in model.named_parameters()
    )
    ids, q_mask = _question([3, 4], 6, torch.Generator().manual_seed(0))
    batch = {"pixels": torch.randn(2, 3, 64, 96), "text_ids": ids, "text_mask": q_mask}
    model(batch).sum().backward()
    names = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}
    grads = {n for n, p in names.items() if p.grad is not None}
    backbone_grads = {n for n in grads if n.startswith("backbone.")}
    trainable_head = {n for n, p in names.items() if n.startswith("head.") and p.requires_grad}
    assert trainable_head and {n for n in grads if n.startswith("head.")} == trainable_head
    if mode == "full":
        assert "backbone.visual.stem.conv1.conv.weight" in backbone_grads
    elif mode == "lock":
        assert not backbone_grads and backbone.frozen
    else:
        assert backbone_grads and all("lora_" in n for n in backbone_grads)
