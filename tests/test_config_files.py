"""Every shipped YAML in configs/ loads into its script's config class (no unknown keys, types)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

from cliptransfer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "pretrain": "pretrain/contrastive.py",
    "vqa": "tasks/vqa.py",
    "snli_ve": "tasks/snli_ve.py",
}
CLASSES = {"pretrain": "PretrainConfig", "vqa": "VQAConfig", "snli_ve": "VEConfig"}


def _script_of(path: Path) -> str:
    if path.parent.name == "pretrain":
        return "pretrain"
    return "snli_ve" if path.name.startswith("snli_ve") else "vqa"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_config_file_loads(path: Path):
    kind = _script_of(path)
    cls = getattr(load_script(SCRIPTS[kind]), CLASSES[kind])
    cfg = load_config(cls, path)
    assert cfg.train.out_dir.startswith("runs/")
