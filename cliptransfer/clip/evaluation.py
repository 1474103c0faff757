"""Zero-shot classification and retrieval of a CLIP model, computed across all processes.

Each process embeds its shard of the images/captions; `gather_for_metrics` reassembles the full,
ordered set (dropping the padding of uneven shards), and every process computes the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cliptransfer.clip.retrieval import retrieval_recall
from cliptransfer.clip.zeroshot import class_embeddings, zeroshot_accuracy
from cliptransfer.contrastive.augment import eval_transform
from cliptransfer.contrastive.pairs import PairRecord, open_image
from cliptransfer.fileio import iter_jsonl, read_json

# Prompt templates for the Shapes world's zero-shot tasks (CLIP-style ensembles), in the
# phrasing of the world's captions ("a picture of", "an image of"): the tokenizer has no pieces
# for words the captions never use, so "a {} on a plain background." cost the packaged CLIP
# 35 shape points (its text tower had never seen "plain").
SHAPES_TEMPLATES = {
    "shape": ["a {}.", "a picture of a {}.", "a photo of a {}.", "an image of a {}."],
    "color": ["a {} object.", "a {} shape.", "something {}.", "a picture of a {} thing."],
}


@dataclass
class RetrievalSet:
    images: list[str]
    captions: list[str]
    owner: list[int]  # caption -> index into images

    @classmethod
    def from_records(cls, records: list[PairRecord], max_images: int | None = None):
        images: list[str] = []
        index: dict[str, int] = {}
        captions, owner = [], []
        for r in records:
            if r.image not in index:
                if max_images is not None and len(images) >= max_images:
                    continue
                index[r.image] = len(images)
                images.append(r.image)
            captions.append(r.caption)
            owner.append(index[r.image])
        return cls(images, captions, owner)


@dataclass
class ClassifySet:
    images: list[str]
    labels: dict[str, list[int]]  # task -> label index per image
    classes: dict[str, list[str]]  # task -> class names

    @classmethod
    def from_world(cls, world: Path) -> ClassifySet:
        return cls.from_folder(Path(world) / "classify")

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClassifySet:
        """classes.json ({task: [class names]}) + val.jsonl ({"image", task: class} per line,
        images relative to the folder's parent, as in a Shapes world)."""
        folder = Path(folder)
        world = folder.parent
        classes_file = folder / "classes.json"
        data_file = folder / "val.jsonl"
        for f in (classes_file, data_file):
            if not f.is_file():
                raise FileNotFoundError(f"zero-shot set incomplete: {f} missing")
        classes = {k: list(v) for k, v in read_json(classes_file).items()}
        images, labels = [], {task: [] for task in classes}
        for line_no, row in iter_jsonl(data_file):
            images.append(str(world / row["image"]))
            for task, names in classes.items():
                if row[task] not in names:
                    raise ValueError(f"{data_file}:{line_no}: {task} {row[task]!r} not in classes")
                labels[task].append(names.index(row[task]))
        return cls(images, labels, classes)


class _Images(Dataset):
    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return eval_transform(open_image(self.paths[i]), self.size)  # (3, S, S)


@torch.no_grad()
def embed_images(accelerator, model, paths: list[str], size: int, batch_size: int) -> torch.Tensor:
    """(N, D) image embeddings of `paths`, in order, on every process."""
    loader = accelerator.prepare_data_loader(
        DataLoader(_Images(paths, size), batch_size=batch_size), device_placement=True
    )
    out = []
    for pixels in loader:
        with accelerator.autocast():
            emb = model.encode_image(pixels).float()
        out.append(accelerator.gather_for_metrics(emb))
    return torch.cat(out)


@torch.no_grad()
def embed_texts(accelerator, model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    loader = accelerator.prepare_data_loader(
        DataLoader(texts, batch_size=batch_size, collate_fn=tokenizer), device_placement=True
    )
    out = []
    for ids in loader:
        with accelerator.autocast():
            emb = model.encode_text(ids).float()
        out.append(accelerator.gather_for_metrics(emb))
    return torch.cat(out)


@torch.no_grad()
def evaluate_clip(
    accelerator,
    model,
    tokenizer,
    retrieval: RetrievalSet | None,
    classify: ClassifySet | None,
    image_size: int,
    batch_size: int = 128,
) -> dict[str, Any]:
    """{"retrieval": {...R@K}, "zeroshot": {task: {"top1": ...}}} for the given sets."""
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    if retrieval is not None:
        img = embed_images(accelerator, model, retrieval.images, image_size, batch_size)
        txt = embed_texts(accelerator, model, tokenizer, retrieval.captions, batch_size)
        owner = torch.tensor(retrieval.owner, device=img.device)
        results["retrieval"] = retrieval_recall(img, txt, owner)
    if classify is not None:
        img = embed_images(accelerator, model, classify.images, image_size, batch_size)
        device = img.device
        results["zeroshot"] = {}
        for task, names in classify.classes.items():
            cls_emb = class_embeddings(
                model.encode_text,
                lambda texts: tokenizer(texts).to(device),
                names,
                SHAPES_TEMPLATES.get(task, ["a photo of a {}."]),
            )
            labels = torch.tensor(classify.labels[task], device=device)
            results["zeroshot"][task] = zeroshot_accuracy(img, cls_emb, labels, ks=(1,))
    model.train(was_training)
    return results
