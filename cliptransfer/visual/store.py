"""Sharded, memory-mapped feature store: one record of (N, C) features per image.

Layout of a store folder:
    metadata.json                 what produced the features (backbone, checkpoint sha256, layer,
                                  input/grid size, normalisation, dtype, kind "grid"|"regions")
    shard-r0-00000.bin            raw (rows, C) features of rank 0's first shard, back to back
    shard-r0-00000.boxes.bin      per-row fields beside them (regions: boxes (rows, 4) float32)
    shard-r0-00000.index.json     the committed records: [image_id, row offset, n_rows, w, h]

A writer appends to its own shards (`shard-r{rank}-*`, so one writer per Accelerate process never
races another) and commits by fsync-ing the data and then atomically replacing the shard index:
a crash loses at most the uncommitted records, and a reopened writer truncates the torn tail and
continues. Readers merge every shard index on open into sorted numpy arrays (small, no per-id
Python objects, so forked DataLoader workers share them), and map shard files lazily per process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cliptransfer.fileio import JSONFileError, read_json

if TYPE_CHECKING:
    from .writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "MissingFeatureError",
    "StoreError",
    "StoreMismatchError",
    "canonical_image_id",
    "check_metadata",
    "parse_coco_id",
]

FORMAT_VERSION = 1
METADATA_NAME = "metadata.json"
DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB: ~900 COCO images of 18x31x2048 fp16 per shard
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
FIELD_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
_INDEX_RE = re.compile(r"^shard-r(\d+)-(\d{5})\.index\.json$")
_COCO_RE = re.compile(r"^COCO_[A-Za-z]+\d*_0*(\d+)$")
_MISSING = "<missing>"


class StoreError(ValueError):
    """A store folder that is missing pieces, corrupt, or used inconsistently."""


class StoreMismatchError(StoreError):
    """A store whose metadata differs from what the run expects."""


class MissingFeatureError(KeyError):
    """An image id that the store does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def parse_coco_id(name: str) -> int | None:
    """`COCO_train2014_000000000123(.jpg)` -> 123; None for names that are not COCO-style."""
    m = _COCO_RE.match(Path(str(name)).stem if "." in str(name) else str(name))
    return int(m.group(1)) if m else None


def canonical_image_id(name: str | int) -> str:
    """The store key of an image: the COCO integer id as a string for COCO names, else unchanged.

    So grid stores (keyed by file stem) and BUTD/LXMERT region stores (keyed by the files' ids)
    use the same key, "123", for `COCO_val2014_000000000123`.
    """
    coco = parse_coco_id(str(name))
    return str(coco) if coco is not None else str(name)


