"""Grid extraction: exact features vs the model, resume, metadata checks, 2-process sharding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptransfer.clip import create_clip, load_clip
from cliptransfer.contrastive.augment import OPENAI_MEAN, OPENAI_STD
from cliptransfer.visual.extract import (
    ImageReadError,
    extract_grids,
    list_images,
    parse_size,
    preprocess,
    rank_shard,
)
from cliptransfer.visual.store import FeatureStore, StoreMismatchError

SIZE = (64, 96)  # (H, W) -> RN-tiny grid 2 x 3
NAMES = [
    "COCO_train2014_000000000007.png",
    "COCO_train2014_000000000042.png",
    "COCO_val2014_000000000100.png",
    "cat_01.png",
    "dog.jpg",
]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    create_clip("RN-tiny").save_pretrained(root / "ckpt")
    rng = np.random.default_rng(0)
    (root / "images" / "sub").mkdir(parents=True)
    files = []
    for k, name in enumerate(NAMES):
        h, w = 40 + 8 * k, 70 - 6 * k  # sizes and aspect ratios all differ from SIZE
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = root / "images" / ("sub" if k == 4 else "") / name
        Image.fromarray(arr).save(path, quality=95)
        files.append(path)
    model = load_clip(root / "ckpt")
    return {"root": root, "files": files, "model": model}


def _reference(model, path: Path) -> torch.Tensor:
    # Independent preprocessing: PIL bicubic resize to (W, H), /255, OpenAI mean/std.
    img = Image.open(path).convert("RGB").resize((SIZE[1], SIZE[0]), Image.Resampling.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255 - OPENAI_MEAN) / OPENAI_STD
    pixels = torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]
    assert torch.allclose(preprocess(Image.open(path), SIZE), pixels[0], atol=1e-6)
    with torch.no_grad():
        feats, hw = model.encode_grid(pixels)
    assert hw == (2, 3)
    return feats[0]  # (H*W, C)


def test_extract_exact_and_metadata(world: dict, tmp_path: Path):
    out = tmp_path / "grid"
    stats = extract_grids(world["root"] / "ckpt", world["root"] / "images", out, SIZE, batch_size=2)
    assert (stats["written"], stats["already"], stats["images"]) == (5, 0, 5)
    store = FeatureStore.open(out)
    assert sorted(store.ids()) == sorted(["7", "42", "100", "cat_01", "dog"])  # COCO -> int ids
    weights = (world["root"] / "ckpt" / "model.safetensors").read_bytes()
    meta = store.metadata
    assert meta["checkpoint_sha256"] == hashlib.sha256(weights).hexdigest()
    assert (meta["kind"], meta["layer"], meta["input_size"], meta["grid_size"]) == (
        "grid", "layer4", [64, 96], [2, 3]
    )  # fmt: skip
    assert meta["channels"] == 256 and meta["compute_dtype"] == "float32"  # 32 * width 8
    assert meta["mean"] == list(OPENAI_MEAN) and meta["dtype"] == "float32"
    for path, key in zip(world["files"], ["7", "42", "100", "cat_01", "dog"]):
        rec = store[key]
        torch.testing.assert_close(
            rec["features"], _reference(world["model"], path), atol=1e-5, rtol=1e-5
        )
        with Image.open(path) as img:
            assert (rec["image_w"], rec["image_h"]) == img.size


def test_resume_and_mismatch(world: dict, tmp_path: Path):
    out, ckpt = tmp_path / "grid", world["root"] / "ckpt"
    first = extract_grids(ckpt, world["files"][:2], out, SIZE, batch_size=4)
    assert first["written"] == 2
    again = extract_grids(ckpt, world["root"] / "images", out, "64x96", batch_size=4)
    assert (again["already"], again["written"]) == (2, 3)
    store = FeatureStore.open(out, expect={"input_size": [64, 96], "grid_size": [2, 3]})
    assert len(store) == 5
    torch.testing.assert_close(
        store["dog"]["features"],
        _reference(world["model"], world["files"][4]),
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(StoreMismatchError) as err:
        extract_grids(ckpt, world["files"], out, (96, 64))
    assert "input_size: expected [96, 64], found [64, 96]" in str(err.value)
    assert "grid_size: expected [3, 2], found [2, 3]" in str(err.value)
    torch.manual_seed(1)
    create_clip("RN-tiny").save_pretrained(tmp_path / "other")  # same arch, other weights
    with pytest.raises(StoreMismatchError, match="checkpoint_sha256"):
        extract_grids(tmp_path / "other", world["files"], out, SIZE)


def test_fp16_storage_and_bf16_compute(world: dict, tmp_path: Path):
    out = tmp_path / "grid"
    extract_grids(world["model"], world["files"][:2], out, SIZE, dtype="bf16", storage="fp16")
    store = FeatureStore.open(out)
    assert (store.metadata["dtype"], store.metadata["compute_dtype"]) == ("float16", "bfloat16")
    assert (out / "shard-r0-00000.bin").stat().st_size == 2 * 6 * 256 * 2
    ref = _reference(world["model"], world["files"][0])
    got = store["7"]["features"]
    assert got.dtype == torch.float32 and not torch.equal(got, ref)  # bf16 really ran
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_bad_inputs(world: dict, tmp_path: Path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match=r"broken.jpg: cannot decode image"):
        extract_grids(world["model"], [bad], tmp_path / "s", SIZE)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint path"):
        extract_grids("no/such/ckpt", world["files"], tmp_path / "s2", SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="HxW"):
        parse_size("600by1000")
    assert parse_size("600x1000") == (600, 1000)
    dup = tmp_path / "COCO_val2014_000000000007.png"
    Image.new("RGB", (8, 8)).save(dup)
    with pytest.raises(ValueError, match="both map to image id '7'"):
        extract_grids(world["model"], [world["files"][0], dup], tmp_path / "s3", SIZE)


def test_rank_shard():
    items = list(range(7))
    parts = [rank_shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError):
        rank_shard(items, 3, 3)


def _launched(ckpt: str, files: list[str], out: str) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Forked from a pytest process where earlier tests built a 1-process Accelerator: drop the
    # inherited singleton state, or both children would believe they are rank 0.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)  # sets 2 threads per process on its own
    # After fork, libgomp's pool of the parent is unusable: one thread avoids a deadlock (and
    # two ranks share the 2 cores anyway). This must come after Accelerator().
    torch.set_num_threads(1)
    extract_grids(ckpt, files, out, SIZE, batch_size=2, accelerator=accelerator)


def test_two_processes_write_own_shards(world: dict, tmp_path: Path):
    from accelerate import debug_launcher

    files = [str(p) for p in world["files"]]
    debug_launcher(_launched, args=(str(world["root"] / "ckpt"), files, str(tmp_path / "s")))
    names = sorted(p.name for p in (tmp_path / "s").glob("*.index.json"))
    assert names == ["shard-r0-00000.index.json", "shard-r1-00000.index.json"]
    store = FeatureStore.open(tmp_path / "s")
    assert store.ids() == ["7", "100", "dog", "42", "cat_01"]  # rank 0: 0, 2, 4; rank 1: 1, 3
    for path, key in zip(world["files"], ["7", "42", "100", "cat_01", "dog"]):
        torch.testing.assert_close(
            store[key]["features"], _reference(world["model"], path), atol=1e-5, rtol=1e-5
        )
