"""The `cliptransfer` console script, called in-process through `main(argv)`."""

from __future__ import annotations

import json

from cliptransfer.cli import main
from cliptransfer.models import create_clip


def test_prepare_shapes_is_idempotent(tiny_world, capsys):
    assert main(["prepare", "shapes", "--out", str(tiny_world), "--size", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["images/train2014"] > 0


def test_tokenizer_train_and_info(tiny_world, tmp_path, capsys):
    out = tmp_path / "tok"
    args = ["--input", str(tiny_world / "captions.txt"), "--vocab-size", "60", "--out", str(out)]
    assert main(["tokenizer", "train", *args, "--context-length", "24"]) == 0
    assert "context_length=24" in capsys.readouterr().out
    assert (out / "tokenizer.model").is_file()

    create_clip("ViT-tiny").save_pretrained(tmp_path / "clip")
    assert main(["info", str(tmp_path / "clip")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["vision"]["kind"] == "vit" and info["params"] > 0


def test_evaluate_vqa_on_world_and_bad_results(tiny_world, tmp_path, capsys):
    q = tiny_world / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = tiny_world / "vqa" / "v2_mscoco_val2014_annotations.json"
    anns = json.loads(a.read_text())["annotations"]
    results = [{"question_id": x["question_id"], "answer": "yes"} for x in anns]
    r = tmp_path / "results.json"
    r.write_text(json.dumps(results))
    assert (
        main(
            ["evaluate", "vqa", "--questions", str(q), "--annotations", str(a), "--results", str(r)]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"overall", "perQuestionType", "perAnswerType"}
    assert scores["perAnswerType"]["number"] < 5  # "yes" answers a count only by annotator error
    assert scores["perAnswerType"]["yes/no"] > 30
    r.write_text(json.dumps(results[1:]))  # one question left out
    assert main(["evaluate", "vqa", "--annotations", str(a), "--results", str(r)]) == 2
    err = capsys.readouterr().err
    assert str(r) in err and str(anns[0]["question_id"]) in err


def test_unknown_size_is_a_clean_error(tmp_path, capsys):
    assert main(["prepare", "shapes", "--out", str(tmp_path / "w"), "--size", "huge"]) == 2
    assert "huge" in capsys.readouterr().err
