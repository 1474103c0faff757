"""The one training loop: every task and the contrastive pretraining run through `fit`.

Reads top to bottom: the optimizers and their schedules, Accelerate's prepare, a checkpoint to
resume from, then steps of (the global batch's micro-batches on this process: forward under
autocast, the non-finite guard, backward; clipping; every optimizer and schedule steps), logs,
checkpoints by steps / minutes / epoch end, an evaluation per epoch with the best kept (or one
after training). A run killed at any point and resumed with `--resume latest` continues from the
newest checkpoint — mid-epoch included — and ends with the metrics of the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cliptransfer.config import ConfigError, flat_hparams, to_dict
from cliptransfer.engine.batches import plan_epoch, steps_per_epoch
from cliptransfer.engine.checkpointing import (
    TrainerState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliptransfer.engine.config import TrainConfig
from cliptransfer.engine.run import Run
from cliptransfer.engine.task import Task

__all__ = ["FitResult", "NonFiniteLossError", "fit"]


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss: the run stops before the update, naming the step and the records."""


@dataclass
class FitResult:
    best: dict | None  # {"epoch", "step", "val"} of the best evaluation
    final: dict | None  # metrics of the evaluation after training (tasks evaluated once)
    history: list[dict]
    steps: int
    samples_seen: int
    train_samples_per_s: float | None

    def report(self) -> dict[str, Any]:
        """The run report's training fields (metrics.json)."""
        return {
            "best_epoch": self.best["epoch"] if self.best else None,
            "val": self.best["val"] if self.best else self.final,
            "history": self.history,
            "steps": self.steps,
            "samples_seen": self.samples_seen,
            "train_samples_per_s": self.train_samples_per_s,
        }


def fit(run: Run, task: Task) -> FitResult:
    """Train `task.model` on `task.train_data` as `run.cfg.train` says."""
    cfg, acc = run.cfg.train, run.accelerator
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} (global) must be divisible by processes x "
            f"train.grad_accum = {world} x {cfg.grad_accum}"
        )
    n = len(task.train_data)
    per_epoch = steps_per_epoch(n, cfg.batch_size, task.drop_last)
    if per_epoch == 0:
        raise ValueError(
            f"{n} training samples give no full step of train.batch_size={cfg.batch_size}"
        )
    total = min(cfg.max_steps or math.inf, per_epoch * cfg.epochs)
    specs = task.optimizers(task.model, total)
    model, *optimizers = acc.prepare(task.model, *[s.optimizer for s in specs])
    unwrapped = acc.unwrap_model(model)
    inner = [s.optimizer for s in specs]  # what checkpoints hold
    schedulers = [s.scheduler for s in specs]

    config = to_dict(run.cfg)
    state = TrainerState(config=config)
    path = find_checkpoint(run.out, cfg.resume) if cfg.resume else None
    if path is not None:
        state = load_checkpoint(path, unwrapped, inner, schedulers, rank=rank, config=config)
        task.load_state_dict(state.extra.get("task", {}))
        run.print(f"resumed from {path} at epoch {state.epoch}, step {state.step}")
    elif cfg.resume:
        run.print(f"no checkpoint in {run.out / 'checkpoints'} yet: starting from the beginning")
    task.on_start(unwrapped, resumed=path is not None)
    acc.init_trackers(task.tracker, config=flat_hparams(config))
    history: list[dict] = state.extra.setdefault("history", [])
    best: dict | None = state.extra.get("best")
    final: dict | None = None

    def save() -> None:  # every rank calls it: each writes its own RNG state
        state.extra["task"] = task.state_dict()
        save_checkpoint(
            run.out, state, unwrapped.state_dict(), inner, schedulers, rank=rank,
            world_size=world, barrier=acc.wait_for_everyone, keep_last=cfg.keep_last,
        )  # fmt: skip

    def evaluate() -> None:
        nonlocal best, final
        results, metrics = task.evaluate(model, "val")
        loss_sum, loss_n = state.extra.get("epoch_loss", (0.0, 0))
        entry = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "train_loss": _mean32(loss_sum, loss_n),
        }
        if metrics is not None:
            entry["val_score"] = task.score(metrics)
            acc.log({f"val/{k}": v for k, v in task.scalars(metrics).items()}, step=state.step)
        history.append(entry)
        run.print(f"epoch {entry['epoch']}: {entry}")
        # Without labels (prediction only) the last evaluation counts as the best.
        if best is None or metrics is None or task.score(metrics) > task.score(best["val"]):
            best = {"epoch": entry["epoch"], "step": state.step, "val": metrics}
            if run.is_main:
                task.save_best(run.out / "best", unwrapped, best, results)
        state.extra["best"] = best
        final = metrics

    bar = tqdm(total=total, initial=state.step, disable=not run.is_main, desc=task.spec.name,
               dynamic_ncols=True)  # fmt: skip
    train_time, train_samples, last_save = 0.0, 0, time.monotonic()
    model.train()
    while state.step < total:
        if state.batches_in_epoch == 0:
            # What DataLoader would draw from the global RNG at each epoch's start (kept so that
            # a run's dropout stream is the same as before the engine drew it itself); stored,
            # so a mid-epoch resume uses the same one.
            state.extra["loader_seed"] = int(torch.empty((), dtype=torch.int64).random_().item())
            state.extra["epoch_loss"] = (0.0, 0)
        if hasattr(task.train_data, "set_epoch"):
            task.train_data.set_epoch(state.epoch)
        plan = list(plan_epoch(
            n, cfg.batch_size, seed=cfg.seed, epoch=state.epoch, rank=rank, world_size=world,
            grad_accum=cfg.grad_accum, drop_last=task.drop_last, start_step=state.batches_in_epoch,
        ))  # fmt: skip
        loader = DataLoader(
            task.train_data,
            batch_sampler=[mb.indices for step in plan for mb in step],
            collate_fn=task.collate,
            num_workers=task.num_workers,
            generator=torch.Generator().manual_seed(state.extra["loader_seed"]),
        )
        batches, t0 = iter(loader), time.monotonic()
        loss_sum = torch.tensor(state.extra["epoch_loss"][0], dtype=torch.float32)
        loss_n = state.extra["epoch_loss"][1]
        for micro in plan:
            step_loss = torch.zeros((), dtype=torch.float32)  # this process's share of the mean
            for i, mb in enumerate(micro):
                batch = send_to_device(next(batches), acc.device)
                sync = i == len(micro) - 1 or world == 1
                with contextlib.nullcontext() if sync else acc.no_sync(model):
                    with acc.autocast():
                        terms = task.training_step(model, batch)
                    _check_finite(run, task, terms, batch, state)
                    loss = terms["loss"] if mb.weight == 1.0 else terms["loss"] * mb.weight
                    acc.backward(loss)
                step_loss += loss.detach().float().cpu()
            if task.cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(model.parameters(), task.cfg.optim.grad_clip)
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            task.after_step(unwrapped)
            state.step += 1
            state.batches_in_epoch += 1
            state.samples_seen += micro[0].global_size
            train_samples += micro[0].global_size
            if world > 1:  # the global batch's mean loss, the same number on every process
                step_loss = acc.reduce(step_loss.to(acc.device), "mean").cpu()
            loss_sum += step_loss
            loss_n += 1
            state.extra["epoch_loss"] = (loss_sum.item(), loss_n)
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total:
                logs = {k: acc.reduce(v.detach().float(), "mean").item() for k, v in terms.items()}
                logs.update(task.train_scalars(unwrapped))
                for spec, sched in zip(specs, schedulers):
                    logs[f"lr_{spec.name}" if len(specs) > 1 else "lr"] = sched.get_last_lr()[0]
                acc.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            epoch_end = state.batches_in_epoch == per_epoch
            if epoch_end or state.step >= total:
                break
            if _due(cfg, state.step, last_save):
                save()
                last_save = time.monotonic()
        train_time += time.monotonic() - t0
        # The epoch ends here (or training does, mid-epoch, at max_steps).
        if task.evaluate_every_epoch:
            evaluate()
        if state.batches_in_epoch == per_epoch:
            state.epoch += 1
            state.batches_in_epoch = 0
        if state.step < total or task.evaluate_every_epoch:
            save()
            last_save = time.monotonic()
    bar.close()
    if not task.evaluate_every_epoch:
        final = task.evaluate(model, "val")[1]
        save()
    return FitResult(
        best=best if task.evaluate_every_epoch else None,
        final=final,
        history=history,
        steps=state.step,
        samples_seen=state.samples_seen,
        train_samples_per_s=train_samples / train_time if train_time else None,
    )


