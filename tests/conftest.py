"""Shared fixtures: the real reference data in ../shared/data (or $CLIPTRANSFER_SHARED_DATA)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

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


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: a second OpenMP thread only spins (up to ~100x
    # slower for tiny convs), so these tests run on one intra-op thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """The same for a whole module, module-scoped fixtures included."""
    with _one_torch_thread():
        yield
