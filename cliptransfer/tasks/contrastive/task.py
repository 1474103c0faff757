"""Contrastive pretraining (CLIP, SLIP, DeCLIP, FILIP, DeFILIP, SigLIP) as a task of the engine.

The loss graph (`cliptransfer.contrastive.objectives`) returns every enabled term and their
weighted sum; the engine logs them all. Data: the Shapes world's pairs by default, or the user's
JSONL / CSV / webdataset shards / `datasets` folder. After training the CLIP is evaluated once
(zero-shot and retrieval, next to its random initialisation) and exported as a plain CLIP.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

from cliptransfer import adapters
from cliptransfer.adapters import AdapterConfig
from cliptransfer.clip import create_clip, load_clip
from cliptransfer.clip.evaluation import ClassifySet, RetrievalSet, evaluate_clip
from cliptransfer.clip.tuning import TuningConfig, apply_tuning, export_clip
from cliptransfer.contrastive.data import PairDataConfig, PairDataset, collate_pairs
from cliptransfer.contrastive.objectives import (
    ContrastiveModel,
    LossConfig,
    clamp_logit_scales_,
    needs_second_view,
)
from cliptransfer.contrastive.pairs import add_caption_noise, load_pairs
from cliptransfer.contrastive.reference import needs_masked_caption, needs_third_view
from cliptransfer.defaults import resolve_tokenizer
from cliptransfer.engine.config import RunConfig, TrainConfig
from cliptransfer.engine.evaluation import peak_memory
from cliptransfer.engine.optim import OptimConfig, OptimizerSpec, adamw_spec, trainable_summary
from cliptransfer.engine.run import save_run_config
from cliptransfer.engine.task import Task, register_task
from cliptransfer.fileio import atomic_save_dir
from cliptransfer.worlds.config import WorldConfig, prepare_world

__all__ = ["ContrastiveTask", "PretrainConfig", "build_clip", "check_bad_fraction"]


@dataclass
class ModelConfig:
    arch: str = "RN-tiny"
    init: str | None = None  # start from a checkpoint (OpenAI/open_clip file, HF or own folder)
    # Field overrides of the architecture, e.g. --set model.text.layers=4 (the CLIP-benchmark
    # "curtailed text encoder" knob) or --set model.vision.width=16.
    vision: dict[str, int | list[int]] = field(default_factory=dict)
    text: dict[str, int] = field(default_factory=dict)
    embed_dim: int | None = None  # the joint embedding width (None: the architecture's)
    quick_gelu: bool | None = None


@dataclass
class PretrainTrainConfig(TrainConfig):
    out_dir: str = "runs/pretrain"
    batch_size: int = 64
    epochs: int = 5
    log_every: int = 10
    keep_last: int = 2
    eval_max_images: int = 500
    tokenizer: str = "shapes"  # "shapes" (packaged) or a tokenizer folder
    # The benchmarked fast path (bench/contrastive_step.py): channels_last ResNet towers, text
    # padding after the batch's last EOT trimmed (equal within 1e-5, not bitwise), fused AdamW.
    fast_kernels: bool = False


@dataclass
class PretrainConfig(RunConfig):
    world: WorldConfig = field(default_factory=WorldConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)  # lock_image / lock_text
    # PEFT adapters on the CLIP towers (the loss terms' heads train in full), merged into final/
    peft: AdapterConfig = field(
        default_factory=lambda: AdapterConfig(scope="backbone", towers=["image", "text"])
    )
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)


def build_clip(cfg: PretrainConfig, vocab_size: int, context_length: int) -> nn.Module:
    if cfg.model.init:
        return load_clip(cfg.model.init)
    text = {"vocab_size": vocab_size, "context_length": context_length, **cfg.model.text}
    extra: dict[str, Any] = (
        {} if cfg.model.quick_gelu is None else {"quick_gelu": cfg.model.quick_gelu}
    )
    if cfg.model.vision:
        extra["vision"] = dict(cfg.model.vision)
    if cfg.model.embed_dim is not None:
        extra["embed_dim"] = cfg.model.embed_dim
    return create_clip(cfg.model.arch, text=text, **extra)


def check_bad_fraction(skipped: int, seen: int, limit: float, examples: list[str]) -> None:
    if seen >= 100 and skipped / seen > limit:
        raise RuntimeError(
            f"{skipped} of {seen} records were unreadable (> data.max_bad_fraction={limit}); "
            f"first ones: {'; '.join(examples)}"
        )


@register_task("contrastive", config=PretrainConfig, launcher="pretrain/contrastive.py",
               configs=("configs/pretrain/*.yaml",))  # fmt: skip
class ContrastiveTask(Task):
    tracker = "pretrain"
    drop_last = True  # cross-rank gathers need equal batches
    evaluate_every_epoch = False

    @property
    def num_workers(self) -> int:
        return self.cfg.data.num_workers

    def setup(self) -> None:
        cfg, run = self.cfg, self.run
        self.started = time.monotonic()
        world = None
        if not cfg.data.train or not cfg.data.val:
            with run.accelerator.main_process_first():
                world = prepare_world(cfg.world)
        # The world's pair files hold paths relative to the world root; a user's are relative
        # to the pairs file (or data.image_root).
        root = str(world) if world else None
        train = load_pairs(cfg.data.train or world / "pairs" / "train.jsonl",
                           cfg.data.image_root or (None if cfg.data.train else root))  # fmt: skip
        val = load_pairs(cfg.data.val or world / "pairs" / "val.jsonl",
                         cfg.data.image_root or (None if cfg.data.val else root))  # fmt: skip
        train, self.noise = add_caption_noise(train, cfg.data.caption_noise, cfg.train.seed)
        if self.noise["noisy"]:
            run.print(f"caption noise: {self.noise}")
        self.tokenizer = tokenizer = resolve_tokenizer(cfg.train.tokenizer)

        # ---- model + the heads of the enabled loss terms, tuning policy (lock / LoRA)
        set_seed(cfg.train.seed)
        base = ContrastiveModel(
            build_clip(cfg, tokenizer.vocab_size, tokenizer.context_length), cfg.loss
        )
        apply_tuning(base.clip, cfg.tuning)
        if cfg.train.fast_kernels:
            base.clip.trim_text_padding = True
            if base.clip.config.vision.kind == "resnet":
                base.clip.visual.to(memory_format=torch.channels_last)
        model: nn.Module = base
        if cfg.peft.method != "none":
            model, targets = adapters.wrap(base, cfg.peft, backbone_prefix="clip")
            run.print(f"PEFT {cfg.peft.method} (r={cfg.peft.r}) on {len(targets)} modules of the "
                      f"{' and '.join(cfg.peft.towers)} tower(s)")  # fmt: skip
        trainable, total = trainable_summary(model)
        run.print(f"model {cfg.model.arch}: {total:,} params, {trainable:,} trainable "
                  f"({100 * trainable / total:.2f}%); loss terms {base.weights}")  # fmt: skip
        tokenizer.context_length = base.clip.context_length
        self.image_size = base.clip.image_size
        cfg.data.second_view = cfg.data.second_view or needs_second_view(base.weights)
        cfg.data.text_aug = cfg.data.text_aug or "mvs" in base.weights
        cfg.data.third_view = cfg.data.third_view or needs_third_view(cfg.loss, base.weights)
        if needs_masked_caption(cfg.loss, base.weights) and cfg.data.mlm_prob == 0:
            cfg.data.mlm_prob = 0.15
        cfg.data.image.size = cfg.data.view.size = self.image_size
        save_run_config(run)
        self.model = model
        self.train_data = PairDataset(train, tokenizer, cfg.data, seed=cfg.train.seed)
        self.collate = collate_pairs
        self.eval_sets = (
            RetrievalSet.from_records(val, cfg.train.eval_max_images),
            ClassifySet.from_folder(cfg.data.classify)
            if cfg.data.classify
            else ClassifySet.from_folder(world / "classify")
            if world and not cfg.data.val
            else None,
        )
        self.bad = {"skipped": 0, "truncated": 0}
        self.bad_examples: list[str] = []
        self.seen = 0
        self.initial: dict | None = None

    def fused_optimizer(self) -> bool:
        return self.cfg.train.fast_kernels

    def optimizers(self, model: nn.Module, total_steps: int) -> list[OptimizerSpec]:
        # The pretraining recipe warms up for exactly optim.warmup_steps, however short the run.
        return [
            adamw_spec(
                model, self.cfg.optim, total_steps, fused=self.fused_optimizer(), cap_warmup=False
            )
        ]

    def _evaluate_clip(self, model: nn.Module) -> dict[str, Any]:
        clip = self.run.accelerator.unwrap_model(model).clip
        return evaluate_clip(
            self.run.accelerator, clip, self.tokenizer, *self.eval_sets, self.image_size
        )

    def on_start(self, model: nn.Module, resumed: bool) -> None:
        if not resumed:
            self.initial = self._evaluate_clip(model)
            self.run.print(f"random-init eval: {_headline(self.initial)}")

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.bad["truncated"] += int(batch.pop("truncated").sum())
        skipped = batch.pop("skipped")
        self.bad["skipped"] += len(skipped)
        self.bad_examples += skipped[: max(0, 5 - len(self.bad_examples))]
        self.seen += batch["image"].shape[0] * self.run.accelerator.num_processes
        return model(batch)

    def after_step(self, model: nn.Module) -> None:
        clamp_logit_scales_(model, self.cfg.loss)
        check_bad_fraction(
            self.bad["skipped"], self.seen, self.cfg.data.max_bad_fraction, self.bad_examples
        )

    def train_scalars(self, model: nn.Module) -> dict[str, float]:
        scalars = {"logit_scale": model.clip.logit_scale.exp().item()}
        dense = getattr(model, "logit_scale_dense", None)  # FILIP's own, recipe=reference
        if dense is not None:
            scalars["logit_scale_dense"] = dense.exp().item()
        return scalars

    def evaluate(self, model: nn.Module, split: str) -> tuple[None, dict]:
        return None, self._evaluate_clip(model)

    def score(self, metrics: dict) -> float:
        return metrics.get("retrieval", {}).get("mean_recall", 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {**self.bad, "seen": self.seen, "initial_eval": self.initial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad = {"skipped": state.get("skipped", 0), "truncated": state.get("truncated", 0)}
        self.seen = state.get("seen", 0)
        self.initial = state.get("initial_eval")

    def report(self, result: Any) -> dict[str, Any]:
        if self.run.is_main:
            model = self.run.accelerator.unwrap_model(self.model)
            if self.cfg.peft.method != "none":  # fold the adapters into a copy of the weights
                model = adapters.merge(copy.deepcopy(model))
            clip = model.clip
            final = self.run.out / "final"
            atomic_save_dir(export_clip(clip).save_pretrained, final)
            self.tokenizer.save(final / "tokenizer")
        return {"steps": result.steps, "samples_seen": result.samples_seen,
                "random_init": self.initial, "trained": result.final, **self.bad,
                "train_samples_per_s": result.train_samples_per_s,
                "caption_noise": self.noise}  # fmt: skip

    def finish_report(self, report: dict[str, Any]) -> dict[str, Any]:
        # Training cost next to the scores (`cliptransfer benchmark` reads both).
        report.update(peak_memory=peak_memory(self.run.accelerator.device),
                      seconds=time.monotonic() - self.started)  # fmt: skip
        return report

    def print_report(self, report: dict) -> None:
        print(_comparison_table(report["random_init"], report["trained"]))
        print(f"skipped records: {report['skipped']}, truncated captions: {report['truncated']}")
        print(f"model written to {Path(self.run.out) / 'final'}")


def _headline(ev: dict) -> dict:
    out = {}
    if "retrieval" in ev:
        out["retrieval_mean_R"] = round(ev["retrieval"]["mean_recall"], 2)
    for task, acc in ev.get("zeroshot", {}).items():
        out[f"zeroshot_{task}_top1"] = round(acc["top1"], 2)
    return out


def _comparison_table(initial: dict, final: dict) -> str:
    rows = ["| metric | random init | trained |", "|---|---:|---:|"]
    for key in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_R@5", "mean_recall"):
        if key in final.get("retrieval", {}):
            rows.append(f"| retrieval {key} | {initial['retrieval'][key]:.2f} | "
                        f"{final['retrieval'][key]:.2f} |")  # fmt: skip
    for task in final.get("zeroshot", {}):
        rows.append(f"| zero-shot {task} top1 | {initial['zeroshot'][task]['top1']:.2f} | "
                    f"{final['zeroshot'][task]['top1']:.2f} |")  # fmt: skip
    return "\n".join(rows)
