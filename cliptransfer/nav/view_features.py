"""36-view features of navigation viewpoints, both ways between the community formats and the
feature store (kind "views", keyed "{scan}_{viewpoint}", one row per view).

- EnvDrop / CLIP-ViL TSV: `scanId, viewpointId, image_w, image_h, vfov, features`, features =
  base64 of float32 (36, D) row-major (R2R-EnvDrop `r2r_src/utils.py read_img_features`).
- HAMT / DUET HDF5: dataset `"{scan}_{viewpoint}"` -> (36, D'), where D' may carry extra columns
  (e.g. 1000 ImageNet logits after 768 features): `keep_dims=768` drops them.
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliptransfer.visual.store import FeatureStore

__all__ = ["TSV_FIELDS", "ViewFeatureError", "ViewRecord", "import_views", "iter_view_hdf5",
           "iter_view_tsv", "view_key", "write_view_tsv"]  # fmt: skip

TSV_FIELDS = ("scanId", "viewpointId", "image_w", "image_h", "vfov", "features")
NUM_VIEWS = 36


class ViewFeatureError(ValueError):
    """A view-feature file that does not fit its format; names the file and record."""


@dataclass
class ViewRecord:
    scan: str
    viewpoint: str
    features: np.ndarray  # (views, D) float32
    image_w: int = 640
    image_h: int = 480
    vfov: float = 60.0  # degrees, as the TSV stores it


def view_key(scan: str, viewpoint: str) -> str:
    return f"{scan}_{viewpoint}"


def iter_view_tsv(path: str | Path, views: int = NUM_VIEWS) -> Iterator[ViewRecord]:
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a 36x2048 row is ~400 kB of base64
    with path.open(newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row:
                continue
            where = f"{path}: line {lineno}"
            if len(row) != len(TSV_FIELDS):
                raise ViewFeatureError(
                    f"{where}: {len(row)} fields, expected {len(TSV_FIELDS)} ({', '.join(TSV_FIELDS)})"
                )
            scan, vp, w, h, vfov, feats = row
            try:
                flat = np.frombuffer(base64.b64decode(feats, validate=True), dtype=np.float32)
            except (binascii.Error, ValueError) as e:
                raise ViewFeatureError(
                    f"{where} ({scan} {vp}): features are not base64: {e}"
                ) from None
            if flat.size == 0 or flat.size % views:
                raise ViewFeatureError(
                    f"{where} ({scan} {vp}): {flat.size} floats do not make {views} views"
                )
            try:
                yield ViewRecord(
                    scan, vp, flat.reshape(views, -1).copy(), int(w), int(h), float(vfov)
                )
            except ValueError as e:
                raise ViewFeatureError(f"{where} ({scan} {vp}): {e}") from None


def write_view_tsv(path: str | Path, records: Any) -> int:
    """Write ViewRecords as the EnvDrop TSV; returns the count written."""
    count = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        for r in records:
            feats = np.ascontiguousarray(r.features, dtype=np.float32)
            vfov = int(r.vfov) if float(r.vfov).is_integer() else r.vfov
            writer.writerow([r.scan, r.viewpoint, r.image_w, r.image_h, vfov,
                             base64.b64encode(feats.tobytes()).decode("ascii")])  # fmt: skip
            count += 1
    return count


def iter_view_hdf5(path: str | Path, keep_dims: int | None = None) -> Iterator[ViewRecord]:
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        for key in sorted(f.keys()):
            scan, sep, vp = key.partition("_")
            if not sep or not vp:
                raise ViewFeatureError(f"{path}: dataset {key!r} is not named scan_viewpoint")
            arr = np.asarray(f[key][...], dtype=np.float32)
            if arr.ndim != 2:
                raise ViewFeatureError(f"{path}: {key} has shape {arr.shape}, expected (views, D)")
            if keep_dims is not None:
                if keep_dims > arr.shape[1]:
                    raise ViewFeatureError(
                        f"{path}: {key} has {arr.shape[1]} columns < keep_dims={keep_dims}"
                    )
                arr = arr[:, :keep_dims]
            yield ViewRecord(scan, vp, np.ascontiguousarray(arr))


def import_views(paths: list[str | Path], store_path: str | Path, *, keep_dims: int | None = None,
                 storage: str = "float32") -> dict[str, Any]:  # fmt: skip
    """TSV / HDF5 view features into a "views" store (resumable: stored keys are skipped)."""
    stats: dict[str, Any] = {"store": str(store_path), "read": 0, "written": 0, "already": 0}
    writer = None
    try:
        for p in map(Path, paths):
            records = (
                iter_view_hdf5(p, keep_dims) if p.suffix in (".h5", ".hdf5") else iter_view_tsv(p)
            )
            for r in records:
                stats["read"] += 1
                if writer is None:
                    meta = {"kind": "views", "views": int(r.features.shape[0]),
                            "channels": int(r.features.shape[1]), "dtype": storage,
                            "camera": {"width": r.image_w, "height": r.image_h, "vfov_deg": r.vfov}}  # fmt: skip
                    writer = FeatureStore.create(store_path, meta)
                key = view_key(r.scan, r.viewpoint)
                if key in writer:
                    stats["already"] += 1
                    continue
                writer.add(key, r.features, image_w=r.image_w, image_h=r.image_h)
                stats["written"] += 1
    finally:
        if writer is not None:
            writer.close()
    return stats
