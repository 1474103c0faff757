"""VQA v2 transfer of a CLIP backbone (CLIP-ViL's "direct fine-tuning" setting), through Accelerate.

With no arguments it prepares the Shapes world (if needed), extracts the packaged tiny CLIP's grid
features into a cached feature store, trains a small MCAN head, scores it on val with
the official VQA metric and prints it next to the answer prior (most frequent train answer per
question type):

    accelerate launch tasks/vqa.py
    python tasks/vqa.py                                            # the same, one process
    accelerate launch --multi_gpu --num_processes 2 tasks/vqa.py --cpu --set train.num_threads=1
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_topdown.yaml       # BUTD top-down
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_bottomup.yaml      # BUTD regions
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_end2end_lora.yaml  # pixels + LoRA
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_v2_rn50.yaml \
        --set data.train_questions=/data/vqa/v2_OpenEnded_mscoco_train2014_questions.json \
        --set data.train_annotations=/data/vqa/v2_mscoco_train2014_annotations.json \
        --set data.val_questions=/data/vqa/v2_OpenEnded_mscoco_val2014_questions.json \
        --set data.val_annotations=/data/vqa/v2_mscoco_val2014_annotations.json \
        --set features.store=/data/features/rn50-grid-600x1000 --set train.out_dir=runs/vqa-rn50
    python tasks/vqa.py --eval-only runs/vqa/best --set train.out_dir=runs/vqa-testdev \
        --set data.val_questions=/data/vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json \
        --set data.val_annotations=                                # predictions for EvalAI only

(`accelerate launch --cpu --num_processes 2` starts a single process; use --multi_gpu as above.)

The run folder gets config.yaml, TensorBoard logs, checkpoints/ (resume with --resume latest),
best/ (the best epoch's model.safetensors, config.yaml, answers.json, tokenizer/, meta.json:
reload with `load_trained`), results_val.json (EvalAI format) and metrics.json.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from cliptransfer.adapters import AdapterConfig
from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.config import ConfigError, load_config, save_config, to_dict
from cliptransfer.engine.finetune import TaskHooks, fit, start_run
from cliptransfer.engine.optim import OptimConfig
from cliptransfer.heads.model import HeadConfig, VLModel, shapes_head
from cliptransfer.heads.question import QuestionConfig, build_question_tokenizer
from cliptransfer.tasks.common import (
    FeatureConfig,
    TaskTrainConfig,
    WorldConfig,
    image_side,
    markdown_table,
    peak_memory,
    predict,
    prepare_world,
    write_json,
)
from cliptransfer.tasks.vl_model import (
    load_best_model,
    lr_scales,
    run_model,
    save_best_dir,
    task_model,
)
from cliptransfer.tasks.vqa.answers import (
    build_answer_vocab,
    load_answer_vocab,
    make_ans2label,
    save_answer_vocab,
)
from cliptransfer.tasks.vqa.data import (
    VQADataset,
    answer_prior,
    check_available,
    collate_vqa,
    load_vqa,
    prior_results,
    with_coco_images,
)
from cliptransfer.tasks.vqa.metric import evaluate_vqa

ANSWER_TYPES = ("yes/no", "number", "other")


@dataclass
class DataConfig:
    # Real VQA v2 files; all empty = the Shapes world's.
    train_questions: str = ""
    train_annotations: str = ""
    val_questions: str = ""
    val_annotations: str = ""  # empty with val_questions set: predict only (e.g. test-dev)
    images: str = ""  # COCO image root holding train2014/, val2014/ (end2end / grid extraction)
    answer_vocab: str = ""  # ans2label.json or label2ans.json (LXMERT's); empty: from train
    min_answer_count: int = 9
    skip_missing: bool = False  # skip (and count) questions whose image/features are missing
    num_workers: int = 0


@dataclass
class EvalConfig:
    legacy: bool = False  # the pre-2021 official scorer instead of the current one


@dataclass
class VQAConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # "default" (packaged tiny CLIP), a checkpoint path, or an arch name (random init, seed 0)
    backbone: str = "default"
    mode: Literal["features", "end2end"] = "features"
    tuning: TuningConfig = field(default_factory=TuningConfig)  # end2end: lock_image or full
    backbone_lr_scale: float = 0.1  # end2end: the backbone's lr is this times optim.lr
    # PEFT adapters: on the backbone (end2end) or the fusion head (features); see adapters.py
    peft: AdapterConfig = field(default_factory=AdapterConfig)
    text: QuestionConfig = field(default_factory=lambda: QuestionConfig(embed_dim=64, hidden=128))
    model: HeadConfig = field(default_factory=shapes_head)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=100)
    )
    train: TaskTrainConfig = field(
        default_factory=lambda: TaskTrainConfig(out_dir="runs/vqa", epochs=6)
    )
    eval: EvalConfig = field(default_factory=EvalConfig)


def soft_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BUTD's loss: BCE-with-logits on soft scores, mean over the batch and summed over answers
    (the element mean x num_answers)."""
    return F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]


