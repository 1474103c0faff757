"""Region files in and out: BUTD/LXMERT TSV writing and the import of any region file into a
"regions" feature store (the readers are in `regions.py`)."""

from __future__ import annotations

import base64
import csv
from pathlib import Path
from typing import Any

import numpy as np

from cliptransfer.visual.regions import LXMERT_ARRAYS, iter_regions
from cliptransfer.visual.store import FeatureStore, canonical_image_id
from cliptransfer.visual.writer import StoreWriter

__all__ = ["import_regions", "write_tsv"]


def _b64(arr: np.ndarray, dtype: Any) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype=dtype).tobytes()).decode("ascii")


def write_tsv(path: str | Path, records: Any, format: str = "butd") -> int:
    """Write records (as yielded above) as a BUTD or LXMERT TSV; returns the count written."""
    if format not in ("butd", "lxmert"):
        raise ValueError(f"TSV format must be 'butd' or 'lxmert', got {format!r}")
    count = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        for rec in records:
            n = len(rec["boxes"])
            if format == "butd":
                row = [rec["image_id"], rec["image_w"], rec["image_h"], n]
            else:
                row = [rec["image_id"], rec["image_h"], rec["image_w"]]
                row += [_b64(rec[k], t) for k, t, _ in LXMERT_ARRAYS[:4]] + [n]
            writer.writerow(
                row + [_b64(rec["boxes"], np.float32), _b64(rec["features"], np.float32)]
            )
            count += 1
    return count


def import_regions(
    path: str | Path | list[str | Path],
    store_path: str | Path,
    skip_bad: bool = False,
    *,
    storage: str = "float32",
    format: str | None = None,
    index: str | Path | None = None,
    coco_ids: bool = True,
) -> dict[str, Any]:
    """Convert region files (one path or several, e.g. the BUTD `.tsv.0/.tsv.1` parts) into a
    "regions" feature store; resumable: ids already stored are skipped. Returns counts.

    `coco_ids` keys COCO-named images (LXMERT's `COCO_val2014_000000000042`) by their integer
    id, like `extract_grids`, so grid and region stores of one dataset share keys.
    """
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    stats: dict[str, Any] = {"store": str(store_path), "read": 0, "written": 0, "already": 0}
    stats.update(skipped_bad=0, formats=[], min_boxes=None, max_boxes=None)
    writer: StoreWriter | None = None
    try:
        for p in paths:
            reader = iter_regions(p, skip_bad=skip_bad, format=format, index=index)
            stats["formats"].append(reader.format)
            for rec in reader:
                stats["read"] += 1
                if writer is None:
                    extra = {k: ["int64" if t is np.int64 else "float32", w] for k, t, w in
                             LXMERT_ARRAYS[:4] if k in rec}  # fmt: skip
                    meta = {
                        "kind": "regions",
                        "channels": int(rec["features"].shape[1]),
                        "dtype": storage,
                        "row_fields": {"boxes": ["float32", 4], **extra},
                    }
                    writer = FeatureStore.create(store_path, meta)
                key = canonical_image_id(rec["image_id"]) if coco_ids else rec["image_id"]
                if key in writer:
                    stats["already"] += 1
                    continue
                fields = {k: rec[k] for k, _, _ in LXMERT_ARRAYS[:4] if k in rec}
                writer.add(key, rec["features"], boxes=rec["boxes"], image_w=rec["image_w"],
                           image_h=rec["image_h"], **fields)  # fmt: skip
                stats["written"] += 1
                n = len(rec["boxes"])
                stats["min_boxes"] = min(n, stats["min_boxes"] or n)
                stats["max_boxes"] = max(n, stats["max_boxes"] or n)
            stats["skipped_bad"] += reader.skipped
    finally:
        if writer is not None:
            writer.close()
    return stats
