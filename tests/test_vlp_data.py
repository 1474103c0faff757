"""V&L pretraining samples: store keys of LXMERT image ids, the tokenizer's mask vocabulary, and
items that are a pure function of (seed, epoch, index) with the ITM / QA / MLM rules applied."""

from __future__ import annotations

import torch

from cliptransfer.heads.question import QuestionConfig, build_question_tokenizer
from cliptransfer.vlp.corpus import VLPSentence
from cliptransfer.vlp.data import MLMVocab, VLPDataConfig, VLPDataset, collate_vlp, image_key
from cliptransfer.vlp.objectives import IGNORE

SENTENCES = [
    VLPSentence("COCO_train2014_000000000001", "a red circle on a gray background", "mscoco"),
    VLPSentence("COCO_train2014_000000000001", "what colour is the circle?", "vqa", {"red": 1.0}),
    VLPSentence("COCO_train2014_000000000002", "two blue stars", "mscoco"),
    VLPSentence("COCO_train2014_000000000002", "how many stars?", "vqa", {"two": 0.9, "one": 0.3}),
]
ANSWERS = {"red": 0, "two": 1, "one": 2}


def _inputs(key):
    n = {1: 6, 2: 4}[key]  # image 1 has 6 cells, image 2 has 4
    return {
        "features": torch.full((n, 3), float(key)),
        "spatial": torch.linspace(0, 1, 4 * n).view(n, 4),
    }


def _dataset(train=True, **cfg):
    tok = build_question_tokenizer(QuestionConfig(max_length=12))
    return VLPDataset(SENTENCES, tok, MLMVocab.of(tok), _inputs, ANSWERS, VLPDataConfig(**cfg),
                      seed=0, train=train)  # fmt: skip


def _same_item(a: dict, b: dict) -> bool:
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def _over_epochs(ds: VLPDataset, epochs: int):
    """(index, item) for every item of `ds` in epochs 0 .. epochs-1."""
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            yield i, ds[i]


def test_image_keys():
    assert image_key("COCO_train2014_000000100000") == 100000
    assert image_key("COCO_val2014_000000000042") == 42
    assert image_key("2354786") == "2354786"  # Visual Genome ids stay strings


def test_mask_vocabulary_of_the_packaged_tokenizer():
    tok = build_question_tokenizer(QuestionConfig())
    vocab = MLMVocab.of(tok)
    t = tok.tokenizer
    assert (vocab.mask_id, vocab.special_ids, vocab.vocab_size) == (
        t.mask_id, (t.pad_id, t.sot_id, t.eot_id), t.vocab_size
    )  # fmt: skip
    for word in ("circle", "background"):
        first = t.tokenize_words(word)[0]
        assert vocab.word_start[first]  # a word's first piece carries "▁"


def test_items_are_seeded_and_follow_the_itm_and_qa_rules():
    ds = _dataset(itm_prob=0.5, mlm_prob=0.3)
    items = [ds[i] for i in range(4)]
    again = [ds[i] for i in range(4)]
    for a, b in zip(items, again):
        assert _same_item(a, b)
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["text_ids"], items[i]["text_ids"]) for i in range(4))
    tok = build_question_tokenizer(QuestionConfig(max_length=12))
    seen = {0: 0, 1: 0}
    for i, it in _over_epochs(ds, 40):
        seen[it["itm"]] += 1
        own_ids = tok([SENTENCES[i].text])[0][0]
        picked = it["mlm_labels"] != IGNORE
        if it["itm"]:  # the image's own sentence: labels are its tokens
            assert torch.equal(it["mlm_labels"][picked], own_ids[picked])
        if i in (1, 3):
            assert (it["qa"] != IGNORE) == bool(it["itm"])  # QA on matched pairs only
        else:
            assert it["qa"] == IGNORE  # captions have no answers
        assert it["features"][0, 0] == (1.0 if i < 2 else 2.0)  # the item's own image
        # image numbers (sorted image ids): the item's, and its sentence's (another if swapped)
        assert it["image"] == (0 if i < 2 else 1)
        assert (it["text_image"] == it["image"]) == bool(it["itm"])
    assert 60 < seen[0] < 100  # ITM swaps about half of 160


def test_grid_keep_and_collate():
    ds = _dataset(grid_keep=3, itm_prob=0.0)
    items = [ds[i] for i in range(4)]
    assert [it["features"].shape[0] for it in items] == [3, 3, 3, 3]
    assert all(it["itm"] == 1 for it in items)
    val = _dataset(train=False, grid_keep=3)
    assert val[0]["features"].shape[0] == 6  # augmentation is train-only
    batch = collate_vlp([val[0], val[2]])
    assert batch["features"].shape == (2, 6, 3) and batch["visual_mask"].sum(1).tolist() == [6, 4]
    assert batch["text_ids"].shape == batch["mlm_labels"].shape == (2, 12)
    assert batch["index"].tolist() == [0, 2]


def test_masked_cells_train_only_seeded_and_padded():
    ds = _dataset(mask_cells=0.5, itm_prob=0.0)
    a, b = ds[0], ds[0]
    assert a["masked_cells"].dtype == torch.bool and a["masked_cells"].shape == (6,)
    assert torch.equal(a["masked_cells"], b["masked_cells"])  # a function of (seed, epoch, index)
    total = sum(int(ds[i % 4]["masked_cells"].sum()) for i in range(4) for ds.epoch in range(50))
    assert 0.4 < total / (50 * (6 + 6 + 4 + 4)) < 0.6
    assert "masked_cells" not in _dataset(train=False, mask_cells=0.5)[0]
    batch = collate_vlp([ds[2], ds[0]])  # 4 and 6 cells: the short one padded with False
    assert batch["masked_cells"].shape == (2, 6) and not batch["masked_cells"][0, 4:].any()
    assert torch.equal(batch["masked_cells"][1], ds[0]["masked_cells"])


def test_word_swap_negatives_are_the_own_sentence_one_word_off():
    ds = _dataset(itm_prob=0.5, mlm_prob=0.0, swap_words="red,blue;circle,star", swap_prob=1.0)
    tok = build_question_tokenizer(QuestionConfig(max_length=12))
    swaps = {0: 0, 2: 0}
    for i, it in _over_epochs(ds, 30):
        if it["itm"]:
            continue
        # every negative is of this image: sentence 0 always has a group word, sentence 2
        # ("two blue stars": "stars" is no group word) swaps "blue" only; the questions of
        # sentences 1 and 3 swap "circle" or have nothing and fall back to another image
        if i in (0, 2):
            swaps[i] += 1
            assert it["text_image"] == it["image"] and it["qa"] == IGNORE
            want = {0: ["a blue circle on a gray background", "a red star on a gray background"],
                    2: ["two red stars"]}[i]  # fmt: skip
            assert any(torch.equal(it["text_ids"], ids) for ids in tok(want)[0])
        elif i == 3:
            assert it["text_image"] != it["image"]  # "how many stars?": nothing to swap
    assert min(swaps.values()) > 5
    # swap_prob 0 draws nothing more: the items equal those of a config without swap words
    plain, off = _dataset(itm_prob=0.5), _dataset(itm_prob=0.5, swap_words="red,blue", swap_prob=0)
    assert all(_same_item(plain[i], off[i]) for i in range(4))
