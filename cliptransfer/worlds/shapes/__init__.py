"""The embedded Shapes world: a seeded generator of COCO/VQA v2/SNLI-VE-format data.

from cliptransfer.worlds.shapes import prepare_shapes, default_world_dir
root = prepare_shapes(default_world_dir("small"), "small", seed=0)
"""

from __future__ import annotations

from .world import GENERATOR_VERSION, SIZES, WorldSize, default_world_dir, prepare_shapes

__all__ = ["GENERATOR_VERSION", "SIZES", "WorldSize", "default_world_dir", "prepare_shapes"]
