"""SNLI-VE as a task of the engine: the image is the premise, `sentence2` the hypothesis; 3-way
cross-entropy, accuracy overall and per gold label, the best dev epoch scored once on test, the
majority train label as baseline."""

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
from cliptransfer.heads.question import QuestionConfig, build_question_tokenizer
from cliptransfer.tasks.common import VLDataConfig, VLTask, VLTaskConfig, markdown_table
from cliptransfer.tasks.snli_ve.data import (
    VEDataset,
    collate_ve,
    flickr_image_path,
    label_prior,
    load_snli_ve,
)
from cliptransfer.tasks.snli_ve.metric import (
    SNLI_VE_LABELS,
    evaluate_snli_ve_files,
    snli_ve_accuracy,
)
from cliptransfer.tasks.vl_model import load_best_model, read_meta, task_model
from cliptransfer.tasks.vqa.data import with_image_files

__all__ = ["VEConfig", "VETask", "load_trained"]

SHAPES_FILES = {
    "train": "snli_ve/snli_ve_train.jsonl",
    "val": "snli_ve/snli_ve_dev.jsonl",
    "test": "snli_ve/snli_ve_test.jsonl",
    "images": "flickr30k_images",
}


@dataclass
class DataConfig(VLDataConfig):
    # Real SNLI-VE JSONL files; all empty = the Shapes world's. `images`: flickr30k_images/.
    train: str = ""
    val: str = ""  # model selection (snli_ve_dev.jsonl)
    test: str = ""  # scored once with the best model; empty on real data: skipped


@dataclass
class VEConfig(VLTaskConfig):
    data: DataConfig = field(default_factory=DataConfig)
    text: QuestionConfig = field(
        default_factory=lambda: QuestionConfig(embed_dim=64, hidden=128, max_length=40)
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=100)
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(out_dir="runs/snli_ve", epochs=8, batch_size=64)
    )


def _data_files(d: DataConfig, world: Path | None) -> DataConfig:
    if world is None:
        missing = [k for k in ("train", "val") if not getattr(d, k)]
        if missing:
            raise ConfigError(f"real SNLI-VE data needs data.{', data.'.join(missing)} as well")
        return d
    return replace(d, **{k: getattr(d, k) or str(world / v) for k, v in SHAPES_FILES.items()})


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="snli_ve_*.jsonl with gold_label and pairID")
    p.add_argument("--results", required=True, help='[{"pairID", "label"}]')


def _shapes_corpus(world: Path) -> list[str]:
    return [e.hypothesis for e in load_snli_ve(world / SHAPES_FILES["train"]).examples]


