"""Config value ranges: exact messages with the dotted section path, and no NaN/inf anywhere."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cliptransfer.adapters import AdapterConfig
from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.config import ConfigError, check, check_range, from_dict, load_config
from cliptransfer.contrastive.augment import ImageAugConfig
from cliptransfer.contrastive.data import PairDataConfig
from cliptransfer.contrastive.objectives import LossConfig
from cliptransfer.engine.optim import OptimConfig
from cliptransfer.heads.mcan import MCANConfig
from cliptransfer.heads.question import QuestionConfig
from cliptransfer.heads.topdown import TopDownConfig
from cliptransfer.tasks.contrastive.task import PretrainConfig
from cliptransfer.tasks.vqa.task import VQAConfig

CHECKED = [
    OptimConfig,
    PairDataConfig,
    ImageAugConfig,
    LossConfig,
    TopDownConfig,
    MCANConfig,
    QuestionConfig,
    AdapterConfig,
    TuningConfig,
]


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_check_range_builds_the_message_from_the_bounds() -> None:
    check_range("n", 1, ge=1)
    check_range("p", 0.0, ge=0, lt=1)
    check_range("opt", None, gt=0)  # unset optional values pass
    assert _message(check_range, "n", 0, ge=1) == "n: must be >= 1, got 0"
    assert _message(check_range, "lr", 0.0, gt=0) == "lr: must be a finite number > 0, got 0.0"
    assert _message(check_range, "lr", math.inf, gt=0) == (
        "lr: must be a finite number > 0, got inf"
    )
    assert _message(check_range, "wd", math.nan, ge=0) == (
        "wd: must be a finite number >= 0, got nan"
    )
    assert _message(check_range, "p", 1.0, ge=0, lt=1) == "p: must be in [0, 1), got 1.0"
    assert _message(check_range, "k", 0.0, gt=0, le=1) == "k: must be in (0, 1], got 0.0"
    assert (
        _message(check_range, "x", -math.inf, le=3) == "x: must be a finite number <= 3, got -inf"
    )
    assert _message(check, False, "towers", "must name 'image'", ("a",)) == (
        "towers: must name 'image', got ('a',)"
    )


@dataclass
class _Leaf:
    lo: int = 0
    hi: int = 1

    def validate(self) -> None:  # run by from_dict only: constructing `_Leaf(2, 1)` is allowed
        check(self.lo <= self.hi, "lo", f"must be <= hi={self.hi}", self.lo)


@dataclass
class _Mid:
    leaf: _Leaf = field(default_factory=_Leaf)
    rate: float = 0.5

    def __post_init__(self) -> None:
        check_range("rate", self.rate, ge=0, le=1)


@dataclass
class _Top:
    mid: _Mid = field(default_factory=_Mid)


def test_validate_and_post_init_errors_get_the_section_path(tmp_path: Path) -> None:
    assert _Leaf(2, 1).hi == 1  # validate() is not a constructor check
    assert from_dict(_Top, {"mid": {"leaf": {"lo": 1}}}).mid.leaf.lo == 1
    assert _message(from_dict, _Top, {"mid": {"leaf": {"lo": 2}}}) == (
        "mid.leaf.lo: must be <= hi=1, got 2"
    )
    assert _message(load_config, _Top, None, ["mid.rate=1.5"]) == (
        "--set mid.rate=1.5: mid.rate: must be in [0, 1], got 1.5"
    )
    yml = tmp_path / "c.yaml"
    yml.write_text("mid:\n  rate: .nan\n")  # YAML's own NaN spelling
    assert _message(load_config, _Top, yml) == f"{yml}: mid.rate: must be in [0, 1], got nan"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=-3", "train.epochs: must be >= 1, got -3"),
        ("optim.lr=nan", "optim.lr: must be a finite number > 0, got nan"),
        ("optim.lr=.inf", "optim.lr: must be a finite number > 0, got inf"),
        ("optim.lr=0", "optim.lr: must be a finite number > 0, got 0.0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: must be a finite number >= 0, got -0.1"),
        ("optim.betas=0.9,1.0", "optim.betas[1]: must be in [0, 1), got 1.0"),
        ("optim.betas=-0.1,0.9", "optim.betas[0]: must be in [0, 1), got -0.1"),
        ("optim.eps=0", "optim.eps: must be a finite number > 0, got 0.0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio: must be in [0, 1], got 1.5"),
        ("optim.grad_clip=inf", "optim.grad_clip: must be a finite number >= 0, got inf"),
        ("peft.r=0", "peft.r: must be >= 1, got 0"),
        ("peft.alpha=0", "peft.alpha: must be > 0, got 0"),
        ("peft.dropout=1", "peft.dropout: must be in [0, 1), got 1.0"),
        ("tuning.lock_image_unlocked_groups=-1",
         "tuning.lock_image_unlocked_groups: must be >= 0, got -1"),
        ("peft.towers=image,audio",
         "peft.towers: must name 'image' and/or 'text', got ['image', 'audio']"),
        ("text.max_length=1", "text.max_length: must be >= 2, got 1"),
        ("text.hidden=0", "text.hidden: must be >= 1, got 0"),
        ("text.encoder=bert", "text.encoder: must be 'gru', 'lstm', 'clip', 'clip:/path' or 'hf:/path', got 'bert'"),
        ("model.topdown.dropout=1.0", "model.topdown.dropout: must be in [0, 1), got 1.0"),
        ("model.topdown.classifier_dropout=-0.5",
         "model.topdown.classifier_dropout: must be in [0, 1), got -0.5"),
        ("model.topdown.glimpses=0", "model.topdown.glimpses: must be >= 1, got 0"),
        ("model.mcan.heads=3", "model.mcan.hidden: must be a multiple of heads=3, got 64"),
        ("model.mcan.layers=0", "model.mcan.layers: must be >= 1, got 0"),
        ("model.mcan.dropout=nan", "model.mcan.dropout: must be in [0, 1), got nan"),
    ],
)  # fmt: skip
def test_vqa_overrides_out_of_range(override: str, message: str) -> None:
    assert _message(load_config, VQAConfig, None, [override]) == f"--set {override}: {message}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr: must be a finite number > 0, got -1.0"),
        ("data.mlm_prob=1.5", "data.mlm_prob: must be in [0, 1], got 1.5"),
        ("data.eda_alpha=-0.1", "data.eda_alpha: must be in [0, 1], got -0.1"),
        ("data.max_bad_fraction=nan", "data.max_bad_fraction: must be in [0, 1], got nan"),
        ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
        ("data.max_retries=-1", "data.max_retries: must be >= 0, got -1"),
        ("data.image.size=0", "data.image.size: must be >= 1, got 0"),
        ("data.image.scale=0.5,1.5", "data.image.scale[1]: must be in (0, 1], got 1.5"),
        ("data.image.scale=0.9,0.5",
         "data.image.scale: must be (low, high), low <= high, got (0.9, 0.5)"),
        ("data.image.ratio=2,1", "data.image.ratio: must be (low, high), low <= high, got (2.0, 1.0)"),
        ("data.image.ratio=0,1", "data.image.ratio[0]: must be a finite number > 0, got 0.0"),
        ("data.image.std=0.2,0,0.2", "data.image.std[1]: must be a finite number > 0, got 0.0"),
        ("data.image.mean=0.5,0.5,nan", "data.image.mean[2]: must be in [0, 1], got nan"),
        ("data.view.color_jitter=1.5", "data.view.color_jitter: must be in [0, 1], got 1.5"),
        ("data.view.blur_prob=.nan", "data.view.blur_prob: must be in [0, 1], got nan"),
        ("loss.method=bogus",
         "loss.method: must be one of clip, slip, declip, filip, defilip, siglip, got 'bogus'"),
        ("loss.weights.clip=-1", "loss.weights.clip: must be a finite number >= 0, got -1.0"),
        ("loss.weights.mvs=inf", "loss.weights.mvs: must be a finite number >= 0, got inf"),
        ("loss.weights.bogus=1",
         "loss.weights.bogus: unknown term; terms are clip, simclr, mvs, simsiam, mlm, nns, "
         "filip, siglip"),
        ("loss.logit_scale_max=0", "loss.logit_scale_max: must be a finite number > 0, got 0.0"),
        ("loss.logit_scale_min=200", "loss.logit_scale_min: must be in (0, 100.0], got 200.0"),
        ("loss.simclr_temperature=nan",
         "loss.simclr_temperature: must be a finite number > 0, got nan"),
        ("loss.queue_size=0", "loss.queue_size: must be >= 1, got 0"),
        ("loss.filip_token_keep=0", "loss.filip_token_keep: must be in (0, 1], got 0.0"),
        ("loss.siglip_chunk=0", "loss.siglip_chunk: must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_pretrain_overrides_out_of_range(override: str, message: str) -> None:
    assert _message(load_config, PretrainConfig, None, [override]) == f"--set {override}: {message}"


def test_vln_feature_dtype_is_checked() -> None:
    from cliptransfer.tasks.vln.task import VLNConfig

    override = "data.feature_dtype=half"
    assert _message(load_config, VLNConfig, None, [override]) == (
        f"--set {override}: data.feature_dtype: one of ['bfloat16', 'float16', 'float32'], "
        "got 'half'"
    )


def test_valid_edges_still_load() -> None:
    cfg = load_config(
        PretrainConfig,
        None,
        [
            "optim.min_lr_ratio=1",
            "optim.betas=0,0.999",
            "optim.grad_clip=0",
            "data.image.scale=1,1",
            "loss.logit_scale_min=100",
            "loss.weights.clip=0",
        ],
    )
    assert cfg.optim.betas == (0.0, 0.999) and cfg.data.image.scale == (1.0, 1.0)
    assert cfg.loss.logit_scale_min == 100.0 and cfg.loss.weights == {"clip": 0.0}


def _float_fields(cls: type) -> list[tuple[str, typing.Any]]:
    """(name, type) of each field holding floats: float, float | None, tuple / dict of floats."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp)
        if tp is float or float in args:
            out.append((name, tp))
    return out


@pytest.mark.parametrize("cls", CHECKED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
def test_every_float_field_refuses_non_finite(cls: type, bad: float) -> None:
    fields = _float_fields(cls)
    # QuestionConfig and TuningConfig have no float field
    assert fields or cls in (QuestionConfig, TuningConfig)
    defaults = cls()
    for name, tp in fields:
        origin = typing.get_origin(tp)
        if origin is tuple:
            value, where = [bad, *list(getattr(defaults, name))[1:]], f"{name}[0]"
        elif origin is dict:
            value, where = {"clip": bad}, f"{name}.clip"
        else:
            value, where = bad, name
        message = _message(from_dict, cls, {name: value})
        assert message.startswith(f"{where}: must be ") and message.endswith(f", got {bad}")
