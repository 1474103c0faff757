"""VQA v2 transfer of a CLIP backbone (CLIP-ViL's "direct fine-tuning" setting), through Accelerate.

With no arguments it prepares the Shapes world (if needed), extracts the packaged tiny CLIP's grid
features into a cached feature store, trains a top-down attention head, scores it on val with
the official VQA metric and prints it next to the answer prior (most frequent train answer per
question type):

    accelerate launch tasks/vqa.py
    python tasks/vqa.py                                            # the same, one process
    accelerate launch --multi_gpu --num_processes 2 tasks/vqa.py --cpu --set train.num_threads=1
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_mcan.yaml
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

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cliptransfer.checkpointing import (
    TrainerState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliptransfer.config import ConfigError, add_config_args, load_config, save_config, to_dict
from cliptransfer.data.contrastive import EpochSampler
from cliptransfer.data.vqa import (
    VQADataset,
    answer_prior,
    check_available,
    collate_vqa,
    load_vqa,
    prior_results,
    with_coco_images,
)
from cliptransfer.data.vqa_answers import (
    build_answer_vocab,
    load_answer_vocab,
    make_ans2label,
    save_answer_vocab,
)
from cliptransfer.features.extract import load_backbone
from cliptransfer.metrics.vqa import evaluate_vqa
from cliptransfer.models.question import QuestionConfig, build_question_tokenizer
from cliptransfer.optim import OptimConfig, build_adamw, trainable_summary, warmup_cosine
from cliptransfer.tasks_common import (
    FeatureConfig,
    GridBackbone,
    HeadConfig,
    TaskTrainConfig,
    VLModel,
    WorldConfig,
    build_head,
    flat_hparams,
    image_side,
    markdown_table,
    peak_memory,
    predict,
    prepare_world,
    save_model_dir,
    write_json,
)
from cliptransfer.tuning import TuningConfig

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
    tuning: TuningConfig = field(default_factory=TuningConfig)  # end2end: lock / LoRA / full
    backbone_lr_scale: float = 0.1  # end2end: the backbone's lr is this times optim.lr
    text: QuestionConfig = field(default_factory=QuestionConfig)
    model: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=100)
    )
    train: TaskTrainConfig = field(
        default_factory=lambda: TaskTrainConfig(out_dir="runs/vqa", epochs=12)
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
    backbone = None
    if cfg.mode == "end2end":
        backbone = GridBackbone(load_backbone(cfg.backbone)[0], cfg.tuning)
    head = build_head(cfg.model, cfg.text, meta["visual_dim"], len(answers), q_tok.vocab_size)
    model = VLModel(head, backbone)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{folder / 'model.safetensors'} does not fit the model of its config.yaml: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--cpu", action="store_true", help="force CPU (gloo for 2 processes)")
    parser.add_argument(
        "--skip-missing", action="store_true", help="= --set data.skip_missing=true"
    )
    parser.add_argument(
        "--eval-only",
        default=None,
        metavar="BEST_DIR",
        help="evaluate / predict with a saved best/ folder (its config.yaml + --set overrides)",
    )
    args = parser.parse_args(argv)
    config_path = args.config
    if args.eval_only and config_path is None:
        config_path = str(Path(args.eval_only) / "config.yaml")
    try:
        cfg = load_config(VQAConfig, config_path, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if args.resume:
        cfg.train.resume = args.resume
    cfg.data.skip_missing = cfg.data.skip_missing or args.skip_missing
    tcfg, out = cfg.train, Path(cfg.train.out_dir)
    started = time.monotonic()

    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=tcfg.precision,
        log_with="tensorboard",
        project_dir=str(out),
    )
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)  # after Accelerator(), which sets its own
    set_seed(tcfg.seed)
    rank, world_size = accelerator.process_index, accelerator.num_processes
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
    set_seed(tcfg.seed)
    head = build_head(cfg.model, cfg.text, side.dim, len(answers), q_tok.vocab_size)
    model = VLModel(head, side.backbone)
    if args.eval_only:
        model.load_state_dict(load_file(str(Path(args.eval_only) / "model.safetensors")))
    trainable, total = trainable_summary(model)
    accelerator.print(
        f"{cfg.model.arch} on {side.info['kind']} features ({side.dim} ch), "
        f"{len(answers)} answers: {total:,} params, {trainable:,} trainable"
    )
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

    def evaluate() -> tuple[list[dict], dict | None]:
        got = predict(
            accelerator,
            model,
            val_loader,
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
        model, val_loader = accelerator.prepare(model, val_loader)
        results, metrics = evaluate()
        report.update(evaluated=str(args.eval_only), val=metrics)
        if accelerator.is_main_process:
            write_json(out / "results_val.json", results)
            write_json(out / "metrics.json", report)
            _print_report(cfg, report, out)
        accelerator.end_training()
        return report

    # ---- training
    report["vocab_coverage"]["train"] = train_ds.coverage
    sampler = EpochSampler(len(train_ds), seed=tcfg.seed)
    loader = DataLoader(
        train_ds,
        batch_size=tcfg.batch_size,
        sampler=sampler,
        collate_fn=collate_vqa,
        num_workers=cfg.data.num_workers,
    )
    optimizer = build_adamw(model, cfg.optim, lr_scales={"backbone.": cfg.backbone_lr_scale})
    steps_per_epoch = math.ceil(len(loader) / world_size)
    total_steps = min(tcfg.max_steps or math.inf, steps_per_epoch * tcfg.epochs)
    # Stepped by hand once per optimizer step, so the schedule ignores the process count.
    scheduler = warmup_cosine(
        optimizer,
        min(cfg.optim.warmup_steps, total_steps // 5),
        total_steps,
        cfg.optim.min_lr_ratio,
    )
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    unwrapped = accelerator.unwrap_model(model)

    state = TrainerState(config=to_dict(cfg))
    if tcfg.resume:
        path = find_checkpoint(out, tcfg.resume)
        state = load_checkpoint(
            path, unwrapped, optimizer.optimizer, scheduler, rank=rank, config=to_dict(cfg)
        )
        accelerator.print(f"resumed from {path} at epoch {state.epoch} (step {state.step})")
    history: list[dict] = state.extra.setdefault("history", [])
    best: dict | None = state.extra.get("best")
    accelerator.init_trackers("vqa", config=flat_hparams(to_dict(cfg)))
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not accelerator.is_main_process,
        desc=f"vqa {cfg.model.arch}",
        dynamic_ncols=True,
    )
    train_time, train_samples = 0.0, 0
    model.train()
    while state.epoch < tcfg.epochs and state.step < total_steps:
        loader.set_epoch(state.epoch)  # accelerate re-sets the sampler from its own counter
        t0, loss_sum, loss_n = time.monotonic(), torch.zeros(()), 0
        for batch in loader:
            with accelerator.autocast():
                logits = model(batch)  # (B, A)
            loss = soft_bce(logits.float(), batch["target"])
            accelerator.backward(loss)
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            n = batch["target"].shape[0] * world_size
            state.samples_seen += n
            train_samples += n
            loss_sum += loss.detach().cpu()
            loss_n += 1
            bar.update(1)
            if state.step % tcfg.log_every == 0:
                logged = accelerator.reduce(loss.detach(), "mean").item()
                accelerator.log(
                    {"train/loss": logged, "train/lr": scheduler.get_last_lr()[0]}, step=state.step
                )
                bar.set_postfix(loss=f"{logged:.3f}")
            if state.step >= total_steps:
                break
        train_time += time.monotonic() - t0
        state.epoch += 1

        results, metrics = evaluate()
        entry = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": (loss_sum / max(1, loss_n)).item(),
        }
        if metrics is not None:
            entry["val_overall"] = metrics["overall"]
            accelerator.log(
                {
                    "val/overall": metrics["overall"],
                    **{f"val/{t}": v for t, v in metrics["perAnswerType"].items()},
                },
                step=state.step,
            )
        history.append(entry)
        accelerator.print(f"epoch {state.epoch}: {json.dumps(entry)}")
        better = best is None or metrics is None or metrics["overall"] > best["val"]["overall"]
        if better:
            best = {"epoch": state.epoch, "step": state.step, "val": metrics}
            if accelerator.is_main_process:
                _save_best(out / "best", unwrapped, cfg, answers, q_tok, side, best)
                write_json(out / "results_val.json", results)
        state.extra["best"] = best
        save_checkpoint(
            out,
            state,
            unwrapped.state_dict(),
            optimizer.optimizer,
            scheduler,
            rank=rank,
            world_size=world_size,
            barrier=accelerator.wait_for_everyone,
            keep_last=tcfg.keep_last,
        )
    bar.close()

    report.update(
        best_epoch=best["epoch"] if best else None,
        val=best["val"] if best else None,
        history=history,
        steps=state.step,
        samples_seen=state.samples_seen,
        train_samples_per_s=train_samples / train_time if train_time else None,
        peak_memory=peak_memory(accelerator.device),
        seconds=time.monotonic() - started,
    )
    if accelerator.is_main_process:
        write_json(out / "metrics.json", report)
        _print_report(cfg, report, out)
    accelerator.end_training()
    return report


def _save_best(folder, model, cfg, answers, q_tok, side, best) -> None:
    meta = {
        "visual_dim": side.dim,
        "num_answers": len(answers),
        "epoch": best["epoch"],
        "step": best["step"],
        "val": best["val"],
        "features": side.info,
    }
    save_model_dir(
        folder,
        model.state_dict(),
        {
            "config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
            "answers.json": lambda p: save_answer_vocab(answers, p),
            "tokenizer": q_tok.save,
            "meta.json": meta,
        },
    )


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
