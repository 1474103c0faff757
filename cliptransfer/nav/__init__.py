"""Vision-and-language navigation without a C++ simulator: Matterport graphs and views exact to
MatterSim and EnvDrop, skybox rendering, 36-view features, R2R / RxR episodes and metrics."""

from __future__ import annotations

from cliptransfer.nav.env import NavEnv, NavObservation
from cliptransfer.nav.episodes import Episode, EpisodeError, check_episodes, load_r2r, load_rxr
from cliptransfer.nav.graph import ConnectivityError, NavGraph, load_graphs, read_scans
from cliptransfer.nav.metrics import (
    SUCCESS_DISTANCE,
    NavResultsError,
    evaluate_nav,
    evaluate_nav_files,
    score_trajectory,
)
from cliptransfer.nav.render import load_skybox, render_view
from cliptransfer.nav.tables import NavTables, angle_feature, load_view_table
from cliptransfer.nav.view_features import (
    import_views,
    iter_view_hdf5,
    iter_view_tsv,
    write_view_tsv,
)
from cliptransfer.nav.views import R2R_CAMERA, candidate_table, candidates, navigable, start_view

__all__ = [
    "R2R_CAMERA",
    "SUCCESS_DISTANCE",
    "ConnectivityError",
    "Episode",
    "EpisodeError",
    "NavEnv",
    "NavGraph",
    "NavObservation",
    "NavTables",
    "NavResultsError",
    "angle_feature",
    "candidate_table",
    "candidates",
    "check_episodes",
    "evaluate_nav",
    "evaluate_nav_files",
    "import_views",
    "iter_view_hdf5",
    "iter_view_tsv",
    "load_graphs",
    "load_r2r",
    "load_rxr",
    "load_skybox",
    "load_view_table",
    "navigable",
    "read_scans",
    "render_view",
    "score_trajectory",
    "start_view",
    "write_view_tsv",
]
