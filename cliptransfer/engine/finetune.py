"""The fine-tuning loop shared by the task scripts (tasks/vqa.py, tasks/snli_ve.py).

Reads top to bottom like the pretraining loop: epochs of (forward, task loss, backward, clip,
AdamW step, warmup+cosine step), then an evaluation over the gathered predictions of every
process, the best epoch kept (by the task's score) and a resumable checkpoint at each epoch end.
What differs between tasks comes in as a `TaskHooks`: the loss, the evaluation, the score and the
best-model writer.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cliptransfer.config import ConfigError, add_config_args, flat_hparams, load_config
from cliptransfer.contrastive.data import EpochSampler
from cliptransfer.engine.checkpointing import (
    TrainerState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliptransfer.engine.distributed import set_cpu_threads
from cliptransfer.engine.optim import OptimConfig, build_adamw, warmup_cosine
from cliptransfer.tasks.vl_model import check_tuning

__all__ = ["FitResult", "TaskHooks", "fit", "start_run"]


def start_run(config_cls: type, argv: list[str] | None, doc: str | None) -> tuple[Any, Any, Any]:
    """Parse a task script's command line, resolve its config and start Accelerate.

    Common flags: --config/--set, --resume, --cpu, --skip-missing, --eval-only BEST_DIR (whose
    config.yaml is the default config). Returns (config, args, accelerator), seeded, with the
    CPU thread count set.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
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
        cfg = load_config(config_cls, config_path, args.overrides)
        check_tuning(cfg.mode, cfg.tuning, cfg.peft)
    except ConfigError as e:
        parser.error(str(e))
    if args.resume:
        cfg.train.resume = args.resume
    cfg.data.skip_missing = cfg.data.skip_missing or args.skip_missing
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=cfg.train.precision,
        log_with="tensorboard",
        project_dir=cfg.train.out_dir,
    )
    set_cpu_threads(accelerator.device, cfg.train.num_threads, accelerator.num_processes)
    set_seed(cfg.train.seed)
    return cfg, args, accelerator


@dataclass
class TaskHooks:
    """What a task adds to the loop."""

    # (logits (B, K) float32, batch) -> scalar loss
    loss: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
    # (prepared model, prepared val loader) -> (results to save, metrics or None without labels)
    evaluate: Callable[[nn.Module, Any], tuple[Any, dict | None]]
    # metrics -> the number the best epoch maximises; metrics -> scalars for TensorBoard
    score: Callable[[dict], float]
    scalars: Callable[[dict], dict[str, float]]
    # (unwrapped model, best {"epoch", "step", "val"}, results) on the main process
    save_best: Callable[[nn.Module, dict, Any], None]


@dataclass
class FitResult:
    best: dict | None
    history: list[dict]
    steps: int
    samples_seen: int
    train_samples_per_s: float | None

    def report(self) -> dict[str, Any]:
        """The run report's training fields (metrics.json)."""
        return {
            "best_epoch": self.best["epoch"] if self.best else None,
            "val": self.best["val"] if self.best else None,
            "history": self.history,
            "steps": self.steps,
            "samples_seen": self.samples_seen,
            "train_samples_per_s": self.train_samples_per_s,
        }


def fit(
    accelerator: Any,
    model: nn.Module,
    train_ds: Dataset,
    val_loader: DataLoader,
    collate: Callable[[list], dict[str, Any]],
    hooks: TaskHooks,
    optim_cfg: OptimConfig,
    train_cfg: Any,
    config: dict[str, Any],
    *,
    lr_scales: dict[str, float] | None = None,
    num_workers: int = 0,
    tracker: str = "task",
    name: str = "task",
) -> FitResult:
    """Train `model` on `train_ds` for `train_cfg.epochs` (or `max_steps`), evaluating after each
    epoch; resumes from `train_cfg.resume` ("latest" or a folder under `train_cfg.out_dir`).

    `train_cfg` is a `TaskTrainConfig`; `config` the run's resolved config as a dict (saved in
    every checkpoint and logged as hyperparameters of the TensorBoard run `tracker`; a resume
    with another config is an error naming the keys).
    """
    out, world_size, rank = (
        Path(train_cfg.out_dir),
        accelerator.num_processes,
        accelerator.process_index,
    )
    sampler = EpochSampler(len(train_ds), seed=train_cfg.seed)
    loader = DataLoader(
        train_ds,
        batch_size=train_cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
    )
    optimizer = build_adamw(model, optim_cfg, lr_scales=lr_scales)
    steps_per_epoch = math.ceil(len(loader) / world_size)
    total_steps = min(train_cfg.max_steps or math.inf, steps_per_epoch * train_cfg.epochs)
    # Stepped by hand once per optimizer step, so the schedule ignores the process count.
    scheduler = warmup_cosine(
        optimizer,
        min(optim_cfg.warmup_steps, total_steps // 5),
        total_steps,
        optim_cfg.min_lr_ratio,
    )
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    unwrapped = accelerator.unwrap_model(model)

    state = TrainerState(config=config)
    if train_cfg.resume:
        path = find_checkpoint(out, train_cfg.resume)
        state = load_checkpoint(
            path, unwrapped, optimizer.optimizer, scheduler, rank=rank, config=config
        )
        accelerator.print(f"resumed from {path} at epoch {state.epoch} (step {state.step})")
    accelerator.init_trackers(tracker, config=flat_hparams(config))
    history: list[dict] = state.extra.setdefault("history", [])
    best: dict | None = state.extra.get("best")
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not accelerator.is_main_process,
        desc=name,
        dynamic_ncols=True,
    )
    train_time, train_samples = 0.0, 0
    model.train()
    while state.epoch < train_cfg.epochs and state.step < total_steps:
        loader.set_epoch(state.epoch)  # accelerate re-sets the sampler from its own counter
        t0, loss_sum, loss_n = time.monotonic(), torch.zeros(()), 0
        for batch in loader:
            with accelerator.autocast():
                logits = model(batch)  # (B, K)
            loss = hooks.loss(logits.float(), batch)
            accelerator.backward(loss)
            if optim_cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            n = logits.shape[0] * world_size
            state.samples_seen += n
            train_samples += n
            loss_sum += loss.detach().cpu()
            loss_n += 1
            bar.update(1)
            if state.step % train_cfg.log_every == 0:
                logged = accelerator.reduce(loss.detach(), "mean").item()
                accelerator.log(
                    {"train/loss": logged, "train/lr": scheduler.get_last_lr()[0]}, step=state.step
                )
                bar.set_postfix(loss=f"{logged:.3f}")
            if state.step >= total_steps:
                break
        train_time += time.monotonic() - t0
        state.epoch += 1

        results, metrics = hooks.evaluate(model, val_loader)
        entry = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": (loss_sum / max(1, loss_n)).item(),
        }
        if metrics is not None:
            entry["val_score"] = hooks.score(metrics)
            accelerator.log(
                {f"val/{k}": v for k, v in hooks.scalars(metrics).items()}, step=state.step
            )
        history.append(entry)
        accelerator.print(f"epoch {state.epoch}: {entry}")
        # Without labels (prediction only) the last epoch counts as the best.
        if best is None or metrics is None or hooks.score(metrics) > hooks.score(best["val"]):
            best = {"epoch": state.epoch, "step": state.step, "val": metrics}
            if accelerator.is_main_process:
                hooks.save_best(unwrapped, best, results)
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
            keep_last=train_cfg.keep_last,
        )
    bar.close()
    return FitResult(
        best=best,
        history=history,
        steps=state.step,
        samples_seen=state.samples_seen,
        train_samples_per_s=train_samples / train_time if train_time else None,
    )
