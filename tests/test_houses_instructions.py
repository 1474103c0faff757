"""Instruction realisation of the Shapes houses in en-US, en-IN, hi-IN and te-IN
(worlds/houses/instructions.py): worked examples, every template, errors."""

from __future__ import annotations

import itertools
import random

import pytest

from cliptransfer.worlds.houses.instructions import (
    COLORS,
    LANGUAGES,
    ROOM_TYPES,
    SHAPES,
    Ref,
    Step,
    landmark_words,
    noun_phrase,
    realize,
    turn_words,
)

PLAN = [
    Step("walk_toward", Ref("star", "red")),
    Step("turn_at", Ref(None, "blue"), direction="left"),
    Step("enter", room="kitchen"),
    Step("stop_near", Ref("square", None, True)),
]


def test_worked_example_in_every_language():
    got = {lang: realize(PLAN, lang, random.Random(0)) for lang in LANGUAGES}
    assert got == {
        "en-US": "Head to the red star and at the blue shape, turn left. Go into the kitchen. "
        "Wait in front of the striped square.",
        "en-IN": "Walk towards the red star. Near the blue one, take left, then go inside the "
        "kitchen, then stand near the striped square.",
        "hi-IN": "लाल तारे की तरफ़ जाइए और नीली आकृति पर पहुँचकर बाएँ मुड़िए। रसोई में जाइए। "
        "धारीदार वर्ग के सामने रुक जाइए।",
        "te-IN": "ఎర్రని నక్షత్రం వైపు వెళ్ళండి, ఆపై నీలి ఆకారం దగ్గరకు వచ్చాక ఎడమ వైపుకు "
        "తిరగండి. వంటగదిలోకి వెళ్ళండి. చారల చతురస్రం ముందు ఆగండి.",
    }


def test_hindi_oblique_and_agreement():
    assert noun_phrase(Ref("star", "yellow"), "hi-IN") == "पीले तारे"
    assert noun_phrase(Ref("star", "yellow"), "hi-IN", oblique=False) == "पीला तारा"
    assert noun_phrase(Ref("diamond", "green", True), "hi-IN") == "हरे धारीदार हीरे"
    assert noun_phrase(Ref(None, "green"), "hi-IN") == "हरी आकृति"  # feminine noun
    assert noun_phrase(Ref("circle", "red"), "hi-IN") == "लाल वृत्त"


def test_every_template_realises_and_names_what_it_mentions():
    refs = [Ref(s, c, st) for s, c, st in itertools.product(SHAPES, COLORS, (False, True))]
    refs += [Ref(None, c) for c in COLORS] + [Ref(s, None) for s in SHAPES]
    for lang in LANGUAGES:
        words = landmark_words(lang)
        for seed in range(6):  # several draws reach every paraphrase
            rng = random.Random(seed)
            for ref in refs:
                for d in ("left", "right", "around"):
                    plan = [Step("walk_past", ref), Step("turn", direction=d),
                            Step("turn_at", ref, direction=d), Step("go_straight"),
                            Step("walk_toward", ref), Step("stop_near", ref)]  # fmt: skip
                    text = realize(plan, lang, rng)
                    assert noun_phrase(ref, lang) in text and "  " not in text
                    assert any(w in text for w in words)
                    assert any(w in text for w in turn_words(lang))
            for room in ROOM_TYPES:
                text = realize([Step("enter", room=room), Step("stop_in", room=room)], lang, rng)
                assert text.endswith("।" if lang == "hi-IN" else ".")
    assert realize(PLAN, "en-US", random.Random(5)) == realize(PLAN, "en-US", random.Random(5))


@pytest.mark.parametrize(
    ("plan", "language", "match"),
    [
        (PLAN, "fr-FR", "unknown language 'fr-FR'"),
        ([Step("fly")], "en-US", "unknown step kind 'fly'"),
        ([Step("walk_toward", Ref("hexagon", "red"))], "en-US", "unknown shape 'hexagon'"),
        ([Step("walk_toward", Ref("star", "pink"))], "hi-IN", "unknown colour 'pink'"),
        ([Step("enter", room="garage")], "te-IN", "unknown room 'garage'"),
        ([Step("turn", direction="up")], "en-IN", "unknown turn direction 'up'"),
        ([Step("walk_toward")], "en-US", "needs a landmark reference"),
    ],
)
def test_errors_name_the_bad_value(plan, language, match):
    with pytest.raises(ValueError, match=match):
        realize(plan, language, random.Random(0))


def test_turn_around_at_a_landmark_reads_well():
    step = Step("turn_at", Ref("star", "red"), direction="around")
    for lang in LANGUAGES:
        for seed in range(20):
            text = realize([step, Step("stop_near", Ref("star", "red"))], lang, random.Random(seed))
            assert "take a around" not in text and "take around" not in text
