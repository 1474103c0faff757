"""Presence probe: do a feature store's cells (or regions) say which objects and attributes an
image holds, before any head reads them?

A VQA or SNLI-VE head that stays at the prior on "is there a blue circle?" either has features
that do not carry the answer or has not learned to read them. This probe separates the two. One
linear map scores every cell for every class, an image's score is the max over its valid cells
(multiple-instance learning: present if some cell shows it), and the map is fitted by logistic
regression on the train images' annotations. Classes come from Visual-Genome-style object
annotations (`{"images": [{"image_id", "objects": [{"label", "attributes": [...]}]}]}`, the
Shapes world's `objects/{train,val}2014.json`), in three groups: labels, attributes, and
attribute+label pairs (binding, e.g. "blue circle").

Reported per group on the val images: accuracy over (image, class) decisions, the majority
baseline (each class's more frequent train outcome), and balanced accuracy (mean over classes of
(TPR + TNR) / 2, 50 = chance), which rare pairs cannot inflate. Grids and BottomUp regions both
work: the store's rows are padded per batch and masked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cliptransfer.fileio import read_json, write_json
from cliptransfer.visual.inputs import pad_visual
from cliptransfer.visual.store import FeatureStore

__all__ = ["PresenceLabels", "add_probe_command", "presence_labels", "probe_presence"]

GROUPS = ("labels", "attributes", "pairs")


@dataclass
class PresenceLabels:
    image_ids: list[str]
    classes: list[tuple[str, str]]  # (group, name), e.g. ("pairs", "blue circle")
    targets: torch.Tensor  # (I, K) 0/1


def _images(path: str | Path) -> list[dict[str, Any]]:
    data = read_json(path, what="object annotations")
    images = data.get("images") if isinstance(data, dict) else data
    if not isinstance(images, list):
        raise ValueError(f"{path}: expected {{'images': [...]}} or a list of images")
    return images


def presence_labels(
    path: str | Path,
    classes: list[tuple[str, str]] | None = None,
    skip: frozenset[str] = frozenset(),
) -> PresenceLabels:
    """The 0/1 presence of every class in every image of `path`; `classes` fixes the columns (the
    train file's, for val); attributes in `skip` (e.g. 'solid') are left out of every group."""
    image_ids, found = [], []
    for i, image in enumerate(_images(path)):
        if "image_id" not in image or not isinstance(image.get("objects"), list):
            raise ValueError(f"{path}: image record {i} needs 'image_id' and an 'objects' list")
        names: set[tuple[str, str]] = set()
        for j, obj in enumerate(image["objects"]):
            label = obj.get("label")
            if not isinstance(label, str):
                raise ValueError(f"{path}: image {image['image_id']} object {j} has no 'label'")
            names.add(("labels", label))
            for attr in obj.get("attributes", []):
                if attr not in skip:
                    names |= {("attributes", attr), ("pairs", f"{attr} {label}")}
        image_ids.append(str(image["image_id"]))
        found.append(names)
    if classes is None:
        classes = sorted(set().union(*found), key=lambda c: (GROUPS.index(c[0]), c[1]))
    column = {c: k for k, c in enumerate(classes)}
    targets = torch.zeros(len(image_ids), len(classes))
    for i, names in enumerate(found):
        targets[i, [column[c] for c in names if c in column]] = 1
    return PresenceLabels(image_ids, classes, targets)


def _load_features(store: FeatureStore, ids: list[str], where: str) -> list[torch.Tensor]:
    missing = [i for i in ids if i not in store]
    if missing:
        raise KeyError(f"{where}: {len(missing)} images are not in the store, e.g. {missing[:3]}")
    return [torch.as_tensor(store[i]["features"], dtype=torch.float32) for i in ids]  # (N_i, C)


def _image_logits(linear: torch.nn.Linear, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = linear(x).masked_fill(~mask[..., None], float("-inf"))  # (I, N, K)
    return scores.amax(dim=1)  # (I, K): an image shows a class if one of its cells does


def probe_presence(
    store: FeatureStore,
    train: PresenceLabels,
    val: PresenceLabels,
    epochs: int = 40,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Fit the max-over-cells linear probe on `train`, score `val`: per group accuracy,
    majority baseline and balanced accuracy (%), and the class count."""
    if train.classes != val.classes:
        raise ValueError("train and val presence labels must share their classes")
    x_train, m_train, _ = pad_visual(_load_features(store, train.image_ids, "train"))
    x_val, m_val, _ = pad_visual(_load_features(store, val.image_ids, "val"))
    valid = x_train[m_train]
    mean, std = valid.mean(0), valid.std(0).clamp_min(1e-5)
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x_train.shape[-1], len(train.classes))
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=gen)
        linear.bias.zero_()
    opt = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(order), batch_size):
            b = order[start : start + batch_size]
            logits = _image_logits(linear, x_train[b], m_train[b])
            loss = F.binary_cross_entropy_with_logits(logits, train.targets[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (_image_logits(linear, x_val, m_val) > 0).float()
    return _scores(pred, val, majority=(train.targets.mean(0) >= 0.5).float())


def _scores(
    pred: torch.Tensor, val: PresenceLabels, majority: torch.Tensor
) -> dict[str, dict[str, float]]:
    y = val.targets
    out = {}
    for group in GROUPS:
        cols = [k for k, (g, _) in enumerate(val.classes) if g == group]
        if not cols:
            continue
        p, t = pred[:, cols], y[:, cols]
        pos, neg = t.sum(0), (1 - t).sum(0)
        tpr = torch.where(pos > 0, (p * t).sum(0) / pos.clamp_min(1), torch.full_like(pos, 0.5))
        tnr = torch.where(
            neg > 0, ((1 - p) * (1 - t)).sum(0) / neg.clamp_min(1), torch.full_like(neg, 0.5)
        )
        out[group] = {
            "classes": len(cols),
            "accuracy": round(100 * (p == t).float().mean().item(), 2),
            "majority": round(100 * (majority[cols] == t).float().mean().item(), 2),
            "balanced": round(100 * ((tpr + tnr) / 2).mean().item(), 2),
        }
    return out


def _run(a: argparse.Namespace) -> None:
    skip = frozenset(s for s in a.skip_attributes.split(",") if s)
    train = presence_labels(a.train, skip=skip)
    val = presence_labels(a.val, classes=train.classes, skip=skip)
    store = FeatureStore.open(a.store)
    report = probe_presence(store, train, val, epochs=a.epochs, lr=a.lr, seed=a.seed)
    print(
        f"presence probe on {a.store} ({len(train.image_ids)} train / {len(val.image_ids)} val images)"
    )
    print("| group | classes | accuracy | majority | balanced (50 = chance) |")
    print("|---|---:|---:|---:|---:|")
    for group, r in report.items():
        print(f"| {group} | {r['classes']} | {r['accuracy']} | {r['majority']} | {r['balanced']} |")
    if a.out:
        write_json(a.out, report)


def add_probe_command(sub: Any) -> None:
    """`cliptransfer probe-presence STORE --train objects.json --val objects.json`."""
    p = sub.add_parser(
        "probe-presence",
        help="which objects/attributes a feature store's cells carry (max-over-cells linear probe)",
    )
    p.add_argument("store", help="feature store folder (CLIP grid or regions)")
    p.add_argument("--train", required=True, help="object annotations of the probe's train images")
    p.add_argument("--val", required=True, help="object annotations of the scored images")
    p.add_argument("--skip-attributes", default="", help="comma list left out (e.g. solid)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the report as JSON here")
    p.set_defaults(func=_run)
