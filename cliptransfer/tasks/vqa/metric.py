"""VQA accuracy exactly as the official scorer, current and pre-2021 ("legacy") variants.

Reference: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``.

* current (GT-Vision-Lab/VQA master, the 2021 fix): GT answers and prediction get newline/tab
  -> space and strip; then, only if the GT answers are not all identical, both are normalised
  (punctuation, then digits/articles/contractions).
* legacy (e.g. commit c4e6a0e, vendored by LAVIS, LXMERT-era code): the prediction is always
  fully normalised; the GT answers get punctuation processing only, and only if not all identical.

Per question: for each of the N GT answers, ``min(1, matches among the other N-1 / 3)``, averaged,
so k matching annotators out of 10 give 0, .3, .6, .9, 1. Aggregates are means of the unrounded
per-question accuracies, x100, rounded to 2 decimals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cliptransfer.fileio import read_json

# Tables copied from the official vqaEval.py (ASCII-apostrophe version, 120 entries). Keys starting
# with a capital ("Im", "Ive", "Id've", "I'dve") can never match: lookup happens after lower().
# fmt: off
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# fmt: on
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# Note: no "'" (contractions keep their apostrophe), no ":" and no "." (handled by _PERIOD_STRIP).
# fmt: off
PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
    "?", "!",
)
# fmt: on
# The official "(?!<=\d)" is a negative *lookahead* for the literal "<=" + digit (a typo for the
# lookbehind "(?<!\d)"), so it never fires: every "." not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the ``count``
# argument, so at most int(re.UNICODE) == 32 periods are removed.
_PERIOD_MAX_SUBS = 32


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space-out punctuation, strip lone periods."""
    out = text
    # Conditions look at the *input* text, replacements accumulate on ``out`` (as in the official
    # code). A digit-comma-digit anywhere (e.g. "1,000") makes every punctuation char vanish,
    # including that comma, so "1,000" -> "1000" rather than "1 000".
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_MAX_SUBS)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words -> digits, drop articles,
    restore contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(ans: str) -> str:
    """The official full normalisation: whitespace cleanup, punctuation, digits/articles."""
    return process_digit_article(process_punctuation(_clean_whitespace(ans)))


def vqa_accuracy(gt_answers: Sequence[str], prediction: str, *, legacy: bool = False) -> float:
    """Accuracy of one prediction against its GT answers (usually 10), in [0, 1], unrounded."""
    if isinstance(gt_answers, str):
        raise TypeError("vqa_accuracy: gt_answers must be a sequence of strings, not one string")
    gts = list(gt_answers)
    if not gts:
        raise ValueError("vqa_accuracy: at least one ground-truth answer is required")
    if not isinstance(prediction, str) or not all(isinstance(a, str) for a in gts):
        raise TypeError("vqa_accuracy: answers and prediction must be strings")
    if legacy:
        pred = normalize_vqa_answer(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    else:
        gts = [_clean_whitespace(a) for a in gts]
        pred = _clean_whitespace(prediction)
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a)) for a in gts]
            pred = process_digit_article(process_punctuation(pred))
    n_match = sum(a == pred for a in gts)
    # For each GT answer, count the matches among the *other* answers (leave-one-out).
    accs = [min(1, float(n_match - (a == pred)) / 3) for a in gts]
    return float(sum(accs)) / len(accs)


# ----------------------------------------------------------------------------- file-level scoring


def _first(ids: Iterable[Any], n: int = 5) -> str:
    ids = sorted(ids, key=lambda x: (str(type(x)), x))
    more = f", ... ({len(ids) - n} more)" if len(ids) > n else ""
    return ", ".join(repr(i) for i in ids[:n]) + more


def check_exact_coverage(
    expected: Iterable[Any], given: Sequence[Any], *, source: str, reference: str, key: str
) -> None:
    """Raise ValueError unless ``given`` holds each id of ``expected`` exactly once."""
    seen: set[Any] = set()
    dups: set[Any] = set()
    for i in given:
        (dups if i in seen else seen).add(i)
    if dups:
        raise ValueError(f"{source}: {len(dups)} duplicate {key}(s): {_first(dups)}")
    want = set(expected)
    missing, extra = want - seen, seen - want
    if missing or extra:
        msg = f"{source}: results must cover exactly the {len(want)} {key}s of {reference}"
        if missing:
            msg += f"; {len(missing)} missing: {_first(missing)}"
        if extra:
            msg += f"; {len(extra)} extra (not in {reference}): {_first(extra)}"
        raise ValueError(msg)


def _records(obj: Any, field: str, source: str) -> list:
    if isinstance(obj, dict):
        if field not in obj:
            raise ValueError(f"{source}: expected a top-level {field!r} list")
        obj = obj[field]
    if not isinstance(obj, list):
        raise ValueError(f"{source}: expected a list of {field} records, got {type(obj).__name__}")
    return obj


