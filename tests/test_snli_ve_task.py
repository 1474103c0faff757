"""SNLI-VE: the JSONL reader (both image-field spellings, errors naming lines), the label prior,
and tasks/snli_ve.py end to end on the tiny Shapes world (features, PEFT, 2 processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cliptransfer.engine import run_task
from cliptransfer.tasks.snli_ve.data import (
    SNLIVEDataError,
    VEExample,
    flickr_image_path,
    label_prior,
    load_snli_ve,
)
from cliptransfer.tasks.snli_ve.metric import evaluate_snli_ve_files
from cliptransfer.tasks.snli_ve.task import VETask, load_trained


class ve:  # noqa: N801 - the launcher's entry points, as tests call them
    main = staticmethod(lambda argv: run_task(VETask, argv))
    load_trained = staticmethod(load_trained)


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


REAL = {  # the first line of the official snli_ve_dev.jsonl, fields as released
    "Flikr30kID": "4564320256.jpg",
    "gold_label": "neutral",
    "sentence1": "Two young boys of opposing teams play football, while wearing full protection "
    "uniforms and helmets.",
    "sentence2": "boys play football",
    "pairID": "4564320256.jpg#0r1n",
    "captionID": "4564320256.jpg#0",
    "annotator_labels": ["neutral"],
}


def test_reads_both_image_field_spellings(tmp_path: Path):
    other = {"Flickr30K_ID": "1000092795", "gold_label": "contradiction",
             "sentence2": "a dog sleeps", "pairID": "1000092795.jpg#1r1c"}  # fmt: skip
    split = load_snli_ve(_write(tmp_path / "d.jsonl", [REAL, "", other]))
    assert split.examples == [
        VEExample("4564320256.jpg#0r1n", "4564320256", "boys play football", "neutral"),
        VEExample("1000092795.jpg#1r1c", "1000092795", "a dog sleeps", "contradiction"),
    ]
    assert split.image_ids() == ["1000092795", "4564320256"] and split.has_labels
    assert flickr_image_path("/data/f30k", "4564320256") == Path("/data/f30k/4564320256.jpg")
    dropped = split.without_images({"4564320256"}, "missing_image")
    assert len(dropped) == 1 and dropped.skipped == {"missing_image": 1}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"line 2: invalid JSON"),
        (dict(REAL, gold_label="-", pairID="x"), r"line 2 \(x\): gold_label '-' is not one of"),
        (
            {k: v for k, v in REAL.items() if k != "Flikr30kID"} | {"pairID": "x"},
            "line 2: no image",
        ),
        (dict(REAL, pairID="4564320256.jpg#0r1n"), "line 2: duplicate pairID"),
        (dict(REAL, sentence2=" ", pairID="x"), r"line 2 \(x\): empty 'sentence2'"),
        ({k: v for k, v in REAL.items() if k != "gold_label"} | {"pairID": "x"}, "no 'gold_label'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line, message):
    path = _write(tmp_path / "bad.jsonl", [REAL, line])
    with pytest.raises(SNLIVEDataError, match=message) as e:
        load_snli_ve(path)
    assert str(path) in str(e.value)


def test_label_prior_is_the_most_frequent_with_snli_order_ties():
    names = {"e": "entailment", "n": "neutral", "c": "contradiction"}

    def prior(labels: str) -> str:
        return label_prior([VEExample(str(i), "1", "h", names[x]) for i, x in enumerate(labels)])

    assert prior("ecc") == "contradiction"
    assert prior("nc") == "neutral"  # a tie goes to the earlier of (e, n, c)
    assert prior("nccen") == "neutral"  # n 2, c 2, e 1


def _args(world: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    sets = [
        f"world.dir={world}", "world.size=tiny", "backbone=RN-tiny", "features.size=64x96",
        f"features.cache_dir={cache}", f"train.out_dir={out}", "train.batch_size=16",
        "train.eval_batch_size=32", "model.topdown.hidden=32", "model.mcan.hidden=16",
        "model.mcan.heads=2", "model.mcan.ffn=32", "model.mcan.flat_mlp=16",
        "model.mcan.flat_out=32", "model.scan.hidden=16", "text.embed_dim=16",
        "text.hidden=32", "train.log_every=5", "train.num_threads=1", *extra,
    ]  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


def test_trains_scores_dev_and_test_and_reloads(tiny_world: Path, tmp_path: Path):
    out = tmp_path / "run"
    report = ve.main(_args(tiny_world, out, tmp_path / "cache", "train.epochs=2"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "snli-ve" and len(saved["history"]) == 2
    assert saved["val"]["accuracy"] == max(h["val_score"] for h in saved["history"])
    assert saved["val"]["count"] == 72 and saved["test"]["count"] == 72  # 8 images x 9 pairs
    assert saved["prior"]["accuracy"] == 33.33 and saved["prior_label"] == "entailment"
    # The written results files, scored by `cliptransfer evaluate snli-ve`, give the same numbers.
    for name, data in (("val", "snli_ve_dev.jsonl"), ("test", "snli_ve_test.jsonl")):
        got = evaluate_snli_ve_files(tiny_world / "snli_ve" / data, out / f"results_{name}.json")
        assert got == saved[name]
    model, cfg, tok = ve.load_trained(out / "best")
    assert cfg.model.arch == "scan" and report["best_epoch"] in (1, 2)
    ev = ve.main(["--eval-only", str(out / "best"), "--set", f"train.out_dir={tmp_path / 'e'}"])
    assert ev["val"] == saved["val"]


def test_ia3_adapters_on_the_fusion_head(tiny_world: Path, tmp_path: Path):
    out = tmp_path / "run"
    ve.main(_args(tiny_world, out, tmp_path / "cache", "peft.method=ia3", "train.max_steps=3"))
    adapter = out / "best" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "IA3"
    ev = ve.main(["--eval-only", str(out / "best"), "--set", f"train.out_dir={tmp_path / 'e'}"])
    assert ev["val"] == json.loads((out / "metrics.json").read_text())["val"]
    # Features of another backbone (ViT-tiny: 128 channels) do not fit the trained head.
    other = ["--set", "backbone=ViT-tiny", "--set", f"features.cache_dir={tmp_path / 'vit'}"]
    with pytest.raises(ValueError, match=r"gives 128-channel features but .* on 256-channel"):
        ve.main(["--eval-only", str(out / "best"), *other])


def _two_process_run(args: list[str]) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    ve.main(["--cpu", *args])


def test_two_processes_score_like_one(tiny_world: Path, tmp_path: Path):
    from accelerate import debug_launcher

    out = tmp_path / "two"
    # 72 dev pairs in eval batches of 32 per process: the last batch is uneven.
    args = _args(tiny_world, out, tmp_path / "cache", "train.max_steps=3")
    debug_launcher(_two_process_run, args=(args,), num_processes=2)
    two = json.loads((out / "metrics.json").read_text())
    results = json.loads((out / "results_val.json").read_text())
    assert len({r["pairID"] for r in results}) == len(results) == 72
    one = ve.main(["--eval-only", str(out / "best"), "--set", f"train.out_dir={tmp_path / 'one'}"])
    assert one["val"] == two["val"]


def test_end2end_frozen_backbone_and_missing_images(tiny_world: Path, tmp_path: Path):
    import shutil

    world = tmp_path / "world"  # a copy with one dev image removed
    shutil.copytree(tiny_world, world)
    dev = load_snli_ve(world / "snli_ve" / "snli_ve_dev.jsonl")
    gone = dev.image_ids()[0]
    (world / "flickr30k_images" / f"{gone}.jpg").unlink()
    extra = ["mode=end2end", "tuning.lock_image=true", "train.max_steps=2", "train.batch_size=8"]
    with pytest.raises(ValueError, match=rf"1 image\(s\) needed by .*snli_ve_dev.jsonl.*{gone}"):
        ve.main(_args(world, tmp_path / "a", tmp_path / "cache", *extra))
    report = ve.main(["--skip-missing", *_args(world, tmp_path / "b", tmp_path / "cache", *extra)])
    assert report["skipped"]["val"] == {"missing_image": 9} and report["val"]["count"] == 63
    assert report["features"]["kind"] == "end2end" and report["steps"] == 2
    assert not (tmp_path / "cache").exists()