def _to_builtin(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise StoreError(f"metadata value {obj!r} ({type(obj).__name__}) is not JSON-serialisable")


def _jsonable(obj: Any) -> Any:
    # tuples -> lists, numpy scalars/arrays -> Python numbers, as stored in metadata.json
    return json.loads(json.dumps(obj, default=_to_builtin))


def check_metadata(found: dict[str, Any], expect: dict[str, Any], where: str | Path) -> None:
    """Raise StoreMismatchError naming every field of `expect` that `found` disagrees with."""
    expect = _jsonable(expect)
    diffs = [(k, v, found.get(k, _MISSING)) for k, v in expect.items() if found.get(k) != v]
    if diffs:
        shown = "; ".join(f"{k}: expected {e!r}, found {f!r}" for k, e, f in diffs)
        raise StoreMismatchError(f"feature store {where} does not match this run ({shown})")


def _normalise_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    meta = _jsonable(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("dtype", "float32")
    kind = meta.get("kind")
    if kind not in ("grid", "regions", "views"):
        raise StoreError(f"metadata kind must be 'grid', 'regions' or 'views', got {kind!r}")
    if meta["dtype"] not in STORAGE_DTYPES:
        raise StoreError(f"metadata dtype must be one of {list(STORAGE_DTYPES)}: {meta['dtype']!r}")
    if not isinstance(meta.get("channels"), int) or meta["channels"] <= 0:
        raise StoreError(f"metadata channels must be a positive int, got {meta.get('channels')!r}")
    if kind == "grid":
        gs = meta.get("grid_size")
        if not (isinstance(gs, list) and len(gs) == 2 and all(isinstance(v, int) for v in gs)):
            raise StoreError(f"grid stores need metadata grid_size [h, w], got {gs!r}")
    if kind == "views" and not (isinstance(meta.get("views"), int) and meta["views"] > 0):
        # navigation: one row per discretised view of a viewpoint (36 for R2R), keyed scan_vp
        raise StoreError(f"views stores need metadata views (e.g. 36), got {meta.get('views')!r}")
    fields = meta.setdefault("row_fields", {"boxes": ["float32", 4]} if kind == "regions" else {})
    for name, spec in fields.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "features":
            raise StoreError(f"bad row field name {name!r}")
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in FIELD_DTYPES):
            raise StoreError(f"row field {name!r} must be [dtype, width], got {spec!r}")
    return meta


def _read_json(path: Path) -> Any:
    # Store callers catch StoreError; JSONFileError's text already names the file and place.
    try:
        return read_json(path)
    except JSONFileError as e:
        raise StoreError(str(e)) from e
    except OSError as e:
        raise StoreError(f"could not read {path}: {e}") from e


def _shard_stem(rank: int, n: int) -> str:
    return f"shard-r{rank}-{n:05d}"


def _field_file(root: Path, stem: str, field: str) -> Path:
    return root / (f"{stem}.bin" if field == "features" else f"{stem}.{field}.bin")


def _list_indices(root: Path) -> list[tuple[int, int, Path]]:
    """(rank, shard number, index path) of every committed shard, in (rank, number) order."""
    out = []
    for p in root.iterdir():
        m = _INDEX_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def _field_specs(meta: dict[str, Any]) -> dict[str, tuple[np.dtype, int]]:
    specs = {"features": (np.dtype(STORAGE_DTYPES[meta["dtype"]]), meta["channels"])}
    for name, (dtype, width) in meta["row_fields"].items():
        specs[name] = (np.dtype(FIELD_DTYPES[dtype]), int(width))
    return specs


class FeatureStore:
    """Read side: `store[image_id] -> {"features": (N, C) float32 tensor, ...}`.

    Grid records add `grid_hw`; region records add `boxes` (N, 4), `image_w`, `image_h` and any
    other row fields (e.g. LXMERT's `objects_id`). Use `FeatureStore.open` / `FeatureStore.create`.
    """

    def __init__(self, root: Path, metadata: dict[str, Any]) -> None:
        self.root = root
        self.metadata = metadata
        self._specs = _field_specs(metadata)
        shards, rows, ids, recs = [], [], [], []
        for _rank, _n, path in _list_indices(root):
            index = _read_json(path)
            stem = path.name[: -len(".index.json")]
            try:
                n_rows, records = int(index["rows"]), index["records"]
            except (KeyError, TypeError, ValueError) as e:
                raise StoreError(f"{path}: malformed shard index ({e})") from e
            for field, (dtype, width) in self._specs.items():
                f = _field_file(root, stem, field)
                need = n_rows * width * dtype.itemsize
                if not f.is_file() or f.stat().st_size < need:
                    have = f.stat().st_size if f.is_file() else "no file"
                    raise StoreError(
                        f"{f}: truncated (index {path.name} needs {need} bytes, {have})"
                    )
            s = len(shards)
            shards.append(stem)
            rows.append(n_rows)
            try:
                shard_recs = np.array([(s, *r[1:5]) for r in records], np.int64).reshape(-1, 5)
            except (TypeError, ValueError) as e:
                raise StoreError(f"{path}: malformed records ({e})") from e
            if len(shard_recs) and (shard_recs[:, 1] + shard_recs[:, 2]).max() > n_rows:
                raise StoreError(f"{path}: a record reaches past the shard's {n_rows} rows")
            ids += [str(r[0]) for r in records]
            recs.append(shard_recs)
        self._shards, self._shard_rows = shards, rows
        ids_arr = np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1")
        recs_arr = np.concatenate(recs) if recs else np.zeros((0, 5), np.int64)
        # recs_arr columns: shard, row offset, n rows, image_w, image_h
        # Keep the first copy of an id stored twice (e.g. two runs with other world sizes).
        _, first = np.unique(ids_arr, return_index=True)
        keep = np.sort(first)
        self._ids, self._recs = ids_arr[keep], recs_arr[keep]  # storage order
        self._sorted = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._sorted]
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | Path, expect: dict[str, Any] | None = None) -> FeatureStore:
        """Open a store for reading; `expect` fields must equal the stored metadata."""
        root = Path(path)
        meta_path = root / METADATA_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"no feature store at {root} (missing {METADATA_NAME})")
        meta = _read_json(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}"
            )
        if expect:
            check_metadata(meta, expect, root)
        return cls(root, _normalise_metadata(meta))

    @classmethod
    def create(
        cls,
        path: str | Path,
        metadata: dict[str, Any],
        *,
        rank: int = 0,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        commit_every: int = 256,
        ignore_keys: tuple[str, ...] = (),
    ) -> StoreWriter:
        """A writer for a new store, or for an existing one with equal metadata (resuming).

        `ignore_keys` are informational metadata fields allowed to differ on resume (e.g. the
        backbone's path when its sha256 is compared anyway).
        """
        from .writer import StoreWriter  # the writer module builds on this one

        return StoreWriter(Path(path), metadata, rank, shard_bytes, commit_every, ignore_keys)

    # --- mapping protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def _find(self, image_id: str | int) -> int:
        key = str(int(image_id)) if isinstance(image_id, np.integer) else str(image_id)
        i = int(np.searchsorted(self._sorted_ids, key))
        if i < len(self._sorted_ids) and self._sorted_ids[i] == key:
            return int(self._sorted[i])
        return -1

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, (str, int, np.integer)) and self._find(image_id) >= 0

    def ids(self) -> list[str]:
        """All image ids, in storage order (shard by shard, in write order)."""
        return self._ids.tolist()

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __getitem__(self, image_id: str | int) -> dict[str, Any]:
        i = self._find(image_id)
        if i < 0:
            raise MissingFeatureError(
                f"image id {str(image_id)!r} not in feature store {self.root}"
            )
        shard, offset, n, w, h = (int(v) for v in self._recs[i])
        out: dict[str, Any] = {"image_id": str(image_id)}
        for field in self._specs:
            rows = torch.from_numpy(self._rows(shard, field)[offset : offset + n])
            # A copy out of the map; torch converts fp16 -> fp32 ~6x faster than numpy.
            t = rows.to(torch.float32 if rows.is_floating_point() else rows.dtype, copy=True)
            out[field] = t[:, 0] if t.shape[1] == 1 and field != "features" else t
        if self.metadata["kind"] == "grid":
            out["grid_hw"] = tuple(self.metadata["grid_size"])
        out["image_w"], out["image_h"] = (w or None), (h or None)
        return out

    def get(self, image_id: str | int, default: Any = None) -> Any:
        return self[image_id] if image_id in self else default

    def _rows(self, shard: int, field: str) -> np.ndarray:
        if self._pid != os.getpid():  # forked DataLoader worker: map the files anew
            self._maps, self._pid = {}, os.getpid()
        key = (shard, field)
        if key not in self._maps:
            dtype, width = self._specs[field]
            n = self._shard_rows[shard]
            path = _field_file(self.root, self._shards[shard], field)
            # mode "c" (private, copy-on-write) maps read-only files as writable arrays, so
            # torch.from_numpy does not warn; nothing ever writes through them. The plain
            # ndarray view (which keeps the map alive) slices faster than np.memmap.
            self._maps[key] = (
                np.memmap(path, dtype=dtype, mode="c", shape=(n, width)).view(np.ndarray)
                if n
                else np.zeros((0, width), dtype)
            )
        return self._maps[key]

    def __getstate__(self) -> dict[str, Any]:  # spawn-started workers: never pickle the maps
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        m = self.metadata
        return f"FeatureStore({str(self.root)!r}, kind={m['kind']}, images={len(self)}, C={m['channels']})"
