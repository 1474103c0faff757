"""Offline image features: the sharded feature store, CLIP grid extraction, BottomUp readers."""

from __future__ import annotations

from .extract import extract_grids, parse_size
from .region_import import import_regions, write_tsv
from .regions import RegionFormatError, UnsafePickleError, iter_regions
from .store import (
    FeatureStore,
    MissingFeatureError,
    StoreError,
    StoreMismatchError,
    canonical_image_id,
    parse_coco_id,
)
from .writer import StoreWriter

__all__ = [
    "FeatureStore",
    "MissingFeatureError",
    "RegionFormatError",
    "StoreError",
    "StoreMismatchError",
    "StoreWriter",
    "UnsafePickleError",
    "canonical_image_id",
    "extract_grids",
    "import_regions",
    "iter_regions",
    "parse_coco_id",
    "parse_size",
    "write_tsv",
]
