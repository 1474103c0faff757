"""Every shipped YAML in configs/ loads into the config class of the task that ships it (the
registry says which files each task owns); every config file belongs to exactly one task."""

from __future__ import annotations

from pathlib import Path

import pytest

from cliptransfer.config import load_config
from cliptransfer.engine import registered

ROOT = Path(__file__).resolve().parents[1]
OWNED = {
    path: spec
    for spec in registered().values()
    for pattern in spec.configs
    for path in sorted(ROOT.glob(pattern))
}


def test_every_task_config_is_owned_and_launchers_exist():
    task_yamls = sorted(
        p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts
    )
    assert sorted(OWNED) == task_yamls
    for spec in registered().values():
        assert (ROOT / spec.launcher).is_file(), spec.launcher
    assert {"contrastive", "snli-ve", "vqa"} <= set(registered())


@pytest.mark.parametrize("path", sorted(OWNED), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_file_loads(path: Path):
    cfg = load_config(OWNED[path].config, path)
    assert cfg.train.out_dir.startswith("runs/")
