"""`cliptransfer benchmark`: the CLIP-benchmark (DeCLIP authors, "Democratizing Contrastive
Language-Image Pre-training") on the Shapes world in one command.

    cliptransfer benchmark --quick                        # smoke table, ~10 min on 2 CPU cores
    cliptransfer benchmark --methods clip,slip,declip,filip,defilip,siglip \
        --archs RN-tiny,ViT-tiny --text-layers 2,1 --data-noise 0,0.3 --seeds 0,1,2

Cells are methods x towers x text depths x caption-noise levels x seeds. Every cell runs
pretrain/contrastive.py in its own subprocess (fresh Accelerate state, freed memory; `compare`'s
machinery) with the same budget and config, varying only `loss.method`, `model.arch`,
`model.text.layers`, `data.caption_noise` and `train.seed`; user `--set` overrides follow for
every cell. The trainer's metrics.json gives retrieval and zero-shot accuracy and the training
cost (samples/s, peak memory); the benchmark adds a linear probe of the frozen image embeddings
(`cliptransfer.clip.probe`) on the same zero-shot images, so "the tower sees it" and "the alignment
learned it" can be told apart. A cell finished by an earlier run of the identical command is
reused (`rerun=True` reruns) and one interrupted resumes from its last checkpoint. Writes OUT/benchmark.{md,json} and the PNGs of `benchmark_report`.
No torch import at module level: `cliptransfer --help` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliptransfer.compare import (
    CompareError,
    check_overrides,
    run_recorded,
    set_args,
    stored_record,
    task_script,
)
from cliptransfer.fileio import JSONFileError, read_json, write_json

# The trainer's methods (`contrastive.objectives.METHODS`, pinned by a test; not imported here
# because that module imports torch).
METHODS = ("clip", "slip", "declip", "filip", "defilip", "siglip")
ARCHS = ("RN-tiny", "ViT-tiny")
DEFAULT_SEEDS = (0, 1, 2)
# Set per cell; a --set of one would make the cells identical.
RESERVED = {"loss.method": "--methods", "model.arch": "--archs",
            "model.text.layers": "--text-layers", "data.caption_noise": "--data-noise",
            "train.seed": "--seeds", "train.out_dir": "--out", "train.resume": "--rerun"}  # fmt: skip
RECORD = "benchmark_command.json"
# One budget for every method (the benchmark's premise: same data, same steps, same batch; the
# per-method YAMLs halve FILIP's batch for CPU comfort, so they are not used here).
# Default: the trainer's own budget on the small world (10,000 pairs, 5 epochs of 64 = 780 steps).
BUDGET = ("world.size=small", "train.batch_size=64", "train.epochs=5", "train.eval_max_images=500")
# --quick: the tiny world (240 pairs) and 48 steps of 32 (epochs set high so that max_steps, not
# the 7-step epochs, ends the run); data in the training process, since a DataLoader worker pool
# restarted every epoch costs more than it saves; a 256-entry DeCLIP queue (the default 4096
# would hold stale features of 17 passes over this data).
QUICK = ("world.size=tiny", "train.batch_size=32", "train.epochs=100", "train.max_steps=48",
         "train.log_every=10", "data.num_workers=0", "loss.queue_size=256")  # fmt: skip
RETRIEVAL = {"mean_recall": "retrieval_mean_R", "image_to_text_R@1": "i2t_R@1",
             "text_to_image_R@1": "t2i_R@1"}  # fmt: skip


class BenchmarkError(CompareError):
    """Bad arguments or a cell that failed (the CLI prints it, exit 2)."""


def _num(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class Cell:
    """One pretraining run. None for text_layers / noise / seed: the config's own value (the
    cell's name then leaves that axis out)."""

    method: str
    arch: str
    text_layers: int | None = None
    noise: float | None = None
    seed: int | None = None

    @property
    def group(self) -> str:
        """The name without the seed: the runs folded into one mean ± std row."""
        name = f"{self.method}-{self.arch}"
        name += "" if self.text_layers is None else f"-text{self.text_layers}"
        return name + ("" if self.noise is None else f"-noise{_num(self.noise)}")

    @property
    def name(self) -> str:  # also the run's folder under OUT
        return self.group + ("" if self.seed is None else f"-seed{self.seed}")

    @property
    def variant(self) -> tuple[str, int | None, float | None]:
        """What a method is compared on: tower, text depth, data quality (the gain over CLIP is
        taken within one variant)."""
        return self.arch, self.text_layers, self.noise

    def overrides(self, run_dir: Path) -> list[str]:
        out = [f"loss.method={self.method}", f"model.arch={self.arch}"]
        out += [] if self.text_layers is None else [f"model.text.layers={self.text_layers}"]
        out += [] if self.noise is None else [f"data.caption_noise={_num(self.noise)}"]
        out += [] if self.seed is None else [f"train.seed={self.seed}"]
        return [*out, f"train.out_dir={run_dir}"]


