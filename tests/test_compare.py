"""`cliptransfer compare`: settings expansion, table / plot / JSON from known metrics (VQA and
SNLI-VE, through a fake task script), failing and reused settings, and one real tasks/vqa.py run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import cliptransfer
from cliptransfer.cli import main
from cliptransfer.compare import CompareError, Setting, expand_settings, run_compare, task_script

# A stand-in task script: writes a metrics.json of the real shapes from canned numbers keyed by
# (features.kind, backbone); `--set fake.task=snli-ve` switches the shape, `--set fake.fail=KIND`
# makes that kind exit 3. Every call is appended to calls.txt beside the script.
FAKE = r"""
import json, sys
from pathlib import Path
sets = dict(a.split("=", 1) for a in sys.argv[2::2])
with open(Path(__file__).with_name("calls.txt"), "a") as f:
    f.write(sets["features.kind"] + "\n")
print("fake child", sets["features.kind"], flush=True)
if sets.get("fake.fail") == sets["features.kind"]:
    print("boom: out of memory", file=sys.stderr)
    sys.exit(3)
key = (sets["features.kind"], sets.get("backbone", "default"))
acc = {("clip-grid", "default"): [61.234, 80.5, 40.125, 55.0],
       ("clip-grid", "RN-tiny"): [33.3, 70.0, 10.0, 20.0],
       ("bottomup", "default"): [58.0, 79.0, 38.0, 51.996]}[key]
acc = [a + int(sets.get("train.seed", 0)) + 10 * ("model.init_from" in sets) for a in acc]
feats = ({"kind": "grid", "backbone": key[1], "input_size": [64, 96], "grid_size": [2, 3],
          "channels": 256} if key[0] == "clip-grid" else {"kind": "regions", "channels": 2048})
if sets.get("fake.task") == "snli-ve":
    val = {"accuracy": acc[0], "per_label": {"entailment": acc[1], "neutral": None,
           "contradiction": acc[3]}, "count": 300}
    prior = {"accuracy": 33.33, "per_label": {"entailment": 100.0, "neutral": 0.0,
             "contradiction": 0.0}, "count": 300}
else:
    val = {"overall": acc[0], "perQuestionType": {},
           "perAnswerType": {"yes/no": acc[1], "number": acc[2], "other": acc[3]}}
    prior = {"overall": 39.64, "perQuestionType": {},
             "perAnswerType": {"yes/no": 63.8, "number": 34.0, "other": 21.72}}
out = Path(sets["train.out_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({
    "mode": "features", "model": "topdown", "features": feats, "val": val, "prior": prior,
    "train_samples_per_s": 1000.0 / len(acc) + acc[0], "seconds": acc[2] / 4,
    "peak_memory": {"kind": "cpu_ru_maxrss", "mib": 800.4 + acc[1]}, "best_epoch": 1}))
