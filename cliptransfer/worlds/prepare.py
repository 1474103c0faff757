"""Writing a generated world atomically: into a temporary sibling folder, renamed into place once
its `manifest.json` (written last) is complete; a complete world of the same identity is reused.
Shared by the Shapes world and the Shapes houses."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cliptransfer.fileio import read_json

__all__ = ["cache_dir", "is_complete", "prepare_atomically", "read_manifest"]


def cache_dir() -> Path:
    """Where generated worlds live by default: `$CLIPTRANSFER_CACHE` or ~/.cache/cliptransfer."""
    return Path(os.environ.get("CLIPTRANSFER_CACHE") or Path.home() / ".cache" / "cliptransfer")


def read_manifest(out: Path, generator: str) -> dict | None:
    """The manifest of a world written by `generator` in `out`, else None."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError):  # unreadable: not a world of ours
        return None
    return (
        manifest if isinstance(manifest, dict) and manifest.get("generator") == generator else None
    )


def is_complete(out: Path, generator: str, identity: Mapping[str, Any]) -> bool:
    m = read_manifest(out, generator)
    return m is not None and all(m.get(k) == v for k, v in identity.items())


def prepare_atomically(out: str | Path, generator: str, identity: Mapping[str, Any],
                       generate: Callable[[Path], None], *, overwrite: bool = False,
                       what: str = "world") -> Path:  # fmt: skip
    """Run `generate(tmp)` (which must write `manifest.json` with `generator` and `identity`
    last) unless `out` already holds that world; `overwrite=True` regenerates. A non-empty `out`
    without a manifest of ours is never deleted. Returns `out` (absolute)."""
    out = Path(out).expanduser().absolute()
    if not overwrite and is_complete(out, generator, identity):
        return out
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        has_files = any(out.iterdir())
        if has_files and read_manifest(out, generator) is None:
            raise FileExistsError(
                f"{out} is not empty and holds no {what} manifest; refusing to replace it"
            )
        if has_files and not overwrite:
            m = read_manifest(out, generator) or {}
            found = ", ".join(f"{k}={m.get(k)!r}" for k in identity)
            raise FileExistsError(
                f"{out} holds a different {what} ({found}); pass overwrite=True or choose "
                "another folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the world is ordinary data
    try:
        generate(tmp)
        if out.exists() and any(out.iterdir()):
            # Another process may have finished the same world meanwhile: keep theirs.
            if not overwrite and is_complete(out, generator, identity):
                shutil.rmtree(tmp)
                return out
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_complete(out, generator, identity):
                raise
            shutil.rmtree(tmp)  # another process renamed the same world into place first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
