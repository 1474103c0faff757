"""The engine: one training loop and run start-up for every task (see `task.py` for the contract)."""

from __future__ import annotations

from cliptransfer.engine.config import RunConfig, TrainConfig
from cliptransfer.engine.loop import FitResult, NonFiniteLossError, fit
from cliptransfer.engine.run import Run, run_task, start_run
from cliptransfer.engine.task import (
    CompareColumns,
    EvaluateCommand,
    Task,
    TaskSpec,
    get_task,
    register_task,
    registered,
)

__all__ = [
    "CompareColumns",
    "EvaluateCommand",
    "FitResult",
    "NonFiniteLossError",
    "Run",
    "RunConfig",
    "Task",
    "TaskSpec",
    "TrainConfig",
    "fit",
    "get_task",
    "register_task",
    "registered",
    "run_task",
    "start_run",
]
