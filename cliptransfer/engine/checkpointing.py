"""Atomic, pickle-free training checkpoints that resume a run exactly.

Layout of a run folder:
    run/checkpoints/step-000120/   model.safetensors, optimizer.pt, scheduler.json,
                                   rng-rank0.pt (one per rank), trainer_state.json
    run/checkpoints/latest         text file naming the newest complete checkpoint

A checkpoint is written into a temporary sibling folder and renamed into place, and `latest` is
replaced atomically afterwards, so an interrupted save never leaves a checkpoint that looks
complete. Everything is read back with safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cliptransfer.fileio import atomic_save_dir, atomic_write_text, read_json, write_json

__all__ = [
    "CheckpointError",
    "TrainerState",
    "atomic_save_dir",
    "find_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]


# Settings that may change between a run and its resumption: where and how often it writes, how
# many CPU threads it uses. Everything else must match the checkpoint's config.
IGNORED_ON_RESUME = (
    "resume", "max_steps", "out_dir", "log_every", "save_every_steps", "save_every_minutes",
    "keep_last", "num_threads", "num_workers", "eval_batch_size", "rollout_threads",
)  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back; the message names the file."""


@dataclass
class TrainerState:
    """Where the run stands: enough to continue mid-epoch."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    samples_seen: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the resolved run config
    extra: dict[str, Any] = field(default_factory=dict)  # counters, best metric, ...


def rng_state() -> dict[str, Any]:
    """All RNG states of this process, as tensors/ints only (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    state: TrainerState,
    model_state: dict[str, torch.Tensor] | None,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    schedulers: Any | Sequence[Any] | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step-{state.step}` of `run_dir`; every rank calls it (each saves its RNG).

    `model_state` is the unwrapped model's state dict (buffers included: e.g. DeCLIP's queue);
    only rank 0's model/optimizer/scheduler are written since data parallelism keeps them equal.
    `barrier` is a callable (e.g. `accelerator.wait_for_everyone`) for multi-process runs.
    Optimizer i is written to optimizer.pt (i = 0) or optimizer-i.pt, its schedule likewise.
    A failed write (a full disk) is a `CheckpointError` that says the previous checkpoint, which
    `latest` still names, is intact.
    """
    root = _checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-step-{state.step:07d}"
    sync = barrier or (lambda: None)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    sync()
    try:
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if rank == 0:
            if model_state is not None:
                tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
                save_file(_untie(tensors), str(tmp / "model.safetensors"))
            for i, opt in enumerate(_as_list(optimizers)):
                torch.save(opt.state_dict(), tmp / _numbered("optimizer", i, ".pt"))
            for i, sched in enumerate(_as_list(schedulers)):
                write_json(
                    tmp / _numbered("scheduler", i, ".json"), sched.state_dict(), indent=None
                )
            meta = dict(state.__dict__, world_size=world_size)
            write_json(tmp / "trainer_state.json", meta, sort_keys=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = root / "latest"
        kept = pointer.read_text().strip() if pointer.is_file() else None
        raise CheckpointError(
            f"writing checkpoint {final} failed: {e}. "
            + (
                f"The previous checkpoint {root / kept} is intact (`--resume latest` uses it)."
                if kept
                else "No earlier checkpoint exists."
            )  # fmt: skip
        ) from e
    sync()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name + "\n")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    sync()
    return final


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone the later duplicates.
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path | None:
    """Resolve `--resume latest` (or a checkpoint folder path) to a complete checkpoint folder.
    `latest` in a run folder that has no checkpoint yet is None (a fresh start: a run killed
    before its first checkpoint resumes from the beginning)."""
    if which != "latest":
        path = Path(which)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint folder (no trainer_state.json)")
        return path
    root = _checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def _earlier(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("step-*") if p.is_dir() and p != path)
    if not others:
        return "no earlier checkpoint is kept: start again without --resume"
    return f"resume from an earlier one instead: --resume {path.parent / others[-1]}"


def _read(path: Path, what: str, read: Callable[[Path], Any]) -> Any:
    """`read(path)`, with any failure named: the file, what it holds, what to do."""
    try:
        return read(path)
    except Exception as e:  # safetensors, torch and json raise their own types
        raise CheckpointError(
            f"{path}: the checkpoint's {what} cannot be read ({type(e).__name__}: {e}); the "
            f"checkpoint is damaged — {_earlier(path.parent)}"
        ) from e


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module | None,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    schedulers: Any | Sequence[Any] | None,
    *,
    rank: int = 0,
    config: dict[str, Any] | None = None,
    ignore_keys: tuple[str, ...] = IGNORED_ON_RESUME,
) -> TrainerState:
    """Restore model/optimizers/schedulers/RNG from `path` and return the trainer state.

    With `config`, the run's resolved config must match the saved one (keys in `ignore_keys`
    excepted, e.g. the resume flag itself): resuming another run's checkpoint is an error that
    names the differing keys. A damaged file is a `CheckpointError` naming it.
    """
    path = Path(path)
    meta = _read(path / "trainer_state.json", "trainer state", read_json)
    world = meta.pop("world_size", 1)
    state = TrainerState(**meta)
    if config is not None:
        diff = _config_diff(state.config, config, ignore_keys)
        if diff:
            shown = "; ".join(f"{k}: saved {a!r} vs now {b!r}" for k, a, b in diff[:8])
            raise ValueError(f"{path} was written by a run with another config ({shown})")
    if model is not None:
        tensors = _read(path / "model.safetensors", "model weights", lambda p: load_file(str(p)))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path / 'model.safetensors'} does not fit the model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    for i, opt in enumerate(_as_list(optimizers)):
        f = path / _numbered("optimizer", i, ".pt")
        opt.load_state_dict(_read(f, "optimizer state", lambda p: torch.load(p, weights_only=True)))
    for i, sched in enumerate(_as_list(schedulers)):
        f = path / _numbered("scheduler", i, ".json")
        sched.load_state_dict(_read(f, "schedule", read_json))
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} missing: checkpoint was saved with {world} process(es)"
        )
    rng = _read(rng_file, "RNG state", lambda p: torch.load(p, weights_only=True))
    try:
        set_rng_state(rng)
    except Exception as e:
        raise CheckpointError(
            f"{rng_file}: the RNG state is malformed ({e}); the checkpoint is damaged — "
            f"{_earlier(path)}"
        ) from e
    return state


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]


def _numbered(stem: str, i: int, suffix: str) -> str:
    return f"{stem}{suffix}" if i == 0 else f"{stem}-{i}{suffix}"


def _config_diff(
    saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(saved) | set(now)):
        name = f"{prefix}{key}"
        if key in ignore or name in ignore:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, ignore, prefix=f"{name}.")
        elif a != b:
            out.append((name, a, b))
    return out