def _items(flag: str, text: str | Sequence[Any] | None) -> list[str]:
    from cliptransfer.config import split_list

    if text is None:
        return []
    items = split_list(text) if isinstance(text, str) else [str(x).strip() for x in text]
    if not items or any(not x for x in items):
        raise BenchmarkError(f"{flag} {text!r}: expected a comma list, e.g. {flag} a,b")
    return list(dict.fromkeys(items))


def _numbers(flag: str, text: str | Sequence[Any] | None, kind: type, example: str,
             ok: Callable[[Any], bool], need: str) -> list[Any]:  # fmt: skip
    out = []
    for x in _items(flag, text):
        try:
            v = kind(x)
        except ValueError:
            raise BenchmarkError(f"{flag}: {x!r} is not {need}, e.g. {flag} {example}") from None
        if not ok(v):
            raise BenchmarkError(f"{flag}: {x!r} is not {need}, e.g. {flag} {example}")
        out.append(v)
    return list(dict.fromkeys(out))


def parse_axes(
    methods: str | Sequence[str] | None = None, archs: str | Sequence[str] | None = None,
    text_layers: str | Sequence[int] | None = None, noise: str | Sequence[float] | None = None,
    seeds: str | Sequence[int] | None = None, quick: bool = False,
) -> tuple[list[str], list[str], list[int], list[float], list[int]]:  # fmt: skip
    """The validated axes (comma strings or lists, duplicates dropped, order kept). Defaults: all
    methods, both tiny towers, the config's text depth and clean data, seeds 0,1,2 (--quick: 0)."""
    m = _items("--methods", methods) or list(METHODS)
    if bad := [x for x in m if x not in METHODS]:
        raise BenchmarkError(f"--methods: unknown method {bad[0]!r}: choose from {', '.join(METHODS)}")  # fmt: skip
    a = _items("--archs", archs) or list(ARCHS)
    from cliptransfer.clip.archs import list_archs

    if bad := [x for x in a if x not in list_archs()]:
        raise BenchmarkError(f"--archs: unknown architecture {bad[0]!r}: choose from {', '.join(list_archs())}")  # fmt: skip
    layers = _numbers("--text-layers", text_layers, int, "2,1", lambda v: v >= 1, "a depth >= 1")
    levels = _numbers("--data-noise", noise, float, "0,0.3", lambda v: 0 <= v <= 1,
                      "a fraction in [0, 1]")  # fmt: skip
    s = _numbers("--seeds", seeds, int, "0,1,2", lambda v: v >= 0, "a seed >= 0")
    return m, a, layers, levels, s or ([0] if quick else list(DEFAULT_SEEDS))


def expand_cells(
    methods: Sequence[str], archs: Sequence[str], text_layers: Sequence[int] = (),
    noise: Sequence[float] = (), seeds: Sequence[int] = (),
) -> list[Cell]:  # fmt: skip
    """Every combination, towers outermost (a tower's cells run together), seeds innermost."""
    return [
        Cell(m, a, t, n, s)
        for a in archs
        for t in (list(text_layers) or [None])
        for n in (list(noise) or [None])
        for m in methods
        for s in (list(seeds) or [None])
    ]


def _read_cell(name: str) -> Callable[[Path], dict[str, Any]]:
    def read(path: Path) -> dict[str, Any]:
        try:
            metrics = read_json(path)
        except JSONFileError as e:
            raise BenchmarkError(f"cell {name!r}: {e}") from None
        if not isinstance(metrics.get("trained"), dict):
            raise BenchmarkError(f"cell {name!r}: {path} is not a pretrain/contrastive.py report")
        return metrics

    return read