def load_trained(folder: str | Path) -> tuple[VLModel, VQAConfig, list[str], Any]:
    """(model, config, answers, question tokenizer) of a `best/` folder, on CPU in eval mode."""
    folder = Path(folder)
    cfg = load_config(VQAConfig, folder / "config.yaml")
    meta = json.loads((folder / "meta.json").read_text())
    answers = load_answer_vocab(folder / "answers.json")
    q_tok = build_question_tokenizer(cfg.text, folder / "tokenizer")
    model = task_model(cfg, meta["visual_dim"], len(answers), q_tok.vocab_size)
    model = load_best_model(folder, model, cfg.peft)
    return model.eval(), cfg, answers, q_tok


SHAPES_FILES = {
    "train_questions": "vqa/v2_OpenEnded_mscoco_train2014_questions.json",
    "train_annotations": "vqa/v2_mscoco_train2014_annotations.json",
    "val_questions": "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
    "val_annotations": "vqa/v2_mscoco_val2014_annotations.json",
    "images": "images",
}


def _data_files(d: DataConfig, world: Path | None) -> DataConfig:
    """The run's files: the Shapes world's wherever `d` leaves them empty (a given val questions
    file keeps its own, possibly empty, annotations)."""
    if world is None:
        needed = ("train_questions", "train_annotations", "val_questions")
        missing = [k for k in needed if not getattr(d, k)]
        if missing:
            raise ConfigError(f"real VQA data needs data.{', data.'.join(missing)} as well")
        return d
    shapes = {k: str(world / v) for k, v in SHAPES_FILES.items()}
    if d.val_questions:
        shapes["val_annotations"] = ""
    return replace(d, **{k: getattr(d, k) or v for k, v in shapes.items()})


def _load_splits(cfg: VQAConfig, world: Path | None, eval_only: str | None):
    """(train, val, answers, files) with the answer vocabulary of the run."""
    files = _data_files(cfg.data, world)
    skip = cfg.data.skip_missing
    train = load_vqa(files.train_questions, files.train_annotations, skip_missing=skip)
    val = load_vqa(files.val_questions, files.val_annotations or None, skip_missing=skip)
    if eval_only:
        answers = load_answer_vocab(Path(eval_only) / "answers.json")
    elif cfg.data.answer_vocab:
        answers = load_answer_vocab(cfg.data.answer_vocab)
    else:
        answers = build_answer_vocab(train.annotation_records, cfg.data.min_answer_count)
    if not answers:
        raise ValueError(
            f"{files.train_annotations}: no answer occurs >= data.min_answer_count="
            f"{cfg.data.min_answer_count} times; lower it or give data.answer_vocab"
        )
    return train, val, answers, files


def _accuracy_row(name: str, m: dict) -> list:
    return [name, m["overall"], *(m["perAnswerType"].get(t, float("nan")) for t in ANSWER_TYPES)]


