"""The task contract every trainable thing implements, and the registry that lists the tasks.

A task (contrastive pretraining, VQA, SNLI-VE, and next navigation and V&L pretraining) says what
is particular to it; the engine (`cliptransfer.engine.loop.fit`) does everything else once. The
shape follows timm's `task/classification.py` (`forward(input, target) -> {"loss", "output"}`)
and open_clip's `task/clip_task.py` (several named terms, the total under "loss"):

    class MyTask(Task):
        def setup(self):                      # model, training data, evaluation splits
            self.model, self.train_data, self.collate = ..., ..., ...
        def training_step(self, model, batch):
            return {"loss": mlm + itm, "mlm": mlm, "itm": itm}   # every term is logged
        def evaluate(self, model, split):
            return results, metrics           # what to save, what to score (None: no labels)
        def score(self, metrics):             # picks best/
            return metrics["accuracy"]
        def save_best(self, folder, model, best, results): ...

A rollout (navigation) is a `training_step` that runs the episode inside; several optimizers
(CLIP-ViL_p's SGD backbone beside AdamW) come from `optimizers`. Tasks register with
`@register_task(...)`; `registered()` imports every task package under `cliptransfer/tasks/` once,
so adding a task touches only its own package and its launcher.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    import argparse

    from cliptransfer.engine.config import RunConfig
    from cliptransfer.engine.optim import OptimizerSpec
    from cliptransfer.engine.run import Run

__all__ = [
    "CompareColumns",
    "EvalOnlyTask",
    "EvaluateCommand",
    "Task",
    "TaskSpec",
    "evaluate_commands",
    "get_task",
    "register_evaluate",
    "register_task",
    "registered",
]


class Task:
    """Base class of every task. Subclasses set `model`, `train_data` and `collate` in `setup`
    and implement `training_step`; the rest has defaults a task overrides as needed."""

    # Set by `@register_task`.
    spec: ClassVar[TaskSpec]

    # Training data: every global batch is split over processes (and micro-batches) by the
    # engine, so a dataset only maps an index to a sample. `drop_last` keeps only full global
    # batches (contrastive losses gather equal batches from every rank).
    drop_last: ClassVar[bool] = False
    # Evaluate (and keep the best) after every epoch; False: only once, after training.
    evaluate_every_epoch: ClassVar[bool] = True
    # The TensorBoard run name under train.out_dir.
    tracker: ClassVar[str] = "task"

    def __init__(self, cfg: RunConfig, run: Run) -> None:
        self.cfg, self.run = cfg, run
        self.model: nn.Module | None = None
        self.train_data: Dataset | None = None
        self.collate: Callable[[list], dict[str, Any]] | None = None

    # ---- what every task provides
    def setup(self) -> None:
        """Build the data and the model (on every process; the run is seeded before)."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"loss": the scalar to minimise (a mean over the batch's samples), name: term, ...}.
        Runs under the run's autocast; every entry is logged as train/<name>."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> tuple[Any, dict | None]:
        """(results to save, metrics) on `split`, gathered from every process; metrics is None
        for a split without labels."""
        raise NotImplementedError

    def score(self, metrics: Mapping[str, Any]) -> float:
        """The number the best epoch maximises."""
        raise NotImplementedError

    # ---- the command line (the engine's flags: --config, --set, --resume, --cpu)
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Task-specific flags of the launcher."""

    @classmethod
    def config_file(cls, args: argparse.Namespace) -> str | None:
        """The YAML file the config starts from (default: --config)."""
        return args.config

    @classmethod
    def apply_arguments(cls, cfg: RunConfig, args: argparse.Namespace) -> None:
        """Fold task flags into the loaded config; check settings that contradict each other
        (a ConfigError is printed as a usage error before any work starts)."""

    # ---- defaults a task may override
    @property
    def num_workers(self) -> int:
        """DataLoader workers of the training data."""
        return 0

    def train_scalars(self, model: nn.Module) -> dict[str, float]:
        """Extra training scalars logged with the loss terms (e.g. CLIP's logit scale)."""
        return {}

    def scalars(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Evaluation metrics to log to TensorBoard (val/<name>)."""
        return {"score": self.score(metrics)}

    def save_best(self, folder: Path, model: nn.Module, best: dict, results: Any) -> None:
        """Write the best model (main process only; `model` is unwrapped)."""

    def optimizers(self, model: nn.Module, total_steps: int) -> list[OptimizerSpec]:
        """The optimizers and their schedules over the run's `total_steps` optimizer steps;
        default: one AdamW over every trainable parameter (`cfg.optim`, per-group lr by
        `lr_scales`) with warmup + cosine."""
        from cliptransfer.engine.optim import adamw_spec

        return [
            adamw_spec(model, self.cfg.optim, total_steps, self.lr_scales(),
                       fused=self.fused_optimizer())
        ]  # fmt: skip

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix (e.g. {"backbone.": 0.1})."""
        return {}

    def fused_optimizer(self) -> bool:
        return False

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (e.g. CLIP's logit-scale clamp)."""

    def record_ids(self, batch: Mapping[str, Any]) -> list[Any]:
        """Ids of the batch's records, named by the non-finite-loss error."""
        for key in ("question_id", "pair_id", "index", "ids"):
            if key in batch:
                value = batch[key]
                return value.tolist() if isinstance(value, torch.Tensor) else list(value)
        return []

    def state_dict(self) -> dict[str, Any]:
        """JSON-able task state that a checkpoint keeps (counters, an initial evaluation)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def on_start(self, model: nn.Module, resumed: bool) -> None:
        """After the model is prepared and any checkpoint loaded, before the first step."""

    # ---- the run report
    eval_only: str | None = None  # a best/ folder to evaluate instead of training

    def evaluate_only(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no --eval-only")

    def report(self, result: Any) -> dict[str, Any]:
        """metrics.json of a finished `fit` (a `FitResult`)."""
        return result.report()

    def finish_report(self, report: dict[str, Any]) -> dict[str, Any]:
        """Last fields of the report (wall time, peak memory)."""
        return report

    def print_report(self, report: dict[str, Any]) -> None:
        print(report)


class EvalOnlyTask(Task):
    """A task whose launcher also takes `--eval-only BEST_DIR` (evaluate a saved best/ folder:
    its config.yaml + --set overrides, `evaluate_only` instead of `fit`) and `--skip-missing`
    (= --set data.skip_missing=true; the config has a `data.skip_missing` field)."""

    def __init__(self, cfg: RunConfig, run: Run) -> None:
        super().__init__(cfg, run)
        self.eval_only = run.args.eval_only

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--skip-missing", action="store_true", help="= --set data.skip_missing=true"
        )
        parser.add_argument("--eval-only", default=None, metavar="BEST_DIR",
                            help="evaluate / predict with a saved best/ folder "
                                 "(its config.yaml + --set overrides)")  # fmt: skip

    @classmethod
    def config_file(cls, args: argparse.Namespace) -> str | None:
        if args.eval_only and args.config is None:
            return str(Path(args.eval_only) / "config.yaml")
        return args.config

    @classmethod
    def apply_arguments(cls, cfg: Any, args: argparse.Namespace) -> None:
        cfg.data.skip_missing = cfg.data.skip_missing or args.skip_missing


# ---- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareColumns:
    """What `cliptransfer compare` varies in a task and which numbers of a run's `metrics.json`
    make its columns."""

    overall: str  # key of the scores (and of each reference) holding the headline number
    breakdown_key: str | None  # key holding {group: number or null}; None: groups at top level
    breakdown: tuple[str, ...]
    prior_label: str  # the label of metrics.json's "prior" entry (references_key="prior")
    split: str = "val"  # metrics.json key of the run's scores
    features_key: str = "features.kind"  # the config field compare sets per setting
    feature_kinds: tuple[str, ...] = ("clip-grid", "bottomup")
    backbone_kind: str = "clip-grid"  # the one feature kind that takes --backbones
    # "prior": metrics["prior"] is one reference entry; "baselines": metrics["baselines"] maps
    # a label to {split: entry} (VLN's random / forward / no-vision walks).
    references_key: str = "prior"
    fractions: tuple[str, ...] = ()  # columns stored as fractions, shown in percent (VLN rates)
    unit: str = "accuracy (%)"  # what the numbers are (table caption, plot axis)
    # "key=value" overrides every setting starts from, before the user's --set (which may
    # change them), e.g. VLN's follower stage and budget.
    defaults: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.overall, *self.breakdown)

    def scores(self, m: Mapping[str, Any]) -> dict[str, float | None]:
        """{column: number or None} of one scores / reference entry."""
        groups = m if self.breakdown_key is None else (m.get(self.breakdown_key) or {})

        def shown(key: str, v: Any) -> float | None:
            return None if v is None else float(v) * (100.0 if key in self.fractions else 1.0)

        return {self.overall: shown(self.overall, m[self.overall]),
                **{g: shown(g, groups.get(g)) for g in self.breakdown}}  # fmt: skip

    def references(self, metrics: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
        """{label: scores} of the reference rows a run reports (the prior, or its baselines)."""
        if self.references_key == "prior":
            prior = metrics.get("prior")
            return {self.prior_label: self.scores(prior)} if isinstance(prior, dict) else {}
        found = metrics.get(self.references_key) or {}
        return {label: self.scores(by_split[self.split]) for label, by_split in found.items()
                if isinstance(by_split, dict) and isinstance(by_split.get(self.split), dict)}  # fmt: skip


@dataclass(frozen=True)
class EvaluateCommand:
    """`cliptransfer evaluate <name>`: the official metric on a results file."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]


@dataclass(frozen=True)
class TaskSpec:
    name: str  # "vqa", "snli-ve", ...: the CLI's and compare's name
    task: type[Task]
    config: type  # the typed config dataclass (extends engine.config.TaskConfig)
    launcher: str  # the script users run, relative to the repository root
    configs: tuple[str, ...] = ()  # globs of the shipped YAML configs (repository-relative)
    compare: CompareColumns | None = None
    evaluate: EvaluateCommand | None = None
    # The sentences of a Shapes world this task feeds a text encoder (the tokenizer corpus).
    text_corpus: Callable[[Path], list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, TaskSpec] = {}
_DISCOVERED = False


def register_task(
    name: str,
    *,
    config: type,
    launcher: str,
    configs: tuple[str, ...] = (),
    compare: CompareColumns | None = None,
    evaluate: EvaluateCommand | None = None,
    text_corpus: Callable[[Path], list[str]] | None = None,
) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: `@register_task("vqa", config=VQAConfig, launcher="tasks/vqa.py")`."""

    def wrap(cls: type[Task]) -> type[Task]:
        old = _REGISTRY.get(name)
        if old is not None and old.task.__qualname__ != cls.__qualname__:
            raise ValueError(f"task {name!r} is registered twice ({old.task} and {cls})")
        spec = TaskSpec(name, cls, config, launcher, configs, compare, evaluate, text_corpus)
        _REGISTRY[name] = spec
        cls.spec = spec
        return cls

    return wrap


_EVALUATE: dict[str, EvaluateCommand] = {}


def register_evaluate(name: str, command: EvaluateCommand) -> EvaluateCommand:
    """`cliptransfer evaluate NAME` for a metric that is not (yet) a trainable task's, e.g. the
    R2R / RxR navigation metrics. Tasks registered with `evaluate=` need no second entry."""
    _EVALUATE[name] = command
    return command


def evaluate_commands() -> dict[str, EvaluateCommand]:
    """Every `cliptransfer evaluate` subcommand: the tasks' and the registered metrics'."""
    tasks = {n: s.evaluate for n, s in registered().items() if s.evaluate is not None}
    return dict(sorted({**_EVALUATE, **tasks}.items()))


def _discover() -> None:
    """Import `cliptransfer.tasks.<package>.task` for every task package (once)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import cliptransfer.tasks as tasks_pkg

    for info in pkgutil.iter_modules(tasks_pkg.__path__):
        if info.ispkg:
            try:
                importlib.import_module(f"cliptransfer.tasks.{info.name}.task")
            except ModuleNotFoundError as e:
                if e.name != f"cliptransfer.tasks.{info.name}.task":
                    raise
    _DISCOVERED = True


def registered() -> dict[str, TaskSpec]:
    """Every task, by name, in name order."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get_task(name: str) -> TaskSpec:
    tasks = registered()
    if name not in tasks:
        raise KeyError(f"unknown task {name!r}: choose from {', '.join(tasks)}")
    return tasks[name]


def iter_tasks(predicate: Callable[[TaskSpec], bool] = lambda s: True) -> Iterator[TaskSpec]:
    yield from (s for s in registered().values() if predicate(s))