def _resume_or_restart(run_dir: Path, record: dict, rerun: bool) -> None:
    """Cells run with train.resume=latest, so a benchmark killed mid-cell continues that cell
    from its last checkpoint when the identical command is run again. Checkpoints of any other
    command (or all of them under --rerun) are removed first: resuming them would continue
    another configuration's run (or skip a rerun's training altogether)."""
    import shutil

    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir() or ((run_dir / "metrics.json").is_file() and not rerun):
        return  # nothing to resume, or a finished cell that run_recorded reuses or refuses
    if rerun or stored_record(run_dir, RECORD) != record:
        shutil.rmtree(ckpts)


def _classify_folder(run_dir: Path) -> Path | None:
    """The zero-shot folder the trainer evaluated (its config.yaml): data.classify, or the
    Shapes world's classify/ when the world's pairs were used; None without one."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data, world = cfg.get("data", {}), cfg.get("world", {})
    if data.get("classify"):
        return Path(data["classify"])
    if data.get("train") and data.get("val"):
        return None
    if world.get("dir"):
        return Path(world["dir"]) / "classify"
    from cliptransfer.worlds.shapes import default_world_dir

    return default_world_dir(world.get("size", "small"), world.get("seed", 0)) / "classify"


def _probe(run_dir: Path, reused: bool, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The linear probe of the cell's final/ model, kept in probe.json (recomputed whenever the
    cell itself ran, so it always belongs to the metrics.json beside it)."""
    path = run_dir / "probe.json"
    if reused and path.is_file():
        return read_json(path)
    folder = _classify_folder(run_dir)
    if folder is None or not (folder / "classes.json").is_file():
        return None
    from cliptransfer.clip.probe import probe_clip

    probe = probe_clip(run_dir / "final", folder)
    write_json(path, probe)
    log("  linear probe: " + ", ".join(f"{k} {v['top1']:.2f}" for k, v in probe.items()
                                       if k != "protocol"))  # fmt: skip
    return probe


def scores(ev: dict[str, Any] | None, probe: dict[str, Any] | None) -> dict[str, float | None]:
    """The benchmark's columns of one evaluation: retrieval (mean recall, R@1 both ways),
    zero-shot top-1 per label, linear-probe top-1 per label."""
    ev = ev or {}
    out: dict[str, float | None] = {
        col: (ev.get("retrieval") or {}).get(key) for key, col in RETRIEVAL.items()
    }
    for task, acc in (ev.get("zeroshot") or {}).items():
        out[f"zeroshot_{task}"] = acc.get("top1")
    for task, acc in (probe or {}).items():
        if task != "protocol":
            out[f"probe_{task}"] = acc.get("top1")
    return out


def _text_layers(run_dir: Path) -> int | None:
    """The text depth the cell trained (final/config.json), also when the config chose it."""
    try:
        return int(read_json(run_dir / "final" / "config.json")["config"]["text"]["layers"])
    except (JSONFileError, KeyError, TypeError, ValueError):
        return None


def cell_row(cell: Cell, metrics: dict, probe: dict | None, run_dir: Path, reused: bool) -> dict:
    mem = metrics.get("peak_memory") or {}
    return {
        "cell": cell.name, "group": cell.group, "method": cell.method, "arch": cell.arch,
        "text_layers": _text_layers(run_dir) or cell.text_layers, "noise": cell.noise or 0.0,
        "seed": cell.seed, "scores": scores(metrics["trained"], probe),
        "random_init": scores(metrics.get("random_init"), None),
        "train_samples_per_s": metrics.get("train_samples_per_s"),
        "peak_memory": {"kind": mem.get("kind"), "mib": mem.get("mib")},
        "seconds": metrics.get("seconds"), "steps": metrics.get("steps"),
        "samples_seen": metrics.get("samples_seen"), "caption_noise": metrics.get("caption_noise"),
        "metrics": str(run_dir / "metrics.json"), "reused": reused,
    }  # fmt: skip


