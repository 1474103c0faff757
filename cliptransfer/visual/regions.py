"""Readers for BottomUp-TopDown region features: BUTD TSV, LXMERT TSV and the HDF5 conversion.

Every reader yields records {image_id (str, as in the file), image_w, image_h, boxes (N, 4)
float32 pixels x1,y1,x2,y2, features (N, D) float32}, plus objects_id/objects_conf/attrs_id/
attrs_conf for LXMERT files. Formats (checked against the reference code):
- BUTD (peteanderson80/bottom-up-attention tools/generate_tsv.py): 6 tab-separated columns
  image_id, image_w, image_h, num_boxes, boxes, features -- width BEFORE height; base64 float32.
- LXMERT (airsplay/lxmert src/utils.py load_obj_tsv): 10 columns img_id, img_h, img_w,
  objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features -- height FIRST;
  ids int64, confidences/boxes/features float32.
- HDF5 (hengyuan-hu/bottom-up-attention-vqa tools/[adaptive_]detection_features_converter.py):
  image_features (N_img, 36, D) or, adaptive, (total_boxes, D) with pos_boxes (N_img, 2)
  [start, end); image_bb likewise; spatial_features (.., 6) = x1/w, y1/h, x2/w, y2/h, bw/w, bh/h;
  `{name}_imgid2idx.pkl` maps image id -> row. The pickle is read by an unpickler that refuses
  every global, so it can only rebuild plain containers of ints/strings. The files store no image
  size: it is recovered from spatial_features (None when that is impossible).
"""

from __future__ import annotations

import base64
import binascii
import csv
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cliptransfer.fileio import JSONFileError, read_json

__all__ = [
    "BUTD_FIELDS",
    "LXMERT_FIELDS",
    "RegionFormatError",
    "RegionReader",
    "UnsafePickleError",
    "detect_format",
    "iter_regions",
    "read_index",
]

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features",
)  # fmt: skip
# LXMERT's per-box arrays besides features: (name, dtype, width).
LXMERT_ARRAYS = (
    ("objects_id", np.int64, 1),
    ("objects_conf", np.float32, 1),
    ("attrs_id", np.int64, 1),
    ("attrs_conf", np.float32, 1),
    ("boxes", np.float32, 4),
)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
FORMATS = ("butd", "lxmert", "hdf5")


class RegionFormatError(ValueError):
    """A region feature file (or one record of it) that does not follow its format."""


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that asks for a global (class/function): refused, never executed."""


def _raise_csv_limit() -> None:
    # Feature columns are ~0.4-1.1 MB of base64; csv's default limit is 128 KB. sys.maxsize
    # overflows a C long on some platforms, so back off until it fits.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def detect_format(path: str | Path) -> str:
    """'hdf5' by signature, else 'butd' (6 columns) or 'lxmert' (10 columns) from the first line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"region feature file not found: {path}")
    with open(path, "rb") as f:
        if f.read(8) == HDF5_SIGNATURE:
            return "hdf5"
        f.seek(0)
        first = b""
        while not first.strip():
            first = f.readline()
            if not first:
                raise RegionFormatError(f"{path}: empty file, not a BUTD/LXMERT TSV or HDF5")
    cols = len(first.rstrip(b"\r\n").split(b"\t"))
    if cols == len(BUTD_FIELDS):
        return "butd"
    if cols == len(LXMERT_FIELDS):
        return "lxmert"
    raise RegionFormatError(
        f"{path}: line 1 has {cols} tab-separated columns; expected {len(BUTD_FIELDS)} (BUTD: "
        f"{', '.join(BUTD_FIELDS)}) or {len(LXMERT_FIELDS)} (LXMERT: {', '.join(LXMERT_FIELDS)})"
    )


