"""`cliptransfer benchmark`: axes and their errors, cell names, reuse only for the identical command,
the aggregation (mean ± sample std, gain over CLIP) on canned metrics through a fake trainer, the
caption-noise knob, the linear probe, and one real tiny cell through pretrain/contrastive.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cliptransfer.benchmark import (
    METHODS,
    BenchmarkError,
    Cell,
    expand_cells,
    parse_axes,
    run_benchmark,
)
from cliptransfer.cli import main
from cliptransfer.clip.probe import probe_accuracy, stratified_folds
from cliptransfer.compare import CompareError
from cliptransfer.contrastive.data import PairDataConfig
from cliptransfer.contrastive.pairs import PairRecord, add_caption_noise

# A stand-in trainer: a metrics.json of the real shape from canned numbers keyed by
# (loss.method, model.arch, train.seed); a config.yaml naming user pairs, so no probe runs.
# Every call is appended to calls.txt beside the script.
FAKE = r"""
import json, sys
from pathlib import Path
sets = dict(a.split("=", 1) for a in sys.argv[2::2])
with open(Path(__file__).with_name("calls.txt"), "a") as f:
    f.write(sets["loss.method"] + "-" + sets["train.seed"] + "\n")
if sets.get("fake.fail") == sets["loss.method"]:
    sys.exit(3)
base = {"clip": 10.0, "slip": 13.0}[sets["loss.method"]] + (5 if sets["model.arch"] == "ViT-tiny" else 0)
seed = int(sets["train.seed"])
# clip: 10, 12, 14 over seeds 0, 1, 2; slip: 13, 13, 16 (paired gains 3, 1, 2)
acc = base + {"clip": [0, 2, 4], "slip": [0, 0, 3]}[sets["loss.method"]][seed]
out = Path(sets["train.out_dir"])
(out / "final").mkdir(parents=True, exist_ok=True)
(out / "final" / "config.json").write_text(json.dumps({"config": {"text": {"layers": 2}}}))
(out / "config.yaml").write_text("data: {train: x.jsonl, val: y.jsonl}\n")
ev = {"retrieval": {"mean_recall": acc, "image_to_text_R@1": acc / 2, "text_to_image_R@1": 1.0},
      "zeroshot": {"shape": {"top1": acc + 1}}}
(out / "metrics.json").write_text(json.dumps({
    "steps": 4, "samples_seen": 64, "random_init": ev, "trained": ev,
    "train_samples_per_s": 100.0 + seed, "seconds": 2.0 * (seed + 1),
    "peak_memory": {"kind": "cpu_ru_maxrss", "mib": 500.0 + seed},
    "caption_noise": {"pairs": 100, "noisy": 0, "mismatched": 0, "corrupted": 0}}))
