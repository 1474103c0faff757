"""VQA answer vocabulary and soft targets, as in BUTD / Pythia / LXMERT preprocessing.

Reference: hengyuan-hu/bottom-up-attention-vqa ``tools/compute_softscore.py``
(``preprocess_answer``, ``filter_answers``, ``get_score``, ``compute_target``). LXMERT's published
3129-answer ``trainval_ans2label.json`` was built with that script (min 9 occurrences, train+val).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cliptransfer.fileio import read_json, write_json
from cliptransfer.tasks.vqa.metric import process_digit_article, process_punctuation


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer_for_vocab(ans: str) -> str:
    """BUTD ``preprocess_answer``: official punctuation + digit/article processing, then
    ``replace(",", "")``. That last step is a no-op (process_punctuation already removes or
    spaces every comma) but is kept for fidelity; "1,000" and "1000" both give "1000".
    Cached: a VQA split repeats few distinct answers (10 per question; 4.4M strings in VQA v2
    train), and the regex rules took 10 s of a Shapes run's setup."""
    return process_digit_article(process_punctuation(ans)).replace(",", "")


def _annotation_records(annotations: Any) -> list:
    if isinstance(annotations, Mapping):
        annotations = annotations.get("annotations")
    if not isinstance(annotations, list):
        raise ValueError("annotations must be a VQA annotations dict or a list of records")
    return annotations


def build_answer_vocab(annotations: Any, min_count: int = 9) -> list[str]:
    """Answers (normalised) that are the ``multiple_choice_answer`` of >= ``min_count`` questions.

    As BUTD ``filter_answers``: only the consensus ``multiple_choice_answer`` is counted (not the 10
    raw answers), once per distinct question id. BUTD's label order is Python-2 dict order, which
    cannot be reproduced; we sort by count (descending), then alphabetically, so the result is
    deterministic. To reuse a published mapping (e.g. LXMERT's) use :func:`load_answer_vocab`.
    """
    qids_per_answer: dict[str, set] = {}
    for i, rec in enumerate(_annotation_records(annotations)):
        try:
            ans, qid = rec["multiple_choice_answer"], rec["question_id"]
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"annotation record {i}: needs 'multiple_choice_answer' and 'question_id'"
            ) from e
        qids_per_answer.setdefault(normalize_answer_for_vocab(ans), set()).add(qid)
    kept = [(len(q), a) for a, q in qids_per_answer.items() if len(q) >= min_count]
    return [a for _, a in sorted(kept, key=lambda t: (-t[0], t[1]))]


def load_answer_vocab(path: str | Path) -> list[str]:
    """Read ``ans2label.json`` (``{answer: label}``) or ``label2ans.json`` (``[answer, ...]``);
    returns answers in label order."""
    obj = read_json(path, what="answer vocabulary")
    if isinstance(obj, list):
        if not all(isinstance(a, str) for a in obj):
            raise ValueError(f"{path}: label2ans list must contain only strings")
        vocab = obj
    elif isinstance(obj, dict):
        labels = sorted(obj.values()) if all(isinstance(v, int) for v in obj.values()) else None
        if labels != list(range(len(obj))):
            raise ValueError(f"{path}: ans2label labels must be the integers 0..{len(obj) - 1}")
        vocab = sorted(obj, key=obj.__getitem__)
    else:
        raise ValueError(f"{path}: expected a dict (ans2label) or a list (label2ans)")
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"{path}: duplicate answers in the vocabulary")
    return vocab


def make_ans2label(vocab: Sequence[str]) -> dict[str, int]:
    return {a: i for i, a in enumerate(vocab)}


def soft_score(count: int) -> float:
    """BUTD ``get_score``: 0, 0.3, 0.6, 0.9, 1 for 0/1/2/3/>=4 annotators (not min(1, k/3))."""
    if count < 0:
        raise ValueError(f"soft_score: count must be >= 0, got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def _count(answers: Iterable[str], normalize: bool) -> dict[str, int]:
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not one string")
    counts: dict[str, int] = {}
    for a in answers:
        a = normalize_answer_for_vocab(a) if normalize else a
        counts[a] = counts.get(a, 0) + 1
    return counts


def answer_targets(
    answers: Sequence[str], ans2label: Mapping[str, int], *, normalize: bool = True
) -> tuple[list[int], list[float]]:
    """Sparse soft target of one question: ``(labels, scores)`` over its in-vocab answers.

    ``normalize=True`` applies :func:`normalize_answer_for_vocab` to the raw answers first
    (Pythia/MMF behaviour). BUTD's ``compute_target`` counted the raw strings although its
    docstring asks for preprocessed ones; pass ``normalize=False`` to reproduce that.
    """
    labels, scores = [], []
    for a, score in answer_scores(answers, normalize=normalize).items():
        if a in ans2label:
            labels.append(ans2label[a])
            scores.append(score)
    return labels, scores


def answer_scores(answers: Sequence[str], *, normalize: bool = True) -> dict[str, float]:
    """The soft score of every distinct answer of one question, before any vocabulary (an
    LXMERT `labelf` table); `normalize` as in `answer_targets`."""
    return {a: soft_score(c) for a, c in _count(answers, normalize).items()}


def dense_answer_target(
    answers: Sequence[str], ans2label: Mapping[str, int], *, normalize: bool = True
) -> torch.Tensor:
    """Dense soft target ``(num_answers,)`` float32, for BCE-with-logits training."""
    target = torch.zeros(len(ans2label))
    labels, scores = answer_targets(answers, ans2label, normalize=normalize)
    target[labels] = torch.tensor(scores)
    return target


def vocab_coverage(
    annotations: Any, ans2label: Mapping[str, int], *, normalize: bool = True
) -> dict[str, float | int]:
    """Count answers outside the vocabulary, and questions left with an all-zero target.

    ``max_score_mean`` is the mean over questions of the best achievable soft score, a quick upper
    bound on what a classifier over this vocabulary can reach.
    """
    n_ans = n_oov = n_q = n_empty = 0
    best_sum = 0.0
    for i, rec in enumerate(_annotation_records(annotations)):
        try:
            answers = [a["answer"] for a in rec["answers"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"annotation record {i}: needs 'answers' with 'answer' fields") from e
        counts = _count(answers, normalize)
        in_vocab = [c for a, c in counts.items() if a in ans2label]
        n_q += 1
        n_ans += len(answers)
        n_oov += len(answers) - sum(in_vocab)
        n_empty += not in_vocab
        best_sum += max((soft_score(c) for c in in_vocab), default=0.0)
    return {
        "questions": n_q,
        "answers": n_ans,
        "oov_answers": n_oov,
        "oov_fraction": n_oov / n_ans if n_ans else 0.0,
        "questions_without_target": n_empty,
        "max_score_mean": best_sum / n_q if n_q else 0.0,
    }


def save_answer_vocab(vocab: Sequence[str], path: str | Path) -> None:
    """Write ``label2ans``-style JSON (a list), readable by :func:`load_answer_vocab`."""
    write_json(path, list(vocab), indent=None)
