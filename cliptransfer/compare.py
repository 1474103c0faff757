"""`cliptransfer compare`: several feature settings of one task, same head and budget, one table.

    cliptransfer compare --task vqa --features clip-grid,bottomup --backbones default,RN50
    cliptransfer compare --task snli-ve --features clip-grid --backbones default,mine=runs/p/final
    cliptransfer compare --task vln --features clip,supervised,symbolic
    cliptransfer compare --task vqa --features clip-grid --init none,runs/vlp/final --seeds 0,1,2 \
        --set model.arch=vlbert

Settings are features x backbones (the backbone only matters for the CLIP feature kind, so
bottomup / supervised / symbolic runs once). Each setting runs the task script (`tasks/vqa.py`,
`tasks/snli_ve.py`, `tasks/vln.py`) in its own subprocess, so every run starts with a fresh
Accelerate state and frees its memory, with `--set features.kind=K` (VLN: `encoder=K`)
`--set backbone=B --set train.out_dir=OUT/<setting>` followed by the same user overrides for every
setting: the head (agent) and the training budget are identical by construction.

Each run's `metrics.json` (VQA: `val.overall` + `val.perAnswerType`; SNLI-VE: `val.accuracy` +
`val.per_label`; VLN: `val_unseen` SR / SPL / nDTW / SDTW / NE, with its baselines as reference
rows) becomes a row of OUT/compare.md, compare.png and compare.json. A setting finished
by an earlier run of the same command is reused (`rerun=True` reruns). No torch import here, and
matplotlib only when the plot is drawn: `cliptransfer --help` stays fast.
"""

from __future__ import annotations

import codecs
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cliptransfer.compare_report import aggregate, markdown, plot_png
from cliptransfer.fileio import (
    JSONFileError,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    write_json,
)

# Set by compare for each setting (with the task's features key); a user override of these would
# make the settings identical.
RESERVED = {"backbone": "--backbones", "train.out_dir": "--out", "model.init_from": "--init",
            "train.seed": "--seeds"}  # fmt: skip
RECORD = "compare_command.json"


class CompareError(ValueError):
    """A setting that failed or whose results cannot be compared (the CLI prints it, exit 2)."""


@dataclass(frozen=True)
class TaskSpec:
    """A task as compare sees it: its name and the columns its `metrics.json` gives."""

    name: str
    launcher: str
    cols: Any  # engine.task.CompareColumns

    @property
    def columns(self) -> tuple[str, ...]:
        return self.cols.columns

    @property
    def overall(self) -> str:
        return self.cols.overall

    @property
    def prior_label(self) -> str:
        return self.cols.prior_label

    def scores(self, m: dict[str, Any]) -> dict[str, float | None]:
        return self.cols.scores(m)

    @property
    def reserved(self) -> dict[str, str]:
        return {self.cols.features_key: "--features", **RESERVED}


def _spec(task: str) -> TaskSpec:
    """The registered task and its compare columns (`cliptransfer.engine.task.registered`)."""
    from cliptransfer.engine.task import registered

    tasks = {name: s for name, s in registered().items() if s.compare is not None}
    if task not in tasks:
        raise CompareError(f"unknown task {task!r}: choose from {', '.join(tasks)}")
    return TaskSpec(task, tasks[task].launcher, tasks[task].compare)


@dataclass(frozen=True)
class Setting:
    """One run of the comparison: a feature kind and, for clip-grid, a backbone; optionally a
    V&L-pretrained start (`init`, a pretrain/vl.py final/ folder; "none" = fresh weights) and a
    seed. Runs that differ only by seed form one `group` (mean ± std in the table)."""

    name: str  # also the run's folder under OUT
    feature: str
    backbone: str | None = None  # "default", an arch name or a checkpoint; None for bottomup
    features_key: str = "features.kind"  # the task's config field for the feature kind
    init: str | None = None  # None: not compared; "none" or a folder: model.init_from
    seed: int | None = None  # None: the config's train.seed

    @property
    def group(self) -> str:
        return self.name if self.seed is None else self.name.rsplit("-seed", 1)[0]

    def overrides(self, run_dir: Path) -> list[str]:
        out = [f"{self.features_key}={self.feature}"]
        out += [] if self.backbone is None else [f"backbone={self.backbone}"]
        out += [] if self.init in (None, "none") else [f"model.init_from={self.init}"]
        out += [] if self.seed is None else [f"train.seed={self.seed}"]
        return [*out, f"train.out_dir={run_dir}"]


