"""VQA v2 as a task of the engine: soft-score BCE over the answer vocabulary, the official VQA
accuracy on val, the answer prior (most frequent train answer per question type) as baseline."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.config import ConfigError, load_config
from cliptransfer.engine.config import TrainConfig
from cliptransfer.engine.optim import OptimConfig
from cliptransfer.engine.task import CompareColumns, EvaluateCommand, register_task
from cliptransfer.heads.model import VLModel
from cliptransfer.heads.question import build_question_tokenizer
from cliptransfer.tasks.common import VLDataConfig, VLTask, VLTaskConfig, markdown_table
from cliptransfer.tasks.vl_model import load_best_model, read_meta, task_model
from cliptransfer.tasks.vqa.answers import (
    build_answer_vocab,
    load_answer_vocab,
    make_ans2label,
    save_answer_vocab,
)
from cliptransfer.tasks.vqa.data import (
    VQADataset,
    answer_prior,
    collate_vqa,
    load_vqa,
    prior_results,
    with_coco_images,
)
from cliptransfer.tasks.vqa.metric import evaluate_vqa, evaluate_vqa_files

__all__ = ["VQAConfig", "VQATask", "load_trained", "soft_bce"]

ANSWER_TYPES = ("yes/no", "number", "other")
SHAPES_FILES = {
    "train_questions": "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
    "train_annotations": "vqa/v2_mscoco_train2014_annotations.json",
    "val_questions": "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
    "val_annotations": "vqa/v2_mscoco_val2014_annotations.json",
    "images": "images",
}


@dataclass
class DataConfig(VLDataConfig):
    # Real VQA v2 files; all empty = the Shapes world's. `images`: the COCO root holding
    # train2014/, val2014/ (end2end / grid extraction).
    train_questions: str = ""
    train_annotations: str = ""
    val_questions: str = ""
    val_annotations: str = ""  # empty with val_questions set: predict only (e.g. test-dev)
    answer_vocab: str = ""  # ans2label.json or label2ans.json (LXMERT's); empty: from train
    min_answer_count: int = 9


@dataclass
class EvalConfig:
    legacy: bool = False  # the pre-2021 official scorer instead of the current one


@dataclass
class VQAConfig(VLTaskConfig):
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=100)
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(out_dir="runs/vqa", epochs=2, batch_size=64)
    )
    eval: EvalConfig = field(default_factory=EvalConfig)


def soft_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BUTD's loss: BCE-with-logits on soft scores, mean over the batch and summed over answers
    (the element mean x num_answers)."""
    return F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]


def _data_files(d: DataConfig, world: Path | None) -> DataConfig:
    """The run's files: the Shapes world's wherever `d` leaves them empty (a given val questions
    file keeps its own, possibly empty, annotations)."""
    if world is None:
        missing = [
            k
            for k in ("train_questions", "train_annotations", "val_questions")
            if not getattr(d, k)
        ]
        if missing:
            raise ConfigError(f"real VQA data needs data.{', data.'.join(missing)} as well")
        return d
    shapes = {k: str(world / v) for k, v in SHAPES_FILES.items()}
    if d.val_questions:
        shapes["val_annotations"] = ""
    return replace(d, **{k: getattr(d, k) or v for k, v in shapes.items()})


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--questions", help="v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument("--annotations", required=True, help="v2_mscoco_*_annotations.json")
    p.add_argument("--results", required=True, help='EvalAI results [{"question_id", "answer"}]')
    p.add_argument("--legacy", action="store_true", help="the pre-2021 scorer")


def _evaluate_files(a: argparse.Namespace) -> dict:
    return evaluate_vqa_files(a.questions, a.annotations, a.results, legacy=a.legacy)


def _shapes_corpus(world: Path) -> list[str]:
    from cliptransfer.fileio import read_json

    questions = read_json(world / SHAPES_FILES["train_questions"])
    annotations = read_json(world / SHAPES_FILES["train_annotations"])
    return [q["question"] for q in questions["questions"]] + sorted(
        {a["answer"] for q in annotations["annotations"] for a in q["answers"]}
    )


