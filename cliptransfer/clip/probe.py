"""Linear probe on frozen CLIP image features: what the image tower encodes, whatever the text
tower and the contrastive alignment made of it.

Zero-shot accuracy needs both towers to agree on a concept; a probe only needs the image
embedding to separate it. A method whose probe is high but zero-shot low has a tower that "sees"
the attribute without the alignment having learned to name it (the CLIP-benchmark's question of
where supervision helps). Protocol (as in CLIP's linear-probe evaluation, scaled down): the
image embeddings `encode_image` of the zero-shot images, standardised, a multinomial logistic
regression with L2 fitted by L-BFGS, accuracy by stratified k-fold cross-validation (each image
scored once, by a probe that never saw it), so a few hundred labelled images give a stable number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["fit_linear_probe", "probe_accuracy", "probe_clip", "stratified_folds"]


def stratified_folds(labels: list[int], k: int) -> list[int]:
    """Fold index per example: the i-th example of each class goes to fold i % k, so every fold
    holds every class about equally (deterministic, no RNG: the same split for every model)."""
    seen: dict[int, int] = {}
    folds = []
    for y in labels:
        folds.append(seen.get(y, 0) % k)
        seen[y] = seen.get(y, 0) + 1
    return folds


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, bias, mean, std) of a logistic regression on standardised `x` (N, D). Full-batch
    L-BFGS from zeros: deterministic, and converged for the few hundred points probed here."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], num_classes, dtype=z.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_accuracy(x: torch.Tensor, labels: list[int], folds: int = 5, l2: float = 1e-3) -> float:
    """Cross-validated top-1 (%) of a linear probe: `folds` stratified folds, each scored by a
    probe fitted on the others."""
    y = torch.tensor(labels)
    num_classes = int(y.max()) + 1
    fold = torch.tensor(stratified_folds(labels, folds))
    correct = scored = 0
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():  # a fold needs examples both to fit and to score
            continue
        w, b, mean, std = fit_linear_probe(x[~test], y[~test], num_classes, l2)
        pred = (((x[test].double() - mean) / std) @ w + b).argmax(1)
        correct += int((pred == y[test]).sum())
        scored += int(test.sum())
    return 100.0 * correct / scored if scored else float("nan")


@torch.no_grad()
def _embed(model: Any, paths: list[str], size: int, batch_size: int = 128) -> torch.Tensor:
    from cliptransfer.contrastive.augment import eval_transform
    from cliptransfer.contrastive.pairs import open_image

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack(
            [eval_transform(open_image(p), size) for p in paths[i : i + batch_size]]
        )
        out.append(model.encode_image(pixels.to(device)).float().cpu())
    return torch.cat(out)


def probe_clip(model_dir: str | Path, classify: str | Path, folds: int = 5) -> dict[str, Any]:
    """{task: {"top1": %}} of linear probes on the image embeddings of a saved CLIP (a trainer's
    final/ folder) for every label of a zero-shot folder (classes.json + val.jsonl; the Shapes
    world's classify/: shape and colour), plus the probe's protocol."""
    from cliptransfer.clip import load_clip
    from cliptransfer.clip.evaluation import ClassifySet

    data = ClassifySet.from_folder(classify)
    model = load_clip(model_dir).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    feats = _embed(model, data.images, model.image_size)
    # (N, D) with N in the hundreds: a second intra-op thread only adds sync cost (~3x slower
    # on 2 cores), so the fits run on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {
            task: {"top1": probe_accuracy(feats, data.labels[task], folds)} for task in data.classes
        }
    finally:
        torch.set_num_threads(threads)
    out["protocol"] = {"images": len(data.images), "folds": folds, "dim": int(feats.shape[1]),
                       "features": "encode_image, standardised; L2 logistic regression"}  # fmt: skip
    return out
