"""Vision-and-language navigation without a C++ simulator: Matterport graphs (MatterSim-exact),
views, episodes, metrics."""

from __future__ import annotations

from cliptransfer.nav.graph import ConnectivityError, NavGraph, load_graphs, read_scans

__all__ = ["ConnectivityError", "NavGraph", "load_graphs", "read_scans"]
