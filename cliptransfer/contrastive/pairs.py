"""Image-text pair sources: JSONL/CSV files, webdataset tar shards, and `datasets` datasets.

All sources become a list of `PairRecord`s with random access, so one seeded sampler orders the
data and a run can resume mid-epoch. Tar shards are indexed once (member offsets) and read by seek.
"""

from __future__ import annotations

import csv
import functools
import io
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cliptransfer.fileio import JSONFileError, iter_jsonl

IMAGE_KEYS = ("image", "filepath", "image_path", "file_name", "img")
TEXT_KEYS = ("caption", "title", "text", "sentence")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class PairRecord:
    """One image-text pair. `image` is a path, or `tar://SHARD#OFFSET:SIZE` inside a shard."""

    image: str
    caption: str
    source: str  # "file:line" (or shard#key): named in every error about this record


def _pick(row: dict, keys: Sequence[str], what: str, where: str) -> str:
    for k in keys:
        if k in row and row[k] is not None:
            return str(row[k])
    raise ValueError(f"{where}: no {what} field (looked for {', '.join(keys)}; got {sorted(row)})")


def _resolve(image: str, root: Path) -> str:
    p = Path(image)
    return str(p if p.is_absolute() else root / p)


def read_jsonl(path: Path, image_root: Path | None = None) -> list[PairRecord]:
    root = image_root or path.parent
    out = []
    try:
        for line_no, row in iter_jsonl(path):
            where = f"{path}:{line_no}"
            image = _pick(row, IMAGE_KEYS, "image", where)
            caption = _pick(row, TEXT_KEYS, "caption", where)
            out.append(PairRecord(_resolve(image, root), caption, where))
    except JSONFileError as e:
        if e.column is None:  # bytes that are not UTF-8: the message names line and offset
            raise
        # Pair sources name records "file:line", like the CSV reader and `PairRecord.source`.
        raise ValueError(
            f"{path}:{e.line}: malformed JSON ({e.reason}, column {e.column})"
        ) from None
    return out


def read_csv(path: Path, image_root: Path | None = None) -> list[PairRecord]:
    """open_clip's CSV (tab separated, `filepath`/`title` header) or a comma CSV with a header."""
    root = image_root or path.parent
    text = path.read_text()
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    out = []
    for line_no, row in enumerate(reader, 2):
        where = f"{path}:{line_no}"
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{where}: wrong number of fields (header: {reader.fieldnames})")
        image = _pick(row, IMAGE_KEYS, "image", where)
        caption = _pick(row, TEXT_KEYS, "caption", where)
        out.append(PairRecord(_resolve(image, root), caption, where))
    return out


def index_shard(path: Path) -> list[PairRecord]:
    """Index a webdataset tar: group members by key, keep (offset, size) of the image and text."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                prefix = m.name[: len(m.name) - len(base)]
                groups.setdefault(prefix + key, {})[ext.lower()] = m
    except tarfile.TarError as e:
        raise ValueError(f"{path}: unreadable tar shard ({e})") from None
    out = []
    for key, members in groups.items():
        img = next((members[e] for e in IMAGE_EXTS if e in members), None)
        txt = members.get("txt")
        where = f"{path}#{key}"
        if img is None or txt is None:
            raise ValueError(f"{where}: sample needs an image ({'/'.join(IMAGE_EXTS)}) and a .txt")
        with tarfile.open(path) as tar:
            f = tar.extractfile(txt)
            caption = f.read().decode("utf-8") if f else ""
        out.append(PairRecord(f"tar://{path}#{img.offset_data}:{img.size}", caption, where))
    return out


def _is_hf_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


@functools.lru_cache(maxsize=4)
def _hf_dataset(path: str):
    """A dataset saved with `datasets.Dataset.save_to_disk` (its "train" split for a DatasetDict);
    cached per process so DataLoader workers memory-map it once."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: DatasetDict without a 'train' split ({list(ds)})")
        ds = ds["train"]
    return ds


def read_hf_dataset(path: Path) -> list[PairRecord]:
    """Pairs from a saved `datasets` dataset with an image column (Image feature, path or bytes)
    and a caption column; images are decoded lazily through `hfds://` references."""
    ds = _hf_dataset(str(path))
    image_col = next((c for c in IMAGE_KEYS if c in ds.column_names), None)
    text_col = next((c for c in TEXT_KEYS if c in ds.column_names), None)
    if image_col is None or text_col is None:
        raise ValueError(
            f"{path}: needs an image column ({', '.join(IMAGE_KEYS)}) and a caption column "
            f"({', '.join(TEXT_KEYS)}); columns are {ds.column_names}"
        )
    captions = ds[text_col]  # text only: the image column is not decoded here
    return [
        PairRecord(f"hfds://{path}#{image_col}:{i}", str(c), f"{path}#{i}")
        for i, c in enumerate(captions)
    ]


