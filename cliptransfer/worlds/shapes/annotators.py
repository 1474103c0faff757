"""Simulated human annotators: 10 noisy VQA answers per question, 5 SNLI-VE labels per pair.

VQA model: each question gets a reliability p ~ U(0.70, 0.98); each of the 10 annotators is right
with probability p. A right annotator usually writes the canonical answer and sometimes a surface
variant that the official VQA normalizer maps back to it ("Yes", "two", "red.", "a circle", "the
star") or a true synonym it does not map ("grey", "big"). A wrong annotator gives a plausible
confusion (the other yes/no, an off-by-one count, a neighbouring colour, a similar shape) or,
rarely, an unrelated answer. At least 6 annotators are right and the canonical raw answer is the
strict mode, so `multiple_choice_answer` (the most frequent raw answer) is always correct.
"""

from __future__ import annotations

import random
from collections import Counter

from .language import number_word
from .scene import COLORS, SHAPES

MIN_CORRECT = 6
VARIANT_PROB = 0.15

_CONFUSABLE = {
    "red": ("orange", "purple"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "white"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "purple": ("blue", "red"),
    "gray": ("white",),
    "white": ("gray", "yellow"),
    "circle": ("square", "diamond"),
    "square": ("diamond", "circle"),
    "triangle": ("diamond", "star"),
    "star": ("cross", "triangle"),
    "diamond": ("square", "triangle"),
    "cross": ("star", "square"),
}
_SYNONYMS = {"gray": "grey", "large": "big", "small": "tiny"}
_UNRELATED = ("yes", "no", "2", "red", "blue", "circle", "square", "nothing")


def _variant(answer: str, kind: str, rng: random.Random) -> str:
    """A different raw string meaning the same answer."""
    forms = [answer.capitalize(), answer + "."]
    if kind == "number":
        forms += [number_word(int(answer))] * 2 + [number_word(int(answer)).capitalize()]
    elif kind == "shape":
        forms += ["a " + answer, "the " + answer]
    elif kind in ("color", "size"):
        forms += ["the " + answer] if kind == "color" else []
        if answer in _SYNONYMS:
            forms += [_SYNONYMS[answer]] * 2
    elif kind == "yes/no":
        forms += [answer.upper(), answer + "!"]
    return rng.choice(forms)


def _wrong(answer: str, kind: str, rng: random.Random) -> str:
    if rng.random() < 0.05:
        return rng.choice([u for u in _UNRELATED if u != answer])
    if kind == "yes/no":
        return "no" if answer == "yes" else "yes"
    if kind == "number":
        n = int(answer)
        if rng.random() < 0.8:
            return str(n + 1) if n == 0 or rng.random() < 0.5 else str(n - 1)
        return str(rng.choice([k for k in range(7) if k != n]))
    if kind == "size":
        return rng.choice(("medium", "small" if answer == "large" else "large"))
    pool = tuple(COLORS) if kind == "color" else SHAPES
    if rng.random() < 0.7:
        return rng.choice(_CONFUSABLE[answer])
    return rng.choice([v for v in pool if v != answer])


def vqa_answers(answer: str, kind: str, rng: random.Random) -> list[dict]:
    """Ten VQA v2 answer records {answer, answer_confidence, answer_id} for canonical `answer`."""
    p = rng.uniform(0.70, 0.98)
    correct = [rng.random() < p for _ in range(10)]
    for i in range(10):  # guarantee a clear majority of right annotators
        if sum(correct) >= MIN_CORRECT:
            break
        correct[i] = True
    raw = []
    for ok in correct:
        if not ok:
            raw.append(_wrong(answer, kind, rng))
        elif rng.random() < VARIANT_PROB:
            raw.append(_variant(answer, kind, rng))
        else:
            raw.append(answer)
    # Make the canonical string the strict mode, turning variants back into it if needed.
    for i, ok in enumerate(correct):
        counts = Counter(raw)
        if counts[answer] > max((c for a, c in counts.items() if a != answer), default=0):
            break
        if ok:
            raw[i] = answer
    out = []
    for i, (ok, text) in enumerate(zip(correct, raw)):
        weights = (0.85, 0.12, 0.03) if ok else (0.4, 0.4, 0.2)
        conf = rng.choices(("yes", "maybe", "no"), weights)[0]
        out.append({"answer": text, "answer_confidence": conf, "answer_id": i + 1})
    return out


def most_frequent(answers: list[dict]) -> str:
    """VQA's `multiple_choice_answer`: the most frequent raw answer (first seen wins ties)."""
    return Counter(a["answer"] for a in answers).most_common(1)[0][0]


SNLI_LABELS = ("entailment", "neutral", "contradiction")


def snli_labels(gold: str, rng: random.Random) -> list[str]:
    """Five annotator labels whose strict majority is `gold` (first = the author's, as in SNLI)."""
    agree = rng.choices((3, 4, 5), (0.2, 0.35, 0.45))[0]
    others = []
    for _ in range(5 - agree):
        if gold != "neutral" and rng.random() < 0.7:
            others.append("neutral")  # e/c disputes are mostly "can't tell"
        else:
            others.append(rng.choice([lab for lab in SNLI_LABELS if lab != gold]))
    rest = [gold] * (agree - 1) + others
    rng.shuffle(rest)
    return [gold] + rest
