"""Navigation episodes: R2R (and EnvDrop augmented-path) JSON, RxR guide JSON Lines, and their
check against the Matterport navigation graphs.

One `Episode` per instruction. R2R's `instr_id` is `f"{path_id}_{k}"` (k = the instruction's
index in the record's `instructions`), as in Matterport3DSimulator's tasks/R2R; RxR's is
`str(instruction_id)`. Files ending in `.gz` are read through gzip; unreadable bytes and malformed
JSON are `fileio.JSONFileError`s, bad records `EpisodeError`s, both naming the file and record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliptransfer.fileio import iter_jsonl, read_json
from cliptransfer.nav.graph import NavGraph

__all__ = ["Episode", "EpisodeError", "check_episodes", "load_r2r", "load_rxr"]


class EpisodeError(ValueError):
    """An episode file or record that cannot be used; the message names the file and record."""


@dataclass
class Episode:
    instr_id: str
    scan: str
    path_id: int | str
    path: list[str]
    heading: float
    instruction: str
    language: str | None = None
    distance: float | None = None  # the file's own `distance` (metres), when it has one
    # Where the episode came from, for error messages: "file: record 3" / "file: line 3".
    source: str = field(default="", compare=False, repr=False)

    @property
    def start(self) -> str:
        return self.path[0]

    @property
    def goal(self) -> str:
        return self.path[-1]


def _field(rec: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(rec, dict):
        raise EpisodeError(f"{where}: expected an object, got {type(rec).__name__}")
    if key not in rec:
        raise EpisodeError(f"{where}: missing {key!r}")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise EpisodeError(f"{where}: {key!r} must be {names}, got {value!r:.80}")
    return value


def _path(rec: Any, where: str) -> list[str]:
    path = _field(rec, "path", list, where)
    if not path or not all(isinstance(v, str) for v in path):
        raise EpisodeError(f"{where}: 'path' must be a non-empty list of viewpoint ids")
    return list(path)


def _number(rec: dict, key: str, where: str, *, optional: bool = False) -> float | None:
    if optional and rec.get(key) is None:
        return None
    return float(_field(rec, key, (int, float), where))


def load_r2r(path: str | Path) -> list[Episode]:
    """One Episode per instruction of an R2R-format JSON list (R2R, R4R, EnvDrop augmentation).

    Records have `scan`, `path_id`, `path`, `heading`, `distance` and `instructions`. EnvDrop's
    augmented-path files may lack `instructions` (a path-only record gives one episode,
    `f"{path_id}_0"`, with instruction "") and `distance` (None).
    """
    path = Path(path)
    data = read_json(path, what="R2R episodes")
    if not isinstance(data, list):
        raise EpisodeError(f"{path}: expected a JSON list of path records")
    episodes = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        scan = _field(rec, "scan", str, where)
        path_id = _field(rec, "path_id", (int, str), where)
        where = f"{where} (path_id {path_id})"
        vps = _path(rec, where)
        heading = _number(rec, "heading", where)
        distance = _number(rec, "distance", where, optional=True)
        instructions = rec.get("instructions")
        if instructions is None:
            instructions = [""]
        elif not isinstance(instructions, list) or not all(
            isinstance(t, str) for t in instructions
        ):
            raise EpisodeError(f"{where}: 'instructions' must be a list of strings")
        for k, text in enumerate(instructions):
            episodes.append(
                Episode(f"{path_id}_{k}", scan, path_id, list(vps), heading, text,
                        None, distance, source=f"{where}, instruction {k}")
            )  # fmt: skip
    return episodes


def _language_match(language: str, wanted: set[str]) -> bool:
    # "en" keeps en-IN and en-US; "en-IN" keeps only en-IN.
    return language in wanted or language.split("-")[0] in wanted


def load_rxr(path: str | Path, languages: Iterable[str] | None = None) -> list[Episode]:
    """One Episode per line of an RxR guide file (`.jsonl` or `.jsonl.gz`).

    Lines have `instruction_id`, `path_id`, `scan`, `path`, `heading`, `instruction` and
    `language`; `instr_id` is `str(instruction_id)`. `languages` keeps only those languages: a
    full tag ("en-IN") or a base language ("en" = en-IN and en-US).
    """
    path = Path(path)
    wanted = None if languages is None else set(languages)
    episodes = []
    for lineno, rec in iter_jsonl(path):
        where = f"{path}: line {lineno}"
        language = _field(rec, "language", str, where)
        if wanted is not None and not _language_match(language, wanted):
            continue
        instruction_id = _field(rec, "instruction_id", (int, str), where)
        where = f"{where} (instruction_id {instruction_id})"
        episodes.append(
            Episode(
                str(instruction_id),
                _field(rec, "scan", str, where),
                _field(rec, "path_id", (int, str), where),
                _path(rec, where),
                _number(rec, "heading", where),
                _field(rec, "instruction", str, where),
                language,
                _number(rec, "distance", where, optional=True),
                source=where,
            )
        )
    return episodes


SKIP_REASONS = ("unknown_scan", "unknown_viewpoint", "disconnected", "empty_instruction")


def episode_problem(
    ep: Episode, graphs: Mapping[str, NavGraph], *, require_instruction: bool = True
) -> tuple[str, str] | None:
    """(reason, message) of the first thing wrong with `ep`, or None."""
    name = ep.source or f"episode {ep.instr_id}"
    graph = graphs.get(ep.scan)
    if graph is None:
        return "unknown_scan", f"{name}: unknown scan {ep.scan!r}"
    for v in ep.path:
        if v not in graph:
            return "unknown_viewpoint", f"{name}: viewpoint {v!r} is not in scan {ep.scan}"
    for a, b in zip(ep.path, ep.path[1:]):
        if a != b and b not in graph.neighbors(a):
            return "disconnected", (
                f"{name}: path is not connected: {a} and {b} are not neighbours in scan {ep.scan}"
            )
    if require_instruction and not ep.instruction.strip():
        return "empty_instruction", f"{name}: empty instruction"
    return None


def check_episodes(
    episodes: Iterable[Episode],
    graphs: Mapping[str, NavGraph],
    skip_missing: bool = False,
    *,
    require_instruction: bool = True,
) -> tuple[list[Episode], dict[str, int]]:
    """(kept episodes, {reason: count skipped}) for episodes checked against `graphs`.

    An episode is bad when its scan is not in `graphs`, a path viewpoint is not in the scan, two
    consecutive distinct path viewpoints are not graph neighbours, or (`require_instruction`) its
    instruction is blank. A bad episode raises EpisodeError naming its file and record, or, with
    `skip_missing`, is dropped and counted under its reason (one of SKIP_REASONS).
    """
    kept, skipped = [], Counter()
    for ep in episodes:
        problem = episode_problem(ep, graphs, require_instruction=require_instruction)
        if problem is None:
            kept.append(ep)
        elif skip_missing:
            skipped[problem[0]] += 1
        else:
            raise EpisodeError(problem[1])
    return kept, {reason: skipped[reason] for reason in SKIP_REASONS}
