"""The report of `cliptransfer benchmark`: cells folded over seeds into mean ± sample std
(`compare_report.mean_std`), the gain of each method over CLIP on the same tower, text depth and
caption noise, benchmark.md / benchmark.json, and two PNGs (Agg; matplotlib imported only here,
only when drawing)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cliptransfer.compare_report import fmt, fmt_score, group_runs, mean_std
from cliptransfer.fileio import atomic_write_bytes, atomic_write_text, write_json

__all__ = ["aggregate", "columns", "gains", "headline", "markdown", "write_report"]

LABELS = {"retrieval_mean_R": "retrieval mean R", "i2t_R@1": "image→text R@1",
          "t2i_R@1": "text→image R@1"}  # fmt: skip


def label(col: str) -> str:
    """A column's header: `zeroshot_shape` -> "zero-shot shape"."""
    kind, _, task = col.partition("_")
    if col in LABELS:
        return LABELS[col]
    return {"zeroshot": f"zero-shot {task}", "probe": f"probe {task}"}.get(kind, col)


def columns(rows: list[dict]) -> list[str]:
    """The score columns of the cells, in first-seen order."""
    return list(dict.fromkeys(c for r in rows for c in r["scores"]))


def aggregate(rows: list[dict], cols: list[str]) -> list[dict]:
    """One entry per group (cells that differ only by seed), in first-seen order: `mean` and
    `std` (sample std, None for one run) per column; samples/s and seconds averaged, peak memory
    the max over the seeds (the budget a run needs)."""
    out = []
    for name, runs in group_runs(rows).items():
        first = runs[0]
        stats = {c: mean_std([r["scores"].get(c) for r in runs]) for c in cols}
        mibs = [r["peak_memory"]["mib"] for r in runs if r["peak_memory"]["mib"] is not None]
        noisy = [r["caption_noise"]["noisy"] for r in runs if r.get("caption_noise")]
        out.append({
            "group": name, **{k: first[k] for k in ("method", "arch", "text_layers", "noise")},
            "n": len(runs), "seeds": [r["seed"] for r in runs],
            "mean": {c: m for c, (m, _) in stats.items()},
            "std": {c: s for c, (_, s) in stats.items()},
            "train_samples_per_s": mean_std([r["train_samples_per_s"] for r in runs])[0],
            "peak_memory": {"kind": first["peak_memory"]["kind"], "mib": max(mibs) if mibs else None},
            "seconds": mean_std([r["seconds"] for r in runs])[0],
            "noisy_pairs": mean_std(noisy)[0],
            "pairs": (first.get("caption_noise") or {}).get("pairs"),
            "cells": [r["cell"] for r in runs],
        })  # fmt: skip
    return out


def _variant(r: dict) -> tuple[Any, ...]:
    return r["arch"], r["text_layers"], r["noise"]


def gains(rows: list[dict], groups: list[dict], cols: list[str]) -> list[dict]:
    """Per non-CLIP group with a CLIP group of the same variant: the gain per column as mean ±
    sample std of the per-seed differences (method seed s minus CLIP seed s, seeds both ran);
    with the same seeds on both sides the mean is the difference of the two means."""
    by_seed = {(r["group"], r["seed"]): r for r in rows}
    clip = {_variant(g): g for g in groups if g["method"] == "clip"}
    out = []
    for g in groups:
        base = clip.get(_variant(g))
        if g["method"] == "clip" or base is None:
            continue
        seeds = [s for s in g["seeds"] if (base["group"], s) in by_seed]
        gain, std = {}, {}
        for c in cols:
            diffs = []
            for s in seeds:
                a, b = by_seed[(g["group"], s)]["scores"].get(c), by_seed[(base["group"], s)]["scores"].get(c)  # fmt: skip
                diffs.append(None if a is None or b is None else a - b)
            gain[c], std[c] = mean_std(diffs)
        out.append({"group": g["group"], "vs": base["group"], "seeds": seeds,
                    **{k: g[k] for k in ("method", "arch", "text_layers", "noise")},
                    "gain": gain, "std": std})  # fmt: skip
    return out


