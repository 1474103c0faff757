"""The contrastive trainer end to end on the tiny Shapes world (CPU, a few steps per run)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cliptransfer.clip import load_clip
from cliptransfer.contrastive.data import PairDataConfig, PairDataset
from cliptransfer.contrastive.pairs import PairRecord, load_pairs
from cliptransfer.defaults import resolve_tokenizer
from cliptransfer.engine import run_task
from cliptransfer.tasks.contrastive.task import ContrastiveTask, check_bad_fraction


def _run(world, out, *extra):
    args = [
        "--set", f"world.dir={world}", "--set", "world.size=tiny",
        "--set", f"train.out_dir={out}", "--set", "train.batch_size=16",
        "--set", "train.eval_max_images=16", "--set", "loss.queue_size=64",
        "--set", "loss.simclr_dim=32", "--set", "loss.simsiam_proj_dim=64",
        "--set", "loss.simsiam_pred_dim=32", "--set", "train.log_every=1",
        "--set", "data.num_workers=0",
    ]  # fmt: skip
    for e in extra:
        args += ["--set", e]
    return run_task(ContrastiveTask, args)


@pytest.mark.parametrize("method", ["clip", "slip", "declip", "filip", "defilip", "siglip"])
def test_every_method_trains_and_saves(tiny_world, tmp_path, method):
    report = _run(tiny_world, tmp_path, f"loss.method={method}", "train.max_steps=2")
    assert report["steps"] == 2 and report["samples_seen"] == 32
    assert set(report["trained"]) == {"retrieval", "zeroshot"}
    model = load_clip(tmp_path / "final")  # the final model is a loadable CLIP
    assert model.context_length == 48
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 2
    assert (tmp_path / "config.yaml").is_file()
    state = load_file(str(tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"))
    if method in ("declip", "defilip"):
        assert state["queue.features"].shape == (64, 128)  # the NNS queue is checkpointed
        assert state["queue.ptr"].item() == (2 * 2 * 16) % 64  # 2 steps x 2 text views x 16
    if method == "siglip":
        assert "logit_bias" in state


def test_resume_mid_epoch_equals_uninterrupted(tiny_world, tmp_path):
    # tiny: 240 pairs / batch 16 = 15 batches per epoch, so step 3 is mid-epoch.
    _run(tiny_world, tmp_path / "a", "train.max_steps=6", "train.save_every_steps=3")
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    resumed = tmp_path / "a" / "checkpoints" / "step-0000003"
    args = ["train.max_steps=6", "train.save_every_steps=3", f"train.resume={resumed}"]
    report = _run(tiny_world, tmp_path / "b", *args)
    assert report["steps"] == 6
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    with pytest.raises(ValueError, match=r"optim.lr: saved 0.001 vs now 0.1"):
        _run(tiny_world, tmp_path / "c", *args, "optim.lr=0.1")


def test_lock_image_and_lora_train_only_what_they_should(tiny_world, tmp_path):
    init = tmp_path / "base"
    _run(tiny_world, init, "train.max_steps=1")
    before = load_file(str(init / "final" / "model.safetensors"))
    _run(
        tiny_world, tmp_path / "lit", f"model.init={init / 'final'}", "train.max_steps=2",
        "tuning.lock_image=true",
    )  # fmt: skip
    after = load_file(str(tmp_path / "lit" / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith("visual.") and "num_batches_tracked" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["text_projection"], after["text_projection"])

    _run(
        tiny_world, tmp_path / "lora", f"model.init={init / 'final'}", "train.max_steps=2",
        "peft.method=lora", "optim.lr=0.05",
    )  # fmt: skip
    lora = load_file(str(tmp_path / "lora" / "final" / "model.safetensors"))
    assert lora.keys() == before.keys()  # adapters merged: a plain CLIP checkpoint
    changed = [k for k in before if not torch.equal(before[k], lora[k])]
    assert "transformer.resblocks.0.mlp.c_fc.weight" in changed  # a LoRA target moved
    assert "visual.stages.0.0.conv1_1x1.conv.weight" in changed
    assert "token_embedding.weight" not in changed and "ln_final.weight" not in changed
    assert load_clip(tmp_path / "lora" / "final").context_length == 48


def test_bad_records_are_replaced_and_counted(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    lines = [
        {"image": "good.jpg", "caption": "a red thing"},
        {"image": "broken.jpg", "caption": "broken"},
        {"image": "missing.jpg", "caption": "missing"},
        {"image": "good.jpg", "caption": "   "},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = load_pairs(pairs)
    ds = PairDataset(records, resolve_tokenizer("shapes"), PairDataConfig())
    item = ds[1]  # broken -> missing -> empty caption -> wraps to record 0
    assert item["image"].shape == (3, 64, 64)
    assert [s.split(": ")[1] for s in item["skipped"]] == [
        "UnidentifiedImageError",
        "FileNotFoundError",
        "empty caption",
    ]
    assert item["skipped"][0].startswith(f"{pairs}:2")
    with pytest.raises(RuntimeError, match=r"60 of 100 records were unreadable .* first ones: x"):
        check_bad_fraction(60, 100, 0.5, ["x"])
    check_bad_fraction(50, 100, 0.5, ["x"])


def test_pairs_formats_agree(tiny_world):
    jsonl = load_pairs(tiny_world / "pairs" / "train.jsonl", tiny_world)
    csv = load_pairs(tiny_world / "pairs" / "train.csv", tiny_world)
    shards = load_pairs(tiny_world / "pairs" / "shards")
    assert [(r.image, r.caption) for r in jsonl] == [(r.image, r.caption) for r in csv]
    assert sorted(r.caption for r in shards) == sorted(r.caption for r in jsonl)
    assert all(isinstance(r, PairRecord) for r in shards)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        bad = tiny_world.parent / "bad.jsonl"
        bad.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": \n')
        load_pairs(bad)


def test_datasets_folder_source(tmp_path):
    import datasets

    images = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": ["red", "blue"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    records = load_pairs(tmp_path / "ds")
    assert [r.caption for r in records] == ["red", "blue"]
    from cliptransfer.contrastive.pairs import open_image

    assert open_image(records[1].image).getpixel((0, 0)) == (0, 0, 255)


def test_fast_kernels_path_trains(tiny_world, tmp_path):
    report = _run(tiny_world, tmp_path, "train.max_steps=2", "train.fast_kernels=true")
    assert report["steps"] == 2
    assert load_clip(tmp_path / "final").context_length == 48