@register_task(
    "vqa",
    config=VQAConfig,
    launcher="tasks/vqa.py",
    configs=("configs/tasks/vqa_*.yaml",),
    compare=CompareColumns(
        "overall", "perAnswerType", ANSWER_TYPES, "answer prior (per question type)"
    ),
    evaluate=EvaluateCommand(
        "VQA accuracy exactly as the official GT-Vision-Lab scorer", _evaluate_args, _evaluate_files
    ),
    text_corpus=_shapes_corpus,
)
class VQATask(VLTask):
    tracker = "vqa"
    collate_fn = staticmethod(collate_vqa)
    id_key = "question_id"

    def uses_world(self) -> bool:
        return not self.cfg.data.train_questions

    def load_splits(self, world: Path | None) -> dict[str, Any]:
        cfg = self.cfg
        self.files = files = _data_files(cfg.data, world)
        skip = cfg.data.skip_missing
        train = load_vqa(files.train_questions, files.train_annotations, skip_missing=skip)
        val = load_vqa(files.val_questions, files.val_annotations or None, skip_missing=skip)
        if self.eval_only:
            answers = load_answer_vocab(Path(self.eval_only) / "answers.json")
        elif cfg.data.answer_vocab:
            answers = load_answer_vocab(cfg.data.answer_vocab)
        else:
            answers = build_answer_vocab(train.annotation_records, cfg.data.min_answer_count)
        if not answers:
            raise ValueError(
                f"{files.train_annotations}: no answer occurs >= data.min_answer_count="
                f"{cfg.data.min_answer_count} times; lower it or give data.answer_vocab"
            )
        self.answers, self.ans2label = answers, make_ans2label(answers)
        self.train_split = train  # the prior's source, also with --eval-only
        return {"val": val} if self.eval_only else {"train": train, "val": val}

    def image_files(self, splits: dict[str, Any]) -> tuple[dict[str, Any], dict[Any, Path]]:
        return with_coco_images(splits, self.files.images, self.cfg.data.skip_missing)

    def dataset(self, split: Any) -> VQADataset:
        return VQADataset(split, self.tokenizer, self.ans2label, self.side.inputs)

    def num_outputs(self) -> int:
        return len(self.answers)

    def output_names(self) -> list[str]:
        return list(self.answers)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": soft_bce(model(batch).float(), batch["target"])}

    def score_results(self, split: str, got: dict[str, torch.Tensor]) -> tuple[list, dict | None]:
        results = [
            {"question_id": int(q), "answer": self.answers[int(k)]}
            for q, k in zip(got["question_id"], got["label"])
        ]
        val = self.splits[split]
        metrics = None
        if val.has_answers:  # every process scores the same gathered results
            metrics = evaluate_vqa(
                None, val.annotation_records, results, legacy=self.cfg.eval.legacy
            )
        return results, metrics

    def score(self, metrics: dict) -> float:
        return metrics["overall"]

    def scalars(self, metrics: dict) -> dict[str, float]:
        return {"overall": metrics["overall"], **metrics["perAnswerType"]}

    def meta(self) -> dict[str, Any]:
        return {"num_answers": len(self.answers)}

    def best_files(self) -> dict[str, Any]:
        return {"answers.json": lambda p: save_answer_vocab(self.answers, p)}

    def base_report(self) -> dict[str, Any]:
        report = super().base_report()
        val_ds, train_ds = self.datasets["val"], self.datasets.get("train")
        report.update(
            answers=len(self.answers),
            truncated_questions=val_ds.truncated + (train_ds.truncated if train_ds else 0),
            vocab_coverage={"val": val_ds.coverage}
            | ({"train": train_ds.coverage} if train_ds else {}),
        )
        val = self.splits["val"]
        if val.has_answers:
            prior = prior_results(val.examples, answer_prior(self.train_split.examples))
            report["prior"] = evaluate_vqa(
                None, val.annotation_records, prior, legacy=self.cfg.eval.legacy
            )
        return report

    def print_report(self, report: dict) -> None:
        out = self.run.out
        metrics, prior = report["val"], report.get("prior")
        if metrics is None:
            print(f"no val annotations: predictions written to {out / 'results_val.json'}")
        else:
            cfg = self.cfg
            rows = [_accuracy_row(f"{cfg.model.arch} ({cfg.mode}, {cfg.features.kind})", metrics)]
            if prior is not None:
                rows.append(_accuracy_row("answer prior (per question type)", prior))
            print(markdown_table(["VQA accuracy", "overall", *ANSWER_TYPES], rows))
        oov = {
            k: f"{100 * v['oov_fraction']:.1f}%" for k, v in report["vocab_coverage"].items() if v
        }
        print(f"answers outside the {report['answers']}-answer vocabulary: {oov}; "
              f"skipped questions: {report['skipped']}")  # fmt: skip
        self.print_footer(report)


def _accuracy_row(name: str, m: dict) -> list:
    return [name, m["overall"], *(m["perAnswerType"].get(t) for t in ANSWER_TYPES)]


def load_trained(folder: str | Path) -> tuple[VLModel, VQAConfig, list[str], Any]:
    """(model, config, answers, question tokenizer) of a `best/` folder, on CPU in eval mode."""
    folder = Path(folder)
    cfg = load_config(VQAConfig, folder / "config.yaml")
    answers = load_answer_vocab(folder / "answers.json")
    q_tok = build_question_tokenizer(cfg.text, folder / "tokenizer")
    model = task_model(cfg, read_meta(folder)["visual_dim"], len(answers), q_tok.vocab_size)
    return load_best_model(folder, model, cfg.peft).eval(), cfg, answers, q_tok