def main(argv: list[str] | None = None) -> dict:
    cfg, args, accelerator = start_run(VQAConfig, argv, __doc__)
    tcfg, out = cfg.train, Path(cfg.train.out_dir)
    started = time.monotonic()
    skip = cfg.data.skip_missing

    # ---- questions + answers: the Shapes world unless real VQA v2 files are given
    world = None
    if not cfg.data.train_questions:
        with accelerator.main_process_first():
            world = prepare_world(cfg.world)
    train, val, answers, files = _load_splits(cfg, world, args.eval_only)
    ans2label = make_ans2label(answers)

    # ---- the image side: feature store (features mode) or pixels (end2end)
    splits = {"val": val} if args.eval_only else {"train": train, "val": val}
    paths: dict[int, Path] = {}
    if cfg.mode == "end2end" or (cfg.features.kind == "clip-grid" and not cfg.features.store):
        splits, paths = with_coco_images(splits, files.images, skip)
    cache = cfg.features.cache_dir or (world / "features" if world else out / "features")
    needed = sorted({i for split in splits.values() for i in split.image_ids()})
    side = image_side(
        accelerator, cfg.features, cfg.mode, cfg.backbone, cfg.tuning, paths, cache, world, needed
    )
    for name, split in splits.items():
        splits[name] = check_available(split, side.available, side.where, skip, "missing_features")
    val, train = splits["val"], splits.get("train", train)

    q_tok = build_question_tokenizer(cfg.text)
    val_ds = VQADataset(val, q_tok, ans2label, side.inputs)
    train_ds = None if args.eval_only else VQADataset(train, q_tok, ans2label, side.inputs)

    # ---- model: the head (+ the backbone in end2end mode)
    model = run_model(accelerator, cfg, side, len(answers), q_tok.vocab_size, args.eval_only)
    if accelerator.is_main_process and not args.eval_only:
        save_config(cfg, out / "config.yaml")

    val_loader = DataLoader(
        val_ds,
        batch_size=tcfg.eval_batch_size,
        collate_fn=collate_vqa,
        num_workers=cfg.data.num_workers,
    )
    report: dict[str, Any] = {
        "mode": cfg.mode,
        "model": cfg.model.arch,
        "features": side.info,
        "answers": len(answers),
        "skipped": {name: s.skipped for name, s in splits.items()},
        "truncated_questions": val_ds.truncated + (train_ds.truncated if train_ds else 0),
        "vocab_coverage": {"val": val_ds.coverage},
    }
    prior = None
    if val.has_answers:
        prior = evaluate_vqa(
            None,
            val.annotation_records,
            prior_results(val.examples, answer_prior(train.examples)),
            legacy=cfg.eval.legacy,
        )
        report["prior"] = prior

    def evaluate(model: torch.nn.Module, loader: Any) -> tuple[list[dict], dict | None]:
        got = predict(
            accelerator,
            model,
            loader,
            lambda m, b: {"question_id": b["question_id"], "label": m(b).argmax(-1)},
        )
        results = [
            {"question_id": int(q), "answer": answers[int(k)]}
            for q, k in zip(got["question_id"], got["label"])
        ]
        metrics = None
        if val.has_answers:  # every process scores the same gathered results
            metrics = evaluate_vqa(None, val.annotation_records, results, legacy=cfg.eval.legacy)
        return results, metrics

    if args.eval_only:
        results, metrics = evaluate(*accelerator.prepare(model, val_loader))
        report.update(evaluated=str(args.eval_only), val=metrics)
        if accelerator.is_main_process:
            write_json(out / "results_val.json", results)
            write_json(out / "metrics.json", report)
            _print_report(cfg, report, out)
        accelerator.end_training()
        return report

    # ---- training
    report["vocab_coverage"]["train"] = train_ds.coverage
    hooks = TaskHooks(
        loss=lambda logits, batch: soft_bce(logits, batch["target"]),
        evaluate=evaluate,
        score=lambda m: m["overall"],
        scalars=lambda m: {"overall": m["overall"], **m["perAnswerType"]},
        save_best=lambda model, best, results: _save_best(
            out, model, cfg, answers, q_tok, side, best, results
        ),
    )
    result = fit(
        accelerator, model, train_ds, val_loader, collate_vqa, hooks, cfg.optim, tcfg,
        to_dict(cfg), lr_scales=lr_scales(cfg), num_workers=cfg.data.num_workers,
        tracker="vqa", name=f"vqa {cfg.model.arch}",
    )  # fmt: skip
    report.update(
        result.report(),
        peak_memory=peak_memory(accelerator.device),
        seconds=time.monotonic() - started,
    )
    if accelerator.is_main_process:
        write_json(out / "metrics.json", report)
        _print_report(cfg, report, out)
    accelerator.end_training()
    return report


def _save_best(out, model, cfg, answers, q_tok, side, best, results) -> None:
    meta = {
        "visual_dim": side.dim,
        "num_answers": len(answers),
        "epoch": best["epoch"],
        "step": best["step"],
        "val": best["val"],
        "features": side.info,
    }
    files = {
        "config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
        "answers.json": lambda p: save_answer_vocab(answers, p),
        "tokenizer": q_tok.save,
        "meta.json": meta,
    }
    save_best_dir(out / "best", model, cfg.peft, files)
    write_json(out / "results_val.json", results)


def _print_report(cfg: VQAConfig, report: dict, out: Path) -> None:
    metrics, prior = report["val"], report.get("prior")
    if metrics is None:
        print(f"no val annotations: predictions written to {out / 'results_val.json'}")
    else:
        rows = [_accuracy_row(f"{cfg.model.arch} ({cfg.mode}, {cfg.features.kind})", metrics)]
        if prior is not None:
            rows.append(_accuracy_row("answer prior (per question type)", prior))
        print(markdown_table(["VQA accuracy", "overall", *ANSWER_TYPES], rows))
    oov = {k: f"{100 * v['oov_fraction']:.1f}%" for k, v in report["vocab_coverage"].items() if v}
    print(f"answers outside the {report['answers']}-answer vocabulary: {oov}; "
          f"skipped questions: {report['skipped']}")  # fmt: skip
    if report.get("train_samples_per_s"):
        print(f"training: {report['train_samples_per_s']:.0f} samples/s, peak memory "
              f"{report['peak_memory']['mib']:.0f} MiB ({report['peak_memory']['kind']})")  # fmt: skip
    print(f"results: {out / 'results_val.json'}, metrics: {out / 'metrics.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
