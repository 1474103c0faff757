"""Navigation instructions of the Shapes houses, realised from a plan in four RxR locales:
en-US, en-IN (Indian English phrasing), hi-IN (Devanagari Hindi) and te-IN (Telugu script).

Grammar. A plan is a list of `Step`s ending in a stop step; each step becomes one clause, picked
among paraphrases with the caller's `random.Random`, and clauses are joined with ", then" /
". " / " and " (Hindi "फिर", Telugu "తర్వాత"). Step kinds (English templates):

    walk_toward  "walk toward {the X}"            "head to {the X}"          en-IN "go straight till {the X}"
    walk_past    "walk past {the X}"              "go past {the X}"          en-IN "cross {the X}"
    turn         "turn {left|right|around}"       "make a {left|right}"      en-IN "take a {left|right}"
    turn_at      "turn {dir} at {the X}"          "at {the X}, turn {dir}"   en-IN "take a {dir} near {the X}"
    enter        "go into the {room}"             "enter the {room}"
    go_straight  "go straight"                    "keep walking forward"
    stop_near    "stop next to {the X}"           "wait in front of {the X}" en-IN "stop near {the X}"
    stop_in      "stop in the {room}"             "wait once you are in the {room}"

{the X} is a referring expression: colour + shape ("the red star"), the colour alone ("the red
shape") or the shape alone ("the star"), optionally "striped". Hindi uses the oblique case before
postpositions (all six shape nouns are masculine: तारा -> तारे की ओर, adjectives in -ा inflect:
पीला -> पीले) and polite imperatives (चलिए, मुड़िए, रुकिए); Telugu uses adjectival colour forms
(ఎర్రని, నీలి ...), postpositions (వైపు, దగ్గర, దాటి, లోకి) and polite imperatives (నడవండి).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["LANGUAGES", "ROOM_TYPES", "STEP_KINDS", "Ref", "Step", "landmark_words",
           "noun_phrase", "realize", "turn_words"]  # fmt: skip

LANGUAGES = ("en-US", "en-IN", "hi-IN", "te-IN")
ROOM_TYPES = ("kitchen", "bedroom", "bathroom", "living room", "hallway", "office")
STEP_KINDS = ("walk_toward", "walk_past", "turn", "turn_at", "enter", "go_straight", "stop_near",
              "stop_in")  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "gray", "white")


@dataclass(frozen=True)
class Ref:
    """A referring expression for a landmark; None = not mentioned."""

    shape: str | None
    color: str | None
    striped: bool = False


@dataclass(frozen=True)
class Step:
    kind: str
    ref: Ref | None = None
    room: str | None = None
    direction: str | None = None  # "left" | "right" | "around"


# Hindi: (direct, oblique) forms. Shapes are all masculine nouns.
_HI_SHAPE = {"circle": ("वृत्त", "वृत्त"), "square": ("वर्ग", "वर्ग"), "triangle": ("त्रिभुज", "त्रिभुज"),
             "star": ("तारा", "तारे"), "diamond": ("हीरा", "हीरे"), "cross": ("क्रॉस", "क्रॉस")}  # fmt: skip
_HI_COLOR = {"red": ("लाल", "लाल"), "orange": ("नारंगी", "नारंगी"), "yellow": ("पीला", "पीले"),
             "green": ("हरा", "हरे"), "blue": ("नीला", "नीले"), "purple": ("बैंगनी", "बैंगनी"),
             "gray": ("स्लेटी", "स्लेटी"), "white": ("सफ़ेद", "सफ़ेद")}  # fmt: skip
_HI_ROOM = {"kitchen": "रसोई", "bedroom": "शयनकक्ष", "bathroom": "स्नानघर", "living room": "बैठक",
            "hallway": "गलियारे", "office": "दफ़्तर"}  # oblique forms: they always take में  # fmt: skip
_HI_DIR = {"left": "बाएँ", "right": "दाएँ", "around": "पीछे"}
_TE_SHAPE = {"circle": "వృత్తం", "square": "చతురస్రం", "triangle": "త్రిభుజం", "star": "నక్షత్రం",
             "diamond": "వజ్రం", "cross": "క్రాస్"}  # fmt: skip
_TE_COLOR = {"red": "ఎర్రని", "orange": "నారింజ రంగు", "yellow": "పసుపు రంగు", "green": "ఆకుపచ్చని",
             "blue": "నీలి", "purple": "ఊదా రంగు", "gray": "బూడిద రంగు", "white": "తెల్లని"}  # fmt: skip
_TE_ROOM = {"kitchen": "వంటగది", "bedroom": "పడకగది", "bathroom": "స్నానాలగది", "living room": "హాలు",
            "hallway": "వరండా", "office": "ఆఫీసు గది"}  # fmt: skip
_TE_DIR = {"left": "ఎడమ వైపుకు", "right": "కుడి వైపుకు", "around": "వెనక్కి"}

_EN = {
    "walk_toward": ["walk toward {x}", "head to {x}", "walk up to {x}"],
    "walk_past": ["walk past {x}", "go past {x}", "continue past {x}"],
    "turn": ["turn {d}", "make a {d}", "turn to your {d}"],
    "turn_around": ["turn around", "turn back", "make a u-turn"],
    "turn_at": ["turn {d} at {x}", "at {x}, turn {d}", "turn {d} when you reach {x}"],
    "enter": ["go into the {r}", "enter the {r}", "walk into the {r}"],
    "go_straight": ["go straight", "keep walking forward", "walk straight ahead"],
    "stop_near": ["stop next to {x}", "wait in front of {x}", "stop when you reach {x}"],
    "stop_in": ["stop in the {r}", "wait once you are in the {r}", "stop inside the {r}"],
}
_EN_IN = {
    "walk_toward": ["go straight till {x}", "walk towards {x}", "move towards {x}"],
    "walk_past": ["cross {x}", "go ahead after {x}", "walk past {x}"],
    "turn": ["take a {d}", "take {d}", "turn to the {d} side"],
    "turn_around": ["turn back", "take a u-turn"],
    "turn_at": ["take a {d} near {x}", "near {x}, take {d}", "turn {d} at {x}"],
    "turn_at_around": ["take a u-turn near {x}", "near {x}, turn back", "turn around at {x}"],
    "enter": ["go inside the {r}", "enter into the {r}"],
    "go_straight": ["go straight", "move straight", "go straight ahead"],
    "stop_near": ["stop near {x}", "stand near {x}", "you have to stop near {x}"],
    "stop_in": ["stop in the {r}", "stand inside the {r}", "you have to stop in the {r}"],
}
_HI = {
    "walk_toward": ["{x} की ओर चलिए", "{x} की तरफ़ जाइए"],
    "walk_past": ["{x} के आगे से निकलिए", "{x} को पार कीजिए"],
    "turn": ["{d} मुड़िए", "{d} हाथ की ओर मुड़ जाइए"],
    "turn_around": ["पीछे मुड़िए", "पीछे की ओर घूम जाइए"],
    "turn_at": ["{x} के पास {d} मुड़िए", "{x} पर पहुँचकर {d} मुड़िए"],
    "enter": ["{r} में जाइए", "{r} के अंदर चलिए"],
    "go_straight": ["सीधे चलिए", "सीधे आगे बढ़िए"],
    "stop_near": ["{x} के पास रुकिए", "{x} के सामने रुक जाइए"],
    "stop_in": ["{r} में रुकिए", "{r} में पहुँचकर रुक जाइए"],
}
_TE = {
    "walk_toward": ["{x} వైపు నడవండి", "{x} వైపు వెళ్ళండి"],
    "walk_past": ["{x} దాటి వెళ్ళండి", "{x} దాటి ముందుకు నడవండి"],
    "turn": ["{d} తిరగండి", "{d} మలుపు తీసుకోండి"],
    "turn_around": ["వెనక్కి తిరగండి", "వెనక్కి తిరిగి నడవండి"],
    "turn_at": ["{x} దగ్గర {d} తిరగండి", "{x} దగ్గరకు వచ్చాక {d} తిరగండి"],
    "enter": ["{r}లోకి వెళ్ళండి", "{r}లోకి ప్రవేశించండి"],
    "go_straight": ["నేరుగా నడవండి", "ముందుకు నేరుగా వెళ్ళండి"],
    "stop_near": ["{x} దగ్గర ఆగండి", "{x} ముందు ఆగండి"],
    "stop_in": ["{r}లో ఆగండి", "{r}లోకి చేరుకుని ఆగండి"],
}
_TEMPLATES = {"en-US": _EN, "en-IN": _EN_IN, "hi-IN": _HI, "te-IN": _TE}
_JOIN = {"en-US": [", then ", ". ", " and "], "en-IN": [" and ", ", then ", ". "],
         "hi-IN": [", फिर ", "। ", " और "], "te-IN": [", తర్వాత ", ". ", ", ఆపై "]}  # fmt: skip
_END = {"en-US": ".", "en-IN": ".", "hi-IN": "।", "te-IN": "."}


def _check(language: str) -> None:
    if language not in _TEMPLATES:
        raise ValueError(f"unknown language {language!r}; choose one of {LANGUAGES}")


def _check_ref(ref: Ref) -> None:
    if ref.shape is not None and ref.shape not in SHAPES:
        raise ValueError(f"unknown shape {ref.shape!r}")
    if ref.color is not None and ref.color not in COLORS:
        raise ValueError(f"unknown colour {ref.color!r}")
    if ref.shape is None and ref.color is None:
        raise ValueError("a landmark reference needs a shape or a colour")


def noun_phrase(ref: Ref, language: str, oblique: bool = True) -> str:
    """The landmark's noun phrase; Hindi in the oblique case (it always precedes a
    postposition in these templates) unless `oblique=False`."""
    _check(language)
    _check_ref(ref)
    if language.startswith("en"):
        words = ["striped"] if ref.striped else []
        words += [ref.color] if ref.color else []
        words += [ref.shape or ("one" if language == "en-IN" else "shape")]
        return "the " + " ".join(words)
    if language == "hi-IN":
        k = 1 if oblique else 0
        color = _HI_COLOR[ref.color][k] if ref.color else None
        if color and ref.shape is None and color[-1] in "ाे":  # आकृति is feminine: पीली, नीली
            color = color[:-1] + "ी"
        words = [color] if color else []
        words += ["धारीदार"] if ref.striped else []
        words += [_HI_SHAPE[ref.shape][k] if ref.shape else "आकृति"]
        return " ".join(words)
    words = ["చారల"] if ref.striped else []
    words += [_TE_COLOR[ref.color]] if ref.color else []
    words += [_TE_SHAPE[ref.shape] if ref.shape else "ఆకారం"]
    return " ".join(words)


def _room(room: str | None, language: str) -> str:
    if room not in ROOM_TYPES:
        raise ValueError(f"unknown room {room!r}")
    return {"hi-IN": _HI_ROOM, "te-IN": _TE_ROOM}.get(language, {}).get(room, room)


def _clause(step: Step, language: str, rng: random.Random) -> str:
    if step.kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {step.kind!r}")
    table = _TEMPLATES[language]
    key = step.kind
    if key in ("turn", "turn_at"):
        if step.direction not in ("left", "right", "around"):
            raise ValueError(f"unknown turn direction {step.direction!r}")
        # own templates for "around" where "{d}" would read "take a around"
        if step.direction == "around" and f"{key}_around" in table:
            key = f"{key}_around"
    fields = {}
    if "{x}" in "".join(table[key]):
        if step.ref is None:
            raise ValueError(f"step {step.kind} needs a landmark reference")
        fields["x"] = noun_phrase(step.ref, language)
    if "{r}" in "".join(table[key]):
        fields["r"] = _room(step.room, language)
    if step.direction:
        d = step.direction
        fields["d"] = {"hi-IN": _HI_DIR, "te-IN": _TE_DIR}.get(language, {}).get(d, d)
        if language.startswith("en") and d == "around":
            fields["d"] = "around"
    return rng.choice(table[key]).format(**fields)


def realize(plan: list[Step], language: str, rng: random.Random) -> str:
    """One instruction for the plan in `language`, paraphrases and joins drawn from `rng`."""
    _check(language)
    if not plan:
        raise ValueError("an empty plan")
    clauses = [_clause(s, language, rng) for s in plan]
    text = clauses[0]
    for clause in clauses[1:]:
        joint = rng.choice(_JOIN[language])
        if language.startswith("en") and joint == ". ":
            clause = clause[0].upper() + clause[1:]
        text += joint + clause
    if language.startswith("en"):
        text = text[0].upper() + text[1:]
    return text + _END[language]


def turn_words(language: str) -> set[str]:
    """Words that carry the turns and 'straight' in `language`."""
    _check(language)
    if language.startswith("en"):
        return {"left", "right", "around", "back", "u-turn", "straight", "forward"}
    if language == "hi-IN":
        return {"बाएँ", "दाएँ", "पीछे", "सीधे"}
    return {"ఎడమ", "కుడి", "వెనక్కి", "నేరుగా"}


def landmark_words(language: str) -> set[str]:
    """The shape and colour words of `language` (Hindi: every case and gender used)."""
    _check(language)
    if language.startswith("en"):
        return set(SHAPES) | set(COLORS) | {"striped"}
    if language == "hi-IN":
        shapes = {w for pair in _HI_SHAPE.values() for w in pair}
        colors = {w for pair in _HI_COLOR.values() for w in pair}
        feminine = {w[:-1] + "ी" for w in colors if w[-1] in "ाे"}  # with आकृति
        return shapes | colors | feminine | {"धारीदार"}
    return set(_TE_SHAPE.values()) | set(_TE_COLOR.values()) | {"చారల"}
