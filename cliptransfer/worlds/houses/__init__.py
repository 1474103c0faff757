"""The Shapes houses: an embedded navigation world in the real Matterport / R2R / RxR formats.

from cliptransfer.worlds.houses import prepare_houses, default_houses_dir
root = prepare_houses(default_houses_dir("small"), "small", seed=0)
"""

from __future__ import annotations

from .world import (
    GENERATOR_VERSION,
    HOUSE_SIZES,
    HouseSize,
    default_houses_dir,
    prepare_houses,
    sample_houses,
)

__all__ = [
    "GENERATOR_VERSION",
    "HOUSE_SIZES",
    "HouseSize",
    "default_houses_dir",
    "prepare_houses",
    "sample_houses",
]
