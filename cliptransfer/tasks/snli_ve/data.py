"""SNLI-VE (visual entailment) JSONL: loading, Flickr30k image paths, the label prior, a dataset.

Reads the files of necla-ml/SNLI-VE (`snli_ve_{train,dev,test}.jsonl`): one JSON object per line
with `Flikr30kID` (sic, "1234.jpg") or, in re-released copies, `Flickr30K_ID` ("1234"),
`sentence2` (the hypothesis; the image is the premise), `gold_label`, `pairID`. `sentence1` is the
Flickr30k caption the hypothesis was written against; it is not an input (it would leak the
premise as text). Every bad line is an error naming the file and line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from cliptransfer.fileio import JSONFileError, iter_jsonl
from cliptransfer.tasks.snli_ve.metric import SNLI_VE_LABELS

__all__ = [
    "SNLIVEDataError",
    "VEDataset",
    "VEExample",
    "VESplit",
    "collate_ve",
    "flickr_image_path",
    "label_prior",
    "load_snli_ve",
]

LABEL_IDS = {name: i for i, name in enumerate(SNLI_VE_LABELS)}
IMAGE_KEYS = ("Flikr30kID", "Flickr30K_ID", "Flickr30kID")  # the official typo first


class SNLIVEDataError(ValueError):
    """An SNLI-VE file the run cannot use as it is."""


@dataclass(frozen=True)
class VEExample:
    pair_id: str
    image_id: str  # the Flickr30k id: the image file's stem, the key of feature stores
    hypothesis: str
    label: str | None  # None in prediction-only files


@dataclass
class VESplit:
    source: Path
    examples: list[VEExample]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_labels(self) -> bool:
        return all(e.label is not None for e in self.examples)

    def image_ids(self) -> list[str]:
        return sorted({e.image_id for e in self.examples})

    def without_images(self, image_ids: Container[str], reason: str) -> VESplit:
        """A copy without the pairs about `image_ids`, counted under `skipped[reason]`."""
        keep = [e for e in self.examples if e.image_id not in image_ids]
        skipped = dict(self.skipped)
        skipped[reason] = skipped.get(reason, 0) + len(self.examples) - len(keep)
        return replace(self, examples=keep, skipped=skipped)


def _image_id(rec: dict, path: Path, lineno: int) -> str:
    for key in IMAGE_KEYS:
        if key in rec:
            value = rec[key]
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value:
                raise SNLIVEDataError(f"{path}: line {lineno}: {key} must be a file name or id")
            return value.removesuffix(".jpg")
    raise SNLIVEDataError(f"{path}: line {lineno}: no image field ({' or '.join(IMAGE_KEYS)})")


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """`iter_jsonl`, with its errors (bad JSON, bytes that are not UTF-8) as SNLIVEDataError."""
    try:
        yield from iter_jsonl(path)
    except JSONFileError as e:
        raise SNLIVEDataError(str(e)) from e


def load_snli_ve(path: str | Path, *, require_labels: bool = True) -> VESplit:
    """The pairs of one SNLI-VE JSONL file, in file order.

    A `gold_label` outside entailment/neutral/contradiction, a duplicate pairID, a missing field,
    invalid JSON or bytes that are not UTF-8 is an SNLIVEDataError naming the file and line (and
    the byte offset for bad bytes). `require_labels=False` accepts files without
    `gold_label` (prediction only).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SNLI-VE file not found: {path}")
    examples: list[VEExample] = []
    seen: set[str] = set()
    for lineno, rec in _records(path):
        if not isinstance(rec, dict):
            raise SNLIVEDataError(f"{path}: line {lineno}: expected a JSON object")
        pair_id, hypothesis = rec.get("pairID"), rec.get("sentence2")
        if not isinstance(pair_id, str) or not pair_id:
            raise SNLIVEDataError(f"{path}: line {lineno}: needs a string 'pairID'")
        if not isinstance(hypothesis, str) or not hypothesis.strip():
            raise SNLIVEDataError(f"{path}: line {lineno} ({pair_id}): empty 'sentence2'")
        label = rec.get("gold_label")
        if label is None and require_labels:
            raise SNLIVEDataError(f"{path}: line {lineno} ({pair_id}): no 'gold_label'")
        if label is not None and label not in LABEL_IDS:
            raise SNLIVEDataError(
                f"{path}: line {lineno} ({pair_id}): gold_label {label!r} is not one of "
                f"{', '.join(SNLI_VE_LABELS)}"
            )
        if pair_id in seen:
            raise SNLIVEDataError(f"{path}: line {lineno}: duplicate pairID {pair_id!r}")
        seen.add(pair_id)
        examples.append(VEExample(pair_id, _image_id(rec, path, lineno), hypothesis, label))
    if not examples:
        raise SNLIVEDataError(f"{path}: no pairs")
    return VESplit(path, examples)


def flickr_image_path(images: str | Path, image_id: str) -> Path:
    """`images/{id}.jpg` (the flickr30k_images folder of the Flickr30k release)."""
    return Path(images) / f"{image_id}.jpg"


def label_prior(examples: Sequence[VEExample]) -> str:
    """The most frequent training label (ties: the first in SNLI order)."""
    counts = Counter(e.label for e in examples if e.label is not None)
    if not counts:
        raise SNLIVEDataError("the label prior needs labelled pairs")
    return max(SNLI_VE_LABELS, key=lambda name: (counts[name], -LABEL_IDS[name]))


class VEDataset(Dataset):
    """Items {index, text_ids (L,), text_mask (L,), label (), **visual(image_id)}; `index` is the
    pair's position in the split (pairIDs are strings, which do not gather across processes)."""

    def __init__(
        self,
        split: VESplit,
        tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        visual: Callable[[str], dict[str, torch.Tensor]],
    ) -> None:
        self.split, self.visual = split, visual
        self.ids, self.mask, truncated = tokenize([e.hypothesis for e in split.examples])
        self.truncated = int(truncated.sum())

    def __len__(self) -> int:
        return len(self.split.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.split.examples[i]
        item = {
            "index": i,
            "text_ids": self.ids[i],
            "text_mask": self.mask[i],
            **self.visual(e.image_id),
        }
        if e.label is not None:
            item["label"] = LABEL_IDS[e.label]
        return item


def collate_ve(items: list[dict[str, Any]]) -> dict[str, Any]:
    from cliptransfer.visual.inputs import collate_visual

    batch = collate_visual(items)
    batch["index"] = torch.tensor([it["index"] for it in items])
    batch["text_ids"] = torch.stack([it["text_ids"] for it in items])
    batch["text_mask"] = torch.stack([it["text_mask"] for it in items])
    if "label" in items[0]:
        batch["label"] = torch.tensor([it["label"] for it in items])
    return batch
