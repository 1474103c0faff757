"""The embedded Shapes world: determinism, real-format fidelity, answer correctness, idempotence."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cliptransfer.worlds.shapes import SIZES, default_world_dir, prepare_shapes
from cliptransfer.worlds.shapes.annotators import snli_labels, vqa_answers
from cliptransfer.worlds.shapes.formats import write_openclip_csv, write_shards
from cliptransfer.worlds.shapes.hypotheses import make_hypotheses
from cliptransfer.worlds.shapes.questions import QUESTION_TYPES, make_questions, question_type
from cliptransfer.worlds.shapes.render import View, render
from cliptransfer.worlds.shapes.scene import Obj, Scene

# The world's vocabulary, written out independently of the generator.
COLORS = {"red", "orange", "yellow", "green", "blue", "purple", "gray", "white"}
SHAPES = {"circle", "square", "triangle", "star", "diamond", "cross"}
SINGULAR = {s + "s": s for s in SHAPES} | {"crosses": "cross"}
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six".split())}


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return prepare_shapes(tmp_path_factory.mktemp("shapes") / "tiny", "tiny", seed=0)


def _load(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def _jsonl(root: Path, rel: str) -> list[dict]:
    return [json.loads(line) for line in (root / rel).read_text().splitlines()]


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


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = prepare_shapes(tmp_path / "again", "tiny", seed=0)
    other = prepare_shapes(tmp_path / "other", "tiny", seed=1)
    ref = _digest(world)
    assert _digest(again) == ref
    diff = _digest(other)
    assert diff.keys() == ref.keys()
    changed = [k for k in ref if ref[k] != diff[k]]
    assert "vqa/v2_mscoco_train2014_annotations.json" in changed
    assert len(changed) > 0.9 * len(ref)


def test_manifest_lists_every_file_and_count(world):
    manifest = _load(world, "manifest.json")
    assert (manifest["generator"], manifest["size"], manifest["seed"]) == (
        "cliptransfer.data.shapes",
        "tiny",
        0,
    )
    on_disk = {p.relative_to(world).as_posix() for p in world.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    counts = manifest["counts"]
    spec = SIZES["tiny"]
    assert counts["images/train2014"] == spec.coco_train == 48
    assert counts["images/val2014"] == spec.coco_val == 24
    assert counts["pairs/train.jsonl"] == 5 * spec.coco_train
    assert counts["snli_ve/snli_ve_train.jsonl"] == 9 * spec.flickr_train
    assert not list(world.parent.glob(".tiny.tmp-*")), "temporary folder left behind"


def test_coco_captions_format_and_ids(world):
    all_ids = set()
    for split, n in (("train", 48), ("val", 24)):
        data = _load(world, f"annotations/captions_{split}2014.json")
        assert set(data) == {"info", "licenses", "images", "annotations"}
        ids = [im["id"] for im in data["images"]]
        assert len(ids) == n == len(set(ids))
        assert not all_ids & set(ids), "image ids must be unique across splits"
        all_ids |= set(ids)
        for im in data["images"]:
            assert {"id", "file_name", "width", "height"} <= set(im)
            assert im["file_name"] == f"COCO_{split}2014_{im['id']:012d}.jpg"
            with Image.open(world / "images" / f"{split}2014" / im["file_name"]) as img:
                assert (img.size, img.mode, img.format) == (
                    (im["width"], im["height"]),
                    "RGB",
                    "JPEG",
                )
                assert img.size == (160, 120) and "exif" not in img.info
        anns = data["annotations"]
        assert [set(a) for a in anns[:1]] == [{"id", "image_id", "caption"}]
        assert len({a["id"] for a in anns}) == len(anns) == 5 * n
        per_image = Counter(a["image_id"] for a in anns)
        assert set(per_image) == set(ids) and set(per_image.values()) == {5}
        for image_id in ids:  # five different captions per image
            assert len({a["caption"] for a in anns if a["image_id"] == image_id}) == 5


def test_pairs_csv_and_webdataset_shards(world):
    caps = _load(world, "annotations/captions_train2014.json")
    by_key = {(a["image_id"], a["caption"]) for a in caps["annotations"]}
    pairs = _jsonl(world, "pairs/train.jsonl")
    assert {(p["image_id"], p["caption"]) for p in pairs} == by_key
    assert all(
        (world / p["image"]).is_file() and set(p) == {"image", "caption", "image_id"} for p in pairs
    )
    with open(world / "pairs/train.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["filepath", "title"]
    assert [(r["filepath"], r["title"]) for r in rows] == [
        (p["image"], p["caption"]) for p in pairs
    ]
    assert (world / "captions.txt").read_text().splitlines() == [p["caption"] for p in pairs]

    shards = sorted((world / "pairs/shards").glob("*.tar"))
    assert [s.name for s in shards] == ["train-000000.tar"]  # val lives in pairs/shards_val/
    assert [s.name for s in (world / "pairs/shards_val").glob("*.tar")] == ["val-000000.tar"]
    with tarfile.open(shards[0]) as tar:
        members = tar.getmembers()
        keys = []
        for i in range(0, len(members), 3):
            group = members[i : i + 3]
            key = group[0].name.rsplit(".", 1)[0]
            assert [m.name for m in group] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
            assert all(
                (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
                for m in group
            )
            meta = json.loads(tar.extractfile(group[2]).read())
            caption = tar.extractfile(group[1]).read().decode()
            assert (
                re.fullmatch(r"\d{12}_[0-4]", key)
                and key == f"{meta['image_id']:012d}_{meta['caption_index']}"
            )
            assert (meta["image_id"], caption) in by_key
            jpg = world / "images/train2014" / meta["file_name"]
            assert tar.extractfile(group[0]).read() == jpg.read_bytes()
            keys.append(key)
    assert len(keys) == len(set(keys)) == len(pairs)
    first = [k.split("_")[0] for k in keys[:48]]
    assert len(set(first)) == 48, "caption-major order: no image twice among the first N samples"


def test_shard_splitting_and_csv_guard(tmp_path):
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(b"\xff\xd8fake")
    samples = [(f"{i:012d}_0", jpg, f"caption {i}", {"i": i}) for i in range(10)]
    counts = write_shards(tmp_path / "shards", "train", samples, per_shard=4)
    assert counts == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2}
    with tarfile.open(tmp_path / "shards/train-000002.tar") as tar:
        assert tar.getnames() == [
            f"{i:012d}_0.{ext}" for i in (8, 9) for ext in ("jpg", "txt", "json")
        ]
    with pytest.raises(ValueError, match=r"bad\.csv.*tab"):
        write_openclip_csv(tmp_path / "bad.csv", [("a.jpg", "a\tcaption")])


def test_vqa_format_ids_and_types(world):
    assert len(QUESTION_TYPES) == 65 == len(set(QUESTION_TYPES))
    coco_ids = {im["id"] for im in _load(world, "annotations/captions_train2014.json")["images"]}
    qs = _load(world, "vqa/v2_OpenEnded_mscoco_train2014_questions.json")
    an = _load(world, "vqa/v2_mscoco_train2014_annotations.json")
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


def test_vqa_answers_are_true_for_the_scene(world):
    objects = _objects(world, "objects/train2014.json")
    qs = {
        q["question_id"]: q["question"]
        for q in _load(world, "vqa/v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    }
    checked = Counter()
    for a in _load(world, "vqa/v2_mscoco_train2014_annotations.json")["annotations"]:
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


def test_answer_balance_and_disagreement(world):
    anns = _load(world, "vqa/v2_mscoco_train2014_annotations.json")["annotations"]
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


def test_snli_ve_format_balance_and_truth(world):
    objects = _objects(world, "objects/flickr30k.json")
    pair_ids = set()
    checked = Counter()
    for split, n_images in (("train", 24), ("dev", 8), ("test", 8)):
        rows = _jsonl(world, f"snli_ve/snli_ve_{split}.jsonl")
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
                and (world / "flickr30k_images" / r["Flikr30kID"]).is_file()
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


def test_objects_files_and_boxes(world):
    for rel, n in (
        ("objects/train2014.json", 48),
        ("objects/val2014.json", 24),
        ("objects/flickr30k.json", 40),
    ):
        data = _load(world, rel)
        assert set(data["labels"]) == SHAPES and set(data["attributes"]) >= COLORS | {
            "small",
            "large",
        }
        assert len(data["images"]) == n
        for im in data["images"]:
            assert (
                set(im) == {"image_id", "file_name", "width", "height", "objects"}
                and 2 <= len(im["objects"]) <= 6
            )
            for o in im["objects"]:
                x1, y1, x2, y2 = o["bbox"]
                assert 0 <= x1 < x2 <= im["width"] and 0 <= y1 < y2 <= im["height"]
                assert o["label"] in data["labels"] and set(o["attributes"]) <= set(
                    data["attributes"]
                )


def test_boxes_enclose_the_drawn_pixels():
    bg = (20, 20, 20)
    for shape in sorted(SHAPES):
        obj = Obj(shape, "red", "large", "solid", 70.0, 50.0, 18.0, 10.0, (220, 30, 30))
        scene = Scene(160, 120, "black", bg, (obj,))
        img = render(scene)
        x1, y1, x2, y2 = obj.bbox
        px = img.load()
        drawn = [(x, y) for x in range(160) for y in range(120) if px[x, y] != bg]
        assert drawn and all(x1 - 1 <= x <= x2 + 1 and y1 - 1 <= y <= y2 + 1 for x, y in drawn), (
            shape
        )
        assert min(x for x, _ in drawn) <= x1 + 2 and max(x for x, _ in drawn) >= x2 - 2, shape
        full = render(scene, View(0, 0, 160, 120, 160, 120))
        assert full.tobytes() == img.tobytes()
        zoom = render(scene, View(40, 20, 100, 80, 64, 64))
        assert zoom.size == (64, 64) and zoom.getpixel((32, 32)) != bg


def test_classify_set(world):
    classes = _load(world, "classify/classes.json")
    assert (
        set(classes) == {"shape", "color"}
        and set(classes["shape"]) == SHAPES
        and set(classes["color"]) == COLORS
    )
    rows = _jsonl(world, "classify/val.jsonl")
    assert len(rows) == 48 and all(
        set(r) == {"image", "shape", "color"} and (world / r["image"]).is_file() for r in rows
    )
    assert set(Counter(r["shape"] for r in rows).values()) == {8}
    assert set(Counter(r["color"] for r in rows).values()) == {6}


def test_idempotent_and_guarded(world, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in world.rglob("*")}
    t0 = time.perf_counter()
    assert prepare_shapes(world, "tiny", seed=0) == world
    assert time.perf_counter() - t0 < 0.5
    assert {p: p.stat().st_mtime_ns for p in world.rglob("*")} == before
    with pytest.raises(FileExistsError, match="different Shapes world"):
        prepare_shapes(world, "tiny", seed=3)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        prepare_shapes(foreign, "tiny", overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_size_and_default_dir(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"huge.*\['medium', 'small', 'tiny'\]"):
        prepare_shapes(tmp_path / "w", "huge")
    assert not (tmp_path / "w").exists()
    monkeypatch.setenv("CLIPTRANSFER_CACHE", str(tmp_path))
    assert default_world_dir("small", 3) == tmp_path / "shapes-small-seed3-v1"
    monkeypatch.delenv("CLIPTRANSFER_CACHE")
    assert default_world_dir() == Path.home() / ".cache/cliptransfer/shapes-small-seed0-v1"