def load_pairs(spec: str | Path, image_root: str | Path | None = None) -> list[PairRecord]:
    """Read pairs from a .jsonl/.csv/.tsv file, a .tar shard, a folder of shards, a glob, or a
    `datasets` dataset folder (written by `save_to_disk`)."""
    spec = str(spec)
    root = Path(image_root) if image_root else None
    if any(c in spec for c in "*?["):
        paths = (
            sorted(Path().glob(spec))
            if not Path(spec).is_absolute()
            else sorted(Path("/").glob(spec.lstrip("/")))
        )
        if not paths:
            raise FileNotFoundError(f"no files match {spec}")
        return [r for p in paths for r in load_pairs(p, image_root)]
    path = Path(spec)
    if path.is_dir() and _is_hf_dataset(path):
        return read_hf_dataset(path)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{path}: folder without .tar shards")
        return [r for s in shards for r in index_shard(s)]
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, root)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, root)
    if suffix == ".tar":
        return index_shard(path)
    raise ValueError(f"{path}: unknown pairs format (use .jsonl, .csv/.tsv, .tar shards)")


def open_image(ref: str) -> Image.Image:
    """Decode an image path or `tar://` reference into an RGB PIL image (raises on corrupt data)."""
    if ref.startswith("tar://"):
        shard, _, span = ref[len("tar://") :].rpartition("#")
        offset, size = (int(v) for v in span.split(":"))
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{shard}: truncated at offset {offset}")
        img = Image.open(io.BytesIO(data))
    elif ref.startswith("hfds://"):
        path, _, span = ref[len("hfds://") :].rpartition("#")
        column, _, row = span.rpartition(":")
        value = _hf_dataset(path)[int(row)][column]
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            img = Image.open(value["path"])
        elif isinstance(value, str):
            img = Image.open(value if Path(value).is_absolute() else Path(path) / value)
        else:
            raise ValueError(f"{path} row {row}: unsupported image value {type(value).__name__}")
    else:
        img = Image.open(ref)
    img.load()
    return img.convert("RGB")


def add_caption_noise(
    records: list[PairRecord], fraction: float, seed: int
) -> tuple[list[PairRecord], dict[str, int]]:
    """Degrade `fraction` of the pairs, as web-crawled data is degraded (the CLIP-benchmark's
    data-quality axis): exactly round(fraction * n) records, drawn by `seed`, get a caption that
    does not describe their image. The first half of them (rounded up) is *mismatched* (another
    record's caption, of a different image); the rest is *corrupted* (the caption's words shuffled
    and every other one replaced by a word of the corpus, so it still reads like the data but
    says little that is true). Returns the new list (records untouched elsewhere) and the counts.

    A pure function of (records, fraction, seed): every process and every resumed run derives the
    same noisy set, and a benchmark's seed changes which pairs are hit.
    """
    import random

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"caption noise fraction must be in [0, 1], got {fraction}")
    n = len(records)
    k = round(fraction * n)
    counts = {"pairs": n, "noisy": 0, "mismatched": 0, "corrupted": 0}
    if k == 0:
        return list(records), counts
    # A private generator keyed by the seed (str seeds hash stably): the global RNGs are not
    # touched, so turning the knob on changes nothing else in the run.
    rng = random.Random(f"caption-noise:{seed}")
    vocab = sorted({w for r in records for w in r.caption.split()}) or [""]
    out = list(records)
    many_images = len({r.image for r in records}) > 1
    for rank, i in enumerate(rng.sample(range(n), k)):
        rec = records[i]
        if rank < (k + 1) // 2 and many_images:
            j = rng.randrange(n)
            while records[j].image == rec.image:  # another image's caption, never a co-caption
                j = rng.randrange(n)
            caption, kind = records[j].caption, "mismatched"
        else:
            words = rec.caption.split() or [rng.choice(vocab)]
            rng.shuffle(words)
            words = [rng.choice(vocab) if w % 2 else x for w, x in enumerate(words)]
            caption, kind = " ".join(words), "corrupted"
        out[i] = PairRecord(rec.image, caption, f"{rec.source} ({kind} caption)")
        counts[kind] += 1
    counts["noisy"] = k
    return out, counts
