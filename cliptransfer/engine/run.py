"""Starting a run: the command line, the typed config, Accelerate, seeding, threads, precision.

Every launcher (`pretrain/contrastive.py`, `tasks/*.py`) starts the same way:

    run = start_run(MyTask, argv, __doc__)     # flags, config, Accelerator, seed, threads
    task = MyTask(run.cfg, run)
    ...
    run.finish(report)                         # metrics.json (strict JSON), end_training()
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from cliptransfer.config import ConfigError, add_config_args, load_config, save_config
from cliptransfer.engine.config import RunConfig
from cliptransfer.engine.distributed import set_cpu_threads
from cliptransfer.fileio import write_json

if TYPE_CHECKING:
    from cliptransfer.engine.task import Task

__all__ = ["Run", "native_bf16_cpu", "resolve_precision", "run_task", "start_run"]


@lru_cache(maxsize=1)
def native_bf16_cpu() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16), where bf16
    autocast is faster than fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, cpu: bool) -> str:
    """`train.precision` -> what Accelerate gets: "auto" is bf16 on GPUs that have it and on
    CPUs with native bf16, "no" elsewhere."""
    if precision != "auto":
        return precision
    if not cpu and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if native_bf16_cpu() else "no"


@dataclass
class Run:
    """One launch: its config, flags, Accelerator and output folder."""

    cfg: RunConfig  # the task's config dataclass (extends RunConfig)
    args: argparse.Namespace
    accelerator: Accelerator
    written: list[Path] = field(default_factory=list)  # files this run wrote (for reports)

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *msg: Any) -> None:
        self.accelerator.print(*msg)

    def log(self, msg: str) -> None:
        """Progress notes on stderr (main process), so stdout keeps the report."""
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)

    def write_json(self, name: str, obj: Any) -> Path:
        """`out/name` as strict JSON (main process); remembered as written by this run."""
        path = self.out / name
        if self.is_main:
            write_json(path, obj)
        self.written.append(path)
        return path

    def finish(self, report: dict[str, Any], show: Callable[[dict], None] | None = None) -> dict:
        """metrics.json, the printed report (main process), then Accelerate's shutdown (gloo
        runs abort at exit without it)."""
        self.write_json("metrics.json", report)
        if show is not None and self.is_main:
            show(report)
        self.accelerator.end_training()
        return report


def parse_args(task_cls: type[Task], argv: list[str] | None, doc: str | None):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--cpu", action="store_true", help="force CPU (gloo for 2 processes)")
    task_cls.add_arguments(parser)
    return parser, parser.parse_args(argv)


def start_run(task_cls: type[Task], argv: list[str] | None, doc: str | None) -> Run:
    """Parse the launcher's command line, resolve the task's config (a config error exits with
    the message), start Accelerate, set the CPU threads and the seed."""
    parser, args = parse_args(task_cls, argv, doc)
    try:
        cfg = load_config(task_cls.spec.config, task_cls.config_file(args), args.overrides)
        if not isinstance(cfg, RunConfig):
            raise TypeError(f"{type(cfg).__name__} must extend engine.config.RunConfig")
        task_cls.apply_arguments(cfg, args)
    except ConfigError as e:
        parser.error(str(e))
    if args.resume:
        cfg.train.resume = args.resume
    # On a machine without GPUs the Accelerator must be told it is on the CPU: torchrun-started
    # processes would otherwise each believe they are alone (two runs, no gradient averaging).
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(cfg.train.precision, cpu),
        log_with="tensorboard",
        project_dir=cfg.train.out_dir,
    )
    set_cpu_threads(accelerator.device, cfg.train.num_threads, accelerator.num_processes)
    set_seed(cfg.train.seed)
    return Run(cfg, args, accelerator)


def save_run_config(run: Run) -> None:
    """The resolved config, written once per run (main process)."""
    if run.is_main:
        save_config(run.cfg, run.out / "config.yaml")


def run_task(task_cls: type[Task], argv: list[str] | None = None, doc: str | None = None) -> dict:
    """The launchers' flow in one call (tests, `cliptransfer compare`): start, set up, train (or
    --eval-only), report."""
    from cliptransfer.engine.loop import fit

    run = start_run(task_cls, argv, doc or task_cls.__doc__)
    task = task_cls(run.cfg, run)
    task.setup()
    report = task.evaluate_only() if task.eval_only else task.report(fit(run, task))
    return run.finish(task.finish_report(report), show=task.print_report)
