"""SNLI-VE accuracy: overall / per gold label, and file scoring with exact coverage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cliptransfer.tasks.snli_ve.metric import (
    evaluate_snli_ve_files,
    read_snli_ve_jsonl,
    snli_ve_accuracy,
)

E, N, C = "entailment", "neutral", "contradiction"
GOLD = [E, E, N, C, C, C]
PRED = [E, N, N, C, E, C]  # correct: 1 0 1 1 0 1


def test_snli_ve_accuracy_by_hand() -> None:
    out = snli_ve_accuracy(GOLD, PRED)
    # overall 4/6 = 66.666... -> 66.67; entailment 1/2; neutral 1/1; contradiction 2/3 -> 66.67
    assert out == {
        "accuracy": 66.67,
        "per_label": {E: 50.0, N: 100.0, C: 66.67},
        "count": 6,
    }
    # a gold label that never occurs has no accuracy
    assert snli_ve_accuracy([E, E, E], [E, N, C])["per_label"] == {E: 33.33, N: None, C: None}


def test_snli_ve_accuracy_bad_input() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        snli_ve_accuracy([E, N, C], [E, N])
    with pytest.raises(ValueError, match="prediction 1: label 'yes'"):
        snli_ve_accuracy([E, N], [E, "yes"])
    with pytest.raises(ValueError, match="no examples"):
        snli_ve_accuracy([], [])


def _write_data(path: Path, gold: list[str]) -> list[str]:
    ids = [f"{1000 + i}.jpg#{i}r1{g[0]}" for i, g in enumerate(gold)]
    with path.open("w") as f:
        for i, (pid, g) in enumerate(zip(ids, gold)):
            # the widely distributed files use the misspelt "Flikr30kID" key
            rec = {"Flikr30kID": f"{1000 + i}.jpg", "gold_label": g, "pairID": pid,
                   "sentence2": "A dog runs."}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
        f.write("\n")  # trailing blank line is tolerated
    return ids


def test_evaluate_snli_ve_files(tmp_path: Path) -> None:
    data = tmp_path / "snli_ve_test.jsonl"
    ids = _write_data(data, GOLD)
    assert list(read_snli_ve_jsonl(data).values()) == GOLD
    res = tmp_path / "res.json"
    # results in a different order than the data: matched by pairID
    res.write_text(
        json.dumps([{"pairID": i, "label": p} for i, p in reversed(list(zip(ids, PRED)))])
    )
    assert evaluate_snli_ve_files(data, res) == snli_ve_accuracy(GOLD, PRED)

    res.write_text(json.dumps([{"pairID": i, "label": E} for i in ids[1:] + ["x#1", "y#2"]]))
    with pytest.raises(ValueError) as e:
        evaluate_snli_ve_files(data, res)
    msg = str(e.value)
    assert "res.json" in msg and f"1 missing: '{ids[0]}'" in msg and "2 extra" in msg

    res.write_text(json.dumps([{"pairID": i, "label": E} for i in ids + ids[:1]]))
    with pytest.raises(ValueError, match="1 duplicate pairID"):
        evaluate_snli_ve_files(data, res)
    res.write_text(json.dumps([{"pairID": ids[0]}]))
    with pytest.raises(ValueError, match=r"res\.json: record 0 needs 'pairID' and 'label'"):
        evaluate_snli_ve_files(data, res)
    res.write_text(json.dumps([{"pairID": ids[0], "label": "Entailment"}]))
    with pytest.raises(ValueError, match="record 0: label 'Entailment'"):
        evaluate_snli_ve_files(data, res)


def test_read_snli_ve_jsonl_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pairID": "a", "gold_label": "neutral"}\n{"pairID": "b", "gold_label": "-"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: gold_label '-'"):
        read_snli_ve_jsonl(bad)
    bad.write_text('{"pairID": "a", "gold_label": "neutral"}\n{"pairID": "b"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: invalid JSON"):
        read_snli_ve_jsonl(bad)
    bad.write_text('{"pairID": "a", "gold_label": "neutral"}\n{"gold_label": "neutral"}\n')
    with pytest.raises(ValueError, match="line 2: needs 'pairID'"):
        read_snli_ve_jsonl(bad)
    bad.write_text('{"pairID": "a", "gold_label": "neutral"}\n' * 2)
    with pytest.raises(ValueError, match="line 2: duplicate pairID 'a'"):
        read_snli_ve_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_snli_ve_jsonl(tmp_path / "missing.jsonl")
