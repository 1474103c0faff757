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
