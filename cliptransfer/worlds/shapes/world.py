"""Orchestration: generate a whole Shapes world on disk, atomically and reproducibly.

Each item's randomness comes from (seed, stream, index, purpose) alone, so output never depends on
generation order; files are written into a temporary sibling folder that is renamed into place
once `manifest.json` (written last) is complete.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from cliptransfer.fileio import write_json
from cliptransfer.worlds.prepare import cache_dir, prepare_atomically

from . import formats
from .annotators import most_frequent, snli_labels, vqa_answers
from .captions import make_captions
from .hypotheses import make_hypotheses, premise
from .questions import make_questions
from .render import render, save_jpeg
from .scene import COLORS, OBJECT_SIZES, SHAPES, TEXTURES, Scene, sample_scene, single_object_scene

# The identifier worlds were first written under (then cliptransfer.data.shapes): kept so that
# worlds already on disk stay valid and generation stays byte-identical.
GENERATOR = "cliptransfer.data.shapes"
# 2: the small world's train split has 24-48 questions per image (was 4-8, as every other split).
GENERATOR_VERSION = 2
# The random streams' names keep version 1: output that version 2 did not change stays
# byte-identical (every world but small's train questions).
_STREAM_VERSION = 1
WIDTH, HEIGHT = 160, 120  # 4:3 like COCO
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = (4, 8)  # (lo, hi), near VQA v2's 5.4 per image
HYPOTHESES_PER_LABEL = 3  # one premise per triple (e, n, c), as in SNLI
COCO_ID_BASE = {"train": 100_000, "val": 500_000}
FLICKR_ID_BASE = {"train": 1_000_000_000, "dev": 1_010_000_000, "test": 1_020_000_000}
SNLI_LETTER = {"entailment": "e", "neutral": "n", "contradiction": "c"}


@dataclass(frozen=True)
class WorldSize:
    """Image counts of one preset (COCO-style VQA/captions, Flickr-style SNLI-VE, zero-shot set)."""

    coco_train: int
    coco_val: int
    flickr_train: int
    flickr_dev: int
    flickr_test: int
    classify: int
    # Questions per train image (lo, hi); val images always get QUESTIONS_PER_IMAGE. `small` is
    # question-dense so that VQA's yes/no questions are learned within the default run's few
    # minutes: with 4-8 they stayed at the answer prior (README, "The default VQA run").
    train_questions: tuple[int, int] = QUESTIONS_PER_IMAGE


SIZES: dict[str, WorldSize] = {
    "tiny": WorldSize(48, 24, 24, 8, 8, 48),
    "small": WorldSize(2000, 500, 1000, 200, 200, 480, train_questions=(24, 48)),
    "medium": WorldSize(10000, 2500, 5000, 1000, 1000, 960),
}


def default_world_dir(size: str = "small", seed: int = 0) -> Path:
    """`$CLIPTRANSFER_CACHE` (or ~/.cache/cliptransfer) / shapes-{size}-seed{seed}-v{version}."""
    _check_size(size)
    return cache_dir() / f"shapes-{size}-seed{seed}-v{GENERATOR_VERSION}"


def _check_size(size: str) -> WorldSize:
    if size not in SIZES:
        raise ValueError(f"unknown Shapes world size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size]


def _rng(seed: int, stream: str, idx: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and Python versions.
    return random.Random(f"shapes-v{_STREAM_VERSION}/{seed}/{stream}/{idx}/{purpose}")


def object_records(scene: Scene) -> list[dict]:
    """BottomUp-style object records: clipped pixel boxes, shape label, attributes."""
    out = []
    for o in scene.objects:
        x1, y1, x2, y2 = o.bbox
        box = [
            max(0.0, x1),
            max(0.0, y1),
            min(float(scene.width), x2),
            min(float(scene.height), y2),
        ]
        attributes = [o.color, o.size, o.texture]
        out.append({"bbox": [round(v, 2) for v in box], "label": o.shape, "attributes": attributes})
    return out


def _image_record(image_id: int | str, file_name: str, scene: Scene) -> dict:
    return {
        "image_id": image_id,
        "file_name": file_name,
        "width": scene.width,
        "height": scene.height,
        "objects": object_records(scene),
    }


def coco_scene(seed: int, split: str, idx: int) -> Scene:
    """The scene model behind COCO-style image `COCO_ID_BASE[split] + idx` of a world: lets
    derived data (sharp object crops) be rendered anew instead of cut from the JPEG."""
    return sample_scene(_rng(seed, f"coco-{split}", idx, "scene"), WIDTH, HEIGHT)


def _coco_item(root: Path, seed: int, split: str, idx: int, per_image: tuple[int, int]) -> dict:
    image_id = COCO_ID_BASE[split] + idx
    stream = f"coco-{split}"
    scene = coco_scene(seed, split, idx)
    file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
    save_jpeg(render(scene), root / "images" / f"{split}2014" / file_name)
    captions = make_captions(scene, _rng(seed, stream, idx, "captions"), CAPTIONS_PER_IMAGE)
    qas = make_questions(scene, _rng(seed, stream, idx, "questions"), *per_image)
    arng = _rng(seed, stream, idx, "answers")
    questions, annotations = [], []
    for k, qa in enumerate(qas):
        qid = image_id * 1000 + k  # VQA v2 convention
        answers = vqa_answers(qa.answer, qa.kind, arng)
        questions.append({"image_id": image_id, "question": qa.question, "question_id": qid})
        annotations.append(
            formats.vqa_annotation(
                qa.question_type, most_frequent(answers), answers, image_id, qa.answer_type, qid
            )
        )
    return {
        "objects": _image_record(image_id, file_name, scene),
        "captions": captions,
        "questions": questions,
        "annotations": annotations,
    }


def _flickr_item(root: Path, seed: int, split: str, idx: int) -> dict:
    flickr_id = FLICKR_ID_BASE[split] + idx
    file_name = f"{flickr_id}.jpg"
    stream = f"flickr-{split}"
    scene = sample_scene(_rng(seed, stream, idx, "scene"), WIDTH, HEIGHT)
    save_jpeg(render(scene), root / "flickr30k_images" / file_name)
    rng = _rng(seed, stream, idx, "snli")
    hyps = make_hypotheses(scene, rng, HYPOTHESES_PER_LABEL)
    premises: list[str] = []
    for _ in range(50):
        text = premise(scene, rng)
        if text not in premises:
            premises.append(text)
        if len(premises) == HYPOTHESES_PER_LABEL:
            break
    records = []
    for j, sentence1 in enumerate(premises):
        caption_id = f"{file_name}#{j}"
        for label in ("entailment", "neutral", "contradiction"):
            records.append(
                formats.snli_ve_record(
                    file_name,
                    label,
                    sentence1,
                    hyps[label][j],
                    f"{caption_id}r1{SNLI_LETTER[label]}",
                    caption_id,
                    snli_labels(label, rng),
                )
            )
    return {"objects": _image_record(flickr_id, file_name, scene), "snli": records}


def _classify_item(root: Path, seed: int, idx: int) -> dict:
    # Cycle through all shape x colour combinations so both tasks are exactly balanced.
    shape = SHAPES[idx % len(SHAPES)]
    color = list(COLORS)[(idx // len(SHAPES)) % len(COLORS)]
    scene = single_object_scene(_rng(seed, "classify", idx, "scene"), shape, color, WIDTH, HEIGHT)
    rel = f"classify/images/{idx:06d}.jpg"
    save_jpeg(render(scene), root / rel)
    return {"image": rel, "shape": shape, "color": color}


def _write_coco(root: Path, split: str, items: list[dict], counts: dict[str, int]) -> None:
    subset = f"{split}2014"
    images = [
        (it["objects"]["image_id"], it["objects"]["file_name"], WIDTH, HEIGHT) for it in items
    ]
    caps = [
        (it["objects"]["image_id"] * 10 + k, it["objects"]["image_id"], c)
        for it in items
        for k, c in enumerate(it["captions"])
    ]
    rel = f"annotations/captions_{subset}.json"
    formats.write_json(root / rel, formats.coco_captions(subset, images, caps))
    counts[rel] = len(caps)
    counts[f"images/{subset}"] = len(items)

    # Contrastive pairs: one record per caption, image paths relative to the world root.
    def image_rel(it: dict) -> str:
        return f"images/{subset}/{it['objects']['file_name']}"

    pairs = [
        {"image": image_rel(it), "caption": c, "image_id": it["objects"]["image_id"]}
        for it in items
        for c in it["captions"]
    ]
    counts[f"pairs/{split}.jsonl"] = formats.write_jsonl(root / f"pairs/{split}.jsonl", pairs)
    formats.write_openclip_csv(
        root / f"pairs/{split}.csv", [(p["image"], p["caption"]) for p in pairs]
    )
    counts[f"pairs/{split}.csv"] = len(pairs)
    # Shards are caption-major (all first captions, then all second ...): samples read in order
    # repeat an image only after a whole split's worth, so an in-order batch has no duplicate
    # images (false negatives for InfoNCE).
    samples = (
        (
            f"{it['objects']['image_id']:012d}_{k}",
            root / image_rel(it),
            it["captions"][k],
            {
                "image_id": it["objects"]["image_id"],
                "caption_index": k,
                "file_name": it["objects"]["file_name"],
                "caption": it["captions"][k],
            },
        )
        for k in range(CAPTIONS_PER_IMAGE)
        for it in items
    )
    # Val shards get their own folder so that loading `pairs/shards/` never mixes in val.
    folder = "pairs/shards" if split == "train" else f"pairs/shards_{split}"
    for name, n in formats.write_shards(root / folder, split, samples).items():
        counts[f"{folder}/{name}"] = n
    if split == "train":
        formats.write_lines(root / "captions.txt", [p["caption"] for p in pairs])
        counts["captions.txt"] = len(pairs)

    questions = [q for it in items for q in it["questions"]]
    annotations = [a for it in items for a in it["annotations"]]
    qrel = f"vqa/v2_OpenEnded_mscoco_{subset}_questions.json"
    arel = f"vqa/v2_mscoco_{subset}_annotations.json"
    formats.write_json(root / qrel, formats.vqa_questions(subset, questions))
    formats.write_json(root / arel, formats.vqa_annotations(subset, annotations))
    counts[qrel] = len(questions)
    counts[arel] = len(annotations)
    _write_objects(root, f"objects/{subset}.json", [it["objects"] for it in items], counts)


def _write_objects(root: Path, rel: str, images: list[dict], counts: dict[str, int]) -> None:
    vocab = {
        "labels": list(SHAPES),
        "attributes": list(COLORS) + list(OBJECT_SIZES) + list(TEXTURES),
        "images": images,
    }
    formats.write_json(root / rel, vocab)
    counts[rel] = len(images)


@contextlib.contextmanager
def _workers() -> Iterator[ProcessPoolExecutor | None]:
    """Two forked worker processes for the item loops, or None (one core, or no fork): every
    item's randomness is named by its index (`_rng`), so the output is the same bytes whichever
    process draws it. Forked, not spawned: a spawned worker would import the launching script
    (torch and all) before its first item."""
    if (os.cpu_count() or 1) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool


def _map_items(pool: ProcessPoolExecutor | None, make: Callable[[int], dict], n: int) -> list[dict]:
    """[make(0), ..., make(n - 1)], on the pool when there is more than a little to do."""
    if pool is None or n < 256:
        return [make(i) for i in range(n)]
    return list(pool.map(make, range(n), chunksize=64))


def _generate(root: Path, size: str, spec: WorldSize, seed: int) -> None:
    with _workers() as pool:
        _generate_files(root, size, spec, seed, pool)


def _generate_files(root: Path, size: str, spec: WorldSize, seed: int,
                    pool: ProcessPoolExecutor | None) -> None:  # fmt: skip
    counts: dict[str, int] = {}
    for split, n in (("train", spec.coco_train), ("val", spec.coco_val)):
        (root / "images" / f"{split}2014").mkdir(parents=True, exist_ok=True)
        per_image = spec.train_questions if split == "train" else QUESTIONS_PER_IMAGE
        items = _map_items(pool, partial(_coco_item, root, seed, split, per_image=per_image), n)
        _write_coco(root, split, items, counts)

    (root / "flickr30k_images").mkdir(parents=True, exist_ok=True)
    flickr_images = []
    for split, n in (
        ("train", spec.flickr_train),
        ("dev", spec.flickr_dev),
        ("test", spec.flickr_test),
    ):
        items = _map_items(pool, partial(_flickr_item, root, seed, split), n)
        rel = f"snli_ve/snli_ve_{split}.jsonl"
        counts[rel] = formats.write_jsonl(root / rel, (r for it in items for r in it["snli"]))
        flickr_images += [it["objects"] for it in items]
    counts["flickr30k_images"] = len(flickr_images)
    _write_objects(root, "objects/flickr30k.json", flickr_images, counts)

    (root / "classify" / "images").mkdir(parents=True, exist_ok=True)
    rows = _map_items(pool, partial(_classify_item, root, seed), spec.classify)
    counts["classify/val.jsonl"] = formats.write_jsonl(root / "classify/val.jsonl", rows)
    formats.write_json(
        root / "classify/classes.json", {"shape": list(SHAPES), "color": list(COLORS)}
    )

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "preset": asdict(spec),
        "image_size": [WIDTH, HEIGHT],
        "counts": dict(sorted(counts.items())),
        "files": files,
    }
    # Written last: its presence marks a complete world.
    write_json(root / "manifest.json", manifest, indent=1)


def prepare_shapes(
    out: str | Path, size: str = "small", seed: int = 0, overwrite: bool = False
) -> Path:
    """Generate the Shapes world of preset `size` into `out` (a no-op if it is already there).

    `overwrite=True` regenerates even a complete world. An existing `out` that is not a Shapes
    world (no manifest of ours) is never deleted. Returns `out`.
    """
    spec = _check_size(size)
    identity = {"size": size, "seed": seed, "version": GENERATOR_VERSION}
    return prepare_atomically(out, GENERATOR, identity, lambda tmp: _generate(tmp, size, spec, seed),
                              overwrite=overwrite, what="Shapes world")  # fmt: skip
