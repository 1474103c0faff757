"""`cliptransfer compare`: several feature settings of one task, same head and budget, one table.

    cliptransfer compare --task vqa --features clip-grid,bottomup --backbones default,RN50
    cliptransfer compare --task snli-ve --features clip-grid --backbones default,mine=runs/p/final
    cliptransfer compare --task vln --features clip,supervised

Settings are features x backbones (the backbone only matters for the CLIP feature kind, so
bottomup / supervised runs once). Each setting runs the task script (`tasks/vqa.py`,
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
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cliptransfer.fileio import (
    JSONFileError,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    write_json,
)

# Set by compare for each setting (with the task's features key); a user override of these would
# make the settings identical.
RESERVED = {"backbone": "--backbones", "train.out_dir": "--out"}
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
    """One run of the comparison: a feature kind and, for clip-grid, a backbone."""

    name: str  # also the run's folder under OUT
    feature: str
    backbone: str | None = None  # "default", an arch name or a checkpoint; None for bottomup
    features_key: str = "features.kind"  # the task's config field for the feature kind

    def overrides(self, run_dir: Path) -> list[str]:
        backbone = [] if self.backbone is None else [f"backbone={self.backbone}"]
        return [f"{self.features_key}={self.feature}", *backbone, f"train.out_dir={run_dir}"]


def split_list(text: str) -> list[str]:
    """`a,b, c` -> ["a", "b", "c"] (empty items dropped)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _label(spec: str) -> str:
    """A folder-safe name for a backbone: an arch name as it is, a path by its last two parts
    (`runs/pretrain/final` -> `pretrain_final`, since `final` alone says little)."""
    p = Path(spec).expanduser()
    if "/" in spec or os.sep in spec or p.exists():
        parent = p.parent.name if p.parent.name not in ("", ".", "..") else ""
        spec = f"{parent}_{p.stem}" if parent else p.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "backbone"