def _due(cfg: TrainConfig, step: int, last_save: float) -> bool:
    due = bool(cfg.save_every_steps and step % cfg.save_every_steps == 0)
    if cfg.save_every_minutes:
        # Clocks differ across processes: rank 0 decides, everyone follows.
        flag = [due or (time.monotonic() - last_save) / 60 >= cfg.save_every_minutes]
        due = bool(broadcast_object_list(flag)[0])
    return due


def _check_finite(run: Run, task: Task, terms: dict, batch: dict, state: TrainerState) -> None:
    """Stop before a NaN/inf loss reaches the weights, on every process at once."""
    bad = not bool(torch.isfinite(terms["loss"].detach()).all())
    if run.accelerator.num_processes > 1:
        flag = torch.tensor([float(bad)], device=run.accelerator.device)
        anywhere = run.accelerator.reduce(flag, "sum").item() > 0
    else:
        anywhere = bad
    if not anywhere:
        return
    values = {k: float(v.detach().float()) for k, v in terms.items() if v.numel() == 1}
    where = f"process {run.accelerator.process_index}" if bad else "another process"
    ids = task.record_ids(batch) if bad else []
    raise NonFiniteLossError(
        f"step {state.step + 1} (epoch {state.epoch + 1}): non-finite loss on {where} {values}"
        + (f"; the batch's records: {ids[:16]}{' ...' if len(ids) > 16 else ''}" if ids else "")
        + ". Nothing was updated or saved; check the inputs (NaN features?) or lower optim.lr."
    )


def _mean32(total: float, n: int) -> float:
    # float32 as the running sum itself, so a resumed run reports the very same number.
    return (torch.tensor(total, dtype=torch.float32) / max(1, n)).item()
