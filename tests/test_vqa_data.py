"""VQA v2 loading, joining, soft targets, image paths, missing data and the answer prior."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cliptransfer.heads.question import QuestionConfig, build_question_tokenizer
from cliptransfer.tasks.vqa.answers import load_answer_vocab, make_ans2label
from cliptransfer.tasks.vqa.data import (
    VQADataError,
    VQADataset,
    answer_prior,
    check_available,
    coco_image_path,
    collate_vqa,
    load_vqa,
    prior_results,
    with_coco_images,
)
from cliptransfer.tasks.vqa.metric import evaluate_vqa
from cliptransfer.visual.inputs import StoreInputs
from cliptransfer.visual.store import FeatureStore

QUESTIONS = [
    {"image_id": 7, "question": "how many red stars are there?", "question_id": 7000},
    {"image_id": 7, "question": "is there a circle?", "question_id": 7001},
    {"image_id": 9, "question": "what color is the square?", "question_id": 9000},
    {"image_id": 9, "question": "is the square large?", "question_id": 9001},
]
# 7000: "2" x3 after normalisation (two, 2., 2) -> .9; "3" x1 -> .3; "4" x2 -> .6; "red" x4 (OOV)
ANSWERS = {
    7000: ["two", "2.", "2", "three", "four", "Four", "red", "red", "red", "red"],
    7001: ["Yes!"] * 4 + ["no"] * 6,
    9000: ["red"] * 10,
    9001: ["yes"] * 7 + ["no"] * 3,
}
TYPES = {
    7000: ("how many", "number", "2"),
    7001: ("is there a", "yes/no", "no"),
    9000: ("what color is the", "other", "red"),
    9001: ("is the", "yes/no", "yes"),
}
VOCAB = ["2", "3", "4", "yes", "no"]


def _write(
    tmp: Path, questions=QUESTIONS, answers=ANSWERS, types=TYPES, subtype="val2014"
) -> tuple[Path, Path]:
    qfile, afile = tmp / "questions.json", tmp / "annotations.json"
    qfile.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    anns = [
        {
            "question_id": qid,
            "image_id": qid // 1000,
            "question_type": types[qid][0],
            "answer_type": types[qid][1],
            "multiple_choice_answer": types[qid][2],
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(ans)],
        }
        for qid, ans in answers.items()
    ]
    afile.write_text(json.dumps({"data_subtype": subtype, "annotations": anns}))
    return qfile, afile


_tokenize = build_question_tokenizer(QuestionConfig(max_length=16))


def _no_image(image_id: int) -> dict:
    return {}


def test_join_and_exact_soft_targets(tmp_path: Path):
    split = load_vqa(*_write(tmp_path))
    assert [e.question_id for e in split.examples] == [7000, 7001, 9000, 9001]
    e = split.examples[0]
    assert (e.image_id, e.question_type, e.answer_type) == (7, "how many", "number")
    assert e.answers == tuple(ANSWERS[7000]) and split.data_subtype == "val2014"
    ds = VQADataset(split, _tokenize, make_ans2label(VOCAB), _no_image)
    assert torch.equal(ds[0]["target"], torch.tensor([0.9, 0.3, 0.6, 0.0, 0.0]))
    assert torch.equal(ds[1]["target"], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))  # 4 and 6
    assert torch.equal(ds[2]["target"], torch.zeros(5))  # "red" is outside the vocabulary
    assert torch.equal(ds[3]["target"], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.9]))
    # 7000 loses its 4 "red", 9000 all 10: 14 of 40 answers; 9000 has no target left.
    assert ds.coverage["oov_answers"] == 14 and ds.coverage["questions_without_target"] == 1
    assert ds.coverage["max_score_mean"] == pytest.approx((0.9 + 1 + 0 + 1) / 4)
    item = ds[0]
    assert item["question_id"] == 7000 and item["text_ids"].shape == (16,)
    assert item["text_mask"].sum() == item["text_ids"].argmax() + 1  # SOT..EOT


def test_questions_without_annotations(tmp_path: Path):
    answers = {k: v for k, v in ANSWERS.items() if k != 9001}
    qfile, afile = _write(tmp_path, answers=answers)
    with pytest.raises(VQADataError, match=r"annotations.json: 1 question_id\(s\) of .*questions"
                       r".json have no annotation: 9001"):  # fmt: skip
        load_vqa(qfile, afile)
    split = load_vqa(qfile, afile, skip_missing=True)
    assert len(split) == 3 and split.skipped == {"no_annotation": 1}
    assert [r["question_id"] for r in split.annotation_records] == [7000, 7001, 9000]
    # Annotations without a question: the other mismatch direction.
    qfile, afile = _write(tmp_path, questions=QUESTIONS[:2])
    with pytest.raises(VQADataError, match=r"2 annotation\(s\) have no question .*: 9000, 9001"):
        load_vqa(qfile, afile)
    assert load_vqa(qfile, afile, skip_missing=True).skipped == {"annotation_without_question": 2}
    # Without annotations (test-dev style) every question is kept, with no targets.
    split = load_vqa(qfile)
    assert len(split) == 2 and not split.has_answers
    assert "target" not in VQADataset(split, _tokenize, make_ans2label(VOCAB), _no_image)[0]


def test_bad_files_name_the_file_and_record(tmp_path: Path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"questions": [')
    with pytest.raises(ValueError, match=r"broken.json: invalid JSON in VQA questions file"):
        load_vqa(bad)
    with pytest.raises(FileNotFoundError, match="VQA annotations file not found"):
        load_vqa(_write(tmp_path)[0], tmp_path / "nope.json")
    qs = [dict(QUESTIONS[0]), {"image_id": 7, "question": "x?"}]
    qfile, _ = _write(tmp_path, questions=qs)
    with pytest.raises(VQADataError, match=r"questions.json: record 1 has no 'question_id'"):
        load_vqa(qfile)
    qs = [dict(QUESTIONS[0]), dict(QUESTIONS[0])]
    qfile, _ = _write(tmp_path, questions=qs)
    with pytest.raises(VQADataError, match="duplicate question_id 7000"):
        load_vqa(qfile)
    qs = [dict(QUESTIONS[0], image_id=8)]
    qfile, afile = _write(tmp_path, questions=qs, answers={7000: ANSWERS[7000]})
    with pytest.raises(VQADataError, match="question_id 7000 is about image 7 but"):
        load_vqa(qfile, afile)


def test_coco_image_paths(tmp_path: Path):
    assert coco_image_path(tmp_path, "val2014", 42) == (
        tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    )
    # test-dev2015 questions are about the test2015 images
    assert coco_image_path(tmp_path, "test-dev2015", 1).name == "COCO_test2015_000000000001.jpg"
    (tmp_path / "COCO_train2014_000000000005.jpg").write_bytes(b"")  # a flat folder works too
    assert coco_image_path(tmp_path, "train2014", 5) == tmp_path / "COCO_train2014_000000000005.jpg"
    with pytest.raises(VQADataError, match="no 'data_subtype'"):
        coco_image_path(tmp_path, None, 5)
    # Missing image files: an error naming the id and the expected file, or a counted skip.
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / "COCO_val2014_000000000007.jpg").write_bytes(b"")
    split = load_vqa(*_write(tmp_path))
    expected = tmp_path / "val2014" / "COCO_val2014_000000000009.jpg"
    with pytest.raises(VQADataError, match=rf"missing: image id 9 \(expected {expected}\)"):
        with_coco_images({"val": split}, tmp_path, False)
    kept, paths = with_coco_images({"val": split}, tmp_path, True)
    assert kept["val"].skipped == {"missing_image": 2} and list(paths) == [7]


def test_missing_features_error_or_counted_skip(tmp_path: Path):
    split = load_vqa(*_write(tmp_path))
    meta = {"kind": "regions", "channels": 3}
    with FeatureStore.create(tmp_path / "store", meta) as w:
        w.add("7", torch.ones(2, 3), boxes=[[0, 0, 8, 6], [4, 3, 16, 12]], image_w=16, image_h=12)
    store = FeatureStore.open(tmp_path / "store")
    where = f"feature store {store.root}"
    with pytest.raises(VQADataError, match=r"store: 1 image\(s\) needed by .* missing: image id 9"):
        check_available(split, lambda i: str(i) in store, where, False, "missing_features")
    kept = check_available(split, lambda i: str(i) in store, where, True, "missing_features")
    assert [e.question_id for e in kept.examples] == [7000, 7001]
    assert kept.skipped == {"missing_features": 2}
    assert [r["question_id"] for r in kept.annotation_records] == [7000, 7001]
    ds = VQADataset(kept, _tokenize, make_ans2label(VOCAB), StoreInputs(store))
    item = ds[1]
    assert torch.equal(item["spatial"], torch.tensor([[0, 0, 0.5, 0.5], [0.25, 0.25, 1, 1]]))
    batch = collate_vqa([ds[0], ds[1]])
    assert batch["features"].shape == (2, 2, 3) and batch["visual_mask"].all()
    assert batch["question_id"].tolist() == [7000, 7001] and batch["target"].shape == (2, 5)


def test_answer_prior_exact(tmp_path: Path):
    questions = QUESTIONS + [{"image_id": 9, "question": "is the star small?", "question_id": 9002}]
    answers = {**ANSWERS, 9002: ["no"] * 10}
    types = {**TYPES, 9002: ("is the", "yes/no", "no")}
    split = load_vqa(*_write(tmp_path, questions=questions, answers=answers, types=types))
    prior = answer_prior(split.examples)
    # "is the": yes once, no once -> the alphabetically first; overall: "no" twice
    assert prior == {"how many": "2", "is there a": "no", "what color is the": "red",
                     "is the": "no", "": "no"}  # fmt: skip
    results = prior_results(split.examples, {**prior, "how many": "3"})
    assert [r["answer"] for r in results] == ["3", "no", "red", "no", "no"]
    assert prior_results(split.examples[:1], {"": "yes"}) == [
        {"question_id": 7000, "answer": "yes"}
    ]
    # 7000 "3": 1 match -> .3; 7001 "no" x6 -> 1; 9000 1; 9001 "no" x3 -> .9; 9002 1
    acc = evaluate_vqa(None, split.annotation_records, results)
    assert acc["overall"] == round(100 * (0.3 + 1 + 1 + 0.9 + 1) / 5, 2)
    assert acc["perAnswerType"] == {"number": 30.0, "yes/no": round(100 * 2.9 / 3, 2),
                                    "other": 100.0}  # fmt: skip


def test_lxmert_vocab_targets(shared_data: Path, tmp_path: Path):
    vocab = load_answer_vocab(shared_data / "vqa" / "trainval_ans2label.json")
    assert len(vocab) == 3129
    ans2label = make_ans2label(vocab)
    split = load_vqa(*_write(tmp_path))
    ds = VQADataset(split, _tokenize, ans2label, _no_image)
    t = ds[0]["target"]
    assert t.shape == (3129,)
    assert t[ans2label["2"]] == pytest.approx(0.9) and t[ans2label["3"]] == pytest.approx(0.3)
    assert t[ans2label["4"]] == pytest.approx(0.6) and t[ans2label["red"]] == 1.0
    assert (t > 0).sum() == 4 and ds.coverage["oov_answers"] == 0


def test_shapes_world_split(tiny_world: Path):
    vqa = tiny_world / "vqa"
    split = load_vqa(
        vqa / "v2_OpenEnded_mscoco_val2014_questions.json",
        vqa / "v2_mscoco_val2014_annotations.json",
    )
    raw = json.loads((vqa / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    assert len(split) == len(raw["questions"]) and split.skipped == {}
    assert all(len(e.answers) == 10 for e in split.examples)
    path = coco_image_path(tiny_world / "images", split.data_subtype, split.examples[0].image_id)
    assert path.is_file()