"""

HEADER = "| setting | feature kind | backbone | input → grid | channels |"
TAIL = " train samples/s | peak memory MiB | seconds |"


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    path = tmp_path / "fake_task.py"
    path.write_text(FAKE)
    return path


def _calls(fake: Path) -> list[str]:
    calls = fake.with_name("calls.txt")
    return calls.read_text().split() if calls.exists() else []


def test_settings_are_features_times_backbones_with_bottomup_once(tmp_path: Path):
    ckpt = tmp_path / "pretrain" / "final"
    ckpt.mkdir(parents=True)
    got = expand_settings(["clip-grid", "bottomup"], ["default", "RN-tiny", str(ckpt), "x=RN50"])
    assert got == [
        Setting("clip-grid-default", "clip-grid", "default"),
        Setting("clip-grid-RN-tiny", "clip-grid", "RN-tiny"),
        Setting("clip-grid-pretrain_final", "clip-grid", str(ckpt)),
        Setting("clip-grid-x", "clip-grid", "RN50"),
        Setting("bottomup", "bottomup"),
    ]
    assert expand_settings(["bottomup"], ["RN50", "RN101"]) == [Setting("bottomup", "bottomup")]
    assert [s.name for s in expand_settings(["clip-grid"])] == ["clip-grid-default"]
    assert Setting("bottomup", "bottomup").overrides(Path("o/b")) == [
        "features.kind=bottomup",
        "train.out_dir=o/b",
    ]
    with pytest.raises(CompareError, match="unknown feature kind 'regions'"):
        expand_settings(["clip-grid", "regions"])
    with pytest.raises(CompareError, match="share the setting name 'clip-grid-a_final'"):
        expand_settings(["clip-grid"], ["a/final", "x/a/final"])


def test_vqa_table_plot_json_and_reuse(fake: Path, tmp_path: Path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "cmp"
    kw = dict(script=fake, log=print)
    res = run_compare("vqa", ["clip-grid", "bottomup"], ["default", "RN-tiny"], out, [], **kw)
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text().split("\n\n")[1]
    assert table.splitlines() == [
        HEADER + " overall | yes/no | number | other |" + TAIL,
        "|" + "|".join(["---"] * 12) + "|",
        "| clip-grid-default | grid | default | 64x96 → 2x3 | 256 | 61.23 | 80.50 | 40.12 | 55.00 "
        "| 311.2 | 881 (cpu_ru_maxrss) | 10.0 |",
        "| clip-grid-RN-tiny | grid | RN-tiny | 64x96 → 2x3 | 256 | 33.30 | 70.00 | 10.00 | 20.00 "
        "| 283.3 | 870 (cpu_ru_maxrss) | 2.5 |",
        "| bottomup | regions | - | regions | 2048 | 58.00 | 79.00 | 38.00 | 52.00 "
        "| 308.0 | 879 (cpu_ru_maxrss) | 9.5 |",
        "| answer prior (per question type) |  |  |  |  | 39.64 | 63.80 | 34.00 | 21.72 |  |  |  |",
    ]
    assert table in printed and "fake child bottomup" in printed  # child output is streamed
    assert "fake child bottomup" in (out / "bottomup" / "compare.log").read_text()
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out / "compare.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 200
    saved = json.loads((out / "compare.json").read_text())
    assert saved == json.loads(json.dumps(res)) and saved["columns"][0] == "overall"
    assert [r["setting"] for r in saved["rows"]] == [
        "clip-grid-default",
        "clip-grid-RN-tiny",
        "bottomup",
    ]
    first = saved["rows"][0]
    assert first["val"] == {"overall": 61.234, "yes/no": 80.5, "number": 40.125, "other": 55.0}
    assert first["peak_memory"] == {"kind": "cpu_ru_maxrss", "mib": 880.9}
    assert first["input_size"] == [64, 96] and not first["reused"]
    assert saved["prior"] == [{"source": "clip-grid-default", "setting": "answer prior (per question type)",
                               "val": {"overall": 39.64, "yes/no": 63.8, "number": 34.0,
                                       "other": 21.72}}]  # fmt: skip
    assert _calls(fake) == ["clip-grid", "clip-grid", "bottomup"]

    # A second run reuses every finished setting; other overrides are refused, --rerun reruns.
    again = run_compare("vqa", ["clip-grid", "bottomup"], ["default", "RN-tiny"], out, [], **kw)
    assert all(r["reused"] for r in again["rows"]) and len(_calls(fake)) == 3
    assert "clip-grid-default: reusing" in capsys.readouterr().out
    with pytest.raises(CompareError, match=r"'bottomup'.* exists but was not made .*--rerun"):
        run_compare("vqa", ["bottomup"], [], out, ["train.epochs=2"], **kw)
    run_compare("vqa", ["bottomup"], [], out, ["train.epochs=2"], rerun=True, **kw)
    assert _calls(fake)[-1] == "bottomup" and len(_calls(fake)) == 4


def test_inits_times_seeds_give_mean_and_std(fake: Path, tmp_path: Path, capsys):
    out = tmp_path / "cmp"
    pre = tmp_path / "vlp" / "final"
    assert [s.name for s in expand_settings(["clip-grid"], ["default"], "vqa", ["none", f"pre={pre}"],
                                            [0, 1])] == [
        "clip-grid-default-init-none-seed0", "clip-grid-default-init-none-seed1",
        "clip-grid-default-init-pre-seed0", "clip-grid-default-init-pre-seed1"]  # fmt: skip
    s = expand_settings(["clip-grid"], [], "vqa", [f"pre={pre}"], [2])[0]
    assert s.group == "clip-grid-default-init-pre" and s.overrides(Path("o")) == [
        "features.kind=clip-grid", "backbone=default", f"model.init_from={pre}", "train.seed=2",
        "train.out_dir=o"]  # fmt: skip
    res = run_compare("vqa", ["clip-grid"], ["default"], out, [], script=fake,
                      inits=["none", f"pre={pre}"], seeds=[0, 1, 2], log=print)  # fmt: skip
    assert len(res["rows"]) == 6 and [g["n"] for g in res["settings"]] == [3, 3]
    # Seeds 0, 1, 2 add 0, 1, 2 points: mean +1, sample std 1; the pretrained start adds 10.
    none, pretrained = res["settings"]
    assert none["val"]["overall"] == pytest.approx(62.234) and none["std"]["overall"] == 1.0
    assert pretrained["val"]["overall"] == pytest.approx(72.234) and pretrained["seeds"] == [
        0,
        1,
        2,
    ]
    table = (out / "compare.md").read_text().split("\n\n")[1].splitlines()
    assert table[0] == HEADER + " runs | overall | yes/no | number | other |" + TAIL
    assert table[2].startswith("| clip-grid-default-init-none | grid | default | 64x96 → 2x3 | 256 | 3 "
                               "| 62.23 ± 1.00 | 81.50 ± 1.00 |")  # fmt: skip
    assert table[3].startswith("| clip-grid-default-init-pre | grid | default | 64x96 → 2x3 | 256 | 3 "
                               "| 72.23 ± 1.00 |")  # fmt: skip
    with pytest.raises(CompareError, match="compare sets train.seed itself; use --seeds"):
        run_compare("vqa", ["clip-grid"], [], out, ["train.seed=3"], script=fake, log=print)


def test_snli_ve_table_through_the_cli(fake: Path, tmp_path: Path, capsys):
    out = tmp_path / "ve"
    args = ["compare", "--task", "snli-ve", "--features", "bottomup,clip-grid", "--out", str(out)]
    assert main([*args, "--script", str(fake), "--set", "fake.task=snli-ve"]) == 0
    lines = (out / "compare.md").read_text().split("\n\n")[1].splitlines()
    assert lines[0] == HEADER + " accuracy | entailment | neutral | contradiction |" + TAIL
    assert lines[2:] == [
        "| bottomup | regions | - | regions | 2048 | 58.00 | 79.00 | - | 52.00 "
        "| 308.0 | 879 (cpu_ru_maxrss) | 9.5 |",
        "| clip-grid-default | grid | default | 64x96 → 2x3 | 256 | 61.23 | 80.50 | - | 55.00 "
        "| 311.2 | 881 (cpu_ru_maxrss) | 10.0 |",
        "| majority-label prior |  |  |  |  | 33.33 | 100.00 | 0.00 | 0.00 |  |  |  |",
    ]
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows[0]["val"] == {"accuracy": 58.0, "entailment": 79.0, "neutral": None,
                              "contradiction": 51.996}  # fmt: skip
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "`--set fake.task=snli-ve`" in (out / "compare.md").read_text()


def test_failing_setting_and_bad_arguments_are_clean_cli_errors(
    fake, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "cmp"
    base = ["compare", "--task", "vqa", "--out", str(out), "--script", str(fake)]
    assert main([*base, "--set", "fake.fail=bottomup"]) == 2
    err = capsys.readouterr().err
    log = out / "bottomup" / "compare.log"
    assert "setting 'bottomup' failed with exit code 3" in err and str(log) in err
    assert "Traceback" not in err and "boom: out of memory" in log.read_text()
    assert not (out / "compare.md").exists()

    assert main([*base, "--set", "backbone=RN50"]) == 2
    assert "compare sets backbone itself; use --backbones" in capsys.readouterr().err
    assert main([*base, "--features", "clip-grid,grid"]) == 2
    assert "unknown feature kind 'grid'" in capsys.readouterr().err
    assert main([*base[:-1], str(tmp_path / "nope.py")]) == 2
    assert f"task script {tmp_path / 'nope.py'} not found" in capsys.readouterr().err
    # No tasks/ beside the package (a non-editable install): the error names the path looked at.
    monkeypatch.setattr(cliptransfer, "__file__", str(tmp_path / "site" / "cliptransfer" / "x.py"))
    expected = re.escape(str(tmp_path / "site" / "tasks" / "snli_ve.py"))
    with pytest.raises(FileNotFoundError, match=expected):
        task_script("snli-ve")


def _region_store(world: Path, path: Path) -> None:
    """Random BUTD-like regions for every world image, where tasks_common caches the Shapes
    bottomup store: the run opens it instead of training the detector analogue (~90 s)."""
    import torch

    from cliptransfer.visual.store import FeatureStore

    gen = torch.Generator().manual_seed(0)
    ids = [int(p.stem.rsplit("_", 1)[1]) for p in (world / "images").glob("*2014/*.jpg")]
    with FeatureStore.create(path, {"kind": "regions", "channels": 8}) as w:
        for image_id in sorted(ids):
            xy = torch.rand(5, 2, generator=gen) * torch.tensor([120.0, 90.0])
            boxes = torch.cat([xy, xy + 20], dim=1)
            w.add(image_id, torch.randn(5, 8, generator=gen), boxes=boxes, image_w=160, image_h=120)


def test_real_vqa_runs_through_compare(tiny_world: Path, tmp_path: Path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "cmp"
    _region_store(tiny_world, cache / "bottomup-shapes-adaptive" / "store")
    sets = [f"world.dir={tiny_world}", "world.size=tiny", "features.size=64x96",
            f"features.cache_dir={cache}", "train.batch_size=16", "train.eval_batch_size=32",
            "model.topdown.hidden=32", "text.embed_dim=16", "text.hidden=32",
            "train.log_every=5", "train.epochs=1", "train.num_threads=1"]  # fmt: skip
    args = ["compare", "--task", "vqa", "--features", "clip-grid,bottomup", "--out", str(out)]
    assert main([*args, "--backbones", "RN-tiny", *(a for s in sets for a in ("--set", s))]) == 0
    assert "epoch 1:" in capsys.readouterr().out
    rows = {r["setting"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert list(rows) == ["clip-grid-RN-tiny", "bottomup"]
    for name, kind in (("clip-grid-RN-tiny", "grid"), ("bottomup", "regions")):
        child = json.loads((out / name / "metrics.json").read_text())
        assert rows[name]["feature_kind"] == child["features"]["kind"] == kind
        assert rows[name]["val"] == {
            "overall": child["val"]["overall"],
            **child["val"]["perAnswerType"],
        }
        assert rows[name]["train_samples_per_s"] == child["train_samples_per_s"] > 0
    assert rows["clip-grid-RN-tiny"]["grid_size"] == [2, 3] and rows["bottomup"]["channels"] == 8
    assert "RN-tiny (random init, seed 0)" in (out / "compare.md").read_text()
    # The prepared store was used: no detector analogue trained (if tasks_common's cache layout
    # changes, update _region_store's path rather than let this test take ~90 s).
    assert "region model" not in (out / "bottomup" / "compare.log").read_text()


# A stand-in tasks/vln.py: VLN's metrics.json shape (rates as fractions, baselines per split).
FAKE_VLN = r"""
import json, sys
from pathlib import Path
sets = dict(a.split("=", 1) for a in sys.argv[2::2])
assert sets["stage"] == "follower"  # compare's VLN default: bt would need a speaker per kind
enc = sets["encoder"]
sr = {"clip": 0.40, "supervised": 0.25}[enc]
def m(sr, ne):
    return {"nav_error": ne, "success_rate": sr, "spl": sr - 0.05, "ndtw": 0.5, "sdtw": sr / 2}