class _IndexUnpickler(pickle.Unpickler):
    """Rebuilds only what needs no global lookup: dicts, lists, tuples, ints, floats, strings."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self.name}: refusing to load {module}.{name} (the index may only hold ids and "
            "ints; convert it to JSON if it was written with numpy types)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.name}: refusing persistent id {pid!r}")


def read_index(path: str | Path) -> dict[str, int]:
    """An `imgid2idx` index (.pkl via the restricted unpickler, or .json) as {str(id): row}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 index not found: {path}")
    if path.suffix == ".json":
        try:
            obj = read_json(path)
        except JSONFileError as e:
            raise RegionFormatError(str(e)) from e
    else:
        with open(path, "rb") as f:
            unpickler = _IndexUnpickler(f, encoding="latin1")  # py2 cPickle str -> str
            unpickler.name = str(path)
            try:
                obj = unpickler.load()
            except UnsafePickleError:
                raise
            except Exception as e:
                raise RegionFormatError(f"{path}: not a readable pickle: {e}") from e
    if not isinstance(obj, dict) or not all(
        isinstance(k, (int, str)) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in obj.items()
    ):
        raise RegionFormatError(f"{path}: expected a dict of image id -> int row index")
    return {str(k): v for k, v in obj.items()}


def _default_index(path: Path) -> Path:
    for suffix in (".pkl", ".json"):
        candidate = path.with_name(f"{path.stem}_imgid2idx{suffix}")
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no index beside it ({path.stem}_imgid2idx.pkl or .json); pass index="
    )


def _int(text: str, what: str) -> int:
    try:
        value = float(text)  # some writers print "640.0"
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise ValueError(f"{what} {text!r} is not an integer")
    return int(value)


def _decode(text: str, dtype: Any, n: int, width: int | None, what: str) -> np.ndarray:
    """base64 -> (n, width) array; width None infers it (features)."""
    try:
        raw = base64.b64decode(text)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what}: invalid base64 ({e})") from e
    item = np.dtype(dtype).itemsize
    if width is None:
        if n <= 0 or len(raw) % (n * item) or not raw:
            raise ValueError(f"{what}: {len(raw)} bytes is not num_boxes={n} x D x {item}")
        width = len(raw) // (n * item)
    elif len(raw) != n * width * item:
        raise ValueError(f"{what}: {len(raw)} bytes, expected num_boxes={n} x {width} x {item}")
    return np.frombuffer(raw, dtype=dtype).reshape(n, width)


def _hdf5_size(bb: np.ndarray, spatial: np.ndarray | None) -> tuple[int | None, int | None]:
    """Image (w, h) from boxes in pixels and the same boxes normalised (spatial_features)."""
    if spatial is None or not len(bb):
        return None, None
    out = []
    for col in (2, 3):  # x2 / (x2 / w), y2 / (y2 / h), from the box reaching furthest
        i = int(np.argmax(spatial[:, col]))
        out.append(
            round(float(bb[i, col]) / float(spatial[i, col])) if spatial[i, col] > 0 else None
        )
    return out[0], out[1]


