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
def houses(tmp_path_factory) -> Path:
    """The `tiny` houses, shared by the navigation task tests (test_vln_*.py)."""
    from cliptransfer.worlds.houses import prepare_houses

    return prepare_houses(tmp_path_factory.mktemp("vln") / "houses", "tiny", seed=0, workers=1)


@pytest.fixture(scope="module")
def world(houses):
    """(train episodes, graphs, a NavEnv with random 12-d view features) on the tiny houses."""
    from cliptransfer.nav import NavEnv, NavTables, load_graphs, load_r2r

    eps = load_r2r(houses / "r2r" / "R2R_train.json")
    graphs = load_graphs(houses / "r2r" / "connectivity")
    tables = NavTables.build(graphs)
    feats = torch.randn(len(tables), 36, 12, generator=torch.Generator().manual_seed(0))
    return eps, graphs, NavEnv(tables, feats, max_steps=10)


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


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str, fn) -> None:
    torch.set_num_threads(1)  # the ranks share a 2-core machine
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(fn(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture()
def fork_ranks(tmp_path: Path):
    """`run(fn, world=2) -> [fn()'s dict of tensors on each rank]`: `world` gloo processes forked
    from this one. "fork" rather than "spawn" saves a fresh torch import per rank (~5 s); run the
    1-process reference first, which also warms up lazy imports before the fork."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this pytest process")

    def run(fn, world: int = 2) -> list[dict]:
        mp.start_processes(_rank_worker, args=(world, str(tmp_path / "store"), str(tmp_path), fn),
                           nprocs=world, start_method="fork")  # fmt: skip
        return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    return run
