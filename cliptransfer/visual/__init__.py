"""Offline image features: the sharded feature store, CLIP grid extraction, BottomUp readers.

The names below load their module on first use (PEP 562), so `cliptransfer.visual.store` (what
navigation reads its view tables through) does not pull grid extraction's CLIP / timm /
torchvision stack (~190 MB of resident memory) into processes that never extract.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "extract_grids": "extract",
    "parse_size": "extract",
    "import_regions": "region_import",
    "write_tsv": "region_import",
    "RegionFormatError": "regions",
    "UnsafePickleError": "regions",
    "iter_regions": "regions",
    "FeatureStore": "store",
    "MissingFeatureError": "store",
    "StoreError": "store",
    "StoreMismatchError": "store",
    "canonical_image_id": "store",
    "parse_coco_id": "store",
    "StoreWriter": "writer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
