"""SNLI-VE (visual entailment) accuracy: overall and per gold label, in percent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cliptransfer.fileio import iter_jsonl, read_json
from cliptransfer.tasks.vqa.metric import check_exact_coverage

SNLI_VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")


def _check_labels(values: Sequence[str], what: str) -> None:
    for i, v in enumerate(values):
        if v not in SNLI_VE_LABELS:
            raise ValueError(f"{what} {i}: label {v!r} is not one of {', '.join(SNLI_VE_LABELS)}")


def snli_ve_accuracy(labels: Sequence[str], predictions: Sequence[str]) -> dict:
    """``{"accuracy", "per_label": {label: acc}, "count"}``; accuracies are percent, rounded to 2
    decimals from the unrounded means. ``per_label`` is the accuracy over examples with that gold
    label (its recall); None when the label never occurs."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise ValueError("snli_ve_accuracy: no examples")
    _check_labels(labels, "gold label")
    _check_labels(predictions, "prediction")
    correct = [g == p for g, p in zip(labels, predictions)]
    per_label: dict[str, float | None] = {}
    for name in SNLI_VE_LABELS:
        hits = [c for c, g in zip(correct, labels) if g == name]
        per_label[name] = round(100 * sum(hits) / len(hits), 2) if hits else None
    return {
        "accuracy": round(100 * sum(correct) / len(correct), 2),
        "per_label": per_label,
        "count": len(correct),
    }


def read_snli_ve_jsonl(path: str | Path) -> dict[str, str]:
    """``{pairID: gold_label}`` from an SNLI-VE JSONL file, in file order. Errors name the file
    and line (and the byte offset of bytes that are not UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SNLI-VE data file not found: {p}")
    gold: dict[str, str] = {}
    for lineno, rec in iter_jsonl(p):
        try:
            pair_id, label = rec["pairID"], rec["gold_label"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{p}: line {lineno}: needs 'pairID' and 'gold_label'") from e
        if not isinstance(pair_id, str):
            raise ValueError(f"{p}: line {lineno}: pairID must be a string, got {pair_id!r}")
        if label not in SNLI_VE_LABELS:
            # SNLI's "-" (no annotator consensus) pairs are dropped by the SNLI-VE generator.
            raise ValueError(
                f"{p}: line {lineno}: gold_label {label!r} is not one of "
                f"{', '.join(SNLI_VE_LABELS)}"
            )
        if pair_id in gold:
            raise ValueError(f"{p}: line {lineno}: duplicate pairID {pair_id!r}")
        gold[pair_id] = label
    if not gold:
        raise ValueError(f"{p}: no examples")
    return gold


def evaluate_snli_ve_files(data_jsonl: str | Path, results_json: str | Path) -> dict:
    """Score a results file ``[{"pairID": ..., "label": ...}]`` against SNLI-VE JSONL data.

    The results must cover the data's pairIDs exactly (no missing, extra or duplicate ids).
    """
    gold = read_snli_ve_jsonl(data_jsonl)
    results = read_json(results_json, what="SNLI-VE results")
    src = str(results_json)
    if not isinstance(results, list):
        raise ValueError(f"{src}: expected a list of {{'pairID', 'label'}} records")
    pred: dict[str, str] = {}
    order = []
    for i, rec in enumerate(results):
        if not isinstance(rec, dict) or "pairID" not in rec or "label" not in rec:
            raise ValueError(f"{src}: record {i} needs 'pairID' and 'label' fields")
        if not isinstance(rec["pairID"], str):
            raise ValueError(f"{src}: record {i}: pairID must be a string, got {rec['pairID']!r}")
        if rec["label"] not in SNLI_VE_LABELS:
            raise ValueError(
                f"{src}: record {i}: label {rec['label']!r} is not one of "
                f"{', '.join(SNLI_VE_LABELS)}"
            )
        pred[rec["pairID"]] = rec["label"]
        order.append(rec["pairID"])
    check_exact_coverage(gold, order, source=src, reference=str(data_jsonl), key="pairID")
    return snli_ve_accuracy(list(gold.values()), [pred[k] for k in gold])
