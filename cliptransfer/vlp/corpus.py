"""V&L pretraining corpus in LXMERT's JSON format (airsplay/lxmert `data/lxmert/*.json`, which
CLIP-ViL_p reads unchanged), and the Shapes world written in it.

One file is a list of images:

    [{"img_id": "COCO_train2014_000000000009",
      "sentf": {"mscoco": [caption, ...], "vqa": [question, ...]},
      "labelf": {"vqa": [{answer: score, ...}, ...]}}]

`labelf[source][k]` is the answer table of `sentf[source][k]` (only question sources have one);
scores are VQA soft scores (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / >= 4 annotators). `img_id` is
the COCO file stem, so images resolve as `<root>/<subset>/<img_id>.jpg` or by key in a store.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cliptransfer.fileio import read_json, write_json
from cliptransfer.tasks.vqa.answers import answer_scores
from cliptransfer.worlds.prepare import prepare_atomically

__all__ = [
    "VLPCorpusError",
    "VLPSentence",
    "build_shapes_vlp_corpus",
    "load_lxmert",
    "to_lxmert",
]

GENERATOR = "cliptransfer-vlp-corpus"
VERSION = 1


class VLPCorpusError(ValueError):
    """A pretraining JSON that is not LXMERT's format; the message names file and record."""


@dataclass(frozen=True)
class VLPSentence:
    """One (image, sentence) pair; `label` is the answer table of a question, else None."""

    img_id: str
    text: str
    source: str
    label: dict[str, float] | None = None


def _check_label(label: object, where: str) -> dict[str, float]:
    if not isinstance(label, dict) or not all(
        isinstance(a, str) and isinstance(s, int | float) and math.isfinite(s) and 0 <= s <= 1
        for a, s in label.items()
    ):
        raise VLPCorpusError(
            f"{where}: a label must map answers to scores in [0, 1], got {label!r}"
        )
    return {a: float(s) for a, s in label.items()}


def load_lxmert(path: str | Path, sources: Iterable[str] | None = None) -> list[VLPSentence]:
    """Every sentence of an LXMERT pretraining file (only `sources` when given, e.g.
    ["mscoco", "vqa"]), in file order."""
    path = Path(path)
    data = read_json(path, what="LXMERT pretraining JSON")
    if not isinstance(data, list):
        raise VLPCorpusError(f"{path}: expected a list of image records, got {type(data).__name__}")
    keep = set(sources) if sources is not None else None
    out: list[VLPSentence] = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict) or not isinstance(rec.get("img_id"), str):
            raise VLPCorpusError(f"{where}: needs a string 'img_id'")
        where = f"{path}: record {i} (img_id {rec['img_id']})"
        sentf, labelf = rec.get("sentf"), rec.get("labelf", {})
        if not isinstance(sentf, dict) or not isinstance(labelf, dict):
            raise VLPCorpusError(f"{where}: 'sentf' (and 'labelf') must be objects")
        for source, sents in sentf.items():
            if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
                raise VLPCorpusError(f"{where}: sentf[{source!r}] must be a list of strings")
            labels = labelf.get(source)
            if labels is not None and (not isinstance(labels, list) or len(labels) != len(sents)):
                raise VLPCorpusError(
                    f"{where}: labelf[{source!r}] must list one answer table per sentence "
                    f"({len(sents)}), got {len(labels) if isinstance(labels, list) else labels!r}"
                )
            if keep is not None and source not in keep:
                continue
            for k, text in enumerate(sents):
                label = None
                if labels is not None:
                    label = _check_label(labels[k], f"{where} labelf[{source!r}][{k}]")
                out.append(VLPSentence(rec["img_id"], text, source, label))
    return out


def to_lxmert(sentences: Sequence[VLPSentence]) -> list[dict]:
    """The LXMERT records of `sentences` (grouped by image in first-seen order); a source gets a
    `labelf` entry when its sentences carry labels (all of them must)."""
    images: dict[str, dict] = {}
    for s in sentences:
        rec = images.setdefault(s.img_id, {"img_id": s.img_id, "sentf": {}, "labelf": {}})
        rec["sentf"].setdefault(s.source, []).append(s.text)
        if s.label is not None:
            rec["labelf"].setdefault(s.source, []).append(dict(s.label))
    for rec in images.values():
        for source, labels in rec["labelf"].items():
            if len(labels) != len(rec["sentf"][source]):
                raise ValueError(f"image {rec['img_id']}: source {source!r} mixes labelled and "
                                 "unlabelled sentences")  # fmt: skip
    return list(images.values())


