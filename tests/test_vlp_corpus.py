"""LXMERT's pretraining JSON: reading (exact sentences and answer tables, errors naming file and
record), writing, and the Shapes world written in it (soft scores worked out by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cliptransfer.cli import main
from cliptransfer.vlp.corpus import (
    VLPCorpusError,
    VLPSentence,
    build_shapes_vlp_corpus,
    load_lxmert,
    to_lxmert,
)

LXMERT = [
    {"img_id": "COCO_train2014_000000000009",
     "sentf": {"mscoco": ["a plate of food", "some broccoli"], "vqa": ["what is it?"]},
     "labelf": {"vqa": [{"food": 1.0, "broccoli": 0.3}]}},
    {"img_id": "COCO_val2014_000000000042", "sentf": {"vg": ["a man"]}},
]  # fmt: skip


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_load_lxmert_sentences_labels_and_sources(tmp_path: Path):
    f = _write(tmp_path / "mscoco_train.json", LXMERT)
    sents = load_lxmert(f)
    assert sents == [
        VLPSentence("COCO_train2014_000000000009", "a plate of food", "mscoco"),
        VLPSentence("COCO_train2014_000000000009", "some broccoli", "mscoco"),
        VLPSentence("COCO_train2014_000000000009", "what is it?", "vqa",
                    {"food": 1.0, "broccoli": 0.3}),
        VLPSentence("COCO_val2014_000000000042", "a man", "vg"),
    ]  # fmt: skip
    assert [s.source for s in load_lxmert(f, sources=["vqa", "vg"])] == ["vqa", "vg"]
    # Written back, the records are the file's (an empty labelf where the file had none).
    back = to_lxmert(sents)
    assert back[0] == LXMERT[0] and back[1] == {**LXMERT[1], "labelf": {}}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"sentf": {}}, r"record 0: needs a string 'img_id'"),
        ({"img_id": "x", "sentf": {"vqa": ["q1", "q2"]}, "labelf": {"vqa": [{"a": 1}]}},
         r"record 0 \(img_id x\): labelf\['vqa'\] must list one answer table per sentence \(2\), "
         r"got 1"),
        ({"img_id": "x", "sentf": {"vqa": ["q"]}, "labelf": {"vqa": [{"a": 2}]}},
         r"record 0 \(img_id x\) labelf\['vqa'\]\[0\]: a label must map answers to scores"),
        ({"img_id": "x", "sentf": {"mscoco": "a caption"}},
         r"record 0 \(img_id x\): sentf\['mscoco'\] must be a list of strings"),
    ],
)  # fmt: skip
def test_load_lxmert_names_file_and_record(tmp_path: Path, record, message):
    f = _write(tmp_path / "bad.json", [record])
    with pytest.raises(VLPCorpusError, match=f"bad.json: {message}"):
        load_lxmert(f)


def _mini_world(root: Path) -> Path:
    """Two train images with one caption each and one question on the first."""
    (root / "annotations").mkdir(parents=True)
    (root / "vqa").mkdir()
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in (100000, 100001)]
    _write(root / "annotations" / "captions_train2014.json", {
        "images": images,
        "annotations": [{"image_id": 100000, "id": 1, "caption": "a red star"},
                        {"image_id": 100001, "id": 2, "caption": "two blue circles"}]})  # fmt: skip
    _write(root / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json", {
        "questions": [{"image_id": 100000, "question": "what colour is the star?",
                       "question_id": 100000000}]})  # fmt: skip
    # 7 x "red", 2 x "red." (the official punctuation rule drops the period) and 1 x "pink".
    answers = ["red"] * 7 + ["red."] * 2 + ["pink"]
    _write(root / "vqa" / "v2_mscoco_train2014_annotations.json", {
        "annotations": [{"question_id": 100000000, "image_id": 100000,
                         "answers": [{"answer": a} for a in answers]}]})  # fmt: skip
    return root


def test_shapes_corpus_by_hand(tmp_path: Path):
    world = _mini_world(tmp_path / "world")
    out = build_shapes_vlp_corpus(world, tmp_path / "corpus", heldout_fraction=0.5, seed=0)
    train = json.loads((out / "mscoco_train.json").read_text())
    minival = json.loads((out / "mscoco_minival.json").read_text())
    assert len(train) == len(minival) == 1  # one of the two images held out
    both = {r["img_id"]: r for r in train + minival}
    # "red." loses its period (official punctuation rule): 9 x "red" -> 1.0, 1 x "pink" -> 0.3.
    assert both["COCO_train2014_000000100000"] == {
        "img_id": "COCO_train2014_000000100000",
        "sentf": {"mscoco": ["a red star"], "vqa": ["what colour is the star?"]},
        "labelf": {"vqa": [{"pink": 0.3, "red": 1.0}]},
    }
    assert both["COCO_train2014_000000100001"]["sentf"] == {"mscoco": ["two blue circles"]}
    assert load_lxmert(out / "mscoco_train.json")  # readable by our own loader
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train_images": 1, "minival_images": 1, "captions": 2,
                                  "questions": 1}  # fmt: skip


def test_shapes_corpus_on_the_tiny_world_and_cli(tiny_world: Path, tmp_path: Path, capsys):
    assert main(["prepare", "vlp-corpus", "--shapes", str(tiny_world), "--out",
                 str(tmp_path / "c"), "--heldout", "0.25"]) == 0  # fmt: skip
    assert "minival_images" in capsys.readouterr().out
    train = load_lxmert(tmp_path / "c" / "mscoco_train.json")
    minival = load_lxmert(tmp_path / "c" / "mscoco_minival.json")
    assert {s.img_id for s in train}.isdisjoint({s.img_id for s in minival})
    n_images = len(json.loads((tiny_world / "objects" / "train2014.json").read_text())["images"])
    assert len({s.img_id for s in minival}) == round(0.25 * n_images)
    assert all(s.label for s in train + minival if s.source == "vqa")
    with pytest.raises(FileNotFoundError, match="captions_train2014.json missing"):
        build_shapes_vlp_corpus(tmp_path / "nowhere", tmp_path / "c2")


def test_shapes_corpus_keeps_the_first_questions_of_each_image(tiny_world: Path, tmp_path: Path):
    questions = json.loads(
        (tiny_world / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json").read_text()
    )["questions"]
    by_image: dict[int, list[dict]] = {}
    for q in sorted(questions, key=lambda q: q["question_id"]):
        by_image.setdefault(q["image_id"], []).append(q)
    assert max(len(qs) for qs in by_image.values()) > 2  # the cap has work to do
    want = {f"COCO_train2014_{i:012d}": [q["question"] for q in qs[:2]]
            for i, qs in by_image.items()}  # fmt: skip
    out = build_shapes_vlp_corpus(tiny_world, tmp_path / "c", questions_per_image=2)
    got: dict[str, list[str]] = {}
    for f in ("mscoco_train.json", "mscoco_minival.json"):
        for s in load_lxmert(out / f):
            if s.source == "vqa":
                got.setdefault(s.img_id, []).append(s.text)
    assert got == want
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["questions"] == sum(len(v) for v in want.values())
    everything = build_shapes_vlp_corpus(tiny_world, tmp_path / "all", questions_per_image=0)
    assert json.loads((everything / "manifest.json").read_text())["counts"]["questions"] == len(
        questions
    )
    with pytest.raises(ValueError, match="questions_per_image must be >= 0"):
        build_shapes_vlp_corpus(tiny_world, tmp_path / "c3", questions_per_image=-1)
