"""VQA v2 questions + annotations: loading, joining, COCO image paths, soft targets, answer prior.

Reads the official files (`v2_OpenEnded_mscoco_{subtype}_questions.json`,
`v2_mscoco_{subtype}_annotations.json`) or any file in their format. Annotations are optional
(test-dev style prediction). Every inconsistency is an error naming the file and the first ids, or
with `skip_missing=True` a counted skip (`VQASplit.skipped`), so a run reports what it left out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cliptransfer.fileio import read_json
from cliptransfer.tasks.vqa.answers import answer_targets, vocab_coverage

__all__ = [
    "VQADataError",
    "VQADataset",
    "VQAQuestion",
    "VQASplit",
    "answer_prior",
    "coco_image_path",
    "collate_vqa",
    "check_available",
    "load_vqa",
    "prior_results",
    "with_coco_images",
    "with_image_files",
]


class VQADataError(ValueError):
    """Question/annotation files that do not fit together, or data the run cannot find."""


@dataclass(frozen=True)
class VQAQuestion:
    question_id: int
    image_id: int
    question: str
    question_type: str | None = None
    answer_type: str | None = None
    answers: tuple[str, ...] | None = None  # the raw annotator answers (10 in VQA v2)
    multiple_choice_answer: str | None = None


@dataclass
class VQASplit:
    """The joined questions of one file pair, in question-file order."""

    questions_file: Path
    annotations_file: Path | None
    data_subtype: str | None  # e.g. "val2014": names the COCO image folder
    examples: list[VQAQuestion]
    annotation_records: list[dict] | None  # raw records of the kept questions, for the scorer
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def source(self) -> Path:
        return self.questions_file

    @property
    def has_answers(self) -> bool:
        return self.annotation_records is not None

    def image_ids(self) -> list[int]:
        return sorted({e.image_id for e in self.examples})

    def without_images(self, image_ids: Container[int], reason: str) -> VQASplit:
        """A copy without the questions about `image_ids`, counted under `skipped[reason]`."""
        keep = [e for e in self.examples if e.image_id not in image_ids]
        kept = {e.question_id for e in keep}
        records = None
        if self.annotation_records is not None:
            records = [r for r in self.annotation_records if r["question_id"] in kept]
        skipped = dict(self.skipped)
        skipped[reason] = skipped.get(reason, 0) + len(self.examples) - len(keep)
        return replace(self, examples=keep, annotation_records=records, skipped=skipped)


def _first(ids: Sequence[Any], n: int = 5) -> str:
    ids = sorted(ids)
    more = f", ... ({len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(str(i) for i in ids[:n]) + more


def _records(obj: Any, key: str, path: Path) -> list:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise VQADataError(f"{path}: expected a JSON object with a {key!r} list")
    return obj[key]


def _get(rec: Any, name: str, types: type | tuple[type, ...], path: Path, i: int) -> Any:
    if not isinstance(rec, dict):
        raise VQADataError(f"{path}: record {i} is {type(rec).__name__}, expected an object")
    if name not in rec:
        raise VQADataError(f"{path}: record {i} has no {name!r} field")
    val = rec[name]
    if not isinstance(val, types) or isinstance(val, bool):
        raise VQADataError(f"{path}: record {i}: {name!r} has type {type(val).__name__}")
    return val


def _parse_annotations(path: Path) -> dict[int, tuple[dict, VQAQuestion]]:
    anns: dict[int, tuple[dict, VQAQuestion]] = {}
    for i, rec in enumerate(_records(read_json(path, what="VQA annotations"), "annotations", path)):
        qid = _get(rec, "question_id", int, path, i)
        if qid in anns:
            raise VQADataError(f"{path}: duplicate question_id {qid} (record {i})")
        answers = _get(rec, "answers", list, path, i)
        if not answers:
            raise VQADataError(f"{path}: record {i} (question_id {qid}) has no answers")
        texts = tuple(_get(a, "answer", str, path, i) for a in answers)
        partial = VQAQuestion(
            question_id=qid,
            image_id=_get(rec, "image_id", int, path, i),
            question="",
            question_type=_get(rec, "question_type", str, path, i),
            answer_type=_get(rec, "answer_type", str, path, i),
            answers=texts,
            multiple_choice_answer=rec.get("multiple_choice_answer"),
        )
        anns[qid] = (rec, partial)
    return anns


def load_vqa(
    questions: str | Path,
    annotations: str | Path | None = None,
    *,
    skip_missing: bool = False,
) -> VQASplit:
    """Join a questions file with its annotations (optional) by question_id.

    A question without an annotation (or an annotation without a question) is an error naming
    the files and the first ids; with `skip_missing` it is dropped and counted in `skipped`.
    """
    qpath = Path(questions)
    qdata = read_json(qpath, what="VQA questions")
    qrecs = _records(qdata, "questions", qpath)
    subtype = qdata.get("data_subtype")
    anns = _parse_annotations(Path(annotations)) if annotations is not None else None
    apath = Path(annotations) if annotations is not None else None

    examples: list[VQAQuestion] = []
    records: list[dict] | None = [] if anns is not None else None
    seen: set[int] = set()
    unannotated: list[int] = []
    for i, rec in enumerate(qrecs):
        qid = _get(rec, "question_id", int, qpath, i)
        if qid in seen:
            raise VQADataError(f"{qpath}: duplicate question_id {qid} (record {i})")
        seen.add(qid)
        q = VQAQuestion(
            question_id=qid,
            image_id=_get(rec, "image_id", int, qpath, i),
            question=_get(rec, "question", str, qpath, i),
        )
        if anns is not None:
            if qid not in anns:
                unannotated.append(qid)
                continue
            raw, ann = anns[qid]
            if ann.image_id != q.image_id:
                raise VQADataError(
                    f"{apath}: question_id {qid} is about image {ann.image_id} but {qpath} says "
                    f"image {q.image_id}"
                )
            q = replace(ann, question=q.question)
            records.append(raw)
        examples.append(q)
    skipped: dict[str, int] = {}
    if unannotated:
        if not skip_missing:
            raise VQADataError(
                f"{apath}: {len(unannotated)} question_id(s) of {qpath} have no annotation: "
                f"{_first(unannotated)} (mismatched files? skip_missing=True drops them)"
            )
        skipped["no_annotation"] = len(unannotated)
    orphans = [qid for qid in (anns or {}) if qid not in seen]
    if orphans:
        if not skip_missing:
            raise VQADataError(
                f"{apath}: {len(orphans)} annotation(s) have no question in {qpath}: "
                f"{_first(orphans)} (mismatched files? skip_missing=True drops them)"
            )
        skipped["annotation_without_question"] = len(orphans)
    if not examples:
        raise VQADataError(f"{qpath}: no questions to use")
    return VQASplit(qpath, apath, subtype, examples, records, skipped)


def coco_image_path(images: str | Path, data_subtype: str | None, image_id: int) -> Path:
    """COCO file of `image_id`: `images/{folder}/COCO_{folder}_{id:012d}.jpg`, or directly in
    `images/` when that folder holds the files. test-dev2015 / test2015 questions use the
    `test2015` images."""
    if not data_subtype:
        raise VQADataError(
            "the questions file has no 'data_subtype' (e.g. 'val2014'), which names the COCO "
            "image folder; add it to the file"
        )
    folder = "test2015" if data_subtype.startswith("test") else data_subtype
    name = f"COCO_{folder}_{image_id:012d}.jpg"
    root = Path(images)
    nested = root / folder / name
    if not nested.is_file() and (root / name).is_file():
        return root / name
    return nested


def check_available(
    split: Any,
    available: Callable[[int], bool],
    where: str,
    skip_missing: bool,
    reason: str,
    describe: Callable[[int], str] | None = None,
) -> VQASplit:
    """Drop (with `skip_missing`) or report the questions whose image is not `available`.

    `split`: a VQASplit, or any split with `source`, `image_ids()` and `without_images()`.
    `where` names the image folder or feature store in the error message, `describe(image_id)`
    (e.g. the expected file) the first missing image.
    """
    missing = [i for i in split.image_ids() if not available(i)]
    if not missing:
        return split
    if not skip_missing:
        first = f" ({describe(missing[0])})" if describe else ""
        raise VQADataError(
            f"{where}: {len(missing)} image(s) needed by {split.source} are missing: "
            f"image id {_first(missing)}{first} (skip_missing=True skips their questions)"
        )
    out = split.without_images(set(missing), reason)
    if not out.examples:
        raise VQADataError(f"{where}: every image of {split.source} is missing")
    return out


def with_image_files(
    splits: dict[str, Any], locate: Callable[[Any, Any], Path], where: str, skip_missing: bool
) -> tuple[dict[str, Any], dict[Any, Path]]:
    """`splits` without the examples whose image file `locate(split, image_id)` is missing
    (`skip_missing`, counted as "missing_image") or an error naming them and `where`, and the
    image id -> file map of the rest. Any split with `image_ids()` / `without_images()`."""
    out, paths = {}, {}
    for name, split in splits.items():
        files = {i: locate(split, i) for i in split.image_ids()}
        split = check_available(
            split, lambda i, f=files: f[i].is_file(), where, skip_missing, "missing_image",
            describe=lambda i, f=files: f"expected {f[i]}",
        )  # fmt: skip
        out[name] = split
        paths.update({i: files[i] for i in split.image_ids()})
    return out, paths


def with_coco_images(
    splits: dict[str, VQASplit], images: str | Path, skip_missing: bool
) -> tuple[dict[str, VQASplit], dict[int, Path]]:
    """`with_image_files` for COCO layouts (`coco_image_path` of each question file's subset)."""
    return with_image_files(
        splits, lambda split, i: coco_image_path(images, split.data_subtype, i),
        f"image folder {images}", skip_missing,
    )  # fmt: skip


# ---------------------------------------------------------------------------- answer prior


def answer_prior(examples: Sequence[VQAQuestion]) -> dict[str, str]:
    """Most frequent `multiple_choice_answer` per question_type; key "" is the overall one.

    Ties go to the alphabetically first answer, so the prior is deterministic.
    """
    by_type: dict[str, Counter] = {}
    overall: Counter = Counter()
    for e in examples:
        if e.multiple_choice_answer is None or e.question_type is None:
            raise VQADataError(f"question {e.question_id}: the prior needs annotated questions")
        by_type.setdefault(e.question_type, Counter())[e.multiple_choice_answer] += 1
        overall[e.multiple_choice_answer] += 1

    def top(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    prior = {t: top(c) for t, c in by_type.items()}
    prior[""] = top(overall)
    return prior


def prior_results(examples: Sequence[VQAQuestion], prior: Mapping[str, str]) -> list[dict]:
    """EvalAI results of the prior: a question type unseen in training gets the overall answer."""
    return [
        {"question_id": e.question_id, "answer": prior.get(e.question_type or "", prior[""])}
        for e in examples
    ]


# ---------------------------------------------------------------------------- dataset


class VQADataset(Dataset):
    """Items {question_id, text_ids (L,), text_mask (L,), target (A,), **visual(image_id)}.

    `tokenize(texts) -> (ids (B, L), mask (B, L) bool, truncated (B,) bool)` encodes the
    questions once; `visual(image_id)` returns the image side ({features, spatial} or {pixels}).
    Targets are BUTD soft scores (0/.3/.6/.9/1) over `ans2label`; answers outside it are counted
    in `coverage` (see `vocab_coverage`).
    """

    def __init__(
        self,
        split: VQASplit,
        tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        ans2label: Mapping[str, int],
        visual: Callable[[int], dict[str, torch.Tensor]],
    ) -> None:
        self.split, self.visual, self.num_answers = split, visual, len(ans2label)
        self.q_ids, self.q_mask, truncated = tokenize([e.question for e in split.examples])
        self.truncated = int(truncated.sum())
        self.targets: list[tuple[list[int], list[float]]] | None = None
        self.coverage: dict[str, float | int] | None = None
        if split.has_answers:
            self.targets = [answer_targets(e.answers, ans2label) for e in split.examples]
            self.coverage = vocab_coverage(split.annotation_records, ans2label)

    def __len__(self) -> int:
        return len(self.split.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.split.examples[i]
        item = {
            "question_id": e.question_id,
            "text_ids": self.q_ids[i],
            "text_mask": self.q_mask[i],
            **self.visual(e.image_id),
        }
        if self.targets is not None:
            target = torch.zeros(self.num_answers)
            labels, scores = self.targets[i]
            target[labels] = torch.tensor(scores)
            item["target"] = target
        return item


def collate_vqa(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of `VQADataset` items; visual features are padded (see `collate_visual`)."""
    from cliptransfer.visual.inputs import collate_visual

    batch = collate_visual(items)
    batch["question_id"] = torch.tensor([it["question_id"] for it in items])
    batch["text_ids"] = torch.stack([it["text_ids"] for it in items])
    batch["text_mask"] = torch.stack([it["text_mask"] for it in items])
    if "target" in items[0]:
        batch["target"] = torch.stack([it["target"] for it in items])
    return batch
