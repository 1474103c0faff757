"""cliptransfer.fileio: strict JSON writes and JSON / JSON Lines reads whose errors name the place."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cliptransfer.fileio import JSONFileError, iter_jsonl, read_json, write_json


def _strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, as jq or JavaScript would."""

    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_is_strict_and_nulls_non_finite_floats_at_any_depth(tmp_path: Path) -> None:
    obj = {
        "a": [1.5, float("nan"), (float("inf"), {"b": -math.inf})],
        "c": "nan",
        "d": {"e": [[float("-inf")]], "f": 0.0},
        "g": 3,
    }
    path = tmp_path / "sub" / "m.json"
    write_json(path, obj, indent=None)
    assert path.read_text() == (
        '{"a":[1.5,null,[null,{"b":null}]],"c":"nan","d":{"e":[[null]],"f":0.0},"g":3}\n'
    )
    assert math.isnan(obj["a"][1])  # the caller's object is left as it was
    write_json(path, obj)  # default: indent 2
    text = path.read_text()
    assert text.startswith('{\n  "a": [\n    1.5,\n    null,\n') and text.endswith("}\n")
    assert _strict_loads(text) == {
        "a": [1.5, None, [None, {"b": None}]],
        "c": "nan",
        "d": {"e": [[None]], "f": 0.0},
        "g": 3,
    }
    assert read_json(path) == _strict_loads(text)
    write_json(path, {"b": 1, "a": 2}, indent=1, sort_keys=True)
    assert path.read_text() == '{\n "a": 2,\n "b": 1\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp file left


def test_read_json_errors_name_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"a": 1,\n "b" 2}\n')
    with pytest.raises(JSONFileError) as e:
        read_json(path)
    assert str(e.value) == f"{path}: invalid JSON (Expecting ':' delimiter at line 2, column 6)"
    assert (e.value.line, e.value.column, e.value.offset) == (2, 6, None)
    with pytest.raises(JSONFileError) as e:
        read_json(path, what="VQA results")
    assert str(e.value) == (
        f"{path}: invalid JSON in VQA results file (Expecting ':' delimiter at line 2, column 6)"
    )
    with pytest.raises(FileNotFoundError) as e:
        read_json(tmp_path / "nope.json", what="VQA results")
    assert str(e.value) == f"VQA results file not found: {tmp_path / 'nope.json'}"


def test_read_json_bad_utf8_names_line_and_file_offset(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    # line 1 "{\n" = 2 bytes, line 2 '  "a": 1,\n' = 10 bytes, line 3 '  "b": "x' = 9 bytes before
    # the bad byte: file offset 2 + 10 + 9 = 21.
    path.write_bytes(b'{\n  "a": 1,\n  "b": "x\xffy"\n}\n')
    with pytest.raises(JSONFileError) as e:
        read_json(path)
    assert str(e.value) == (
        f"{path}: line 3: invalid UTF-8 byte(s) ff at byte offset 21 (invalid start byte)"
    )
    assert isinstance(e.value, ValueError)
    assert (e.value.line, e.value.column, e.value.offset) == (3, None, 21)


def test_iter_jsonl_skips_blank_lines_and_numbers_records_by_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n["é", 2]\r\n"x"\n')  # no newline needed at the end either
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, ["é", 2]), (5, "x")]
    path.write_text("")
    assert list(iter_jsonl(path)) == []


def test_iter_jsonl_errors_name_file_line_column_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2\n')
    with pytest.raises(JSONFileError) as e:
        list(iter_jsonl(path))
    assert str(e.value) == f"{path}: line 3: invalid JSON (Expecting ',' delimiter at column 8)"
    # line 1 '{"a": 1}\n' = 9 bytes, line 2 "\n" = 1, line 3 '{"b": "' = 7 and "é" = 2 bytes
    # before the bad byte: file offset 9 + 1 + 7 + 2 = 19 (a character count would say 18).
    path.write_bytes(b'{"a": 1}\n\n{"b": "\xc3\xa9\xff"}\n{"c": 3}\n')
    records = iter_jsonl(path)
    assert next(records) == (1, {"a": 1})  # lines before the bad one stream out first
    with pytest.raises(JSONFileError) as e:
        next(records)
    assert str(e.value) == (
        f"{path}: line 3: invalid UTF-8 byte(s) ff at byte offset 19 (invalid start byte)"
    )
    assert (e.value.line, e.value.offset) == (3, 19)
    # A multi-byte sequence cut short by the newline: both bytes shown, offset of the first.
    path.write_bytes(b'"ok"\n"\xe2\x82\n')
    with pytest.raises(JSONFileError) as e:
        list(iter_jsonl(path))
    assert str(e.value) == (
        f"{path}: line 2: invalid UTF-8 byte(s) e2 82 at byte offset 6 (invalid continuation byte)"
    )
    with pytest.raises(FileNotFoundError) as e:
        list(iter_jsonl(tmp_path / "nope.jsonl"))
    assert str(e.value) == f"file not found: {tmp_path / 'nope.jsonl'}"