def _vqa_labels(answers: list[dict]) -> dict[str, float]:
    """The soft answer table of one VQA annotation (answers normalised as the vocab's)."""
    return dict(sorted(answer_scores([a["answer"] for a in answers]).items()))


def build_shapes_vlp_corpus(
    world: str | Path,
    out: str | Path,
    *,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    questions_per_image: int = 6,
    overwrite: bool = False,
) -> Path:
    """Write the Shapes world's train2014 captions ("mscoco") and VQA train questions with soft
    answers ("vqa") as `out/mscoco_train.json`, minus `heldout_fraction` of the images (drawn by
    `seed`), which go to `out/mscoco_minival.json` for held-out MLM / ITM accuracy. val2014 is
    left out entirely: the VQA task scores on it. `questions_per_image` keeps the first N
    questions of each image (0: all): VQA v2 has 5.4 per image, the question-dense `small`
    world 24-48, which would make the questions most of the corpus and multiply its epochs."""
    world = Path(world).absolute()
    captions_file = world / "annotations" / "captions_train2014.json"
    questions_file = world / "vqa" / "v2_OpenEnded_mscoco_train2014_questions.json"
    annotations_file = world / "vqa" / "v2_mscoco_train2014_annotations.json"
    for f in (captions_file, questions_file, annotations_file):
        if not f.is_file():
            raise FileNotFoundError(f"vlp corpus: {f} missing (prepare the Shapes world first)")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if questions_per_image < 0:
        raise ValueError(f"questions_per_image must be >= 0, got {questions_per_image}")
    identity = {"version": VERSION, "world": str(world), "heldout_fraction": heldout_fraction,
                "seed": seed, "questions_per_image": questions_per_image}  # fmt: skip

    def generate(tmp: Path) -> None:
        captions = read_json(captions_file)
        stem = {im["id"]: Path(im["file_name"]).stem for im in captions["images"]}
        sentences = [VLPSentence(stem[a["image_id"]], a["caption"], "mscoco")
                     for a in captions["annotations"]]  # fmt: skip
        answers = {
            a["question_id"]: a["answers"] for a in read_json(annotations_file)["annotations"]
        }
        kept: Counter[int] = Counter()
        for q in sorted(read_json(questions_file)["questions"], key=lambda q: q["question_id"]):
            if questions_per_image and kept[q["image_id"]] >= questions_per_image:
                continue
            kept[q["image_id"]] += 1
            if q["question_id"] not in answers:
                raise VLPCorpusError(f"{annotations_file}: no annotation for question "
                                     f"{q['question_id']} of {questions_file}")  # fmt: skip
            sentences.append(VLPSentence(stem[q["image_id"]], q["question"], "vqa",
                                         _vqa_labels(answers[q["question_id"]])))  # fmt: skip
        images = sorted(stem.values())
        held = set(random.Random(f"{GENERATOR}/{seed}").sample(
            images, max(1, round(heldout_fraction * len(images)))))  # fmt: skip
        train = to_lxmert([s for s in sentences if s.img_id not in held])
        minival = to_lxmert([s for s in sentences if s.img_id in held])
        write_json(tmp / "mscoco_train.json", train)
        write_json(tmp / "mscoco_minival.json", minival)
        counts = {"train_images": len(train), "minival_images": len(minival),
                  "captions": sum(s.source == "mscoco" for s in sentences),
                  "questions": sum(s.source == "vqa" for s in sentences)}  # fmt: skip
        write_json(tmp / "manifest.json", {"generator": GENERATOR, **identity, "counts": counts})

    return prepare_atomically(out, GENERATOR, identity, generate, overwrite=overwrite,
                              what="vlp corpus")  # fmt: skip
