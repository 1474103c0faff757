"""Official VQA accuracy (current + legacy), answer vocab / soft targets, `evaluate` module."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from cliptransfer.tasks.vqa.answers import (
    answer_targets,
    build_answer_vocab,
    dense_answer_target,
    load_answer_vocab,
    make_ans2label,
    normalize_answer_for_vocab,
    save_answer_vocab,
    soft_score,
    vocab_coverage,
)
from cliptransfer.tasks.vqa.metric import (
    CONTRACTIONS,
    evaluate_vqa,
    evaluate_vqa_files,
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLIPTRANSFER_SHARED_DATA", REPO.parent / "shared" / "data"))
MODULE_DIR = REPO / "cliptransfer" / "evaluate_modules" / "vqa_accuracy"


# ------------------------------------------------------------------ per-question leave-one-out


@pytest.mark.parametrize(
    "k, expected",
    [
        # k of the 10 GT answers equal the prediction. Each GT answer scores
        # min(1, matches among the *other* 9 / 3): a matching GT sees k-1, a non-matching one k.
        (0, 0.0),  # 10 * 0 / 10
        (1, 0.3),  # (1 * 0/3 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10   (not min(1, 3/3) = 1)
        (4, 1.0),  # (4 * 1 + 6 * 1) / 10: with 4 matches even a matching GT still sees 3
        (10, 1.0),
    ],
)
def test_leave_one_out_scores(k: int, expected: float) -> None:
    gts = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy(gts, "cat") == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy(gts, "cat", legacy=True) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_with_fewer_answers() -> None:
    # 3 GT answers [cat, dog, dog], prediction cat: cat sees 0 others -> 0, each dog sees 1 -> 1/3
    # => (0 + 1/3 + 1/3) / 3 = 2/9
    assert vqa_accuracy(["cat", "dog", "dog"], "cat") == pytest.approx(2 / 9, abs=1e-12)


# ------------------------------------------------------------------------ punctuation rules


@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes?", "yes "),  # '?' not touching a space -> replaced by a space
        ("yes ?", "yes "),  # ' ?' occurs -> '?' removed
        ("red,blue", "red blue"),  # no ', ' and no digit,digit -> comma becomes a space
        ("red, blue", "red blue"),  # ', ' occurs -> comma removed
        ("x-ray", "x ray"),  # '-' becomes a space...
        ("x-ray - yes", "xray  yes"),  # ...but one spaced '-' makes *every* '-' vanish
        ("100(approx)", "100 approx "),
        ("1,000", "1000"),  # digit,digit: comma removed (not kept, not spaced)
        ("1,000(approx)", "1000approx"),  # a digit,digit anywhere removes all punctuation
        ('"yes"', " yes "),
        ("a\\b", "a b"),
        ("don't", "don't"),  # apostrophe is not in the punctuation list
        ("10:30", "10:30"),  # nor is ':'
        ("yes.", "yes"),  # a '.' not followed by a digit is removed
        ("a.m.", "am"),
        ("2.5", "2.5"),  # '.' followed by a digit is kept
        ("2.", "2"),
        (".5", ".5"),
        ("3.14.", "3.14"),
        ("yes" + "." * 40, "yes" + "." * 8),  # official sub(..., re.UNICODE): count=32
    ],
)
def test_process_punctuation(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),
        ("two dogs", "2 dogs"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the number map stops at ten
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("another", "another"),
        ("a", ""),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Isnt", "isn't"),  # lower() happens before the lookup
        ("whats up", "what's up"),
        ("oclock", "o'clock"),
        ("Im", "im"),  # the capitalised keys "Im"/"Ive" can never match
        ("  a   red\tcar ", "red car"),
    ],
)
def test_process_digit_article(text: str, expected: str) -> None:
    assert process_digit_article(text) == expected


def test_tables_and_full_normalisation() -> None:
    assert len(CONTRACTIONS) == 120
    assert normalize_vqa_answer("  Two\tdogs!\n") == "2 dogs"
    assert normalize_vqa_answer("The answer is: none.") == "answer is: 0"
    assert normalize_vqa_answer("Dont know?") == "don't know"


# --------------------------------------------------------------------- current vs. legacy


def test_identical_gt_skips_normalisation_in_current_only() -> None:
    gts = ["yes"] * 10
    # current: the 10 GT are identical -> nothing is normalised -> "Yes." != "yes"
    assert vqa_accuracy(gts, "Yes.") == 0.0
    # legacy: the prediction is always normalised -> "yes" matches all 10
    assert vqa_accuracy(gts, "Yes.", legacy=True) == 1.0
    # identical capitalised GT is never normalised in legacy either: "yes" != "Yes"
    assert vqa_accuracy(["Yes"] * 10, "yes") == 0.0
    assert vqa_accuracy(["Yes"] * 10, "yes", legacy=True) == 0.0
    # current strips GT whitespace before the identity test; legacy compares the raw GT
    assert vqa_accuracy(["yes "] * 10, "yes") == 1.0
    assert vqa_accuracy(["yes "] * 10, "yes", legacy=True) == 0.0


def test_varied_gt_normalisation_current_vs_legacy() -> None:
    gts = ["two"] * 4 + ["three"] * 6
    # current: GT -> "2" x4, "3" x6; prediction "2" or "two" -> "2": 4 matches -> 1
    assert vqa_accuracy(gts, "2") == 1.0
    assert vqa_accuracy(gts, "Two") == 1.0
    # legacy: GT only get punctuation processing, so "two" stays "two" != "2"
    assert vqa_accuracy(gts, "2", legacy=True) == 0.0
    assert vqa_accuracy(gts, "two", legacy=True) == 0.0
    # legacy GT "yes!" -> "yes " (space kept: no digit/article step on GT) != "yes"
    gts = ["yes!"] * 3 + ["no"] * 7
    assert vqa_accuracy(gts, "yes") == pytest.approx(0.9, abs=1e-12)
    assert vqa_accuracy(gts, "yes", legacy=True) == 0.0
    assert vqa_accuracy(["1,000"] * 5 + ["1000"] * 5, "1000") == 1.0


def test_vqa_accuracy_bad_input() -> None:
    with pytest.raises(TypeError, match="sequence of strings"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy([], "yes")


# ----------------------------------------------------------------------- file-level scoring


def _ann(qid: int, answers: list[str], qtype: str, atype: str) -> dict:
    return {
        "question_id": qid,
        "image_id": qid * 10,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": answers[0],
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)
        ],
    }


ANNOTATIONS = {
    "annotations": [
        _ann(1, ["red"] * 3 + ["blue"] * 7, "what color is the", "other"),  # pred red: 0.9
        _ann(2, ["2"] + ["3"] * 9, "how many", "number"),  # pred 2: 0.3
        _ann(3, ["yes"] * 10, "is the", "yes/no"),  # pred yes: 1.0
        _ann(4, ["red"] * 3 + ["blue"] * 7, "what color is the", "other"),  # pred green: 0.0
        _ann(5, ["cat", "dog", "dog"], "what is the", "other"),  # pred cat: 2/9
        _ann(6, ["cat"] + ["dog"] * 4, "what is the", "other"),  # pred cat: 4 * (1/3) / 5 = 4/15
    ]
}
QUESTIONS = {"questions": [{"question_id": q, "image_id": q * 10} for q in range(1, 7)]}
RESULTS = [
    {"question_id": 1, "answer": "red"},
    {"question_id": 2, "answer": "two"},
    {"question_id": 3, "answer": "yes"},
    {"question_id": 4, "answer": "green"},
    {"question_id": 5, "answer": "cat"},
    {"question_id": 6, "answer": "Cat"},
]


def test_evaluate_vqa_aggregation_and_rounding() -> None:
    acc = evaluate_vqa(QUESTIONS, ANNOTATIONS, RESULTS)
    # overall: (0.9 + 0.3 + 1 + 0 + 2/9 + 4/15) / 6 * 100 = (2.2 + 22/45) / 6 * 100
    #        = (121/45) / 6 * 100 = 44.8148... -> 44.81
    assert acc["overall"] == 44.81
    # "what is the": (2/9 + 4/15) / 2 * 100 = 24.444... -> 24.44. Averaging the per-question
    # values the official scorer rounds for evalQA (22.22, 26.67) would give 24.445 -> 24.45.
    assert acc["perQuestionType"] == {
        "what color is the": 45.0,  # (0.9 + 0) / 2
        "how many": 30.0,
        "is the": 100.0,
        "what is the": 24.44,
    }
    # other: (0.9 + 0 + 2/9 + 4/15) / 4 * 100 = (0.9 + 22/45) / 4 * 100 = 34.7222... -> 34.72
    assert acc["perAnswerType"] == {"other": 34.72, "number": 30.0, "yes/no": 100.0}
    # legacy: q3 (identical GT) unchanged, q2 GT ["2", "3"...] and prediction "two" -> "2": same
    assert evaluate_vqa(None, ANNOTATIONS, RESULTS, legacy=True)["overall"] == 44.81


def test_evaluate_vqa_coverage_errors() -> None:
    results = RESULTS[1:] + [{"question_id": 99, "answer": "x"}, {"question_id": 98, "answer": "y"}]
    with pytest.raises(ValueError) as e:
        evaluate_vqa(QUESTIONS, ANNOTATIONS, results)
    msg = str(e.value)
    assert "results" in msg and "1 missing: 1" in msg and "2 extra" in msg and "98, 99" in msg
    with pytest.raises(ValueError, match="1 duplicate question_id.*: 3"):
        evaluate_vqa(QUESTIONS, ANNOTATIONS, RESULTS + [{"question_id": 3, "answer": "no"}])
    with pytest.raises(ValueError, match="record 2 has no 'answer'"):
        evaluate_vqa(QUESTIONS, ANNOTATIONS, RESULTS[:2] + [{"question_id": 3}] + RESULTS[3:])
    with pytest.raises(ValueError, match="record 0: 'question_id' has type str"):
        evaluate_vqa(QUESTIONS, ANNOTATIONS, [{"question_id": "1", "answer": "red"}])
    with pytest.raises(ValueError, match="have no question: 6"):
        evaluate_vqa({"questions": QUESTIONS["questions"][:5]}, ANNOTATIONS, RESULTS)


def test_evaluate_vqa_files(tmp_path: Path) -> None:
    paths = {}
    for name, obj in [("q", QUESTIONS), ("a", ANNOTATIONS), ("r", RESULTS)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    acc = evaluate_vqa_files(paths["q"], paths["a"], paths["r"])
    assert acc == evaluate_vqa(QUESTIONS, ANNOTATIONS, RESULTS)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question_id": 1, "answer": "red"},\n {"question_id": 2 "answer": "x"}]')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON .* line 2"):
        evaluate_vqa_files(paths["q"], paths["a"], bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_vqa_files(paths["q"], paths["a"], tmp_path / "nope.json")
    short = tmp_path / "short.json"
    short.write_text(json.dumps(RESULTS[:-1]))
    with pytest.raises(ValueError, match=r"short\.json: results must cover exactly the 6"):
        evaluate_vqa_files(None, paths["a"], short)


# ---------------------------------------------------------------- vocab and soft targets


def test_soft_score_values() -> None:
    assert [soft_score(c) for c in (0, 1, 2, 3, 4, 10)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    with pytest.raises(ValueError):
        soft_score(-1)


def test_build_answer_vocab() -> None:
    def rec(qid: int, mc: str) -> dict:
        return {"question_id": qid, "multiple_choice_answer": mc, "answers": []}

    anns = [
        rec(1, "yes"), rec(2, "yes"), rec(3, "yes"), rec(4, "Yes."),  # "yes": 4 questions
        rec(1, "yes"),  # duplicate question id: counted once, as BUTD's set of question ids
        rec(5, "two"), rec(6, "2"),  # "2": 2
        rec(7, "1,000"), rec(8, "1000"),  # "1000": 2
        rec(9, "a dog"),  # "dog": 1
    ]  # fmt: skip
    assert normalize_answer_for_vocab("1,000") == "1000"
    assert build_answer_vocab(anns, min_count=2) == ["yes", "1000", "2"]  # count desc, then alpha
    assert build_answer_vocab({"annotations": anns}, min_count=5) == []
    assert build_answer_vocab(anns, min_count=1)[-1] == "dog"
    with pytest.raises(ValueError, match="record 0"):
        build_answer_vocab([{"question_id": 1}])


def test_answer_targets_and_coverage() -> None:
    ans2label = make_ans2label(["2", "yes", "no"])
    answers = ["two", "2", "2", "yes", "no", "no", "no", "no", "no", "maybe"]
    # normalised: "2" x3 -> 0.9, "yes" x1 -> 0.3, "no" x5 -> 1, "maybe" out of vocab
    assert answer_targets(answers, ans2label) == ([0, 1, 2], [0.9, 0.3, 1.0])
    # raw strings (BUTD compute_target): "two" is out of vocab, "2" x2 -> 0.6
    assert answer_targets(answers, ans2label, normalize=False) == ([0, 1, 2], [0.6, 0.3, 1.0])
    dense = dense_answer_target(answers, ans2label)
    assert dense.dtype == torch.float32 and dense.shape == (3,)
    assert torch.allclose(dense, torch.tensor([0.9, 0.3, 1.0]))
    assert torch.equal(dense_answer_target(["cat"] * 10, ans2label), torch.zeros(3))
    anns = [
        {"answers": [{"answer": a} for a in answers]},
        {"answers": [{"answer": "cat"}] * 10},
    ]
    cov = vocab_coverage(anns, ans2label)
    assert cov == {
        "questions": 2,
        "answers": 20,
        "oov_answers": 11,  # "maybe" + 10 x "cat"
        "oov_fraction": 0.55,
        "questions_without_target": 1,
        "max_score_mean": 0.5,  # (1.0 + 0) / 2
    }


def test_load_answer_vocab(tmp_path: Path) -> None:
    (tmp_path / "a2l.json").write_text(json.dumps({"b": 1, "a": 0}))
    assert load_answer_vocab(tmp_path / "a2l.json") == ["a", "b"]
    save_answer_vocab(["a", "b"], tmp_path / "l2a.json")
    assert load_answer_vocab(tmp_path / "l2a.json") == ["a", "b"]
    (tmp_path / "gap.json").write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(ValueError, match=r"gap\.json: ans2label labels"):
        load_answer_vocab(tmp_path / "gap.json")
    (tmp_path / "dup.json").write_text(json.dumps(["a", "a"]))
    with pytest.raises(ValueError, match="duplicate"):
        load_answer_vocab(tmp_path / "dup.json")


def test_lxmert_answer_vocab() -> None:
    a2l, l2a = (
        SHARED / "vqa" / "trainval_ans2label.json",
        SHARED / "vqa" / "trainval_label2ans.json",
    )
    if not a2l.is_file() or not l2a.is_file():
        pytest.skip(f"LXMERT vocab not found under {SHARED} (set CLIPTRANSFER_SHARED_DATA)")
    vocab = load_answer_vocab(a2l)
    assert len(vocab) == 3129
    assert load_answer_vocab(l2a) == vocab
    # Finding: every LXMERT answer is a fixed point of both normalisations (fully idempotent).
    # "" (an answer that normalised to nothing, e.g. "a") is itself a class, label 0.
    assert [a for a in vocab if normalize_vqa_answer(a) != a] == []
    assert [a for a in vocab if normalize_answer_for_vocab(a) != a] == []
    assert vocab[0] == "" and "2" in vocab and "two" not in vocab
    assert "don't know" in vocab and "dont know" not in vocab  # contraction restored


# ------------------------------------------------------------------- local `evaluate` module


# Ten GT answers per question, worked by hand from the official definition: per GT answer,
# min(1, matches among the other 9 / 3), averaged over the 10.
EVAL_PREDS = ["2", "Yes", "red", "dog"]
EVAL_REFS = [
    ["2", "2", "two"] + ["3"] * 7,
    ["yes"] * 10,
    ["red"] + ["blue"] * 9,
    ["a dog"] * 2 + ["dogs"] * 8,
]
EVAL_HAND = {
    # current: GTs differ, so both sides are normalised ("two" -> "2"): 3 matches,
    #   (3 * 2/3 + 7 * 3/3) / 10 = 0.9; legacy normalises the GTs' punctuation only: 2 matches,
    #   (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    # "Yes" vs 10 x "yes": current leaves identical GTs and the prediction as they are: 0 matches,
    #   0.0; legacy always normalises the prediction: 10 matches, 1.0.
    # "red" vs 1 x "red": the matching GT sees 0 others, the 9 others see 1: (9 * 1/3) / 10 = 0.3.
    # "dog" vs 2 x "a dog": current drops the article: 2 matches, (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
    #   legacy keeps "a dog": 0 matches, 0.0.
    "default": [0.9, 0.0, 0.3, 0.6],
    "legacy": [0.6, 1.0, 0.3, 0.0],
}


@pytest.mark.slow  # importing evaluate + datasets takes several seconds
def test_evaluate_module_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local `evaluate` module loads from its folder with no network and scores exactly as
    cliptransfer.tasks.vqa.metric (and as the hand-worked numbers above)."""
    for var in ("HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True, raising=False)

    attempts: list[tuple] = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    # Environment variables are read when huggingface_hub is first imported, perhaps before this
    # test, and `evaluate` swallows failed Hub look-ups; so refuse every connection and check
    # at the end that none was tried (`evaluate.load("accuracy")` here would record one).
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for config, legacy in (("default", False), ("legacy", True)):
        hand = EVAL_HAND[config]
        ours = [vqa_accuracy(r, p, legacy=legacy) for p, r in zip(EVAL_PREDS, EVAL_REFS)]
        assert ours == pytest.approx(hand, abs=1e-12)
        metric = evaluate.load(
            str(MODULE_DIR), config, cache_dir=str(tmp_path / config), keep_in_memory=True
        )
        got = metric.compute(predictions=EVAL_PREDS, references=EVAL_REFS)
        assert got == {"accuracy": sum(ours) / len(ours)}  # the same float, not just close
        assert got["accuracy"] == pytest.approx(sum(hand) / 4, abs=1e-12)  # 0.45 / 0.475
        for p, r, want in zip(EVAL_PREDS, EVAL_REFS, ours):
            assert metric.compute(predictions=[p], references=[r]) == {"accuracy": want}
    with pytest.raises(ValueError, match="config_name must be one of"):
        evaluate.load(str(MODULE_DIR), "strict", cache_dir=str(tmp_path / "bad"))
    assert attempts == []
