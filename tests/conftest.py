"""Shared fixtures: the real reference data in ../shared/data (or $CLIPTRANSFER_SHARED_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("CLIPTRANSFER_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip(
            "real reference data not found: set CLIPTRANSFER_SHARED_DATA or put shared/data "
            "beside the repository"
        )
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A `tiny` Shapes world shared by every test of the session (a few seconds to generate)."""
    from cliptransfer.worlds.shapes import prepare_shapes

    return prepare_shapes(tmp_path_factory.mktemp("shapes") / "world", size="tiny", seed=0)


def load_script(name: str):
    """Import a script from pretrain/ or tasks/ (folders of scripts, not packages) as a module."""
    import importlib.util
    import sys

    path = REPO / name
    module_name = f"{path.parent.name}_{path.stem}_script"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module
