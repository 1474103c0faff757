"""Atomic file and folder writes, and the project's JSON / JSON Lines readers and writer.

Writes never leave a half-written file that looks complete (temp file + fsync + rename). The JSON
readers turn every way a file can be unreadable into a `JSONFileError` (a ValueError, so command
lines print it as a usage error) whose message names the file and the place: line and column for
malformed JSON, line and byte offset for bytes that are not UTF-8.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; these are ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_dir(write: Callable[[Path], object], final: str | Path) -> Path:
    """Call `write(tmp_dir)` and rename the folder to `final` only once it has fully succeeded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class JSONFileError(ValueError):
    """A JSON or JSON Lines file that is not valid UTF-8 or not valid JSON.

    `str()` is the complete message. The parts (1-based `line`, and `column` for malformed JSON
    or the file's byte `offset` for bad UTF-8; `reason` is the bare parser message) let callers
    that number records in their own style re-word it.
    """

    def __init__(
        self,
        message: str,
        path: Path,
        *,
        line: int | None,
        reason: str,
        column: int | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path, self.line, self.reason = path, line, reason
        self.column, self.offset = column, offset


def _utf8_error(
    path: Path, e: UnicodeDecodeError, data: bytes, base: int, line: int
) -> JSONFileError:
    """The error for bytes `data` (at file offset `base`, starting on line `line`) that failed."""
    # e.start is relative to `data`; the line and offset are made file-absolute here, because
    # the decoder's own position is only meaningful within the chunk it was given.
    offset = base + e.start
    line += data.count(b"\n", 0, e.start)
    bad = data[e.start : e.end].hex(" ")
    message = (
        f"{path}: line {line}: invalid UTF-8 byte(s) {bad} at byte offset {offset} ({e.reason})"
    )
    return JSONFileError(message, path, line=line, reason=e.reason, offset=offset)


def _read_bytes(path: Path, what: str | None) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what + ' file' if what else 'file'} not found: {path}") from None
    if path.suffix == ".gz":  # gzip by suffix; offsets and lines then count decompressed bytes
        try:
            return gzip.decompress(data)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            reason = f"not a valid gzip file ({e})"
            raise JSONFileError(f"{path}: {reason}", path, line=None, reason=reason) from None
    return data


def read_json(path: str | Path, *, what: str | None = None) -> Any:
    """The JSON document in `path` (UTF-8).

    `what` ("VQA questions") names the file's role in the errors; a name ending in `.gz` is
    decompressed first. A missing file raises FileNotFoundError; bad bytes, bad gzip or bad JSON
    raise JSONFileError naming the file and place.
    """
    path = Path(path)
    data = _read_bytes(path, what)
    role = f" in {what} file" if what else ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e, data, 0, 1) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        message = f"{path}: invalid JSON{role} ({e.msg} at line {e.lineno}, column {e.colno})"
        raise JSONFileError(message, path, line=e.lineno, reason=e.msg, column=e.colno) from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line of the JSON Lines file `path` (UTF-8).

    Streams the file (SNLI-VE train is ~500k lines). Errors are JSONFileError naming the file,
    the line, and the column (malformed JSON) or the byte offset in the file (bad UTF-8). A name
    ending in `.gz` is read through gzip (offsets then count decompressed bytes).
    """
    path = Path(path)
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    with f:
        offset = 0
        # Binary lines split on b"\n" only, so `offset` counts the file's bytes exactly.
        for lineno, raw in _lines(f, path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, e, raw, offset, lineno) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                # Without its newline the line is the whole document, so colno is its column.
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                message = f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
                raise JSONFileError(
                    message, path, line=lineno, reason=e.msg, column=e.colno
                ) from None
            yield lineno, record


def _lines(f: Any, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a binary file; a corrupt gzip stream is a JSONFileError."""
    lineno = 0
    while True:
        try:
            raw = f.readline()
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            reason = f"not a valid gzip file ({e})"
            message = f"{path}: line {lineno + 1}: {reason}"
            raise JSONFileError(message, path, line=lineno + 1, reason=reason) from None
        if not raw:
            return
        lineno += 1
        yield lineno, raw


def _finite(obj: Any) -> Any:
    """`obj` with NaN/inf floats replaced by None, recursively (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(
    path: str | Path, obj: Any, indent: int | None = 2, *, sort_keys: bool = False
) -> None:
    """Write `obj` as strict JSON (RFC 8259) plus a newline, atomically.

    NaN and +-inf floats, which `json.dumps` would write as the non-standard `NaN`/`Infinity`
    that strict parsers (jq, JavaScript, Go) reject, are written as `null`, at any depth of
    dicts, lists and tuples. `indent=None` writes one compact line (no spaces after , and :).
    """
    separators = (",", ":") if indent is None else None
    text = json.dumps(
        _finite(obj), indent=indent, separators=separators, sort_keys=sort_keys, allow_nan=False
    )
    atomic_write_text(path, text + "\n")