def _field(rec: Any, name: str, types: type | tuple[type, ...], source: str, idx: int) -> Any:
    if not isinstance(rec, dict):
        raise ValueError(f"{source}: record {idx} is {type(rec).__name__}, expected an object")
    if name not in rec:
        raise ValueError(f"{source}: record {idx} has no {name!r} field")
    val = rec[name]
    # bool is an int subclass; a True question_id is certainly a bug.
    if not isinstance(val, types) or isinstance(val, bool):
        raise ValueError(f"{source}: record {idx}: {name!r} has type {type(val).__name__}")
    return val


def _parse_annotations(annotations: Any, source: str) -> dict[int, tuple[list[str], str, str]]:
    anns: dict[int, tuple[list[str], str, str]] = {}
    for i, rec in enumerate(_records(annotations, "annotations", source)):
        qid = _field(rec, "question_id", int, source, i)
        answers = _field(rec, "answers", list, source, i)
        if not answers:
            raise ValueError(f"{source}: record {i} (question_id {qid}) has no answers")
        texts = [
            _field(a, "answer", str, f"{source}: record {i} answers", j)
            for j, a in enumerate(answers)
        ]
        if qid in anns:
            raise ValueError(f"{source}: duplicate question_id {qid} (record {i})")
        qtype = _field(rec, "question_type", str, source, i)
        anns[qid] = (texts, qtype, _field(rec, "answer_type", str, source, i))
    if not anns:
        raise ValueError(f"{source}: no annotations")
    return anns


def _accuracy_dict(accs: list[float], qtypes: list[str], atypes: list[str]) -> dict:
    def mean_pct(vals: list[float]) -> float:
        # Same float expression as the official setAccuracy.
        return round(100 * float(sum(vals)) / len(vals), 2)

    by_q: dict[str, list[float]] = {}
    by_a: dict[str, list[float]] = {}
    for acc, q, a in zip(accs, qtypes, atypes):
        by_q.setdefault(q, []).append(acc)
        by_a.setdefault(a, []).append(acc)
    return {
        "overall": mean_pct(accs),
        "perQuestionType": {k: mean_pct(v) for k, v in by_q.items()},
        "perAnswerType": {k: mean_pct(v) for k, v in by_a.items()},
    }


def _evaluate(questions, annotations, results, legacy: bool, names: tuple[str, str, str]) -> dict:
    q_name, a_name, r_name = names
    anns = _parse_annotations(annotations, a_name)
    if questions is not None:
        qids = {
            _field(r, "question_id", int, q_name, i)
            for i, r in enumerate(_records(questions, "questions", q_name))
        }
        orphans = set(anns) - qids
        if orphans:
            raise ValueError(
                f"{q_name}: {len(orphans)} question_id(s) of {a_name} have no "
                f"question: {_first(orphans)} (questions/annotations files mismatch?)"
            )
    preds: dict[int, str] = {}
    order: list[int] = []
    for i, rec in enumerate(_records(results, "results", r_name)):
        qid = _field(rec, "question_id", int, r_name, i)
        preds[qid] = _field(rec, "answer", str, r_name, i)
        order.append(qid)
    check_exact_coverage(anns, order, source=r_name, reference=a_name, key="question_id")
    accs, qtypes, atypes = [], [], []
    for qid, (gts, qtype, atype) in anns.items():  # annotation order, as the official scorer
        accs.append(vqa_accuracy(gts, preds[qid], legacy=legacy))
        qtypes.append(qtype)
        atypes.append(atype)
    return _accuracy_dict(accs, qtypes, atypes)


def evaluate_vqa(
    questions: dict | list | None,
    annotations: dict | list,
    results: list[dict],
    *,
    legacy: bool = False,
) -> dict:
    """Official accuracy dict ``{"overall", "perQuestionType", "perAnswerType"}`` (percent).

    ``questions``/``annotations`` are the loaded VQA JSON files (or their record lists);
    ``results`` is the EvalAI list ``[{"question_id": int, "answer": str}]`` and must cover the
    annotation question ids exactly. ``questions`` may be None (only used as a consistency check).
    """
    return _evaluate(
        questions, annotations, results, legacy, ("questions", "annotations", "results")
    )


def evaluate_vqa_files(
    questions_path: str | Path | None,
    annotations_path: str | Path,
    results_path: str | Path,
    *,
    legacy: bool = False,
) -> dict:
    """:func:`evaluate_vqa` on files; errors name the offending file and record index, or the
    line and column (bad JSON) or line and byte offset (bytes that are not UTF-8)."""
    questions = None
    if questions_path is not None:
        questions = read_json(questions_path, what="VQA questions")
    annotations = read_json(annotations_path, what="VQA annotations")
    results = read_json(results_path, what="VQA results")
    names = (str(questions_path), str(annotations_path), str(results_path))
    return _evaluate(questions, annotations, results, legacy, names)