blind = m(0.30, 5.0) if enc == "clip" else m(0.31, 5.0)
out = Path(sets["train.out_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({
    "val_seen": m(sr + 0.1, 3.0), "val_unseen": m(sr, 4.0),
    "baselines": {"random": {"val_seen": m(0.1, 8.0), "val_unseen": m(0.12, 8.0)},
                  "no_vision": {"val_seen": blind, "val_unseen": blind}},
    "features": {"kind": "views", "backbone": sets.get("backbone", "region"),
                 "input_size": [96, 128], "channels": 256},
    "train_samples_per_s": 50.0, "seconds": 10.0,
    "peak_memory": {"kind": "cpu_ru_maxrss", "mib": 900.0}, "best_epoch": 3}))
"""


def test_vln_compare_sets_the_encoder_and_reads_val_unseen_with_baselines(tmp_path: Path):
    script = tmp_path / "fake_vln.py"
    script.write_text(FAKE_VLN)
    assert expand_settings(["clip", "supervised", "symbolic"], ["default"], "vln") == [
        Setting("clip-default", "clip", "default", "encoder"),
        Setting("supervised", "supervised", None, "encoder"),
        Setting("symbolic", "symbolic", None, "encoder"),
    ]
    with pytest.raises(CompareError, match="unknown feature kind 'clip-grid': choose from clip"):
        expand_settings(["clip-grid"], [], "vln")
    with pytest.raises(CompareError, match="compare sets encoder itself; use --features"):
        run_compare("vln", ["clip"], ["default"], tmp_path / "x", ["encoder=clip"], script=script)
    out = tmp_path / "cmp"
    res = run_compare("vln", ["clip", "supervised"], ["default"], out, [], script=script,
                      log=lambda m: None)  # fmt: skip
    assert res["columns"] == ["success_rate", "spl", "ndtw", "sdtw", "nav_error"]
    rows = {r["setting"]: r for r in res["rows"]}
    # Rates shown in percent, NE in metres, from val_unseen.
    assert rows["clip-default"]["val"] == pytest.approx(
        {"success_rate": 40.0, "spl": 35.0, "ndtw": 50.0, "sdtw": 20.0, "nav_error": 4.0}
    )
    assert rows["supervised"]["val"]["success_rate"] == pytest.approx(25.0)
    # random is the same for both runs (one row); each run's no-vision twin differs (two rows).
    assert [p["setting"] for p in res["prior"]] == [
        "random",
        "no_vision (clip-default)",
        "no_vision (supervised)",
    ]
    table = (out / "compare.md").read_text()
    assert "| clip-default | views | default | 36 views 96x128 | 256 | 40.00 | 35.00 |" in table
    assert "`--set stage=follower --set train.epochs=5`" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
