"""tasks/vqa.py end to end on the tiny Shapes world: features, end2end + LoRA, regions, 2 processes.

Runs use a random-init RN-tiny backbone (`backbone=RN-tiny`), 64x96 inputs and tiny heads, so
they check the plumbing and the numbers' consistency, not the accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.engine import run_task
from cliptransfer.tasks.vqa.answers import make_ans2label
from cliptransfer.tasks.vqa.data import VQADataError, VQADataset, collate_vqa, load_vqa
from cliptransfer.tasks.vqa.metric import evaluate_vqa_files
from cliptransfer.tasks.vqa.task import VQATask, load_trained
from cliptransfer.visual.backbone import GridBackbone
from cliptransfer.visual.extract import load_backbone
from cliptransfer.visual.inputs import StoreInputs
from cliptransfer.visual.store import FeatureStore


class vqa:  # noqa: N801 - the launcher's entry points, as tests call them
    main = staticmethod(lambda argv: run_task(VQATask, argv))
    load_trained = staticmethod(load_trained)


VAL_Q = "vqa/v2_OpenEnded_mscoco_val2014_questions.json"
VAL_A = "vqa/v2_mscoco_val2014_annotations.json"


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(world: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    sets = [
        f"world.dir={world}", "world.size=tiny", "backbone=RN-tiny", "features.size=64x96",
        f"features.cache_dir={cache}", f"train.out_dir={out}", "train.batch_size=16",
        "train.eval_batch_size=32", "model.topdown.hidden=32", "model.mcan.hidden=16",
        "model.mcan.heads=2", "model.mcan.ffn=32", "model.mcan.flat_mlp=16",
        "model.mcan.flat_out=32", "text.embed_dim=16", "text.hidden=32", "train.log_every=5", "train.num_threads=1",
        *extra,
    ]  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


def test_features_mode_trains_scores_and_reloads(tiny_world: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = _args(tiny_world, out, tmp_path / "cache", "train.epochs=2", "model.arch=topdown")
    report = vqa.main(args)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_epoch"] == report["best_epoch"] and len(saved["history"]) == 2
    best = max(h["val_score"] for h in saved["history"])
    assert saved["val"]["overall"] == best
    assert set(saved["val"]["perAnswerType"]) == {"yes/no", "number", "other"}
    assert set(saved["prior"]) == {"overall", "perQuestionType", "perAnswerType"}
    assert saved["skipped"] == {"train": {}, "val": {}} and saved["train_samples_per_s"] > 0
    assert saved["peak_memory"]["kind"] == "cpu_ru_maxrss" and saved["peak_memory"]["mib"] > 0
    assert saved["features"]["kind"] == "grid" and saved["features"]["grid_size"] == [2, 3]
    assert saved["vocab_coverage"]["val"]["questions"] > 0
    # The written EvalAI file, scored by the official scorer, gives the reported numbers.
    results = json.loads((out / "results_val.json").read_text())
    assert (
        evaluate_vqa_files(tiny_world / VAL_Q, tiny_world / VAL_A, out / "results_val.json")
        == (saved["val"])
    )
    assert (out / "config.yaml").is_file() and any((out / "vqa").rglob("events.out.tfevents*"))

    # best/ reloads into a model that predicts the same answers.
    model, cfg, answers, q_tok = vqa.load_trained(out / "best")
    assert cfg.model.arch == "topdown" and len(answers) == report["answers"]
    store = FeatureStore.open(saved["features"]["path"])
    split = load_vqa(tiny_world / VAL_Q, tiny_world / VAL_A)
    ds = VQADataset(split, q_tok, make_ans2label(answers), StoreInputs(store))
    batch = collate_vqa([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred = model(batch).argmax(-1)
    by_qid = {r["question_id"]: r["answer"] for r in results}
    assert [answers[k] for k in pred] == [by_qid[q] for q in batch["question_id"].tolist()]


def test_vlbert_head_trains_and_reloads(tiny_world: Path, tmp_path: Path):
    out = tmp_path / "run"
    extra = ["train.epochs=1", "model.arch=vlbert", "model.vlbert.hidden=16",
             "model.vlbert.heads=2", "model.vlbert.intermediate=32", "model.vlbert.layers=1"]  # fmt: skip
    vqa.main(_args(tiny_world, out, tmp_path / "cache", *extra))
    saved = json.loads((out / "metrics.json").read_text())
    model, cfg, answers, q_tok = vqa.load_trained(out / "best")
    assert cfg.model.arch == "vlbert" and type(model.head).__name__ == "VLBert"
    split = load_vqa(tiny_world / VAL_Q, tiny_world / VAL_A)
    ds = VQADataset(split, q_tok, make_ans2label(answers),
                    StoreInputs(FeatureStore.open(saved["features"]["path"])))  # fmt: skip
    batch = collate_vqa([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred = model(batch).argmax(-1)
    results = {
        r["question_id"]: r["answer"] for r in json.loads((out / "results_val.json").read_text())
    }
    assert [answers[k] for k in pred] == [results[q] for q in batch["question_id"].tolist()]


def test_end2end_lora_mcan_saves_reloads_and_merges(tiny_world: Path, tmp_path: Path):
    from cliptransfer.adapters import AdapterConfig, load_adapter
    from cliptransfer.heads.model import VLModel, build_head
    from cliptransfer.visual.backbone import GridBackbone

    out = tmp_path / "run"
    extra = ["mode=end2end", "peft.method=lora", "peft.r=2", "model.arch=mcan",
             "text.encoder=lstm", "train.max_steps=3", "train.batch_size=8"]  # fmt: skip
    report = vqa.main(_args(tiny_world, out, tmp_path / "cache", *extra))
    assert report["mode"] == "end2end" and report["steps"] == 3
    assert report["features"]["kind"] == "end2end"
    # The reported numbers are the official scorer's on the written results file.
    scored = evaluate_vqa_files(tiny_world / VAL_Q, tiny_world / VAL_A, out / "results_val.json")
    assert scored == report["val"] and set(scored["perAnswerType"]) == {"yes/no", "number", "other"}
    assert not (tmp_path / "cache").exists()  # no feature store in end2end mode
    # Adapter-only folder: LoRA weights on the backbone's convs + the new head (modules_to_save).
    adapter = load_file(str(out / "best" / "adapter" / "adapter_model.safetensors"))
    lora = [k for k in adapter if "lora_" in k]
    assert lora and all(k.startswith("base_model.model.backbone.visual.") for k in lora)
    assert not any(".base_layer." in k for k in adapter)  # no frozen base weights in it
    assert {k.split(".")[2] for k in adapter} == {"backbone", "head"}
    assert not any(".visual.head." in k for k in adapter)  # CLIP's unused attention pool
    # model.safetensors has the adapters merged in: the plain model's keys, a changed conv.
    merged = load_file(str(out / "best" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    base = load_backbone("RN-tiny")[0].visual.state_dict()
    # (random-init RN-tiny zero-inits each block's last BatchNorm: only shortcut convs move)
    conv = "stages.0.0.shortcut.conv.conv.weight"
    assert not torch.equal(merged[f"backbone.visual.{conv}"], base[conv])
    bn = "stem.conv1.bn.running_mean"  # frozen BatchNorm statistics stay the backbone's
    assert torch.equal(merged[f"backbone.visual.{bn}"], base[bn])

    model, cfg, answers, q_tok = vqa.load_trained(out / "best")
    assert model.backbone is not None and model.backbone.channels == 256
    # The adapter folder re-attached to a fresh base predicts exactly like the merged model.
    head = build_head(cfg.model, cfg.text, 256, len(answers), q_tok.vocab_size)
    fresh = VLModel(head, GridBackbone(load_backbone("RN-tiny")[0], cfg.tuning))
    peft_model = load_adapter(fresh, out / "best" / "adapter", AdapterConfig("lora")).eval()
    ids, mask, _ = q_tok(["what color is the circle?", "how many squares are there?"])
    batch = {"pixels": torch.randn(2, 3, 64, 96), "text_ids": ids, "text_mask": mask}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(batch), model(batch), rtol=1e-4, atol=1e-5)


def test_features_mode_loha_on_the_fusion_head(tiny_world: Path, tmp_path: Path):
    out = tmp_path / "run"
    extra = ["peft.method=loha", "peft.r=2", "train.max_steps=3"]
    report = vqa.main(_args(tiny_world, out, tmp_path / "cache", *extra))
    adapter = load_file(str(out / "best" / "adapter" / "adapter_model.safetensors"))
    assert any("hada_" in k for k in adapter) and any(".classifier." in k for k in adapter)
    assert not any(".question." in k and "hada_" not in k for k in adapter)  # GRU frozen
    model, *_ = vqa.load_trained(out / "best")
    ev = vqa.main(["--eval-only", str(out / "best"), "--set", f"train.out_dir={tmp_path / 'e'}"])
    assert ev["val"] == report["val"]
    with pytest.raises(SystemExit):  # a contradiction is refused before any work
        vqa.main(_args(tiny_world, out, tmp_path / "cache", "peft.method=lora",
                       "peft.scope=backbone"))  # fmt: skip


def _region_store(world: Path, path: Path, drop: set[str]) -> None:
    gen = torch.Generator().manual_seed(0)
    meta = {"kind": "regions", "channels": 8}
    ids = []
    for sub in ("train2014", "val2014"):
        ids += [int(p.stem.rsplit("_", 1)[1]) for p in (world / "images" / sub).glob("*.jpg")]
    with FeatureStore.create(path, meta) as w:
        for image_id in sorted(ids):
            if str(image_id) in drop:
                continue
            n = int(torch.randint(2, 9, (), generator=gen))  # adaptive: a varying count
            xy = torch.rand(n, 2, generator=gen) * torch.tensor([120.0, 90.0])
            boxes = torch.cat([xy, xy + 20], dim=1)
            w.add(image_id, torch.randn(n, 8, generator=gen), boxes=boxes, image_w=160, image_h=120)


def test_bottomup_region_store_and_missing_features(tiny_world: Path, tmp_path: Path):
    val_ids = sorted(
        {q["image_id"] for q in json.loads((tiny_world / VAL_Q).read_text())["questions"]}
    )
    missing = str(val_ids[0])
    _region_store(tiny_world, tmp_path / "regions", drop={missing})
    base = _args(tiny_world, tmp_path / "run", tmp_path / "cache", "features.kind=bottomup",
                 f"features.store={tmp_path / 'regions'}", "train.max_steps=4")  # fmt: skip
    with pytest.raises(
        VQADataError, match=rf"regions: 1 image\(s\) .* missing: image id {missing}"
    ):
        vqa.main(base)
    report = vqa.main([*base, "--set", "data.skip_missing=true", "--set", "model.arch=mcan"])
    n_missing = sum(
        q["image_id"] == int(missing)
        for q in json.loads((tiny_world / VAL_Q).read_text())["questions"]
    )
    assert report["skipped"]["val"] == {"missing_features": n_missing} and n_missing > 0
    assert report["features"]["kind"] == "regions"
    results = json.loads((tmp_path / "run" / "results_val.json").read_text())
    assert len(results) == len(load_vqa(tiny_world / VAL_Q).examples) - n_missing


def _two_process_run(args: list[str]) -> None:
    from accelerate.state import AcceleratorState

    # Forked from a pytest process whose earlier runs set up a 1-process Accelerate state.
    AcceleratorState._reset_state(reset_partial_state=True)
    vqa.main(["--cpu", *args, "--set", "train.num_threads=1"])


def test_two_processes_score_like_one(tiny_world: Path, tmp_path: Path):
    from accelerate import debug_launcher

    out = tmp_path / "two"
    # 150-odd val questions in eval batches of 32 per process: the last batch is uneven.
    args = _args(tiny_world, out, tmp_path / "cache", "train.max_steps=4")
    debug_launcher(_two_process_run, args=(args,), num_processes=2)
    two = json.loads((out / "metrics.json").read_text())
    results = json.loads((out / "results_val.json").read_text())
    qids = [r["question_id"] for r in results]
    assert len(qids) == len(set(qids)) == len(load_vqa(tiny_world / VAL_Q).examples)
    assert two["steps"] == 4 and two["samples_seen"] == 4 * 16  # train.batch_size is global
    names = sorted(p.name for p in Path(two["features"]["path"]).glob("*.index.json"))
    assert names == ["shard-r0-00000.index.json", "shard-r1-00000.index.json"]
    # One process evaluating the saved model gets the same numbers.
    one = vqa.main(["--eval-only", str(out / "best"), "--set", f"train.out_dir={tmp_path / 'one'}"])
    assert one["val"] == two["val"]


def test_two_processes_train_like_one_with_dropout_off(tiny_world: Path, tmp_path: Path):
    from accelerate import debug_launcher

    # 286 train questions in global batches of 16: the last batch (14) splits 7 + 7.
    extra = ["train.epochs=1", "model.mcan.dropout=0", "model.arch=mcan"]
    one = vqa.main(_args(tiny_world, tmp_path / "one", tmp_path / "cache", *extra))
    debug_launcher(_two_process_run, args=(_args(tiny_world, tmp_path / "two", tmp_path / "cache",
                                                 *extra),), num_processes=2)  # fmt: skip
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["steps"] == one["steps"] == 18 and two["samples_seen"] == one["samples_seen"] == 286
    assert two["history"][0]["train_loss"] == pytest.approx(
        one["history"][0]["train_loss"], rel=1e-5
    )
    wa = load_file(str(tmp_path / "one" / "best" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "best" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_resume_from_epoch_checkpoint_equals_uninterrupted(tiny_world: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    common = ["train.epochs=2", "train.keep_last=2"]
    a = vqa.main(_args(tiny_world, tmp_path / "a", cache, *common))
    first = tmp_path / "a" / "checkpoints" / "step-0000018"  # 286 questions / 16 per step
    b = vqa.main(_args(tiny_world, tmp_path / "b", cache, *common, f"train.resume={first}"))
    assert b["history"] == a["history"] and b["val"] == a["val"]
    last = "checkpoints/step-0000036/model.safetensors"
    sa, sb = load_file(str(tmp_path / "a" / last)), load_file(str(tmp_path / "b" / last))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_kill_9_mid_epoch_then_resume_latest_equals_uninterrupted(tiny_world: Path, tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    common = [
        "train.epochs=2",
        "train.save_every_steps=3",
        "train.keep_last=3",
        "model.mcan.dropout=0.1",
    ]
    full = vqa.main(_args(tiny_world, tmp_path / "full", cache, *common))
    cut = tmp_path / "cut"
    script = Path(__file__).resolve().parents[1] / "tasks" / "vqa.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), *_args(tiny_world, cut, cache, *common)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pointer, deadline = cut / "checkpoints" / "latest", time.monotonic() + 120
    while not pointer.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # wherever it is: mid-step, mid-save, mid-evaluation
    proc.wait()
    assert not (cut / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = vqa.main(["--resume", "latest", *_args(tiny_world, cut, cache, *common)])
    assert resumed["history"] == full["history"] and resumed["val"] == full["val"]
    saved = json.loads((cut / "metrics.json").read_text())
    assert saved["val"] == full["val"] and saved["best_epoch"] == full["best_epoch"]


def test_end2end_backbone_in_its_own_sgd(tiny_world: Path, tmp_path: Path):
    """CLIP-ViL_p's recipe: the backbone in an SGD with step decay beside the head's AdamW."""
    out = tmp_path / "run"
    extra = ["mode=end2end", "model.arch=topdown", "train.epochs=2", "train.batch_size=32",
             "backbone_optim.kind=sgd", "backbone_optim.lr=0.003", "backbone_optim.weight_decay=4e-4",
             "backbone_optim.decay_every_epochs=1", "backbone_optim.gamma=0.5"]  # fmt: skip
    vqa.main(_args(tiny_world, out, tmp_path / "cache", *extra))
    step = sorted((out / "checkpoints").iterdir())[-1]
    adamw = torch.load(step / "optimizer.pt", weights_only=True)
    sgd = torch.load(step / "optimizer-1.pt", weights_only=True)
    names = [n for g in adamw["param_groups"] for n in g["param_names"]]
    assert names and not any(n.startswith("backbone.") for n in names)
    fresh = GridBackbone(load_backbone("RN-tiny")[0], TuningConfig())  # as the run built it
    (group,) = sgd["param_groups"]
    assert len(group["params"]) == sum(p.requires_grad for p in fresh.parameters()) > 0
    assert group["momentum"] == 0.0 and group["weight_decay"] == 4e-4
    # The schedule steps after every optimizer step: 2 epochs done = decayed twice.
    assert group["lr"] == pytest.approx(0.003 * 0.5**2)
    weights = load_file(str(step / "model.safetensors"))
    moved = [k for k, v in fresh.state_dict().items()
             if f"backbone.{k}" in weights and v.is_floating_point()
             and not torch.equal(v, weights[f"backbone.{k}"])]  # fmt: skip
    assert moved  # SGD updated the tower


def test_backbone_sgd_needs_a_fully_tuned_end2end_backbone(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    with pytest.raises(SystemExit):  # features mode has no backbone to train
        vqa.main(_args(tiny_world, tmp_path / "run", tmp_path / "cache",
                       "backbone_optim.kind=sgd"))  # fmt: skip
    assert "backbone_optim.kind=sgd trains a fully fine-tuned backbone" in capsys.readouterr().err