class RegionReader:
    """Iterate one region feature file; `skipped` counts bad records passed over (skip_bad)."""

    def __init__(
        self,
        path: str | Path,
        *,
        skip_bad: bool = False,
        format: str | None = None,
        index: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.format = format or detect_format(self.path)
        if self.format not in FORMATS:
            raise ValueError(f"unknown region format {self.format!r}; expected one of {FORMATS}")
        self.skip_bad = skip_bad
        self.index = Path(index) if index is not None else None
        self.skipped = 0
        self.errors: list[str] = []  # the first bad-record messages, for reports
        self.dim: int | None = None

    def _bad(self, where: str, image_id: str, reason: str) -> None:
        msg = f"{self.path}:{where}: image {image_id!r}: {reason}"
        if not self.skip_bad:
            raise RegionFormatError(msg + " (pass skip_bad=True to skip bad records)")
        self.skipped += 1
        if len(self.errors) < 20:
            self.errors.append(msg)

    def _check_dim(self, feats: np.ndarray) -> None:
        if self.dim is None:
            self.dim = feats.shape[1]
        elif feats.shape[1] != self.dim:
            raise ValueError(f"features have D={feats.shape[1]}, earlier records D={self.dim}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.format == "hdf5":
            yield from self._iter_hdf5()
        else:
            yield from self._iter_tsv()

    def _iter_tsv(self) -> Iterator[dict[str, Any]]:
        _raise_csv_limit()
        fields = BUTD_FIELDS if self.format == "butd" else LXMERT_FIELDS
        with open(self.path, newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            for row in reader:
                if not row or row == list(fields):  # blank line, or a header someone added
                    continue
                line, image_id = f"line {reader.line_num}", row[0]
                if len(row) != len(fields):
                    self._bad(line, image_id, f"{len(row)} columns, expected {len(fields)} "
                              f"({self.format.upper()}: {', '.join(fields)}); truncated line?")  # fmt: skip
                    continue
                try:
                    rec = self._butd(row) if self.format == "butd" else self._lxmert(row)
                    self._check_dim(rec["features"])
                except ValueError as e:
                    self._bad(line, image_id, str(e))
                    continue
                yield rec

    def _butd(self, row: list[str]) -> dict[str, Any]:
        image_id, w, h, n = row[0], *(_int(v, k) for v, k in zip(row[1:4], BUTD_FIELDS[1:4]))
        if n <= 0:
            raise ValueError(f"num_boxes={n}")
        return {
            "image_id": image_id,
            "image_w": w,
            "image_h": h,
            "boxes": _decode(row[4], np.float32, n, 4, "boxes"),
            "features": _decode(row[5], np.float32, n, None, "features"),
        }

    def _lxmert(self, row: list[str]) -> dict[str, Any]:
        h, w, n = _int(row[1], "img_h"), _int(row[2], "img_w"), _int(row[7], "num_boxes")
        if n <= 0:
            raise ValueError(f"num_boxes={n}")
        rec: dict[str, Any] = {"image_id": row[0], "image_w": w, "image_h": h}
        columns = dict(zip(LXMERT_FIELDS, row))
        for name, dtype, width in LXMERT_ARRAYS:
            arr = _decode(columns[name], dtype, n, width, name)
            rec[name] = arr if width > 1 else arr[:, 0]
        rec["features"] = _decode(columns["features"], np.float32, n, None, "features")
        return rec

    def _iter_hdf5(self) -> Iterator[dict[str, Any]]:
        import h5py  # only this format needs it

        index = read_index(self.index or _default_index(self.path))
        with h5py.File(self.path, "r") as f:
            missing = [k for k in ("image_features", "image_bb") if k not in f]
            if missing:
                raise RegionFormatError(f"{self.path}: no dataset(s) {missing}; keys {list(f)}")
            feats, bb = f["image_features"], f["image_bb"]
            spatial = f["spatial_features"] if "spatial_features" in f else None
            adaptive = feats.ndim == 2
            if adaptive and "pos_boxes" not in f:
                raise RegionFormatError(f"{self.path}: 2-D image_features need pos_boxes")
            pos = f["pos_boxes"][()] if adaptive else None
            n_images = len(pos) if adaptive else feats.shape[0]
            for image_id, idx in sorted(index.items(), key=lambda kv: kv[1]):
                where = f"row {idx}"
                if not 0 <= idx < n_images:
                    self._bad(where, image_id, f"index row outside 0..{n_images - 1}")
                    continue
                if adaptive:
                    a, b = (int(v) for v in pos[idx])
                    if not 0 <= a < b <= feats.shape[0]:
                        self._bad(where, image_id, f"pos_boxes [{a}, {b}) outside the boxes")
                        continue
                    sel: Any = slice(a, b)
                else:
                    sel = idx
                boxes = np.asarray(bb[sel], dtype=np.float32)
                rec_feats = np.asarray(feats[sel], dtype=np.float32)
                sp = np.asarray(spatial[sel], dtype=np.float32) if spatial is not None else None
                w, h = _hdf5_size(boxes, sp)
                try:
                    self._check_dim(rec_feats)
                except ValueError as e:
                    self._bad(where, image_id, str(e))
                    continue
                yield {
                    "image_id": image_id,
                    "image_w": w,
                    "image_h": h,
                    "boxes": boxes,
                    "features": rec_feats,
                }


def iter_regions(
    path: str | Path,
    *,
    skip_bad: bool = False,
    format: str | None = None,
    index: str | Path | None = None,
) -> RegionReader:
    """Records of a BUTD TSV / LXMERT TSV / HDF5 file, format auto-detected unless given.

    The returned iterable's `.skipped` counts records passed over with `skip_bad=True`; without
    it a bad record raises RegionFormatError naming the file, line (or row) and image id.
    """
    return RegionReader(path, skip_bad=skip_bad, format=format, index=index)