def expand_settings(
    features: Sequence[str], backbones: Sequence[str] = (), task: str = "vqa"
) -> list[Setting]:
    """features x backbones, in the given order; the non-CLIP kind once. A backbone may be
    `LABEL=SPEC` to name its setting `clip-grid-LABEL` (VLN: `clip-LABEL`); otherwise the label
    comes from the spec."""
    cols = _spec(task).cols
    kinds = cols.feature_kinds
    if not features:
        raise CompareError(f"no features given: choose from {', '.join(kinds)}")
    bad = [f for f in features if f not in kinds]
    if bad:
        raise CompareError(f"unknown feature kind {bad[0]!r}: choose from {', '.join(kinds)}")
    parsed: list[tuple[str, str]] = []
    for b in dict.fromkeys(backbones or ["default"]):
        label, sep, rest = b.partition("=")
        if sep and rest and re.fullmatch(r"[A-Za-z0-9._-]+", label) and not Path(b).exists():
            parsed.append((label, rest))
        else:
            parsed.append((_label(b), b))
    settings: list[Setting] = []
    key = cols.features_key
    for feature in dict.fromkeys(features):
        if feature == cols.backbone_kind:
            settings += [Setting(f"{feature}-{label}", feature, b, key) for label, b in parsed]
        else:
            settings.append(Setting(feature, feature, None, key))
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
    `--script`)."""
    spec = _spec(task)
    if script is not None:
        path = Path(script)
        if not path.is_file():
            raise FileNotFoundError(f"task script {path} not found")
        return path
    import cliptransfer

    path = Path(cliptransfer.__file__).resolve().parents[1] / spec.launcher
    if not path.is_file():
        raise FileNotFoundError(
            f"task script {path} not found (the tasks/ folder exists in a source checkout, not "
            "in a non-editable install): install with `pip install -e .` or pass --script PATH"
        )
    return path


def _sets(overrides: Sequence[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _check_overrides(overrides: Sequence[str], reserved: dict[str, str]) -> None:
    for text in overrides:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            raise CompareError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        if (flag := reserved.get(key.strip())) is not None:
            raise CompareError(f"--set {text}: compare sets {key.strip()} itself; use {flag}")


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


def _run_setting(
    spec: TaskSpec, setting: Setting, cmd: list[str], record: dict, run_dir: Path, rerun: bool,
    log: Callable[[str], None], where: str,
) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """(metrics, reused): run the setting, or reuse what an earlier run of `record` finished."""
    metrics_path, record_path = run_dir / "metrics.json", run_dir / RECORD
    if metrics_path.is_file() and not rerun:
        old = read_json(record_path) if record_path.is_file() else None
        if old != record:
            raise CompareError(
                f"setting {setting.name!r}: {metrics_path} exists but was not made by this "
                f"command (see {record_path}); pass --rerun to run it again or choose another --out"
            )
        log(f"{where} {setting.name}: reusing {metrics_path} (finished earlier; --rerun reruns)")
        return _read_metrics(spec, setting, metrics_path), True
    metrics_path.unlink(missing_ok=True)  # metrics.json now means: this record's run finished
    write_json(record_path, record)
    log_path = run_dir / "compare.log"
    log(f"{where} {setting.name}: {shlex.join(cmd)}")
    try:
        rc = _stream(cmd, log_path, sys.stdout)
    except OSError as e:
        raise CompareError(f"setting {setting.name!r} could not start {cmd[0]!r}: {e}") from None
    if rc != 0:
        how = f"exit code {rc}" + (f" (signal {-rc})" if rc < 0 else "")
        raise CompareError(f"setting {setting.name!r} failed with {how}; its log: {log_path}")
    if not metrics_path.is_file():
        raise CompareError(f"setting {setting.name!r} exited 0 but wrote no {metrics_path}")
    return _read_metrics(spec, setting, metrics_path), False


def _row(spec: TaskSpec, setting: Setting, metrics: dict, path: Path, reused: bool) -> dict:
    feats = metrics.get("features") or {}
    mem = metrics.get("peak_memory") or {}
    return {
        "setting": setting.name,
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


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def _input_cell(row: dict) -> str:
    size, grid = ("x".join(map(str, row[k] or [])) or "-" for k in ("input_size", "grid_size"))
    cells = {"grid": f"{size} → {grid}", "regions": "regions", "end2end": f"{size} (pixels)",
             "views": f"36 views {size}"}  # fmt: skip
    return cells.get(row["feature_kind"], "-")


def markdown(spec: TaskSpec, rows: list[dict], priors: list[dict]) -> str:
    """The comparison table: accuracies with 2 decimals, samples/s 1, MiB 0, seconds 1."""
    header = ["setting", "feature kind", "backbone", "input → grid", "channels", *spec.columns,
              "train samples/s", "peak memory MiB", "seconds"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        mem = r["peak_memory"]
        mem_cell = "-" if mem["mib"] is None else f"{mem['mib']:.0f} ({mem['kind']})"
        cells = [r["setting"], r["feature_kind"], r["feature_backbone"], _input_cell(r),
                 r["channels"], *(r["val"][c] for c in spec.columns),
                 _fmt(r["train_samples_per_s"], 1), mem_cell, _fmt(r["seconds"], 1)]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    for p in priors:
        cells = [p["setting"], "", "", "", "", *(p["val"][c] for c in spec.columns), "", "", ""]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_png(spec: TaskSpec, rows: list[dict], priors: list[dict]) -> bytes:
    """Three panels (Agg, no pyplot state): grouped accuracy bars per column with the prior as
    dashed reference lines, training samples/s, and peak memory per setting."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def num(v: Any) -> float:
        return math.nan if v is None else float(v)

    names = [r["setting"] for r in rows]
    fig = Figure(figsize=(6 + 1.2 * len(rows) + 1.5 * len(spec.columns), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    acc, speed, mem = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2.2, 1, 1]})
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(spec.columns))]
        acc.bar(xs, [num(r["val"][c]) for c in spec.columns], width, label=r["setting"])
    for k, p in enumerate(priors):
        for j, c in enumerate(spec.columns):
            acc.hlines(num(p["val"][c]), j - 0.45, j + 0.45, colors="black",
                       linestyles=["--", ":", "-."][k % 3], label=p["setting"] if j == 0 else None)  # fmt: skip
    acc.set_xticks(range(len(spec.columns)), spec.columns)
    acc.set_ylabel(f"{spec.cols.split} {spec.cols.unit}")
    acc.set_title(f"{spec.name}: {spec.cols.split} per setting")
    acc.legend(fontsize="small")
    colors = [f"C{i}" for i in range(len(rows))]
    speed.bar(names, [num(r["train_samples_per_s"]) for r in rows], color=colors)
    speed.set_ylabel("samples/s")
    speed.set_title("training throughput")
    mem.bar(names, [num(r["peak_memory"]["mib"]) for r in rows], color=colors)
    kinds = sorted({str(r["peak_memory"]["kind"]) for r in rows})
    mem.set_ylabel(f"MiB ({', '.join(kinds)})")
    mem.set_title("peak memory")
    for ax in (speed, mem):
        ax.tick_params(axis="x", labelrotation=30)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or reuse) every setting, then write OUT/compare.{md,png,json} and print the table.

    Returns the compare.json content. Stops at the first failing setting with a CompareError that
    names it, its exit code and its log (OUT/<setting>/compare.log).
    """
    path = task_script(task, script)
    spec = _spec(task)
    _check_overrides(overrides, spec.reserved)
    settings = expand_settings(features, backbones, task)
    clip_kind = spec.cols.backbone_kind
    if clip_kind not in features and list(backbones) not in ([], ["default"]):
        log(f"note: --backbones only applies to {clip_kind}, which is not among --features")
    out = Path(out or f"runs/compare-{task}")
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    rows, all_metrics = [], []
    for i, s in enumerate(settings, 1):
        run_dir = out / s.name
        args = (["--config", config] if config else []) + _sets([*s.overrides(run_dir), *overrides])
        record = {"script": path.name, "launcher": launcher, "args": args}
        metrics, reused = _run_setting(
            spec, s, [*prefix, str(path), *args], record, run_dir, rerun, log,
            f"[{i}/{len(settings)}]",
        )  # fmt: skip
        rows.append(_row(spec, s, metrics, run_dir / "metrics.json", reused))
        all_metrics.append(metrics)
    priors = _priors(spec, rows, all_metrics)
    table = markdown(spec, rows, priors)
    common = shlex.join((["--config", config] if config else []) + _sets(overrides))
    atomic_write_text(
        out / "compare.md",
        f"# {task}: feature settings compared\n\n{table}\n\nScores on {spec.cols.split}, "
        f"{spec.cols.unit}, at the best epoch; "
        f"every setting ran {path.name} with the same arguments: `{common or '(none)'}`.\n",
    )
    atomic_write_bytes(out / "compare.png", plot_png(spec, rows, priors))
    result = {"task": task, "columns": list(spec.columns), "rows": rows, "prior": priors,
              "overrides": list(overrides), "launcher": launcher, "script": str(path)}  # fmt: skip
    write_json(out / "compare.json", result)
    log(table)
    log(f"wrote {out / 'compare.md'}, {out / 'compare.png'}, {out / 'compare.json'}")
    return result
