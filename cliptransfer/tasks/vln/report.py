"""The VLN run's printed report: the agent next to its baselines per split (NE in metres, the
rates in percent), the RxR per-language table, or the speaker's BLEU."""

from __future__ import annotations

from typing import Any

__all__ = ["EVAL_SPLITS", "report_text"]

EVAL_SPLITS = ("val_seen", "val_unseen")
_RATES = ("success_rate", "spl", "ndtw", "sdtw")


def _cells(m: dict | None) -> list[str]:
    if m is None:
        return ["-"] * 5
    return [f"{m['nav_error']:.2f}"] + [f"{100 * m[k]:.1f}" for k in _RATES]


def report_text(report: dict[str, Any], stage: str) -> str:
    if stage == "speaker":
        return "\n".join(f"speaker {s}: BLEU {report[s]['bleu']:.2f} over {report[s]['paths']} paths"
                         for s in EVAL_SPLITS if s in report)  # fmt: skip
    rows = [("agent", {s: report[s] for s in EVAL_SPLITS if s in report})]
    rows += list(report["baselines"].items())
    head = " | ".join(f"{s} {m}" for s in EVAL_SPLITS for m in ("NE", "SR", "SPL", "nDTW", "SDTW"))
    lines = [f"| | {head} |", "|" + "---|" * (1 + 5 * len(EVAL_SPLITS))]
    for name, m in rows:
        cells = [c for s in EVAL_SPLITS for c in _cells(m.get(s))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = report["baselines"].get("no_vision", {}).get("val_unseen")
    if base and "val_unseen" in report:
        margin = report["val_unseen"]["success_rate"] - base["success_rate"]
        lines.append(f"val_unseen SR margin over no vision: {100 * margin:+.1f} points")
    langs = report.get("val_unseen", {}).get("languages")
    if langs:
        lines += ["", "| val_unseen by language | NE | SR | nDTW |", "|---|---|---|---|"]
        lines += [f"| {lang} | {m['nav_error']:.2f} | {100 * m['success_rate']:.1f} | "
                  f"{100 * m['ndtw']:.1f} |" for lang, m in langs.items()]  # fmt: skip
    return "\n".join(lines)
