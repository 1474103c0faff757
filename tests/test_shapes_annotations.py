"""The Shapes world's VQA questions and SNLI-VE hypotheses: the real formats, answers true for
the scene, the official question types, balance and annotator agreement."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from cliptransfer.fileio import iter_jsonl, read_json
from cliptransfer.worlds.shapes.annotators import snli_labels, vqa_answers
from cliptransfer.worlds.shapes.hypotheses import make_hypotheses
from cliptransfer.worlds.shapes.questions import QUESTION_TYPES, make_questions, question_type
from cliptransfer.worlds.shapes.scene import Obj, Scene

# The world's vocabulary, written out independently of the generator.
COLORS = {"red", "orange", "yellow", "green", "blue", "purple", "gray", "white"}
SHAPES = {"circle", "square", "triangle", "star", "diamond", "cross"}
SINGULAR = {s + "s": s for s in SHAPES} | {"crosses": "cross"}
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six".split())}


def _load(root: Path, rel: str):
    return read_json(root / rel)


def _jsonl(root: Path, rel: str) -> list[dict]:
    return [record for _, record in iter_jsonl(root / rel)]


def _objects(root: Path, rel: str) -> dict:
    return {im["image_id"]: im for im in _load(root, rel)["images"]}


def _parse_desc(words: list[str]) -> dict:
    """'large red circles' -> {'size': 'large', 'color': 'red', 'shape': 'circle'}."""
    out: dict = {}
    for w in words:
        if w in ("small", "large"):
            out["size"] = w
        elif w in COLORS:
            out["color"] = w
        elif w in SHAPES or w in SINGULAR:
            out["shape"] = SINGULAR.get(w, w)
        elif w not in ("object", "objects", "shape", "shapes"):
            raise AssertionError(f"unexpected word {w!r} in a description")
    return out


def _fits(obj: dict, desc: dict) -> bool:
    color, size, _texture = obj["attributes"]
    return all(
        {"size": size, "color": color, "shape": obj["label"]}[k] == v for k, v in desc.items()
    )


def _normalize(answer: str) -> str:
    """The parts of the official VQA normalization our annotator variants exercise."""
    text = re.sub(r"[.!]", "", answer).lower().split()
    text = [NUMBERS.get(w, w) for w in text if w not in ("a", "an", "the")]
    return " ".join(text)


def test_vqa_format_ids_and_types(tiny_world):
    assert len(QUESTION_TYPES) == 65 == len(set(QUESTION_TYPES))
    coco_ids = {
        im["id"] for im in _load(tiny_world, "annotations/captions_train2014.json")["images"]
    }
    qs = _load(tiny_world, "vqa/v2_OpenEnded_mscoco_train2014_questions.json")
    an = _load(tiny_world, "vqa/v2_mscoco_train2014_annotations.json")
    assert set(qs) == {"info", "task_type", "data_type", "license", "data_subtype", "questions"}
    assert (qs["task_type"], qs["data_type"], qs["data_subtype"]) == (
        "Open-Ended",
        "mscoco",
        "train2014",
    )
    assert {"info", "license", "data_subtype", "annotations"} <= set(an)
    assert an["data_subtype"] == "train2014"
    questions = {q["question_id"]: q for q in qs["questions"]}
    assert len(questions) == len(qs["questions"]) == len(an["annotations"])
    per_image = Counter(q["image_id"] for q in qs["questions"])
    assert (
        set(per_image) == coco_ids and min(per_image.values()) >= 4 and max(per_image.values()) <= 8
    )
    for a in an["annotations"]:
        q = questions[a["question_id"]]
        assert set(q) == {"image_id", "question", "question_id"}
        assert set(a) == {
            "question_type",
            "multiple_choice_answer",
            "answers",
            "image_id",
            "answer_type",
            "question_id",
        }
        assert a["image_id"] == q["image_id"] and a["question_id"] // 1000 == a["image_id"]
        assert a["question_type"] in QUESTION_TYPES and q["question"].startswith(
            a["question_type"] + " "
        )
        assert a["answer_type"] in ("yes/no", "number", "other")
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(set(x) == {"answer", "answer_confidence", "answer_id"} for x in a["answers"])
        assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
        raw = Counter(x["answer"] for x in a["answers"])
        assert raw[a["multiple_choice_answer"]] == max(raw.values())
        # The canonical answer stays the strict mode after normalization (synonyms such as
        # "grey" are not merged by the official normalizer, so they count against it).
        normalized = Counter(_normalize(x["answer"]) for x in a["answers"]).most_common()
        assert normalized[0][0] == a["multiple_choice_answer"]
        assert len(normalized) == 1 or normalized[0][1] > normalized[1][1]
        if a["answer_type"] == "yes/no":
            assert a["multiple_choice_answer"] in ("yes", "no")
        if a["answer_type"] == "number":
            assert a["multiple_choice_answer"].isdigit()


def test_question_types_match_official_list(shared_data):
    official = (shared_data / "vqa/mscoco_question_types.txt").read_text().split("\n")
    assert tuple(t.strip() for t in official if t.strip()) == QUESTION_TYPES


def test_question_type_is_longest_official_prefix():
    assert question_type("what color is the large star?") == "what color is the"
    assert question_type("what is the color of the star?") == "what is the color of the"
    assert question_type("is there an orange circle?") == "is there"
    assert question_type("are there any red objects?") == "are there any"
    assert question_type("what shape is the red object?") == "what"
    with pytest.raises(ValueError, match="no official VQA question type"):
        question_type("count the stars?")


def test_vqa_answers_are_true_for_the_scene(tiny_world):
    objects = _objects(tiny_world, "objects/train2014.json")
    qs = {
        q["question_id"]: q["question"]
        for q in _load(tiny_world, "vqa/v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    }
    checked = Counter()
    for a in _load(tiny_world, "vqa/v2_mscoco_train2014_annotations.json")["annotations"]:
        q, ans = qs[a["question_id"]], a["multiple_choice_answer"]
        objs = objects[a["image_id"]]["objects"]
        if re.search(r"\b(left|right|above|below|than|same)\b", q):
            continue  # relations and comparisons: need object centres, not in the objects file
        if m := re.fullmatch(r"how many (.+?) (are there|are in the \w+|can you see)\?", q):
            desc = _parse_desc(m.group(1).split())
            assert ans == str(sum(_fits(o, desc) for o in objs)), q
            checked["count"] += 1
        elif m := re.fullmatch(r"(is there an?|are there any) ([a-z ]+)\?", q):
            desc = _parse_desc(m.group(2).split())
            assert ans == ("yes" if any(_fits(o, desc) for o in objs) else "no"), q
            checked["exist"] += 1
        elif m := re.fullmatch(r"what (?:color is the|is the color of the) ([a-z ]+)\?", q):
            desc = _parse_desc(m.group(1).split())
            (target,) = [o for o in objs if _fits(o, desc)]  # descriptions are unique
            assert ans == target["attributes"][0], q
            checked["color"] += 1
        elif m := re.fullmatch(r"what (?:shape is the|is the shape of the) ([a-z ]+)\?", q):
            (target,) = [o for o in objs if _fits(o, _parse_desc(m.group(1).split()))]
            assert ans == target["label"], q
            checked["shape"] += 1
    assert min(checked.values()) >= 10 and len(checked) == 4, checked


def test_answer_balance_and_disagreement(tiny_world):
    anns = _load(tiny_world, "vqa/v2_mscoco_train2014_annotations.json")["annotations"]
    yesno = Counter(a["multiple_choice_answer"] for a in anns if a["answer_type"] == "yes/no")
    assert 0.4 < yesno["yes"] / sum(yesno.values()) < 0.6
    counts = Counter(a["multiple_choice_answer"] for a in anns if a["answer_type"] == "number")
    assert len(counts) >= 5 and max(counts.values()) / sum(counts.values()) < 0.4
    raw = [x["answer"] for a in anns for x in a["answers"]]
    assert any(r != _normalize(r) for r in raw), "variants that the normalizer maps"
    assert {"two", "Yes"} & set(raw) and any(r.endswith(".") for r in raw)
    assert sum(len({x["answer"] for x in a["answers"]}) > 1 for a in anns) > len(anns) / 2


def test_annotator_models_keep_a_correct_majority():
    rng = random.Random(0)
    for i in range(300):
        kind, answer = [
            ("number", str(i % 7)),
            ("yes/no", "yes"),
            ("color", "gray"),
            ("shape", "star"),
            ("size", "large"),
        ][i % 5]
        answers = vqa_answers(answer, kind, rng)
        raw = Counter(a["answer"] for a in answers)
        assert raw.most_common(1)[0][0] == answer and list(raw.values()).count(raw[answer]) == 1
        labels = snli_labels(["entailment", "neutral", "contradiction"][i % 3], rng)
        assert len(labels) == 5 and labels.count(labels[0]) >= 3


def test_snli_ve_format_balance_and_truth(tiny_world):
    objects = _objects(tiny_world, "objects/flickr30k.json")
    pair_ids = set()
    checked = Counter()
    for split, n_images in (("train", 24), ("dev", 8), ("test", 8)):
        rows = _jsonl(tiny_world, f"snli_ve/snli_ve_{split}.jsonl")
        assert Counter(r["gold_label"] for r in rows) == {
            "entailment": 3 * n_images,
            "neutral": 3 * n_images,
            "contradiction": 3 * n_images,
        }
        for r in rows:
            assert set(r) == {
                "Flikr30kID",
                "gold_label",
                "sentence1",
                "sentence2",
                "pairID",
                "captionID",
                "annotator_labels",
            }
            assert (
                re.fullmatch(r"\d{10}\.jpg", r["Flikr30kID"])
                and (tiny_world / "flickr30k_images" / r["Flikr30kID"]).is_file()
            )
            assert r["captionID"].startswith(r["Flikr30kID"] + "#") and r["pairID"].startswith(
                r["captionID"] + "r"
            )
            labels = r["annotator_labels"]
            assert len(labels) == 5 and Counter(labels).most_common(1)[0] == (
                r["gold_label"],
                labels.count(r["gold_label"]),
            )
            assert labels.count(r["gold_label"]) >= 3 and r["pairID"] not in pair_ids
            pair_ids.add(r["pairID"])
            objs = objects[int(r["Flikr30kID"][:-4])]["objects"]
            h = r["sentence2"]
            if m := re.fullmatch(r"there (?:is exactly|are) (one|no|two|three) ([a-z ]+)", h):
                n = sum(_fits(o, _parse_desc(m.group(2).split())) for o in objs)
                truth = str(n) == NUMBERS.get(m.group(1), "0")
                assert r["gold_label"] == ("entailment" if truth else "contradiction"), h
                checked["count"] += 1
            elif m := re.fullmatch(
                r"the ([a-z ]+) is (red|orange|yellow|green|blue|purple|gray|white|small|large)", h
            ):
                (target,) = [o for o in objs if _fits(o, _parse_desc(m.group(1).split()))]
                truth = m.group(2) in target["attributes"]
                assert r["gold_label"] == ("entailment" if truth else "contradiction"), h
                checked["attribute"] += 1
    assert checked["count"] >= 10 and checked["attribute"] >= 10, checked


def _hand_scene() -> tuple[Scene, dict[str, Obj]]:
    objs = {
        "circle": Obj("circle", "red", "large", "solid", 30.0, 60.0, 18.0, 0.0, (210, 35, 35)),
        "star": Obj("star", "blue", "small", "striped", 80.0, 25.0, 9.0, 0.0, (45, 85, 220)),
        "square": Obj("square", "green", "large", "solid", 130.0, 95.0, 18.0, 0.0, (40, 165, 60)),
    }
    return Scene(160, 120, "black", (20, 20, 20), tuple(objs.values())), objs


def test_relation_questions_and_hypotheses_on_a_known_scene():
    scene, objs = _hand_scene()

    def find(words: str) -> Obj:
        desc = _parse_desc(words.split())
        (hit,) = [o for o in objs.values() if all(getattr(o, k) == v for k, v in desc.items())]
        return hit

    def holds(a: Obj, rel: str, b: Obj) -> bool:
        return {
            "to the left of": a.x < b.x,
            "to the right of": a.x > b.x,
            "above": a.y < b.y,
            "below": a.y > b.y,
        }[rel]

    rel = r"(to the left of|to the right of|above|below)"
    checked = Counter()
    for seed in range(150):
        for qa in make_questions(scene, random.Random(seed)):
            if m := re.fullmatch(rf"is the ([a-z ]+?) {rel} the ([a-z ]+)\?", qa.question):
                truth = holds(find(m.group(1)), m.group(2), find(m.group(3)))
                assert qa.answer == ("yes" if truth else "no"), qa
                checked["yes/no"] += 1
            elif m := re.fullmatch(rf"what color is the (\w+) {rel} the ([a-z ]+)\?", qa.question):
                ref = find(m.group(3))
                (hit,) = [
                    o for o in objs.values() if o.shape == m.group(1) and holds(o, m.group(2), ref)
                ]
                assert qa.answer == hit.color, qa
                checked["query"] += 1
        hyps = make_hypotheses(scene, random.Random(seed))
        for label in ("entailment", "contradiction"):
            for h in hyps[label]:
                if m := re.fullmatch(rf"the ([a-z ]+?) is {rel} the ([a-z ]+)", h):
                    truth = holds(find(m.group(1)), m.group(2), find(m.group(3)))
                    assert truth == (label == "entailment"), h
                    checked["snli"] += 1
    assert min(checked.values()) >= 20 and len(checked) == 3, checked
