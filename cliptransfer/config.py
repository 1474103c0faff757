"""Typed dataclass configs: YAML files, dotted `--set a.b=c` overrides, the resolved config saved per run.

A config is a (nested) dataclass. `load_config(Cls, path, overrides)` starts from the dataclass
defaults, applies the YAML file, then each override in order, and checks every key and type on the
way: an unknown key is an error that names the key and where it came from, never silently ignored.

Value ranges: a dataclass checks its own fields in `__post_init__` (every construction) or in a
`validate(self) -> None` method (run by `from_dict`, i.e. on loading only), raising
ConfigError("field: message"), most simply with `check` / `check_range` below. `from_dict` puts
the section's dotted path in front, so `--set train.epochs=-3` reports
"--set train.epochs=-3: train.epochs: must be >= 1, got -3".
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cliptransfer.fileio import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass."""


def split_list(text: str) -> list[str]:
    """`a,b, c` -> ["a", "b", "c"] (empty items dropped): comma-list settings and flags."""
    return [x.strip() for x in text.split(",") if x.strip()]


def check(ok: bool, field: str, requirement: str, value: Any) -> None:
    """Raise ConfigError("field: requirement, got value") unless `ok` (for range checks)."""
    if not ok:
        raise ConfigError(f"{field}: {requirement}, got {value!r}")


def check_range(
    field: str,
    value: float | None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> None:
    """`value` within the given bounds; floats must also be finite. None (unset) always passes.

    The message is built from the bounds: "must be >= 1", "must be a finite number > 0",
    "must be in [0, 1)". NaN fails every comparison, but is refused explicitly so that a
    one-sided bound like `ge=0` cannot let +inf through either.
    """
    if value is None:
        return
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    high = f"{le}]" if le is not None else f"{lt})" if lt is not None else None
    if low is not None and high is not None:
        requirement = f"must be in {low}, {high}"
    else:
        ops = [(">=", ge), (">", gt), ("<=", le), ("<", lt)]
        op, bound = next((op, b) for op, b in ops if b is not None)
        finite = "a finite number " if isinstance(value, float) else ""
        requirement = f"must be {finite}{op} {bound}"
    ok = math.isfinite(value) and (
        (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    )
    check(ok, field, requirement, value)


def _field_types(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations that `from __future__ import annotations` leaves.
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            # `--set a.b=1,2,3` is the natural spelling of a list on the command line.
            value = [] if value == "" else value.split(",")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))
            )
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # also accepts "1e-3", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and bad types raise ConfigError.

    `where` is the dotted path of this section, used in error messages.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key {key!r} (valid keys here: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ConfigError as e:
        # A range check in __post_init__ / validate names its field; add the section path.
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able structure of a config (Paths become strings, tuples lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so `null`, `true`, `[1, 2]` work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then each `a.b=c` override in order."""
    data = to_dict(cls())
    if path is not None:
        file_data = read_yaml(path)
        try:
            from_dict(cls, _merge(data, file_data))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        data = _merge(data, file_data)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        try:
            from_dict(cls, data)
        except ConfigError as e:
            raise ConfigError(f"--set {text}: {e}") from None
    return from_dict(cls, data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def save_config(obj: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    atomic_write_text(path, text)
    return path


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None = None) -> None:
    """The two flags every script shares: `--config FILE.yaml` and repeatable `--set a.b=c`."""
    parser.add_argument("--config", default=default_config, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set optim.lr=1e-4 (repeatable)",
    )


def flat_hparams(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> flat {"a.b": scalar} for TensorBoard's hparams."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_hparams(v, f"{key}."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