def run_benchmark(
    methods: str | Sequence[str] | None = None,
    archs: str | Sequence[str] | None = None,
    text_layers: str | Sequence[int] | None = None,
    noise: str | Sequence[float] | None = None,
    seeds: str | Sequence[int] | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    quick: bool = False,
    rerun: bool = False,
    report_only: bool = False,
    launcher: str | None = None,
    script: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or reuse) every cell, probe it, then write OUT/benchmark.{md,json} and the PNGs.
    Stops at the first failing cell with an error naming it, its exit code and its log
    (OUT/<cell>/benchmark.log). `report_only`: run nothing; the table of the cells this command
    has finished, the others listed as missing (a long benchmark read while it runs).
    Returns the benchmark.json content."""
    from cliptransfer.benchmark_report import write_report

    started = time.monotonic()
    m, a, layers, levels, s = parse_axes(methods, archs, text_layers, noise, seeds, quick)
    check_overrides(overrides, RESERVED, who="benchmark")
    path = task_script("contrastive", script)
    cells = expand_cells(m, a, layers, levels, s)
    out = Path(out or ("runs/benchmark-quick" if quick else "runs/benchmark"))
    budget = list(QUICK if quick else BUDGET)
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    rows, missing = [], []
    for i, cell in enumerate(cells, 1):
        run_dir = out / cell.name
        args = set_args([*budget, *cell.overrides(run_dir), *overrides, "train.resume=latest"])
        record = {"script": path.name, "launcher": launcher, "args": args}
        if report_only:
            if _finished_by(run_dir, record):
                metrics = _read_cell(cell.name)(run_dir / "metrics.json")
                rows.append(cell_row(cell, metrics, _probe(run_dir, True, log), run_dir, True))
            else:
                missing.append(cell.name)
            continue
        _resume_or_restart(run_dir, record, rerun)
        metrics, reused = run_recorded(
            cell.name, [*prefix, str(path), *args], record, run_dir, rerun=rerun, log=log,
            where=f"[{i}/{len(cells)}]", read=_read_cell(cell.name), record_name=RECORD,
            log_name="benchmark.log", what="cell",
        )  # fmt: skip
        rows.append(cell_row(cell, metrics, _probe(run_dir, reused, log), run_dir, reused))
    setup = {"methods": m, "archs": a, "text_layers": layers, "data_noise": levels, "seeds": s,
             "quick": quick, "budget": budget, "overrides": list(overrides),
             "launcher": launcher, "script": str(path), "missing": missing,
             "wall_seconds": time.monotonic() - started}  # fmt: skip
    if not rows:
        raise BenchmarkError(f"{out}: no cell of this command has finished yet")
    return write_report(out, rows, setup, log)


def _finished_by(run_dir: Path, record: dict) -> bool:
    """Whether run_dir holds a finished run of exactly this cell command."""
    return (run_dir / "metrics.json").is_file() and stored_record(run_dir, RECORD) == record


def _command(args: argparse.Namespace) -> int:
    run_benchmark(
        args.methods, args.archs, args.text_layers, args.data_noise, args.seeds, args.out,
        args.overrides, quick=args.quick, rerun=args.rerun, report_only=args.report_only,
        launcher=args.launcher,
        script=args.script,
    )  # fmt: skip
    return 0


def add_benchmark_command(sub: Any) -> None:
    """`cliptransfer benchmark`: its arguments on the CLI's subparsers."""
    bench = sub.add_parser(
        "benchmark",
        help="the CLIP-benchmark: pretrain methods x towers x text depth x caption noise x seeds "
        "on the Shapes world, one table (zero-shot, retrieval, linear probe, training cost)",
    )
    bench.add_argument(
        "--methods", help="comma list (default: clip,slip,declip,filip,defilip,siglip)"
    )
    bench.add_argument("--archs", help="image towers, comma list (default: RN-tiny,ViT-tiny)")
    bench.add_argument("--text-layers", help="text tower depths, comma list (default: the arch's)")
    bench.add_argument(
        "--data-noise", help="caption-noise fractions in [0, 1], comma list (default: 0)"
    )
    bench.add_argument(
        "--seeds", help="comma list of train.seed values (default 0,1,2; --quick: 0)"
    )
    bench.add_argument(
        "--out", help="output folder (default runs/benchmark, --quick: runs/benchmark-quick)"
    )
    bench.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="trainer override passed to every cell, after the budget (repeatable)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smoke budget: tiny world, 48 steps, one seed (~10 min on 2 CPU cores)",
    )
    bench.add_argument("--launcher", help='e.g. "accelerate launch --num_processes 2"')
    bench.add_argument(
        "--script", help="the trainer (default: pretrain/contrastive.py of this checkout)"
    )
    bench.add_argument("--rerun", action="store_true", help="rerun cells that finished earlier")
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: the table of the cells this command has finished (the rest listed "
        "as missing), e.g. while a long benchmark runs",
    )
    bench.set_defaults(func=_command)
