"""`cliptransfer evaluate r2r|rxr`: the official navigation metrics on a results file (registered
with the VLN task, which writes such files)."""

from __future__ import annotations

import argparse

from cliptransfer.engine.task import EvaluateCommand, register_evaluate
from cliptransfer.nav.metrics import evaluate_nav_files


def _arguments(kind: str):
    def add(p: argparse.ArgumentParser) -> None:
        what = "R2R_*.json (or EnvDrop-format paths)" if kind == "r2r" else "rxr_*_guide.jsonl[.gz]"
        p.add_argument("--episodes", required=True, help=what)
        p.add_argument("--connectivity", required=True, help="Matterport connectivity/ folder")
        p.add_argument("--results", required=True,
                       help='[{"instr_id", "trajectory": [[vp, heading, elevation], ...]}]')  # fmt: skip
        p.add_argument("--per-item", help="write each instruction's numbers to this JSON file")
        if kind == "rxr":
            p.add_argument("--languages", help="comma list, e.g. en,hi-IN (default: all)")

    return add


def _run(kind: str):
    def run(a: argparse.Namespace) -> dict:
        languages = getattr(a, "languages", None)
        return evaluate_nav_files(
            a.episodes, a.connectivity, a.results, kind=kind, per_item=a.per_item,
            languages=languages.split(",") if languages else None,
        )  # fmt: skip

    return run


for _kind, _help in (("r2r", "R2R navigation metrics (Matterport3DSimulator eval.py + r4r nDTW/SDTW/CLS)"),
                     ("rxr", "RxR navigation metrics (nDTW/SDTW/CLS + R2R's)")):  # fmt: skip
    register_evaluate(_kind, EvaluateCommand(_help, _arguments(_kind), _run(_kind)))