def _label(spec: str) -> str:
    """A folder-safe name for a backbone: an arch name as it is, a path by its last two parts
    (`runs/pretrain/final` -> `pretrain_final`, since `final` alone says little)."""
    p = Path(spec).expanduser()
    if "/" in spec or os.sep in spec or p.exists():
        parent = p.parent.name if p.parent.name not in ("", ".", "..") else ""
        spec = f"{parent}_{p.stem}" if parent else p.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "backbone"


def _labelled(specs: Sequence[str]) -> list[tuple[str, str]]:
    """(label, spec) of `LABEL=SPEC` items, else the spec's own label."""
    parsed: list[tuple[str, str]] = []
    for b in dict.fromkeys(specs):
        label, sep, rest = b.partition("=")
        if sep and rest and re.fullmatch(r"[A-Za-z0-9._-]+", label) and not Path(b).exists():
            parsed.append((label, rest))
        else:
            parsed.append((_label(b), b))
    return parsed


def expand_settings(
    features: Sequence[str], backbones: Sequence[str] = (), task: str = "vqa",
    inits: Sequence[str] = (), seeds: Sequence[int] = (),
) -> list[Setting]:  # fmt: skip
    """features x backbones (x inits x seeds), in the given order; the non-CLIP kind once. A
    backbone or init may be `LABEL=SPEC` to name its setting `clip-grid-LABEL` (VLN:
    `clip-LABEL`) / `...-init-LABEL`; otherwise the label comes from the spec."""
    cols = _spec(task).cols
    kinds = cols.feature_kinds
    if not features:
        raise CompareError(f"no features given: choose from {', '.join(kinds)}")
    bad = [f for f in features if f not in kinds]
    if bad:
        raise CompareError(f"unknown feature kind {bad[0]!r}: choose from {', '.join(kinds)}")
    parsed = _labelled(backbones or ["default"])
    base: list[Setting] = []
    key = cols.features_key
    for feature in dict.fromkeys(features):
        if feature == cols.backbone_kind:
            base += [Setting(f"{feature}-{label}", feature, b, key) for label, b in parsed]
        else:
            base.append(Setting(feature, feature, None, key))
    init_specs: list[tuple[str, str | None]] = [(i, i) if i == "none" else (label, i)
                                                for label, i in _labelled(inits)] or [("", None)]  # fmt: skip
    seed_list: list[int | None] = list(dict.fromkeys(seeds)) or [None]
    settings = [
        Setting(
            s.name + (f"-init-{label}" if init else "") + ("" if seed is None else f"-seed{seed}"),
            s.feature,
            s.backbone,
            key,
            init,
            seed,
        )  # fmt: skip
        for s in base
        for label, init in init_specs
        for seed in seed_list
    ]
    names = [s.name for s in settings]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        same = [s.backbone for s in settings if s.name == dup]
        raise CompareError(
            f"backbones {same} would share the setting name {dup!r}: name them LABEL=PATH, "
            f"e.g. --backbones a={same[0]},b={same[1]}"
        )
    return settings


def task_script(task: str, script: str | Path | None = None) -> Path:
    """The task's launcher: `script`, or the registered one (`tasks/<name>.py`) next to the
    package (an editable install or a checkout; a wheel install has no tasks/ and must pass
    `--script`). Any registered task (benchmark runs the contrastive one), not only compare's."""
    from cliptransfer.engine.task import registered

    tasks = registered()
    if task not in tasks:
        raise CompareError(f"unknown task {task!r}: choose from {', '.join(tasks)}")
    if script is not None:
        path = Path(script)
        if not path.is_file():
            raise FileNotFoundError(f"task script {path} not found")
        return path
    import cliptransfer

    path = Path(cliptransfer.__file__).resolve().parents[1] / tasks[task].launcher
    if not path.is_file():
        raise FileNotFoundError(
            f"task script {path} not found (the tasks/ folder exists in a source checkout, not "
            "in a non-editable install): install with `pip install -e .` or pass --script PATH"
        )
    return path


