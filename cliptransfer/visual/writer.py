"""Appending to a feature store: one writer per rank, crash-safe commits, resumable.

A writer appends each record's rows to this rank's current shard files and remembers it in
memory; `commit()` (every `commit_every` records, at a shard change and on close) fsyncs the
data and then atomically replaces the shard's index. A crash therefore loses only uncommitted
records; a reopened writer truncates the torn tail of its last shard and appends after it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliptransfer.fileio import write_json

from .store import (
    FORMAT_VERSION,
    METADATA_NAME,
    FeatureStore,
    StoreError,
    _field_file,
    _field_specs,
    _list_indices,
    _normalise_metadata,
    _read_json,
    _shard_stem,
    check_metadata,
)

try:  # advisory lock against two writers of one rank; POSIX only
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["StoreWriter"]


def _as_array(x: Any, dtype: np.dtype, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16
        x = x.numpy()
    arr = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, with the image id
        out = np.ascontiguousarray(arr, dtype=dtype)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        bad = "overflows float16" if np.isfinite(arr).all() else "has NaN/inf values"
        raise StoreError(f"{what} {bad}")
    return out


class StoreWriter:
    """Appends records to this rank's shards; `with FeatureStore.create(...) as w: w.add(...)`."""

    def __init__(
        self,
        root: Path,
        metadata: dict[str, Any],
        rank: int,
        shard_bytes: int,
        commit_every: int,
        ignore_keys: tuple[str, ...],
    ) -> None:
        self.root, self.rank = root, int(rank)
        self.shard_bytes, self.commit_every = int(shard_bytes), max(1, int(commit_every))
        meta = _normalise_metadata(metadata)
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / METADATA_NAME
        if not meta_path.is_file():
            write_json(meta_path, meta, sort_keys=True)
        found = _read_json(meta_path)  # another rank may have written it first: same check
        check_metadata(found, {k: v for k, v in meta.items() if k not in ignore_keys}, root)
        self.metadata = found
        self._specs = _field_specs(meta)
        self._row_bytes = sum(d.itemsize * w for d, w in self._specs.values())
        self._lock = self._acquire_lock()
        self._files: dict[str, Any] = {}
        try:
            self._known = set(FeatureStore(root, _normalise_metadata(found)).ids())
            self._resume()
        except BaseException:
            if self._lock is not None:
                self._lock.close()
            raise

    def _acquire_lock(self) -> Any:
        if fcntl is None:
            return None
        f = open(self.root / f".writer-r{self.rank}.lock", "w")  # noqa: SIM115 (held while open)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            raise StoreError(f"another writer with rank {self.rank} has {self.root} open") from e
        return f

    def _resume(self) -> None:
        own = [(n, p) for r, n, p in _list_indices(self.root) if r == self.rank]
        self._shard, self._records, self._rows = 0, [], 0
        if own:
            n, path = own[-1]
            index = _read_json(path)
            self._shard, self._records, self._rows = n, index["records"], int(index["rows"])
            if self._rows * self._row_bytes >= self.shard_bytes:
                self._shard, self._records, self._rows = n + 1, [], 0
        self._committed = len(self._records)
        self._open_shard(truncate_to=self._rows)

    def _open_shard(self, truncate_to: int) -> None:
        stem = _shard_stem(self.rank, self._shard)
        for field, (dtype, width) in self._specs.items():
            path = _field_file(self.root, stem, field)
            with open(path, "ab"):
                pass
            os.truncate(path, truncate_to * width * dtype.itemsize)  # drop a torn, uncommitted tail
            self._files[field] = open(path, "ab")  # noqa: SIM115 (closed in close())

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._known

    def __len__(self) -> int:
        return len(self._known)

    def add(
        self,
        image_id: str | int,
        features: Any,
        *,
        boxes: Any = None,
        image_w: int | None = None,
        image_h: int | None = None,
        **fields: Any,
    ) -> None:
        """Append one image: `features` (N, C); regions also `boxes` (N, 4) in pixels."""
        key = str(image_id)
        what = f"feature store {self.root}, image {key!r}"
        if key in self._known:
            raise StoreError(f"{what}: already stored")
        if boxes is not None:
            fields["boxes"] = boxes
        unknown = sorted(set(fields) - set(self._specs))
        missing = sorted(set(self._specs) - set(fields) - {"features"})
        if unknown or missing:
            raise StoreError(f"{what}: row fields unknown {unknown}, missing {missing}")
        dtype, channels = self._specs["features"]
        feats = _as_array(features, dtype, f"{what}: features")
        if feats.ndim != 2 or feats.shape[1] != channels:
            raise StoreError(f"{what}: features must be (N, {channels}), got {feats.shape}")
        n = feats.shape[0]
        gh, gw = self.metadata.get("grid_size") or (0, 0)
        if self.metadata["kind"] == "grid" and n != gh * gw:
            raise StoreError(f"{what}: {n} feature rows but the {gh}x{gw} grid has {gh * gw}")
        if self.metadata["kind"] == "views" and n != self.metadata["views"]:
            raise StoreError(
                f"{what}: {n} feature rows but the store holds {self.metadata['views']} views"
            )
        arrays = {"features": feats}
        for name, value in fields.items():
            fdtype, width = self._specs[name]
            arr = _as_array(value, fdtype, f"{what}: {name}")
            if arr.size != n * width or arr.ndim > 2:
                raise StoreError(f"{what}: {name} has shape {arr.shape}, expected ({n}, {width})")
            arrays[name] = arr.reshape(n, width)
        try:
            for field, arr in arrays.items():
                self._files[field].write(memoryview(arr).cast("B"))
        except BaseException:
            self._rollback()
            raise
        self._records.append([key, self._rows, n, int(image_w or 0), int(image_h or 0)])
        self._rows += n
        self._known.add(key)
        if len(self._records) - self._committed >= self.commit_every:
            self.commit()
        if self._rows * self._row_bytes >= self.shard_bytes:
            self._next_shard()

    def _rollback(self) -> None:
        for field, f in self._files.items():
            f.flush()
            dtype, width = self._specs[field]
            os.truncate(f.name, self._rows * width * dtype.itemsize)

    def commit(self) -> None:
        """Make every added record durable: fsync the data, then atomically replace the index."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        index = {"format_version": FORMAT_VERSION, "rows": self._rows, "records": self._records}
        stem = _shard_stem(self.rank, self._shard)
        write_json(self.root / f"{stem}.index.json", index, indent=None)
        self._committed = len(self._records)

    def _next_shard(self) -> None:
        self.commit()
        for f in self._files.values():
            f.close()
        self._shard, self._records, self._rows, self._committed = self._shard + 1, [], 0, 0
        self._open_shard(truncate_to=0)

    def close(self) -> None:
        if not self._files:
            return
        if self._records:
            self.commit()
        for f in self._files.values():
            f.close()
            if not self._records:  # a shard opened but never used: leave no empty files
                os.unlink(f.name)
        self._files = {}
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # every record added completely is valid, even when leaving on an error
