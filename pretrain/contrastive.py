"""Contrastive pretraining: CLIP, SLIP, DeCLIP, FILIP, DeFILIP and SigLIP through Accelerate.

With no arguments it prepares the Shapes world (if needed) and trains the tiny CLIP on CPU:

    accelerate launch pretrain/contrastive.py
    python pretrain/contrastive.py                                  # same, one process
    accelerate launch pretrain/contrastive.py --config configs/pretrain/declip_shapes.yaml
    accelerate launch --multi_gpu --num_processes 2 pretrain/contrastive.py --cpu   # 2 CPU procs
    accelerate launch pretrain/contrastive.py --config configs/pretrain/clip_rn50_pairs.yaml \
        --set data.train=/data/cc3m/train.jsonl --set train.out_dir=runs/rn50
    accelerate launch pretrain/contrastive.py --resume latest --set train.out_dir=runs/x

The run folder gets config.yaml (the resolved config), TensorBoard logs, checkpoints/ (resumable
with --resume latest), final/ (the CLIP model, `load_clip`-able) and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from cliptransfer.clip import create_clip, load_clip
from cliptransfer.clip.evaluation import ClassifySet, RetrievalSet, evaluate_clip
from cliptransfer.clip.tuning import TuningConfig, apply_tuning, export_clip
from cliptransfer.config import (
    ConfigError,
    add_config_args,
    flat_hparams,
    load_config,
    save_config,
    to_dict,
)
from cliptransfer.contrastive.data import EpochSampler, PairDataConfig, PairDataset, collate_pairs
from cliptransfer.contrastive.losses.clip import clamp_logit_scale_
from cliptransfer.contrastive.objectives import ContrastiveModel, LossConfig, needs_second_view
from cliptransfer.contrastive.pairs import load_pairs
from cliptransfer.defaults import resolve_tokenizer
from cliptransfer.engine.checkpointing import (
    TrainerState,
    atomic_save_dir,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliptransfer.engine.distributed import set_cpu_threads
from cliptransfer.engine.optim import OptimConfig, build_adamw, trainable_summary, warmup_cosine
from cliptransfer.worlds.shapes import default_world_dir, prepare_shapes


@dataclass
class WorldConfig:
    size: str = "small"
    seed: int = 0
    dir: str | None = None  # default: the cache folder of default_world_dir(size, seed)


@dataclass
class ModelConfig:
    arch: str = "RN-tiny"
    init: str | None = None  # start from a checkpoint (OpenAI/open_clip file, HF or own folder)
    # Field overrides of the architecture, e.g. --set model.text.layers=4 (the CLIP-benchmark
    # "curtailed text encoder" knob) or --set model.vision.width=16.
    vision: dict[str, int] = field(default_factory=dict)
    text: dict[str, int] = field(default_factory=dict)
    quick_gelu: bool | None = None


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    seed: int = 0
    batch_size: int = 64  # per process
    epochs: int = 5
    max_steps: int | None = None  # overrides epochs when set
    grad_accum: int = 1
    precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = 10
    save_every_steps: int = 0  # 0: only at the end
    save_every_minutes: float = 0.0
    keep_last: int = 2
    eval_max_images: int = 500
    resume: str | None = None  # "latest" or a checkpoint folder
    tokenizer: str = "shapes"  # "shapes" (packaged) or a tokenizer folder
    # The benchmarked fast path (bench/contrastive_step.py): channels_last ResNet towers, text
    # padding after the batch's last EOT trimmed (equal within 1e-5, not bitwise), fused AdamW.
    fast_kernels: bool = False
    num_threads: int = 0  # torch threads per process on CPU (0: CPU cores / local processes)


@dataclass
class PretrainConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    train: TrainConfig = field(default_factory=TrainConfig)


def build_clip(cfg: PretrainConfig, vocab_size: int, context_length: int):
    if cfg.model.init:
        return load_clip(cfg.model.init)
    text = {"vocab_size": vocab_size, "context_length": context_length, **cfg.model.text}
    extra = {} if cfg.model.quick_gelu is None else {"quick_gelu": cfg.model.quick_gelu}
    if cfg.model.vision:
        extra["vision"] = dict(cfg.model.vision)
    return create_clip(cfg.model.arch, text=text, **extra)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--cpu", action="store_true", help="force CPU (gloo for 2 processes)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if args.resume:
        cfg.train.resume = args.resume
    tcfg = cfg.train
    out = Path(tcfg.out_dir)

    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=tcfg.precision,
        gradient_accumulation_steps=tcfg.grad_accum,
        log_with="tensorboard",
        project_dir=str(out),
    )
    set_cpu_threads(accelerator.device, tcfg.num_threads, accelerator.num_processes)
    set_seed(tcfg.seed)
    rank, world_size = accelerator.process_index, accelerator.num_processes

    # ---- data: the Shapes world by default, or the user's pairs
    world_dir = (
        Path(cfg.world.dir) if cfg.world.dir else default_world_dir(cfg.world.size, cfg.world.seed)
    )
    if not cfg.data.train or not cfg.data.val:
        with accelerator.main_process_first():
            prepare_shapes(world_dir, size=cfg.world.size, seed=cfg.world.seed)
    # The world's pair files hold paths relative to the world root; a user's are relative to
    # the pairs file (or data.image_root).
    world_root = str(world_dir)
    train_records = load_pairs(
        cfg.data.train or world_dir / "pairs" / "train.jsonl",
        cfg.data.image_root or (None if cfg.data.train else world_root),
    )
    val_records = load_pairs(
        cfg.data.val or world_dir / "pairs" / "val.jsonl",
        cfg.data.image_root or (None if cfg.data.val else world_root),
    )
    tokenizer = resolve_tokenizer(tcfg.tokenizer)

    # ---- model + the heads of the enabled loss terms, tuning policy (lock / LoRA)
    set_seed(tcfg.seed)
    model = ContrastiveModel(
        build_clip(cfg, tokenizer.vocab_size, tokenizer.context_length), cfg.loss
    )
    apply_tuning(model.clip, cfg.tuning)
    trainable, total = trainable_summary(model)
    accelerator.print(
        f"model {cfg.model.arch}: {total:,} params, {trainable:,} trainable "
        f"({100 * trainable / total:.2f}%); loss terms {model.weights}"
    )
    tokenizer.context_length = model.clip.context_length
    image_size = model.clip.image_size
    cfg.data.second_view = cfg.data.second_view or needs_second_view(model.weights)
    cfg.data.text_aug = cfg.data.text_aug or "mvs" in model.weights
    if "mlm" in model.weights and cfg.data.mlm_prob == 0:
        cfg.data.mlm_prob = 0.15
    cfg.data.image.size = cfg.data.view.size = image_size
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")

    dataset = PairDataset(train_records, tokenizer, cfg.data, seed=tcfg.seed)
    sampler = EpochSampler(len(dataset), seed=tcfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=tcfg.batch_size,
        sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=cfg.data.num_workers,
        drop_last=True,  # equal batches on every rank: cross-rank gathers need them
    )
    if tcfg.fast_kernels:
        model.clip.trim_text_padding = True
        if model.clip.config.vision.kind == "resnet":
            model.clip.visual.to(memory_format=torch.channels_last)
    optimizer = build_adamw(model, cfg.optim, fused=tcfg.fast_kernels)
    steps_per_epoch = len(loader) // (world_size * tcfg.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} pairs give no full step of batch {tcfg.batch_size} x {world_size} "
            f"processes x {tcfg.grad_accum} accumulation"
        )
    total_steps = tcfg.max_steps or steps_per_epoch * tcfg.epochs
    # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step
    # it once per process, making the schedule depend on the number of processes.
    scheduler = warmup_cosine(
        optimizer, cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)

    eval_sets = (
        RetrievalSet.from_records(val_records, tcfg.eval_max_images),
        ClassifySet.from_world(world_dir) if not cfg.data.val else None,
    )

    state = TrainerState(config=to_dict(cfg))
    if tcfg.resume:
        path = find_checkpoint(out, tcfg.resume)
        state = load_checkpoint(
            path, unwrapped, optimizer.optimizer, scheduler, rank=rank, config=to_dict(cfg)
        )
        accelerator.print(f"resumed from {path} at step {state.step}")
        initial = state.extra.get("initial_eval")
    else:
        initial = evaluate_clip(accelerator, unwrapped.clip, tokenizer, *eval_sets, image_size)
        state.extra["initial_eval"] = initial
        accelerator.print(f"random-init eval: {json.dumps(_headline(initial))}")

    accelerator.init_trackers("pretrain", config=flat_hparams(to_dict(cfg)))
    bad = {"skipped": state.extra.get("skipped", 0), "truncated": state.extra.get("truncated", 0)}
    bad_examples: list[str] = []

    def save() -> None:  # every rank calls it: each writes its own RNG state
        state.extra.update(bad)
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

    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not accelerator.is_main_process,
        desc=cfg.loss.method,
        dynamic_ncols=True,
    )
    last_save, t0, seen0 = time.monotonic(), time.monotonic(), state.samples_seen
    model.train()
    done = state.step >= total_steps
    while not done:
        sampler.set_epoch(state.epoch)
        dataset.set_epoch(state.epoch)
        epoch_loader = (
            accelerator.skip_first_batches(loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else loader
        )
        for batch in epoch_loader:
            state.batches_in_epoch += 1
            bad["truncated"] += int(batch.pop("truncated").sum())
            skipped = batch.pop("skipped")
            bad["skipped"] += len(skipped)
            bad_examples += skipped[: max(0, 5 - len(bad_examples))]
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    terms = model(batch)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.samples_seen += batch["image"].shape[0] * world_size
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            clamp_logit_scale_(
                unwrapped.clip.logit_scale, cfg.loss.logit_scale_max, cfg.loss.logit_scale_min
            )
            state.step += 1
            bar.update(1)
            _check_bad_fraction(
                bad["skipped"], state.samples_seen, cfg.data.max_bad_fraction, bad_examples
            )
            if state.step % tcfg.log_every == 0 or state.step == total_steps:
                logs = {k: accelerator.reduce(v.detach(), "mean").item() for k, v in terms.items()}
                logs["logit_scale"] = unwrapped.clip.logit_scale.exp().item()
                logs["lr"] = scheduler.get_last_lr()[0]
                rate = (state.samples_seen - seen0) / max(1e-9, time.monotonic() - t0)
                accelerator.log(
                    {**{f"train/{k}": v for k, v in logs.items()}, "train/samples_per_s": rate},
                    step=state.step,
                )
                bar.set_postfix(loss=f"{logs['loss']:.3f}", samples_s=f"{rate:.0f}")
            if _should_save(tcfg, state.step, last_save):
                save()
                last_save = time.monotonic()
            if state.step >= total_steps:
                done = True
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()

    final = evaluate_clip(accelerator, unwrapped.clip, tokenizer, *eval_sets, image_size)
    save()
    report = {
        "steps": state.step,
        "samples_seen": state.samples_seen,
        "random_init": initial,
        "trained": final,
        **bad,
    }
    if accelerator.is_main_process:
        atomic_save_dir(export_clip(unwrapped.clip).save_pretrained, out / "final")
        tokenizer.save(out / "final" / "tokenizer")
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
        print(_comparison_table(initial, final))
        print(f"skipped records: {bad['skipped']}, truncated captions: {bad['truncated']}")
        print(f"model written to {out / 'final'}")
    accelerator.end_training()
    return report


def _should_save(tcfg: TrainConfig, step: int, last_save: float) -> bool:
    due = bool(tcfg.save_every_steps and step % tcfg.save_every_steps == 0)
    if tcfg.save_every_minutes:
        # Clocks differ across processes: rank 0 decides, everyone follows.
        flag = [due or (time.monotonic() - last_save) / 60 >= tcfg.save_every_minutes]
        due = bool(broadcast_object_list(flag)[0])
    return due


def _check_bad_fraction(skipped: int, seen: int, limit: float, examples: list[str]) -> None:
    if seen >= 100 and skipped / seen > limit:
        raise RuntimeError(
            f"{skipped} of {seen} records were unreadable (> data.max_bad_fraction={limit}); "
            f"first ones: {'; '.join(examples)}"
        )


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
            rows.append(
                f"| retrieval {key} | {initial['retrieval'][key]:.2f} | "
                f"{final['retrieval'][key]:.2f} |"
            )
    for task in final.get("zeroshot", {}):
        rows.append(
            f"| zero-shot {task} top1 | {initial['zeroshot'][task]['top1']:.2f} | "
            f"{final['zeroshot'][task]['top1']:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