"""


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE)
    return path


def _calls(fake: Path) -> list[str]:
    calls = fake.with_name("calls.txt")
    return calls.read_text().split() if calls.exists() else []


def test_methods_are_the_trainers():
    from cliptransfer.contrastive.objectives import METHODS as TRAINER

    assert set(METHODS) == set(TRAINER)


def test_axes_defaults_and_errors():
    assert parse_axes() == (list(METHODS), ["RN-tiny", "ViT-tiny"], [], [], [0, 1, 2])
    assert parse_axes(quick=True)[4] == [0]
    got = parse_axes("clip, slip,clip", "ViT-tiny", "2,1", "0,0.3", "2,0")
    assert got == (["clip", "slip"], ["ViT-tiny"], [2, 1], [0.0, 0.3], [2, 0])
    bad = [
        (dict(methods="clip,moco"), "--methods: unknown method 'moco': choose from clip, slip"),
        (dict(archs="RN-huge"), "--archs: unknown architecture 'RN-huge': choose from"),
        (dict(text_layers="2,0"), "--text-layers: '0' is not a depth >= 1, e.g. --text-layers 2,1"),
        (dict(text_layers="two"), "--text-layers: 'two' is not a depth >= 1"),
        (dict(noise="0.3,1.5"), "--data-noise: '1.5' is not a fraction in [0, 1]"),
        (dict(seeds="0,x"), "--seeds: 'x' is not a seed >= 0"),
        (dict(methods=","), "--methods ',': expected a comma list"),
    ]
    for kwargs, message in bad:
        with pytest.raises(BenchmarkError) as e:
            parse_axes(**kwargs)
        assert message in str(e.value), (kwargs, str(e.value))


def test_cli_errors_exit_2_with_the_message(capsys, tmp_path: Path):
    out = ["--out", str(tmp_path / "b")]
    assert main(["benchmark", "--methods", "clip,nope", *out]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["benchmark", "--set", "loss.method=slip", *out]) == 2
    assert "benchmark sets loss.method itself; use --methods" in capsys.readouterr().err
    assert main(["benchmark", "--set", "train.epochs", *out]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cell_names_and_overrides():
    cells = expand_cells(["clip", "slip"], ["RN-tiny", "ViT-tiny"], [2, 1], [0.0, 0.3], [0, 1])
    assert len(cells) == 2 * 2 * 2 * 2 * 2
    assert [c.name for c in cells[:5]] == [
        "clip-RN-tiny-text2-noise0-seed0", "clip-RN-tiny-text2-noise0-seed1",
        "slip-RN-tiny-text2-noise0-seed0", "slip-RN-tiny-text2-noise0-seed1",
        "clip-RN-tiny-text2-noise0.3-seed0",
    ]  # fmt: skip
    cell = Cell("defilip", "ViT-tiny", 1, 0.3, 2)
    assert (cell.name, cell.group) == ("defilip-ViT-tiny-text1-noise0.3-seed2",
                                       "defilip-ViT-tiny-text1-noise0.3")  # fmt: skip
    assert cell.overrides(Path("o/x")) == [
        "loss.method=defilip", "model.arch=ViT-tiny", "model.text.layers=1",
        "data.caption_noise=0.3", "train.seed=2", "train.out_dir=o/x",
    ]  # fmt: skip
    assert Cell("clip", "RN-tiny").name == "clip-RN-tiny"


def test_aggregation_gain_and_reuse_only_for_the_same_command(fake: Path, tmp_path: Path):
    out = tmp_path / "bench"
    kw = dict(out=out, script=fake, log=lambda _: None)
    result = run_benchmark("clip,slip", "RN-tiny,ViT-tiny", seeds="0,1,2", **kw)
    assert len(_calls(fake)) == 12
    clip, slip = result["groups"][:2]
    assert clip["group"] == "clip-RN-tiny" and clip["seeds"] == [0, 1, 2]
    assert clip["mean"]["retrieval_mean_R"] == 12.0 and clip["std"]["retrieval_mean_R"] == 2.0
    assert slip["mean"]["retrieval_mean_R"] == 14.0
    assert slip["std"]["retrieval_mean_R"] == pytest.approx(3**0.5)
    assert clip["train_samples_per_s"] == 101.0 and clip["peak_memory"]["mib"] == 502.0
    assert clip["seconds"] == 4.0 and clip["text_layers"] == 2
    assert [(g["group"], g["vs"]) for g in result["gains"]] == [
        ("slip-RN-tiny", "clip-RN-tiny"), ("slip-ViT-tiny", "clip-ViT-tiny")]  # fmt: skip
    gain = result["gains"][0]
    assert gain["gain"]["retrieval_mean_R"] == 2.0 and gain["std"]["retrieval_mean_R"] == 1.0
    assert gain["gain"]["t2i_R@1"] == 0.0 and gain["std"]["t2i_R@1"] == 0.0
    md = (out / "benchmark.md").read_text()
    assert (
        "| clip | RN-tiny | 2 | 0 | 3 | 12.00 ± 2.00 | 6.00 ± 1.00 | 1.00 ± 0.00 | 13.00 ± 2.00 |"
        in md
    )
    assert (
        "| slip | ViT-tiny | 2 | 0 | 3 | +2.00 ± 1.00 | +1.00 ± 0.50 | +0.00 ± 0.00 | +2.00 ± 1.00 |"
        in md
    )
    for name in ("benchmark_bars.png", "benchmark_cost.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["columns"] == ["retrieval_mean_R", "i2t_R@1", "t2i_R@1", "zeroshot_shape"]
    assert saved["setup"]["seeds"] == [0, 1, 2] and not saved["setup"]["quick"]

    # The identical command reuses every cell; another command refuses them; --rerun reruns.
    again = run_benchmark("clip,slip", "RN-tiny,ViT-tiny", seeds="0,1,2", **kw)
    assert len(_calls(fake)) == 12 and all(r["reused"] for r in again["rows"])
    assert again["groups"] == result["groups"]
    with pytest.raises(
        CompareError, match="cell 'clip-RN-tiny-seed0': .* not made by this command"
    ):
        run_benchmark("clip", "RN-tiny", seeds="0", overrides=["optim.lr=0.1"], **kw)
    run_benchmark("clip", "RN-tiny", seeds="0", overrides=["optim.lr=0.1"], rerun=True, **kw)
    assert len(_calls(fake)) == 13


def test_an_interrupted_cell_resumes_only_under_the_same_command(tmp_path: Path):
    from cliptransfer.benchmark import RECORD, _resume_or_restart
    from cliptransfer.fileio import write_json

    run, record = tmp_path / "cell", {"args": ["--set", "a=1"]}
    (run / "checkpoints").mkdir(parents=True)
    write_json(run / RECORD, record)
    _resume_or_restart(run, record, rerun=False)  # killed mid-cell, same command: resume
    assert (run / "checkpoints").is_dir()
    _resume_or_restart(run, {"args": ["--set", "a=2"]}, rerun=False)  # another command
    assert not (run / "checkpoints").exists()
    (run / "checkpoints").mkdir()
    (run / "metrics.json").write_text("{}")
    _resume_or_restart(run, record, rerun=False)  # finished: reused, nothing touched
    assert (run / "checkpoints").is_dir()
    _resume_or_restart(run, record, rerun=True)  # a rerun trains from scratch
    assert not (run / "checkpoints").exists()


def test_a_failing_cell_names_itself_and_its_log(fake: Path, tmp_path: Path):
    with pytest.raises(CompareError) as e:
        run_benchmark("clip,slip", "RN-tiny", seeds="0", out=tmp_path / "b", script=fake,
                      overrides=["fake.fail=slip"], log=lambda _: None)  # fmt: skip
    assert "cell 'slip-RN-tiny-seed0' failed with exit code 3" in str(e.value)
    assert str(tmp_path / "b" / "slip-RN-tiny-seed0" / "benchmark.log") in str(e.value)


def _records(n: int = 10) -> list[PairRecord]:
    return [PairRecord(f"img{i // 2}.png", f"a red circle number {i}", f"f:{i}") for i in range(n)]


def test_caption_noise_is_exact_and_deterministic_per_seed():
    records = _records()
    noisy, counts = add_caption_noise(records, 0.3, seed=0)
    assert counts == {"pairs": 10, "noisy": 3, "mismatched": 2, "corrupted": 1}
    changed = [(a, b) for a, b in zip(records, noisy) if a != b]
    assert len(changed) == 3 and all(a.image == b.image for a, b in changed)
    mismatched = [(a, b) for a, b in changed if "mismatched" in b.source]
    corrupted = [(a, b) for a, b in changed if "corrupted" in b.source]
    assert len(mismatched) == 2 and len(corrupted) == 1
    by_caption = {r.caption: r.image for r in records}
    for a, b in mismatched:  # another record's caption, of another image
        assert by_caption[b.caption] != a.image
    a, b = corrupted[0]
    assert len(b.caption.split()) == len(a.caption.split()) and b.caption != a.caption
    assert add_caption_noise(records, 0.3, seed=0) == (noisy, counts)
    assert add_caption_noise(records, 0.3, seed=1)[0] != noisy
    assert add_caption_noise(records, 0.0, seed=0) == (records, {**counts, "noisy": 0,
                                                                 "mismatched": 0, "corrupted": 0})  # fmt: skip
    assert add_caption_noise(records, 1.0, seed=0)[1]["noisy"] == 10
    with pytest.raises(ValueError, match="caption_noise"):
        PairDataConfig(caption_noise=1.5)


def test_linear_probe_on_separable_data():
    assert stratified_folds([0, 0, 1, 0, 1, 1, 0], 3) == [0, 1, 0, 2, 1, 2, 0]
    g = torch.Generator().manual_seed(0)
    labels = [i % 3 for i in range(90)]
    centers = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    x = centers[labels] + 0.3 * torch.randn(90, 3, generator=g)
    assert probe_accuracy(x, labels) == 100.0
    noise = torch.randn(90, 3, generator=g)  # no signal: near chance (1/3), far from 100
    assert probe_accuracy(noise, labels) < 60.0


@pytest.mark.slow
def test_one_real_tiny_cell(tiny_world: Path, tmp_path: Path):
    import cliptransfer

    script = Path(cliptransfer.__file__).resolve().parents[1] / "pretrain" / "contrastive.py"
    result = run_benchmark(
        "clip", "RN-tiny", noise="0.5", quick=True, out=tmp_path / "b", script=script,
        overrides=[f"world.dir={tiny_world}", "train.max_steps=2", "train.eval_max_images=8"],
        log=lambda _: None,
    )  # fmt: skip
    (row,) = result["rows"]
    assert row["cell"] == "clip-RN-tiny-noise0.5-seed0" and row["steps"] == 2
    assert row["caption_noise"] == {"pairs": 240, "noisy": 120, "mismatched": 60, "corrupted": 60}
    assert row["train_samples_per_s"] > 0 and row["peak_memory"]["kind"] == "cpu_ru_maxrss"
    assert row["peak_memory"]["mib"] > 100 and row["seconds"] > 0
    assert set(row["scores"]) == {"retrieval_mean_R", "i2t_R@1", "t2i_R@1", "zeroshot_shape",
                                  "zeroshot_color", "probe_shape", "probe_color"}  # fmt: skip
    assert all(0 <= v <= 100 for v in row["scores"].values())
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert "Caption noise 0.5: 120 of 240 training pairs per run" in md


def test_report_only_tables_the_finished_cells_of_this_command(fake: Path, tmp_path: Path):
    out = tmp_path / "bench"
    kw = dict(out=out, script=fake, log=lambda _: None)
    with pytest.raises(BenchmarkError, match="no cell of this command has finished"):
        run_benchmark("clip,slip", "RN-tiny", seeds="0,1", report_only=True, **kw)
    run_benchmark("clip", "RN-tiny", seeds="0,1", **kw)  # 2 of the 4 cells
    assert len(_calls(fake)) == 2
    part = run_benchmark("clip,slip", "RN-tiny", seeds="0,1", report_only=True, **kw)
    assert len(_calls(fake)) == 2  # nothing ran
    assert [r["cell"] for r in part["rows"]] == ["clip-RN-tiny-seed0", "clip-RN-tiny-seed1"]
    assert part["setup"]["missing"] == ["slip-RN-tiny-seed0", "slip-RN-tiny-seed1"]
    assert part["groups"][0]["mean"]["retrieval_mean_R"] == 11.0 and not part["gains"]
    md = (out / "benchmark.md").read_text()
    assert "2 cells not finished yet: slip-RN-tiny-seed0, slip-RN-tiny-seed1" in md
    # A cell finished by another command is missing for this one, not borrowed.
    with pytest.raises(BenchmarkError, match="no cell of this command has finished"):
        run_benchmark("clip", "RN-tiny", seeds="0,1", overrides=["optim.lr=0.1"],
                      report_only=True, **kw)  # fmt: skip