def set_args(overrides: Sequence[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def check_overrides(
    overrides: Sequence[str], reserved: dict[str, str], who: str = "compare"
) -> None:
    """KEY=VALUE items, none of them a key that `who` sets per run itself (`reserved`: key ->
    the flag that varies it)."""
    for text in overrides:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            raise CompareError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        if (flag := reserved.get(key.strip())) is not None:
            raise CompareError(f"--set {text}: {who} sets {key.strip()} itself; use {flag}")


def _stream(cmd: list[str], log_path: Path, echo: TextIO) -> int:
    """Run `cmd`, copying its stdout+stderr to `echo` as it comes and to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress shows up as it happens
    with (
        open(log_path, "wb") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        ) as proc,
    ):
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(1 << 16):  # raw chunks keep tqdm's \r updates
            log.write(chunk)
            log.flush()
            echo.write(decoder.decode(chunk))
            echo.flush()
        echo.write(decoder.decode(b"", final=True))
        return proc.wait()


def _read_metrics(spec: TaskSpec, setting: Setting, path: Path) -> dict[str, Any]:
    try:
        metrics = read_json(path)
    except JSONFileError as e:
        raise CompareError(f"setting {setting.name!r}: {e}") from None
    split = spec.cols.split
    val = metrics.get(split)
    if not isinstance(val, dict) or spec.overall not in val:
        raise CompareError(
            f"setting {setting.name!r}: {path} has no {split}.{spec.overall} (a {spec.name} run "
            f"without {split} annotations cannot be compared)"
        )
    return metrics


def stored_record(run_dir: Path, record_name: str = RECORD) -> dict | None:
    """The command record an earlier run left in run_dir/`record_name`, or None."""
    path = run_dir / record_name
    return read_json(path) if path.is_file() else None


def run_recorded(
    name: str, cmd: list[str], record: dict, run_dir: Path, *, rerun: bool,
    log: Callable[[str], None], where: str, read: Callable[[Path], dict[str, Any]],
    record_name: str = RECORD, log_name: str = "compare.log", what: str = "setting",
) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """(metrics, reused): run `cmd` (which writes run_dir/metrics.json, parsed by `read`), or
    reuse what an earlier run of the identical `record` (the command, kept in
    run_dir/`record_name`) finished. Shared by `compare` (settings) and `benchmark` (cells)."""
    metrics_path, record_path = run_dir / "metrics.json", run_dir / record_name
    if metrics_path.is_file() and not rerun:
        if stored_record(run_dir, record_name) != record:
            raise CompareError(
                f"{what} {name!r}: {metrics_path} exists but was not made by this "
                f"command (see {record_path}); pass --rerun to run it again or choose another --out"
            )
        log(f"{where} {name}: reusing {metrics_path} (finished earlier; --rerun reruns)")
        return read(metrics_path), True
    metrics_path.unlink(missing_ok=True)  # metrics.json now means: this record's run finished
    write_json(record_path, record)
    log_path = run_dir / log_name
    log(f"{where} {name}: {shlex.join(cmd)}")
    try:
        rc = _stream(cmd, log_path, sys.stdout)
    except OSError as e:
        raise CompareError(f"{what} {name!r} could not start {cmd[0]!r}: {e}") from None
    if rc != 0:
        how = f"exit code {rc}" + (f" (signal {-rc})" if rc < 0 else "")
        raise CompareError(f"{what} {name!r} failed with {how}; its log: {log_path}")
    if not metrics_path.is_file():
        raise CompareError(f"{what} {name!r} exited 0 but wrote no {metrics_path}")
    return read(metrics_path), False


def _row(spec: TaskSpec, setting: Setting, metrics: dict, path: Path, reused: bool) -> dict:
    feats = metrics.get("features") or {}
    mem = metrics.get("peak_memory") or {}
    return {
        "setting": setting.name,
        "group": setting.group,
        "init": setting.init,
        "seed": setting.seed,
        "features": setting.feature,
        "backbone": setting.backbone,
        "feature_kind": feats.get("kind"),
        "feature_backbone": feats.get("backbone"),
        "input_size": feats.get("input_size"),
        "grid_size": feats.get("grid_size"),
        "channels": feats.get("channels"),
        "val": spec.scores(metrics[spec.cols.split]),
        "train_samples_per_s": metrics.get("train_samples_per_s"),
        "peak_memory": {"kind": mem.get("kind"), "mib": mem.get("mib")},
        "seconds": metrics.get("seconds"),
        "best_epoch": metrics.get("best_epoch"),
        "metrics": str(path),
        "reused": reused,
    }


def _priors(spec: TaskSpec, rows: list[dict], all_metrics: list[dict]) -> list[dict]:
    """The distinct reference rows of the runs (VQA / SNLI-VE: the prior, one unless settings
    evaluated different examples; VLN: random, forward and each run's no-vision twin)."""
    priors: list[dict] = []
    for row, m in zip(rows, all_metrics):
        for label, val in spec.cols.references(m).items():
            if all(p["label"] != label or p["val"] != val for p in priors):
                priors.append({"label": label, "source": row["setting"], "val": val})
    labels = [p.pop("label") for p in priors]
    for p, label in zip(priors, labels):
        p["setting"] = label + (f" ({p['source']})" if labels.count(label) > 1 else "")
    return priors


def run_compare(
    task: str,
    features: Sequence[str],
    backbones: Sequence[str] = ("default",),
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    launcher: str | None = None,
    script: str | Path | None = None,
    config: str | None = None,
    rerun: bool = False,
    inits: Sequence[str] = (),
    seeds: Sequence[int] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or reuse) every setting, then write OUT/compare.{md,png,json} and print the table
    (settings run over several `seeds` as mean ± std).

    Returns the compare.json content. Stops at the first failing setting with a CompareError that
    names it, its exit code and its log (OUT/<setting>/compare.log).
    """
    path = task_script(task, script)
    spec = _spec(task)
    check_overrides(overrides, spec.reserved)
    settings = expand_settings(features, backbones, task, inits, seeds)
    clip_kind = spec.cols.backbone_kind
    if clip_kind not in features and list(backbones) not in ([], ["default"]):
        log(f"note: --backbones only applies to {clip_kind}, which is not among --features")
    out = Path(out or f"runs/compare-{task}")
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    rows, all_metrics = [], []
    for i, s in enumerate(settings, 1):
        run_dir = out / s.name
        args = (["--config", config] if config else []) + set_args(
            [*spec.cols.defaults, *s.overrides(run_dir), *overrides]
        )
        record = {"script": path.name, "launcher": launcher, "args": args}
        metrics, reused = run_recorded(
            s.name, [*prefix, str(path), *args], record, run_dir, rerun=rerun, log=log,
            where=f"[{i}/{len(settings)}]", read=lambda p, s=s: _read_metrics(spec, s, p),
        )  # fmt: skip
        rows.append(_row(spec, s, metrics, run_dir / "metrics.json", reused))
        all_metrics.append(metrics)
    priors = _priors(spec, rows, all_metrics)
    grouped = aggregate(spec, rows)
    table = markdown(spec, grouped, priors)
    common = shlex.join(
        (["--config", config] if config else []) + set_args([*spec.cols.defaults, *overrides])
    )
    atomic_write_text(
        out / "compare.md",
        f"# {task}: feature settings compared\n\n{table}\n\nScores on {spec.cols.split}, "
        f"{spec.cols.unit}, at the best epoch; "
        f"every setting ran {path.name} with the same arguments: `{common or '(none)'}`.\n",
    )
    atomic_write_bytes(out / "compare.png", plot_png(spec, grouped, priors))
    result = {"task": task, "columns": list(spec.columns), "rows": rows, "settings": grouped,
              "prior": priors, "overrides": list(overrides), "launcher": launcher,
              "script": str(path)}  # fmt: skip
    write_json(out / "compare.json", result)
    log(table)
    log(f"wrote {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")
    return result
