"""The report of `cliptransfer compare`: runs of one setting over several seeds folded into
mean ± sample std, the markdown table and the PNG (Agg, no pyplot state; matplotlib is imported
only when a plot is drawn)."""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["aggregate", "fmt", "fmt_score", "markdown", "mean_std", "plot_png"]


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std) of the values that are not None; std is None for fewer than two."""
    got = [v for v in values if v is not None]
    if not got:
        return None, None
    return statistics.fmean(got), (statistics.stdev(got) if len(got) > 1 else None)


def group_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """The runs of each setting group (its `group`: the runs that differ only by seed), groups
    and runs in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    return groups


def aggregate(spec: Any, rows: list[dict]) -> list[dict]:
    """One row per setting group (the runs that differ only by seed), in first-seen order:
    `val` the mean per column, `std` the sample standard deviation (None for one run), `n` the
    number of runs, `seeds` their seeds; throughput and seconds averaged, peak memory the max."""
    out = []
    for name, runs in group_runs(rows).items():
        first = runs[0]
        val, std = {}, {}
        for c in spec.columns:
            val[c], std[c] = mean_std([r["val"][c] for r in runs])
        mibs = [r["peak_memory"]["mib"] for r in runs if r["peak_memory"]["mib"] is not None]
        out.append({
            **{k: first[k] for k in ("features", "backbone", "init", "feature_kind",
                                     "feature_backbone", "input_size", "grid_size", "channels")},
            "setting": name, "n": len(runs), "seeds": [r["seed"] for r in runs],
            "val": val, "std": std,
            "train_samples_per_s": mean_std([r["train_samples_per_s"] for r in runs])[0],
            "peak_memory": {"kind": first["peak_memory"]["kind"], "mib": max(mibs) if mibs else None},
            "seconds": mean_std([r["seconds"] for r in runs])[0],
            "runs": [r["setting"] for r in runs],
        })  # fmt: skip
    return out


def fmt(v: Any, digits: int = 2) -> str:
    """A table cell: "-" for missing / NaN, floats with `digits` decimals, pipes escaped."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def fmt_score(mean: float | None, std: float | None) -> str:
    """The cell of a score: mean ± std, or just the mean when there is no spread (one run)."""
    return fmt(mean) if std is None else f"{fmt(mean)} ± {fmt(std)}"


def _input_cell(row: dict) -> str:
    size, grid = ("x".join(map(str, row[k] or [])) or "-" for k in ("input_size", "grid_size"))
    cells = {"grid": f"{size} → {grid}", "regions": "regions", "end2end": f"{size} (pixels)",
             "views": f"36 views {size}"}  # fmt: skip
    return cells.get(row["feature_kind"], "-")


def markdown(spec: Any, rows: list[dict], priors: list[dict]) -> str:
    """The comparison table (aggregated rows): scores with 2 decimals (mean ± std over seeds
    where a setting ran several), samples/s 1, MiB 0, seconds 1."""
    seeds = any(r["n"] > 1 for r in rows)
    header = ["setting", "feature kind", "backbone", "input → grid", "channels",
              *(["runs"] if seeds else []), *spec.columns, "train samples/s", "peak memory MiB",
              "seconds"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        mem = r["peak_memory"]
        mem_cell = "-" if mem["mib"] is None else f"{mem['mib']:.0f} ({mem['kind']})"
        cells = [fmt(c) for c in (r["setting"], r["feature_kind"], r["feature_backbone"],
                                   _input_cell(r), r["channels"])]  # fmt: skip
        cells += [str(r["n"])] if seeds else []
        cells += [fmt_score(r["val"][c], r["std"][c]) for c in spec.columns]
        cells += [fmt(r["train_samples_per_s"], 1), mem_cell, fmt(r["seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    for p in priors:
        cells = [p["setting"], "", "", "", "", *([""] if seeds else []),
                 *(fmt(p["val"][c]) for c in spec.columns), "", "", ""]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_png(spec: Any, rows: list[dict], priors: list[dict]) -> bytes:
    """Three panels: grouped score bars per column (± std error bars over seeds) with the prior
    as dashed reference lines, training samples/s, and peak memory per setting."""
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
        err = [0.0 if r["std"][c] is None else r["std"][c] for c in spec.columns]
        acc.bar(xs, [num(r["val"][c]) for c in spec.columns], width, label=r["setting"],
                yerr=err if any(err) else None, capsize=3)  # fmt: skip
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
