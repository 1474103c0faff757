"""What the vision-and-language transfer tasks share (VQA, SNLI-VE; the V&L-pretrained heads next):
the config base, the image side, the model with its PEFT adapters, the best-model folder,
`--eval-only`, and the report. A task adds its data, loss, metric and report rows.

One model interface for both modes: `head(features (B, N, C), mask (B, N), text_ids (B, L),
text_mask (B, L), spatial (B, N, 4)) -> logits (B, K)`, over a feature store (features mode) or
the CLIP image tower's grid of the pixels (end2end).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cliptransfer.adapters import AdapterConfig
from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.config import ConfigError, to_dict
from cliptransfer.engine.batches import steps_per_epoch
from cliptransfer.engine.config import RunConfig
from cliptransfer.engine.evaluation import peak_memory, predict
from cliptransfer.engine.loop import FitResult
from cliptransfer.engine.optim import BackboneOptimConfig, OptimizerSpec, adamw_spec, sgd_step_spec
from cliptransfer.engine.run import save_run_config
from cliptransfer.engine.task import EvalOnlyTask
from cliptransfer.heads.model import HeadConfig, shapes_head
from cliptransfer.heads.question import QuestionConfig, build_question_tokenizer
from cliptransfer.tasks.vl_model import (
    check_tuning,
    load_best_model,
    lr_scales,
    run_model,
    save_best_dir,
    task_model,
)
from cliptransfer.visual.side import FeatureConfig, ImageSide, image_side
from cliptransfer.worlds.config import WorldConfig, prepare_world

__all__ = ["VLDataConfig", "VLTask", "VLTaskConfig", "markdown_table"]


@dataclass
class VLDataConfig:
    images: str = ""  # the image folder (end2end / grid extraction)
    skip_missing: bool = False  # skip (and count) examples whose image/features are missing
    num_workers: int = 0


@dataclass
class VLTaskConfig(RunConfig):
    world: WorldConfig = field(default_factory=WorldConfig)
    data: VLDataConfig = field(default_factory=VLDataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # "default" (packaged small CLIP), a checkpoint path, or an arch name (random init, seed 0)
    backbone: str = "default"
    mode: Literal["features", "end2end"] = "features"
    tuning: TuningConfig = field(default_factory=TuningConfig)  # end2end: lock_image or full
    backbone_lr_scale: float = 0.1  # end2end: the backbone's lr is this times optim.lr
    # end2end: the backbone in the head's AdamW (default) or in its own SGD (CLIP-ViL_p)
    backbone_optim: BackboneOptimConfig = field(default_factory=BackboneOptimConfig)
    # PEFT adapters: on the backbone (end2end) or the fusion head (features); see adapters.py
    peft: AdapterConfig = field(default_factory=AdapterConfig)
    text: QuestionConfig = field(default_factory=lambda: QuestionConfig(embed_dim=64, hidden=128))
    model: HeadConfig = field(default_factory=shapes_head)


class VLTask(EvalOnlyTask):
    """A head over image features and a sentence, trained on `splits["train"]`, selected on
    `splits["val"]`. Subclasses implement `load_splits`, `image_files`, `dataset`,
    `num_outputs`, `training_step`, `score_results`, `prior` and `print_report`."""

    collate_fn: ClassVar[Any]  # the task's collate function
    id_key: ClassVar[str] = "index"  # the batch key that identifies predictions
    shapes_splits: ClassVar[tuple[str, ...]] = ("train2014", "val2014")  # BottomUp on Shapes

    @classmethod
    def apply_arguments(cls, cfg: VLTaskConfig, args: argparse.Namespace) -> None:
        check_tuning(cfg.mode, cfg.tuning, cfg.peft)
        if cfg.backbone_optim.kind == "sgd" and (
            cfg.mode != "end2end" or cfg.peft.method != "none" or cfg.tuning.lock_image
        ):
            raise ConfigError(
                "backbone_optim.kind=sgd trains a fully fine-tuned backbone: it needs "
                "mode=end2end, peft.method=none and tuning.lock_image=false"
            )
        super().apply_arguments(cfg, args)

    # ---- what a task adds
    def load_splits(self, world: Path | None) -> dict[str, Any]:
        """{"train", "val", ...} splits (only "val" with --eval-only) of the run's files."""
        raise NotImplementedError

    def image_files(self, splits: dict[str, Any]) -> tuple[dict[str, Any], dict[Any, Path]]:
        """(splits without examples whose image is missing, image id -> file) for grid
        extraction and end2end."""
        raise NotImplementedError

    def dataset(self, split: Any) -> Dataset:
        raise NotImplementedError

    def num_outputs(self) -> int:
        raise NotImplementedError

    def score_results(self, split: str, got: dict[str, torch.Tensor]) -> tuple[list, dict | None]:
        """(results file rows, metrics or None) from the gathered predictions of `split`."""
        raise NotImplementedError

    # A task with its own head (V&L pretraining) sets this to a method building it; None =
    # the registered `model.arch`.
    build_head: Callable[[], nn.Module] | None = None

    def output_names(self) -> list[str] | None:
        """Names of the head's outputs that a V&L-pretrained QA head may share (VQA answers)."""
        return None

    def init_head(self, model: nn.Module) -> None:
        """`model.init_from`: the vlbert head starts from a pretrain/vl.py final/ folder."""
        folder = self.cfg.model.init_from
        if not folder:
            return
        if self.cfg.model.arch != "vlbert":
            raise ConfigError(
                f"model.init_from needs model.arch=vlbert, got {self.cfg.model.arch!r}"
            )
        from cliptransfer.vlp.transfer import load_pretrained_head

        got = load_pretrained_head(model.head, folder, self.output_names())
        self.run.print(f"vlbert initialised from {folder}: {got['loaded']} tensors, "
                       f"{got['answers_shared']} answers from its QA head")  # fmt: skip

    def best_files(self) -> dict[str, Any]:
        """Extra files of best/ beside model, config, tokenizer and meta."""
        return {}

    def meta(self) -> dict[str, Any]:
        return {}

    # ---- the shared part
    @property
    def num_workers(self) -> int:
        return self.cfg.data.num_workers

    def uses_world(self) -> bool:
        """True when the run reads the embedded Shapes world (no real data files given)."""
        raise NotImplementedError

    def setup(self) -> None:
        cfg, run = self.cfg, self.run
        self.started = time.monotonic()
        self.world = None
        if self.uses_world():
            with run.accelerator.main_process_first():
                self.world = prepare_world(cfg.world)
        splits = self.load_splits(self.world)
        paths: dict[Any, Path] = {}
        if cfg.mode == "end2end" or (cfg.features.kind == "clip-grid" and not cfg.features.store):
            splits, paths = self.image_files(splits)
        cache = cfg.features.cache_dir or (
            self.world / "features" if self.world else run.out / "features"
        )
        needed = sorted({i for split in splits.values() for i in split.image_ids()})
        self.side: ImageSide = image_side(
            run.accelerator, cfg.features, cfg.mode, cfg.backbone, cfg.tuning, paths, cache,
            self.world, needed, shapes_splits=self.shapes_splits,
        )  # fmt: skip
        from cliptransfer.tasks.vqa.data import check_available

        skip = cfg.data.skip_missing
        self.splits = {
            name: check_available(split, self.side.available, self.side.where, skip, "missing_features")
            for name, split in splits.items()
        }  # fmt: skip
        self.tokenizer = build_question_tokenizer(cfg.text)
        self.datasets = {name: self.dataset(split) for name, split in self.splits.items()}
        self.train_data = self.datasets.get("train")
        self.collate = type(self).collate_fn
        self.model = run_model(
            run.accelerator, cfg, self.side, self.num_outputs(), self.tokenizer.vocab_size,
            self.eval_only, self.build_head, self.init_head,
        )  # fmt: skip
        if not self.eval_only:
            save_run_config(run)
        self.loaders = {
            name: run.accelerator.prepare(
                DataLoader(
                    ds,
                    batch_size=cfg.train.eval_batch_size,
                    collate_fn=self.collate,
                    num_workers=cfg.data.num_workers,
                )  # fmt: skip
            )
            for name, ds in self.datasets.items()
            if name != "train"
        }

    def lr_scales(self) -> dict[str, float]:
        return lr_scales(self.cfg)

    def optimizers(self, model: nn.Module, total_steps: int) -> list[OptimizerSpec]:
        """AdamW over the model; with `backbone_optim.kind=sgd`, AdamW over the head and an SGD
        with step decay over the backbone (stepped together, checkpointed as optimizer-1.pt)."""
        bo = self.cfg.backbone_optim
        if bo.kind != "sgd":
            return super().optimizers(model, total_steps)
        per_epoch = steps_per_epoch(len(self.train_data), self.cfg.train.batch_size, self.drop_last)
        every = bo.decay_every_epochs * per_epoch if bo.decay_every_epochs else total_steps + 1
        return [
            adamw_spec(model, self.cfg.optim, total_steps, exclude="backbone."),
            sgd_step_spec(model.backbone, bo.lr, momentum=bo.momentum,
                          weight_decay=bo.weight_decay, step_every=every, gamma=bo.gamma,
                          name="backbone_sgd"),
        ]  # fmt: skip

    def evaluate(self, model: nn.Module, split: str) -> tuple[list, dict | None]:
        got = predict(
            self.run.accelerator,
            model,
            self.loaders[split],
            lambda m, b: {self.id_key: b[self.id_key], "label": m(b).argmax(-1)},
        )
        return self.score_results(split, got)

    def save_model(self, folder: Path, model: nn.Module, **meta: Any) -> None:
        """A model folder (best/, V&L pretraining's final/): weights (+ adapter/), config.yaml,
        tokenizer/, meta.json (`meta` added) and the task's `best_files`."""
        meta = {"visual_dim": self.side.dim, **self.meta(), "features": self.side.info, **meta}
        files = {
            "config.yaml": yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
            "tokenizer": self.tokenizer.save,
            "meta.json": meta,
            **self.best_files(),
        }
        save_best_dir(folder, model, self.cfg.peft, files)

    def save_best(self, folder: Path, model: nn.Module, best: dict, results: Any) -> None:
        self.save_model(folder, model, epoch=best["epoch"], step=best["step"], val=best["val"])
        self.run.write_json("results_val.json", results)

    def load_best(self) -> nn.Module:
        """The model of best/ (after training; every process waits for the main one's write)."""
        self.run.accelerator.wait_for_everyone()
        head = self.build_head() if self.build_head else None
        fresh = task_model(self.cfg, self.side.dim, self.num_outputs(), self.tokenizer.vocab_size,
                           head=head)  # fmt: skip
        return load_best_model(self.run.out / "best", fresh, self.cfg.peft)

    # ---- reports
    def base_report(self) -> dict[str, Any]:
        return {
            "mode": self.cfg.mode,
            "model": self.cfg.model.arch,
            "features": self.side.info,
            "skipped": {name: s.skipped for name, s in self.splits.items()},
        }

    def evaluate_only(self) -> dict[str, Any]:
        """--eval-only: score / predict val with the saved model."""
        model = self.run.accelerator.prepare(self.model)
        results, metrics = self.evaluate(model, "val")
        self.run.write_json("results_val.json", results)
        return {**self.report(None), "evaluated": str(self.eval_only), "val": metrics}

    def report(self, result: FitResult | None) -> dict[str, Any]:
        report = self.base_report()
        if result is not None:
            report.update(result.report())
        return report

    def print_footer(self, report: dict[str, Any]) -> None:
        """The report's last lines: training speed and memory, the files this run wrote."""
        if report.get("train_samples_per_s"):
            mem = report["peak_memory"]
            print(f"training: {report['train_samples_per_s']:.0f} samples/s, peak memory "
                  f"{mem['mib']:.0f} MiB ({mem['kind']})")  # fmt: skip
        print(f"written by this run: {', '.join(str(p) for p in dict.fromkeys(self.run.written))}")

    def finish_report(self, report: dict[str, Any]) -> dict[str, Any]:
        report.update(peak_memory=peak_memory(self.run.accelerator.device),
                      seconds=time.monotonic() - self.started)  # fmt: skip
        return report


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
