"""Which embedded world a run uses when it is given no real data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorldConfig", "prepare_world"]


@dataclass
class WorldConfig:
    size: str = "small"
    seed: int = 0
    dir: str | None = None  # default: default_world_dir(size, seed)


def prepare_world(cfg: WorldConfig) -> Path:
    """The Shapes world of `cfg`, generated first if needed (call under main_process_first)."""
    from cliptransfer.worlds.shapes import default_world_dir, prepare_shapes

    world = Path(cfg.dir) if cfg.dir else default_world_dir(cfg.size, cfg.seed)
    return prepare_shapes(world, size=cfg.size, seed=cfg.seed)
