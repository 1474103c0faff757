"""The sampling rules of LXMERT / CLIP-ViL_p's pretraining objectives (airsplay/lxmert
src/pretrain/lxmert_data.py and lxmert_pretrain.py), as plain functions of a seeded `random.Random`
so a dataset item is a pure function of (seed, epoch, index).

- MLM: `cliptransfer.contrastive.losses.declip.mask_tokens` (15 %, 80/10/10, optional whole-word),
  loss on masked positions only (`mlm_loss`).
- ITM: with probability 0.5 the sentence is replaced by one of *another image* (LXMERT drew a
  random sentence from the whole corpus, which can come from the same image: never here).
- Word-swap negatives (beyond LXMERT, as NegCLIP's attribute swaps): an ITM negative may instead
  be the image's own sentence with one word of a group (colours, shapes, ...) replaced by another
  of the group, so that only the image, not the sentence's style, tells it from the truth.
- QA: on matched pairs only, the target is one answer of the question's table, drawn with
  probability proportional to its soft score among the answers the QA table knows.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

__all__ = [
    "IGNORE",
    "itm_sentence",
    "other_image_index",
    "parse_word_groups",
    "sample_answer",
    "swap_word",
]

IGNORE = -100  # the ignore label of every objective (torch's cross-entropy default)


def other_image_index(image_of: Sequence[str], i: int, rng: random.Random) -> int:
    """A uniformly drawn index j with `image_of[j] != image_of[i]`."""
    n = len(image_of)
    for _ in range(32):  # rejection: almost always done on the first draw
        j = rng.randrange(n)
        if image_of[j] != image_of[i]:
            return j
    others = [j for j in range(n) if image_of[j] != image_of[i]]
    if not others:
        raise ValueError(f"ITM needs sentences of at least two images; all are of {image_of[i]!r}")
    return others[rng.randrange(len(others))]


def itm_sentence(
    image_of: Sequence[str], i: int, rng: random.Random, p_mismatch: float = 0.5
) -> tuple[int, bool]:
    """(index of the sentence to pair with item i's image, whether it is i's own): i itself with
    probability 1 - p_mismatch, else a sentence of another image."""
    if rng.random() < p_mismatch:
        return other_image_index(image_of, i, rng), False
    return i, True


def parse_word_groups(spec: str) -> tuple[tuple[str, ...], ...]:
    """'red,blue,green;circle,square' -> (('red', 'blue', 'green'), ('circle', 'square'))."""
    groups = tuple(
        tuple(w.strip().lower() for w in g.split(",") if w.strip()) for g in spec.split(";")
    )
    groups = tuple(g for g in groups if g)
    for g in groups:
        if len(g) < 2:
            raise ValueError(f"word group {g!r}: a swap needs at least two words")
    return groups


def swap_word(text: str, groups: Sequence[Sequence[str]], rng: random.Random) -> str | None:
    """`text` with one word that belongs to a group replaced by another word of that group (the
    position uniformly among such words, the new word uniformly among the rest of its group);
    None when no word of `text` is in a group. Case-insensitive; trailing punctuation is kept."""
    words = text.split(" ")
    spots = []
    for k, word in enumerate(words):
        core = word.rstrip(".,;:!?").lower()
        spots += [(k, core, g) for g in groups if core in g]
    if not spots:
        return None
    k, core, group = spots[rng.randrange(len(spots))]
    suffix = words[k][len(core) :]
    words[k] = rng.choice([w for w in group if w != core]) + suffix
    return " ".join(words)


def sample_answer(label: Mapping[str, float] | None, ans2label: Mapping[str, int],
                  rng: random.Random) -> int:  # fmt: skip
    """The QA target of one question: an answer of `label` that `ans2label` knows, drawn with
    probability score / (sum of those scores); IGNORE when none is known or all score 0."""
    known = [(ans2label[a], s) for a, s in (label or {}).items() if a in ans2label and s > 0]
    total = sum(s for _, s in known)
    if total <= 0:
        return IGNORE
    r = rng.random() * total
    for index, score in known:
        r -= score
        if r < 0:
            return index
    return known[-1][0]  # r == total up to rounding
