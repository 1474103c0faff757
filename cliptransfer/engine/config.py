"""The config sections the engine reads: `train` (loop, checkpoints, precision) and the run base.

Every task config extends `RunConfig` (train + optim); the vision-and-language transfer tasks
extend `cliptransfer.tasks.common.VLTaskConfig` (world, features, backbone, mode, tuning, peft).
`train.batch_size` is the GLOBAL batch of one optimizer step: it is split evenly over the
processes and `train.grad_accum` micro-batches, so a run trains on the same samples in the same
order whatever the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from cliptransfer.config import ConfigError
from cliptransfer.engine.optim import OptimConfig

__all__ = ["RunConfig", "TrainConfig"]

Precision = Literal["no", "bf16", "fp16", "auto"]


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{name}: must be >= {low}, got {value}")


@dataclass
class TrainConfig:
    out_dir: str = "runs/task"
    seed: int = 0
    epochs: int = 10
    max_steps: int | None = None  # stops early when set (tests, smoke runs)
    batch_size: int = 128  # GLOBAL samples per optimizer step (split over processes x grad_accum)
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batch_size: int = 512  # per process
    # "auto": bf16 autocast on GPUs with bf16 and on CPUs with native bf16 (AVX512-BF16 / AMX)
    precision: Precision = "no"
    log_every: int = 20
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0: epoch ends only)
    save_every_minutes: float = 0.0  # also checkpoint every N minutes (0: off)
    keep_last: int = 1  # checkpoints kept
    resume: str | None = None  # "latest" or a checkpoint folder
    num_threads: int = 0  # torch threads per process on CPU (0: CPU cores / local processes)

    def __post_init__(self) -> None:
        _at_least("epochs", self.epochs, 1)
        _at_least("max_steps", self.max_steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("grad_accum", self.grad_accum, 1)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        _at_least("log_every", self.log_every, 1)
        _at_least("save_every_steps", self.save_every_steps, 0)
        _at_least("keep_last", self.keep_last, 1)
        _at_least("num_threads", self.num_threads, 0)
        minutes = self.save_every_minutes
        if not (math.isfinite(minutes) and minutes >= 0):
            raise ConfigError(f"save_every_minutes: must be a finite number >= 0, got {minutes}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )


@dataclass
class RunConfig:
    """What the engine needs of every task's config."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
