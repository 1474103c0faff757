from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from cliptransfer.config import (
    ConfigError,
    add_config_args,
    load_config,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10


@dataclass
class Run:
    name: str = "run"
    method: Literal["clip", "siglip"] = "clip"
    out: Path = Path("runs/x")
    peft: str | None = None
    amp: bool = False
    features: list[str] = field(default_factory=lambda: ["clip-grid"])
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_then_overrides_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: fromfile\noptim:\n  lr: 5e-4\n")
    cfg = load_config(Run, cfg_file, ["optim.lr=1e-2", "amp=true", "optim.betas=0.8,0.9"])
    assert cfg.name == "fromfile"
    assert cfg.optim.lr == 1e-2  # the override wins over the file
    assert cfg.optim.warmup_steps == 10  # untouched default kept inside a partially given section
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.amp is True
    # YAML 1.1 reads "5e-4" as a string; the float field still gets a float
    assert load_config(Run, cfg_file).optim.lr == 5e-4


def test_typed_values_and_null():
    cfg = load_config(Run, None, ["peft=lora", "features=clip-grid,bottomup", "out=/tmp/o"])
    assert cfg.peft == "lora" and cfg.features == ["clip-grid", "bottomup"]
    assert cfg.out == Path("/tmp/o")
    assert load_config(Run, None, ["peft=null"]).peft is None
    assert load_config(Run, None, ["optim.warmup_steps=2e3"]).optim.warmup_steps == 2000


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'"),
        ("nme=x", "unknown key 'nme'"),
        ("optim.warmup_steps=1.5", "optim.warmup_steps: expected an integer"),
        ("method=bogus", "method: 'bogus' is not one of ['clip', 'siglip']"),
        ("amp=maybe", "amp: expected true/false"),
        ("optim.lr", "expected KEY=VALUE"),
        ("name.sub=1", "'name' is not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(Run, None, [override])
    assert message in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1\n  moment: 0.9\n")
    with pytest.raises(ConfigError) as err:
        load_config(Run, bad)
    assert str(bad) in str(err.value) and "optim.moment" in str(err.value)


def test_malformed_and_missing_yaml(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(Run, bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "nope.yaml")
    scalar = tmp_path / "s.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, scalar)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=0.25", "peft=lora"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 0.25
    assert load_config(Run, path) == cfg
    assert to_dict(cfg)["out"] == "runs/x"
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_argparse_flags():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--config", "a.yaml", "--set", "x=1", "--set", "y.z=2"])
    assert args.config == "a.yaml" and args.overrides == ["x=1", "y.z=2"]