@register_task(
    "snli-ve",
    config=VEConfig,
    launcher="tasks/snli_ve.py",
    configs=("configs/tasks/snli_ve_*.yaml",),
    compare=CompareColumns("accuracy", "per_label", SNLI_VE_LABELS, "majority-label prior"),
    evaluate=EvaluateCommand(
        "SNLI-VE accuracy overall and per label",
        _evaluate_args,
        lambda a: evaluate_snli_ve_files(a.data, a.results),
    ),
    text_corpus=_shapes_corpus,
)
class VETask(VLTask):
    tracker = "snli_ve"
    collate_fn = staticmethod(collate_ve)
    shapes_splits = ("flickr30k",)

    def uses_world(self) -> bool:
        return not self.cfg.data.train

    def load_splits(self, world: Path | None) -> dict[str, Any]:
        self.files = files = _data_files(self.cfg.data, world)
        splits = {"val": load_snli_ve(files.val)}
        if not self.eval_only:
            splits["train"] = load_snli_ve(files.train)
            if files.test:
                splits["test"] = load_snli_ve(files.test)
        return splits

    def image_files(self, splits: dict[str, Any]) -> tuple[dict[str, Any], dict[Any, Path]]:
        images, skip = self.files.images, self.cfg.data.skip_missing
        if not images:
            raise ConfigError("data.images (the flickr30k_images folder) is needed")
        return with_image_files(splits, lambda split, i: flickr_image_path(images, i),
                                f"image folder {images}", skip)  # fmt: skip

    def dataset(self, split: Any) -> VEDataset:
        return VEDataset(split, self.tokenizer, self.side.inputs)

    def num_outputs(self) -> int:
        return len(SNLI_VE_LABELS)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(model(batch).float(), batch["label"])}

    def score_results(self, split: str, got: dict[str, torch.Tensor]) -> tuple[list, dict | None]:
        data = self.splits[split]
        pairs = [data.examples[int(i)] for i in got["index"]]
        predicted = [SNLI_VE_LABELS[int(k)] for k in got["label"]]
        results = [{"pairID": e.pair_id, "label": p} for e, p in zip(pairs, predicted)]
        metrics = None
        if data.has_labels:  # every process scores the same gathered results
            metrics = snli_ve_accuracy([e.label for e in pairs], predicted)
        return results, metrics

    def record_ids(self, batch: dict[str, Any]) -> list[Any]:
        split = self.splits["train"]
        return [split.examples[int(i)].pair_id for i in batch["index"]]

    def score(self, metrics: dict) -> float:
        return metrics["accuracy"]

    def scalars(self, metrics: dict) -> dict[str, float]:
        present = {k: v for k, v in metrics["per_label"].items() if v is not None}
        return {"accuracy": metrics["accuracy"], **present}

    def meta(self) -> dict[str, Any]:
        return {"labels": list(SNLI_VE_LABELS)}

    def base_report(self) -> dict[str, Any]:
        report = {"task": "snli-ve", **super().base_report()}
        report["truncated_hypotheses"] = sum(d.truncated for d in self.datasets.values())
        if "train" in self.splits and self.splits["val"].has_labels:
            majority = label_prior(self.splits["train"].examples)
            gold = [e.label for e in self.splits["val"].examples]
            report["prior_label"] = majority
            report["prior"] = snli_ve_accuracy(gold, [majority] * len(gold))
        return report

    def report(self, result: Any) -> dict[str, Any]:
        report = super().report(result)
        if result is not None and "test" in self.splits:  # the best dev epoch, once on test
            best = self.run.accelerator.prepare(self.load_best())
            results, report["test"] = self.evaluate(best, "test")
            self.run.write_json("results_test.json", results)
        return report

    def print_report(self, report: dict) -> None:
        cfg = self.cfg
        if report.get("val") is None:
            print(f"no gold labels: predictions written to {self.run.out / 'results_val.json'}")
        else:
            name = f"{cfg.model.arch} ({cfg.mode}, {cfg.features.kind})"
            rows = [_row(f"{name}, dev", report["val"])]
            if report.get("test"):
                rows.append(_row(f"{name}, test", report["test"]))
            if report.get("prior"):
                rows.append(_row(f"majority label ({report['prior_label']}), dev", report["prior"]))
            print(markdown_table(["SNLI-VE accuracy", "overall", *SNLI_VE_LABELS], rows))
        print(f"skipped pairs: {report['skipped']}")
        self.print_footer(report)


def _row(name: str, m: dict) -> list:
    return [name, m["accuracy"], *(m["per_label"][k] for k in SNLI_VE_LABELS)]


def load_trained(folder: str | Path) -> tuple[VLModel, VEConfig, Any]:
    """(model, config, hypothesis tokenizer) of a `best/` folder, on CPU in eval mode."""
    folder = Path(folder)
    cfg = load_config(VEConfig, folder / "config.yaml")
    tok = build_question_tokenizer(cfg.text, folder / "tokenizer")
    model = task_model(cfg, read_meta(folder)["visual_dim"], len(SNLI_VE_LABELS), tok.vocab_size)
    return load_best_model(folder, model, cfg.peft).eval(), cfg, tok
