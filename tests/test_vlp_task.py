"""pretrain/vl.py end to end on the tiny Shapes world: the report before/after, final/, QA joining
at its epoch, a mid-epoch resume equal to the uninterrupted run, and VQA / SNLI-VE fine-tuning
from final/ (weights and shared answers loaded exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cliptransfer.config import ConfigError
from cliptransfer.engine import run_task
from cliptransfer.tasks.snli_ve.task import VETask
from cliptransfer.tasks.vlp.task import VLPTask
from cliptransfer.tasks.vqa.task import VQATask, load_trained

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.vlbert.hidden=16", "model.vlbert.heads=2", "model.vlbert.intermediate=32",
         "model.vlbert.layers=1"]  # fmt: skip


def _args(world: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    sets = [f"world.dir={world}", "world.size=tiny", "backbone=RN-tiny", "features.size=64x96",
            f"features.cache_dir={cache}", f"train.out_dir={out}", "train.batch_size=32",
            "train.eval_batch_size=64", "train.num_threads=1", *SMALL, *extra]  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def pretrained(tiny_world: Path, tmp_path_factory) -> tuple[Path, dict, Path]:
    tmp = tmp_path_factory.mktemp("vlp")
    out = tmp / "run"
    report = run_task(VLPTask, _args(tiny_world, out, tmp / "cache", "train.epochs=2",
                                     "train.save_every_steps=3", "train.keep_last=5"))  # fmt: skip
    return out, report, tmp / "cache"


def test_report_final_folder_and_qa_stage(pretrained, tiny_world: Path):
    out, report, _ = pretrained
    for key in ("untrained", "pretrained"):
        m = report[key]
        assert 0 <= m["mlm_accuracy"] <= 100 and 0 <= m["itm_accuracy"] <= 100
        assert 0 <= m["mlm_accuracy_other_image"] <= 100
        assert m["pairs"] > 0 and m["masked_tokens"] > 0
    assert report["untrained"]["pairs"] == report["pretrained"]["pairs"]  # the same held-out set
    final = out / "final"
    assert {p.name for p in final.iterdir()} >= {"model.safetensors", "config.yaml", "tokenizer",
                                                 "answers.json", "meta.json"}  # fmt: skip
    answers = json.loads((final / "answers.json").read_text())
    assert len(answers) == json.loads((final / "meta.json").read_text())["answers"] > 0
    corpus = json.loads((tiny_world / "vlp-corpus-q6" / "manifest.json").read_text())
    assert corpus["counts"]["minival_images"] > 0
    # QA joins at loss.qa_from_epoch (1): epoch 0 logs mlm + itm only, epoch 1 also qa.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((out / "vlp").rglob("events.out.tfevents*")).parent))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"train/mlm", "train/itm", "train/qa"} <= set(tags)
    first_qa = min(e.step for e in ea.Scalars("train/qa"))
    steps_per_epoch = report["steps"] // 2
    assert first_qa > steps_per_epoch - 1  # logged only in the second epoch


def test_mid_epoch_resume_equals_uninterrupted(pretrained, tiny_world: Path, tmp_path: Path):
    out, report, cache = pretrained
    mid = out / "checkpoints" / "step-0000027"  # 16 steps per epoch: mid-epoch 2 (QA on)
    assert mid.is_dir()
    again = run_task(VLPTask, _args(tiny_world, tmp_path / "b", cache, "train.epochs=2",
                                    "train.save_every_steps=3", f"train.resume={mid}"))  # fmt: skip
    assert again["pretrained"] == report["pretrained"]
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vqa_and_snli_ve_start_from_final(pretrained, tiny_world: Path, tmp_path: Path, capsys):
    out, _, cache = pretrained
    final = out / "final"
    common = ["train.epochs=1", "model.arch=vlbert", f"model.init_from={final}",
              "optim.lr=1e-12", "optim.warmup_steps=0"]  # fmt: skip
    run_task(VQATask, _args(tiny_world, tmp_path / "vqa", cache, *common))
    printed = capsys.readouterr().out
    model, _, answers, _ = load_trained(tmp_path / "vqa" / "best")
    pre = load_file(str(final / "model.safetensors"))
    pre_answers = json.loads((final / "answers.json").read_text())
    shared = [a for a in answers if a in pre_answers]
    assert f"{len(shared)} answers from its QA head" in printed and shared
    head = model.head.state_dict()
    # lr ~0: the fine-tuned weights are still the pretrained ones (to float rounding).
    for key in ("bert.encoder.layer.0.attention.self.query.weight", "pos_x.weight"):
        torch.testing.assert_close(head[key], pre[f"head.{key}"], atol=1e-6, rtol=0)
    a = shared[0]
    torch.testing.assert_close(head["classifier.3.weight"][answers.index(a)],
                               pre["head.classifier.3.weight"][pre_answers.index(a)],
                               atol=1e-6, rtol=0)  # fmt: skip
    run_task(VETask, _args(tiny_world, tmp_path / "ve", cache, *common))
    assert "0 answers from its QA head" in capsys.readouterr().out  # 3 labels, none shared
    with pytest.raises(ConfigError, match="model.init_from needs model.arch=vlbert"):
        run_task(VQATask, _args(tiny_world, tmp_path / "x", cache, "model.arch=mcan",
                                f"model.init_from={final}"))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        run_task(VQATask, _args(tiny_world, tmp_path / "y", cache, "model.arch=vlbert",
                                f"model.init_from={tmp_path}"))  # fmt: skip


def test_lora_on_the_pretrained_fusion_transformer(pretrained, tiny_world: Path, tmp_path: Path):
    out, _, cache = pretrained
    run = tmp_path / "lora"
    run_task(VQATask, _args(tiny_world, run, cache, "train.max_steps=2", "model.arch=vlbert",
                            f"model.init_from={out / 'final'}", "peft.method=lora", "peft.r=2"))  # fmt: skip
    adapter = load_file(str(run / "best" / "adapter" / "adapter_model.safetensors"))
    lora = {k.split(".lora_")[0] for k in adapter if ".lora_" in k}
    # Attention and feed-forward linears of the transformer carry adapters...
    for part in ("attention.self.query", "attention.self.value", "intermediate.dense",
                 "output.dense"):  # fmt: skip
        assert any(part in k for k in lora), part
    # ...the new answer layer trains in full (saved whole), the embeddings stay frozen.
    assert any(k.endswith("head.classifier.3.weight") for k in adapter)
    assert not any("classifier" in k for k in lora)
    assert not any("word_embeddings" in k for k in adapter)
    model, *_ = load_trained(run / "best")  # merged weights load into the plain head
    assert type(model.head).__name__ == "VLBert"


def test_end2end_on_pixels_with_the_backbone_in_sgd(tiny_world: Path, tmp_path: Path, capsys):
    """CLIP-ViL_p end to end: pixels through the CLIP tower, which trains in its own SGD."""
    out = tmp_path / "run"
    report = run_task(VLPTask, _args(tiny_world, out, tmp_path / "cache", "mode=end2end",
                                     "train.max_steps=2", "backbone_optim.kind=sgd",
                                     "backbone_optim.lr=0.003"))  # fmt: skip
    assert report["steps"] == 2 and report["pretrained"]["pairs"] > 0
    assert not (tmp_path / "cache").exists()  # pixels, no feature store
    for stored_cells_only in ("data.grid_keep=100", "data.mask_cells=0.15"):
        with pytest.raises(SystemExit):  # refused before any work
            run_task(VLPTask, _args(tiny_world, out, tmp_path / "cache", "mode=end2end",
                                    stored_cells_only))  # fmt: skip
        assert f"{stored_cells_only.split('=')[0]}: " in capsys.readouterr().err
    step = sorted((out / "checkpoints").iterdir())[-1]
    (group,) = torch.load(step / "optimizer-1.pt", weights_only=True)["param_groups"]
    assert group["lr"] == 0.003 and group["params"]
    final = load_file(str(out / "final" / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in final)  # the tuned tower is saved with the head