def headline(g: dict, cols: list[str]) -> float | None:
    """The accuracy a cost plot shows: mean zero-shot top-1 over the labels (the paper's
    headline is zero-shot accuracy), retrieval mean recall without a zero-shot set."""
    zs = [g["mean"][c] for c in cols if c.startswith("zeroshot_") and g["mean"][c] is not None]
    return sum(zs) / len(zs) if zs else g["mean"].get("retrieval_mean_R")


def _table(header: list[str], lines: list[list[str]]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(rows + ["| " + " | ".join(cells) + " |" for cells in lines])


def _signed(mean: float | None, std: float | None) -> str:
    text = fmt_score(mean, std)
    return text if mean is None or mean < 0 else "+" + text


def markdown(groups: list[dict], gain_rows: list[dict], cols: list[str]) -> str:
    """The scores table (mean ± std, training cost) and the gain-over-CLIP table."""
    key = ["method", "tower", "text layers", "caption noise"]
    lines = []
    for g in groups:
        mem = g["peak_memory"]
        mem_cell = "-" if mem["mib"] is None else f"{mem['mib']:.0f} ({mem['kind']})"
        lines.append([g["method"], g["arch"], fmt(g["text_layers"]), _g(g["noise"]), str(g["n"]),
                      *(fmt_score(g["mean"][c], g["std"][c]) for c in cols),
                      fmt(g["train_samples_per_s"], 1), mem_cell, fmt(g["seconds"], 1)])  # fmt: skip
    scores = _table([*key, "runs", *map(label, cols), "train samples/s", "peak memory MiB",
                     "seconds"], lines)  # fmt: skip
    if not gain_rows:
        return scores
    lines = [[r["method"], r["arch"], fmt(r["text_layers"]), _g(r["noise"]), str(len(r["seeds"])),
              *(_signed(r["gain"][c], r["std"][c]) for c in cols)] for r in gain_rows]  # fmt: skip
    gain = _table([*key, "paired seeds", *(f"Δ {label(c)}" for c in cols)], lines)
    return f"{scores}\n\nGain over CLIP (same tower, text depth and caption noise; mean ± std of the per-seed differences, in points):\n\n{gain}"


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"  # a noise level as given: 0.3, not 0.30


def bars_png(groups: list[dict], cols: list[str]) -> bytes:
    """One panel per tower: the columns on x, one bar per method (and text depth / noise), ±
    std over seeds as error bars."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    archs = list(dict.fromkeys(g["arch"] for g in groups))
    most = max(sum(g["arch"] == a for g in groups) for a in archs)
    fig = Figure(figsize=(4 + 0.35 * most * len(cols), 3.6 * len(archs)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(archs), 1, squeeze=False)[:, 0]
    for ax, arch in zip(axes, archs):
        mine = [g for g in groups if g["arch"] == arch]
        width = 0.8 / len(mine)
        for i, g in enumerate(mine):
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(cols))]
            err = [0.0 if g["std"][c] is None else g["std"][c] for c in cols]
            rest = g["group"][len(f"{g['method']}-{arch}") :].lstrip("-")  # text depth, noise
            ax.bar(xs, [_num(g["mean"][c]) for c in cols], width, capsize=2,
                   yerr=err if any(err) else None,
                   label=f"{g['method']} ({rest})" if rest else g["method"])  # fmt: skip
        ax.set_xticks(range(len(cols)), [label(c) for c in cols], rotation=20)
        ax.set_ylabel("% (mean over seeds)")
        ax.set_title(f"{arch}: per method")
        ax.legend(fontsize="x-small", ncols=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def cost_png(groups: list[dict], cols: list[str]) -> bytes:
    """Accuracy vs training cost: the headline accuracy against samples/s and against peak
    memory, a colour per method and a marker per tower."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    speed, mem = fig.subplots(1, 2)
    methods = list(dict.fromkeys(g["method"] for g in groups))
    archs = list(dict.fromkeys(g["arch"] for g in groups))
    what = "zero-shot top-1 (mean over labels)" if any(c.startswith("zeroshot_") for c in cols) else "retrieval mean R"  # fmt: skip
    for g in groups:
        y = _num(headline(g, cols))
        style = {"color": f"C{methods.index(g['method'])}", "marker": "osD^v<>"[archs.index(g["arch"]) % 7]}  # fmt: skip
        for ax, x in ((speed, g["train_samples_per_s"]), (mem, g["peak_memory"]["mib"])):
            ax.scatter([_num(x)], [y], **style)
            ax.annotate(g["group"], (_num(x), y), fontsize=6, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    kinds = sorted({str(g["peak_memory"]["kind"]) for g in groups})
    speed.set_xlabel("training samples/s (higher is cheaper)")
    mem.set_xlabel(f"peak memory MiB ({', '.join(kinds)})")
    for ax in (speed, mem):
        ax.set_ylabel(what)
    speed.set_title("accuracy vs throughput")
    mem.set_title("accuracy vs memory")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _noise_lines(groups: list[dict]) -> str:
    levels = {}
    for g in groups:
        if g["noise"] and g["noisy_pairs"] is not None:
            levels.setdefault(g["noise"], (g["noisy_pairs"], g["pairs"]))
    return "".join(f"\nCaption noise {_g(k)}: {v[0]:.0f} of {v[1]} training pairs per run "
                   "(half mismatched with another image's caption, half corrupted).\n"
                   for k, v in levels.items())  # fmt: skip


def _missing_line(missing: list[str]) -> str:
    if not missing:
        return ""
    return (f"**Partial table** (`--report-only`): {len(missing)} cells not finished yet: "
            f"{', '.join(missing)}.\n\n")  # fmt: skip


def write_report(out: Path, rows: list[dict], setup: dict, log: Callable[[str], None]) -> dict:
    """OUT/benchmark.md, benchmark.json, benchmark_bars.png and benchmark_cost.png."""
    cols = columns(rows)
    groups = aggregate(rows, cols)
    gain_rows = gains(rows, groups, cols)
    table = markdown(groups, gain_rows, cols)
    budget = " ".join(f"--set {b}" for b in [*setup["budget"], *setup["overrides"]])
    total = sum(r["seconds"] or 0.0 for r in rows)
    atomic_write_text(
        out / "benchmark.md",
        f"# CLIP benchmark{' (--quick)' if setup['quick'] else ''}\n\n"
        f"{len(rows)} pretraining runs of {Path(setup['script']).name}, every one with `{budget}` "
        f"plus its cell's method, tower, text depth, caption noise and seed "
        f"(seeds {', '.join(map(str, setup['seeds']))}); {total / 60:.1f} min inside the runs, "
        f"{setup['wall_seconds'] / 60:.1f} min of wall time (cells reused: "
        f"{sum(r['reused'] for r in rows)}).\n\n"
        f"{_missing_line(setup.get('missing') or [])}"
        "Scores in %: retrieval on the validation pairs, zero-shot top-1 on the zero-shot images, "
        "and a linear probe (5-fold cross-validated logistic regression) on the frozen image "
        "embeddings of the same images: a probe far above zero-shot means the image tower sees "
        "the attribute but the alignment has not learned to name it.\n\n"
        f"{table}\n{_noise_lines(groups)}",
    )
    atomic_write_bytes(out / "benchmark_bars.png", bars_png(groups, cols))
    atomic_write_bytes(out / "benchmark_cost.png", cost_png(groups, cols))
    result = {"setup": setup, "columns": cols, "rows": rows, "groups": groups, "gains": gain_rows}
    write_json(out / "benchmark.json", result)
    log(table)
    log(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'}, "
        f"{out / 'benchmark_bars.png'}, {out / 'benchmark_cost.png'}")  # fmt: skip
    return result
