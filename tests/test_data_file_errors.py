"""Task data and results files with bytes that are not UTF-8: a ValueError naming file, line and
byte offset (not a bare UnicodeDecodeError with a position inside some decoder chunk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cliptransfer.cli import main
from cliptransfer.tasks.snli_ve.data import SNLIVEDataError, load_snli_ve
from cliptransfer.tasks.snli_ve.metric import evaluate_snli_ve_files, read_snli_ve_jsonl
from cliptransfer.tasks.vqa.data import load_vqa
from cliptransfer.tasks.vqa.metric import evaluate_vqa_files

QUESTIONS = {
    "questions": [
        {"question_id": q, "image_id": 10 * q, "question": "What colour is it?"} for q in (1, 2)
    ]
}
ANNOTATIONS = {
    "annotations": [
        {
            "question_id": q,
            "image_id": 10 * q,
            "question_type": "what color is the",
            "answer_type": "other",
            "multiple_choice_answer": "red",
            "answers": [{"answer": "red", "answer_id": k + 1} for k in range(10)],
        }
        for q in (1, 2)
    ]
}
RESULTS = [{"question_id": q, "answer": "red"} for q in (1, 2)]
PAIRS = [
    {"Flikr30kID": f"{i}.jpg", "sentence2": "a red square", "gold_label": "entailment",
     "pairID": f"{i}.jpg#0r1e"}
    for i in (1, 2, 3, 4)
]  # fmt: skip
LABELS = [{"pairID": p["pairID"], "label": "entailment"} for p in PAIRS]


def _write(path: Path, text: str, bad_line: int | None = None) -> int | None:
    """Write `text` as UTF-8; with `bad_line`, put byte 0xff in the middle of that line and
    return its offset in the file (the lengths of the lines before it + its place in the line)."""
    lines = text.encode("utf-8").splitlines(keepends=True)
    if bad_line is None:
        path.write_bytes(b"".join(lines))
        return None
    line = lines[bad_line - 1]
    col = len(line) // 2
    lines[bad_line - 1] = line[:col] + b"\xff" + line[col:]
    path.write_bytes(b"".join(lines))
    return sum(len(b) for b in lines[: bad_line - 1]) + col


def _message(path: Path, line: int, offset: int) -> str:
    return f"{path}: line {line}: invalid UTF-8 byte(s) ff at byte offset {offset}"


@pytest.fixture()
def vqa(tmp_path: Path) -> dict[str, Path]:
    files = {"q": QUESTIONS, "a": ANNOTATIONS, "r": RESULTS}
    paths = {k: tmp_path / f"{k}.json" for k in files}
    for k, obj in files.items():
        _write(paths[k], json.dumps(obj, indent=1))
    return paths


@pytest.mark.parametrize("which", ["q", "a"])
def test_load_vqa_names_file_line_and_offset(vqa: dict[str, Path], which: str) -> None:
    assert [q.question_id for q in load_vqa(vqa["q"], vqa["a"]).examples] == [1, 2]
    obj = QUESTIONS if which == "q" else ANNOTATIONS
    offset = _write(vqa[which], json.dumps(obj, indent=1), bad_line=3)
    with pytest.raises(ValueError) as e:
        load_vqa(vqa["q"], vqa["a"])
    assert _message(vqa[which], 3, offset) in str(e.value)


@pytest.mark.parametrize("which", ["q", "a", "r"])
def test_evaluate_vqa_files_names_file_line_and_offset(vqa: dict[str, Path], which: str) -> None:
    assert evaluate_vqa_files(vqa["q"], vqa["a"], vqa["r"])["overall"] == 100.0
    obj = {"q": QUESTIONS, "a": ANNOTATIONS, "r": RESULTS}[which]
    offset = _write(vqa[which], json.dumps(obj, indent=1), bad_line=3)
    with pytest.raises(ValueError) as e:
        evaluate_vqa_files(vqa["q"], vqa["a"], vqa["r"])
    assert _message(vqa[which], 3, offset) in str(e.value)


def test_snli_ve_jsonl_names_file_line_and_offset(tmp_path: Path) -> None:
    data = tmp_path / "snli_ve_dev.jsonl"
    text = "".join(json.dumps(p) + "\n" for p in PAIRS)
    _write(data, text)
    assert len(load_snli_ve(data)) == 4 and len(read_snli_ve_jsonl(data)) == 4
    offset = _write(data, text, bad_line=3)
    # lines 1 and 2 are the same length: the bad byte sits 2 lines + half a line into the file
    assert offset == 2 * len(json.dumps(PAIRS[0]) + "\n") + (len(json.dumps(PAIRS[2])) + 1) // 2
    with pytest.raises(SNLIVEDataError) as e:
        load_snli_ve(data)
    assert _message(data, 3, offset) in str(e.value)
    with pytest.raises(ValueError) as e:
        read_snli_ve_jsonl(data)
    assert _message(data, 3, offset) in str(e.value)


def test_snli_ve_results_names_file_line_and_offset(tmp_path: Path) -> None:
    data, results = tmp_path / "snli_ve_dev.jsonl", tmp_path / "results.json"
    _write(data, "".join(json.dumps(p) + "\n" for p in PAIRS))
    _write(results, json.dumps(LABELS, indent=1))
    assert evaluate_snli_ve_files(data, results)["accuracy"] == 100.0
    offset = _write(results, json.dumps(LABELS, indent=1), bad_line=3)
    with pytest.raises(ValueError) as e:
        evaluate_snli_ve_files(data, results)
    assert _message(results, 3, offset) in str(e.value)


def test_cli_prints_the_place_not_a_traceback(tmp_path: Path, vqa: dict[str, Path], capsys):
    offset = _write(vqa["r"], json.dumps(RESULTS, indent=1), bad_line=3)
    args = ["--annotations", str(vqa["a"]), "--results", str(vqa["r"])]
    assert main(["evaluate", "vqa", *args]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cliptransfer evaluate: error: {_message(vqa['r'], 3, offset)} (invalid start byte)\n"
    )
