"""The `cliptransfer` console script, called in-process through `main(argv)`."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from cliptransfer.cli import main
from cliptransfer.clip import create_clip


def _snapshot(root: Path, names: list[str]) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)}: same bytes, and not rewritten with the same bytes."""
    return {
        n: (hashlib.sha256((root / n).read_bytes()).hexdigest(), (root / n).stat().st_mtime_ns)
        for n in names
    }


def _records(path: Path) -> int:
    """How many records a world file holds, counted from the file itself."""
    if path.is_dir():
        return sum(1 for _ in path.iterdir())
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            return len(tar.getnames()) // 3  # {key}.jpg, {key}.txt, {key}.json per sample
    if path.suffix == ".csv":
        return len(path.read_text().splitlines()) - 1  # the header
    if path.suffix in (".jsonl", ".txt"):
        return len(path.read_text().splitlines())
    obj = json.loads(path.read_text())
    key = next(k for k in ("annotations", "questions", "images") if k in obj)
    return len(obj[key])


def test_prepare_shapes_is_idempotent(tiny_world, tmp_path, capsys):
    manifest = json.loads((tiny_world / "manifest.json").read_text())
    files = manifest["files"] + ["manifest.json"]
    before = _snapshot(tiny_world, files)
    assert main(["prepare", "shapes", "--out", str(tiny_world), "--size", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert _snapshot(tiny_world, files) == before  # the second prepare wrote nothing
    assert out == {"out": str(tiny_world), "counts": manifest["counts"]}
    # The tiny preset: 48 train + 24 val COCO images with 5 captions each; 24 train + 8 dev +
    # 8 test Flickr images with 3 premises x 3 labels each; 48 zero-shot images.
    expected = {
        "images/train2014": 48,
        "images/val2014": 24,
        "objects/train2014.json": 48,
        "objects/val2014.json": 24,
        "annotations/captions_train2014.json": 5 * 48,
        "annotations/captions_val2014.json": 5 * 24,
        "captions.txt": 5 * 48,
        "pairs/train.jsonl": 5 * 48,
        "pairs/train.csv": 5 * 48,
        "pairs/shards/train-000000.tar": 5 * 48,
        "pairs/val.jsonl": 5 * 24,
        "pairs/val.csv": 5 * 24,
        "pairs/shards_val/val-000000.tar": 5 * 24,
        "flickr30k_images": 24 + 8 + 8,
        "objects/flickr30k.json": 24 + 8 + 8,
        "snli_ve/snli_ve_train.jsonl": 9 * 24,
        "snli_ve/snli_ve_dev.jsonl": 9 * 8,
        "snli_ve/snli_ve_test.jsonl": 9 * 8,
        "classify/val.jsonl": 48,
    }
    vqa = {k: v for k, v in out["counts"].items() if k.startswith("vqa/")}
    assert {k: v for k, v in out["counts"].items() if not k.startswith("vqa/")} == expected
    assert sorted(vqa) == [
        "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
        "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
        "vqa/v2_mscoco_train2014_annotations.json",
        "vqa/v2_mscoco_val2014_annotations.json",
    ]
    # Every count is what the file holds (VQA: a random number of questions per image).
    assert {k: _records(tiny_world / k) for k in out["counts"]} == out["counts"]
    # A fresh generation with the same size and seed is byte-identical, manifest included.
    again = tmp_path / "again"
    assert main(["prepare", "shapes", "--out", str(again), "--size", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(again), "counts": out["counts"]}
    fresh = {k: v[0] for k, v in _snapshot(again, files).items()}
    assert fresh == {k: v[0] for k, v in before.items()}


def test_tokenizer_train_and_info(tiny_world, tmp_path, capsys):
    out = tmp_path / "tok"
    args = ["--input", str(tiny_world / "captions.txt"), "--vocab-size", "60", "--out", str(out)]
    assert main(["tokenizer", "train", *args, "--context-length", "24"]) == 0
    assert "context_length=24" in capsys.readouterr().out
    assert (out / "tokenizer.model").is_file()

    create_clip("ViT-tiny").save_pretrained(tmp_path / "clip")
    assert main(["info", str(tmp_path / "clip")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["vision"]["kind"] == "vit" and info["params"] > 0


def test_evaluate_vqa_on_world_and_bad_results(tiny_world, tmp_path, capsys):
    q = tiny_world / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = tiny_world / "vqa" / "v2_mscoco_val2014_annotations.json"
    anns = json.loads(a.read_text())["annotations"]
    results = [{"question_id": x["question_id"], "answer": "yes"} for x in anns]
    r = tmp_path / "results.json"
    r.write_text(json.dumps(results))
    assert (
        main(
            ["evaluate", "vqa", "--questions", str(q), "--annotations", str(a), "--results", str(r)]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"overall", "perQuestionType", "perAnswerType"}
    assert scores["perAnswerType"]["number"] < 5  # "yes" answers a count only by annotator error
    assert scores["perAnswerType"]["yes/no"] > 30
    r.write_text(json.dumps(results[1:]))  # one question left out
    assert main(["evaluate", "vqa", "--annotations", str(a), "--results", str(r)]) == 2
    err = capsys.readouterr().err
    assert str(r) in err and str(anns[0]["question_id"]) in err


def test_unknown_size_is_a_clean_error(tmp_path, capsys):
    assert main(["prepare", "shapes", "--out", str(tmp_path / "w"), "--size", "huge"]) == 2
    assert "huge" in capsys.readouterr().err


def test_extract_grid_and_import_regions(tiny_world, tmp_path, capsys):
    import numpy as np

    from cliptransfer.visual.region_import import write_tsv
    from cliptransfer.visual.store import FeatureStore

    store = tmp_path / "grids"
    args = ["extract", "grid", "--backbone", "ViT-tiny", "--images"]
    args += [str(tiny_world / "images" / "val2014"), "--size", "64x96", "--out", str(store)]
    assert main([*args, "--cpu"]) == 0
    grids = FeatureStore.open(store)
    first = grids[grids.ids()[0]]
    assert first["features"].shape == (8 * 12, 128) and tuple(first["grid_hw"]) == (8, 12)
    assert len(grids) == 24
    assert main([*args, "--cpu"]) == 0  # resumable: a second run finds everything done

    rng = np.random.default_rng(0)
    records = [
        {
            "image_id": str(i),
            "image_w": 160,
            "image_h": 120,
            "boxes": rng.uniform(0, 100, (n, 4)).astype(np.float32),
            "features": rng.standard_normal((n, 16)).astype(np.float32),
        }
        for i, n in ((7, 10), (8, 36))
    ]
    write_tsv(tmp_path / "regions.tsv", records)
    assert (
        main(
            [
                "extract",
                "import-regions",
                str(tmp_path / "regions.tsv"),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    regions = FeatureStore.open(tmp_path / "r")
    np.testing.assert_array_equal(regions["8"]["features"].numpy(), records[1]["features"])
    assert regions["7"]["image_w"] == 160 and regions["7"]["boxes"].shape == (10, 4)
