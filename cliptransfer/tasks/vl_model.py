"""The model of a task run: built from the config (head + end-to-end backbone), PEFT adapters
attached, and the best-model folder written and read back (merged weights + adapter-only folder).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from cliptransfer import adapters
from cliptransfer.adapters import AdapterConfig
from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.config import ConfigError
from cliptransfer.engine.optim import trainable_summary
from cliptransfer.fileio import atomic_save_dir, read_json, write_json
from cliptransfer.heads.model import VLModel, build_head
from cliptransfer.visual.backbone import GridBackbone
from cliptransfer.visual.extract import load_backbone
from cliptransfer.visual.side import ImageSide

__all__ = [
    "attach_adapters",
    "check_tuning",
    "check_visual_dim",
    "load_best_model",
    "lr_scales",
    "read_meta",
    "run_model",
    "save_best_dir",
    "save_model_dir",
    "task_model",
]


def save_model_dir(
    folder: str | Path, state: Mapping[str, torch.Tensor], files: Mapping[str, Any]
) -> Path:
    """Atomically write `folder/model.safetensors` plus `files` (name -> text, JSON-able object,
    or a callable writing into the folder, e.g. a tokenizer's `save`)."""

    def write(tmp: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        for name, content in files.items():
            if callable(content):
                content(tmp / name)
            elif isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                write_json(tmp / name, content)

    return atomic_save_dir(write, folder)


def check_tuning(mode: str, tuning: TuningConfig, peft: AdapterConfig) -> None:
    """Reject settings that contradict each other before any work starts."""
    if peft.method != "none" and mode == "end2end" and tuning.lock_image:
        raise ConfigError("peft adapters on a locked backbone: drop tuning.lock_image")
    if peft.method != "none" and mode == "features" and peft.scope == "backbone":
        raise ConfigError("peft.scope=backbone needs mode=end2end (features mode has no backbone)")


def attach_adapters(model: nn.Module, cfg: AdapterConfig, log: Callable[[str], Any]) -> nn.Module:
    """`model` wrapped with the PEFT adapters of `cfg` (unchanged for method "none"); logs the
    targets and the trainable fraction."""
    if cfg.method == "none":
        return model
    wrapped, targets = adapters.wrap(model, cfg)
    trainable, total, pct = adapters.trainable_fraction(wrapped)
    scope = adapters.resolve(cfg, model).scope
    log(
        f"PEFT {cfg.method} (r={cfg.r}) on the {scope}: {len(targets)} modules adapted, "
        f"{trainable:,} of {total:,} parameters trainable ({pct:.2f}%)"
    )
    return wrapped


def save_best_dir(
    folder: str | Path, model: nn.Module, cfg: AdapterConfig, files: Mapping[str, Any]
) -> Path:
    """A best-model folder: model.safetensors (adapters merged in, so it loads into the plain
    model) and, with PEFT, `adapter/` (adapter-only, `save_pretrained`) beside it."""
    if cfg.method == "none":
        return save_model_dir(folder, model.state_dict(), files)
    merged = adapters.merge(copy.deepcopy(model))  # the live model keeps its adapters
    files = dict(files, adapter=lambda d: model.save_pretrained(str(d)))
    return save_model_dir(folder, merged.state_dict(), files)


def read_meta(folder: str | Path) -> dict[str, Any]:
    """A best/ folder's meta.json (visual width, features, best epoch)."""
    return read_json(Path(folder) / "meta.json", what="best-model meta")


def check_visual_dim(folder: str | Path, side: ImageSide) -> None:
    """A best/ folder evaluated on features of another width is an error naming both."""
    meta = read_meta(folder)
    if int(meta["visual_dim"]) != side.dim:
        raise ValueError(
            f"{side.where or 'the image side'} gives {side.dim}-channel features but "
            f"{folder} was trained on {meta['visual_dim']}-channel features "
            f"({meta.get('features', {}).get('backbone', '?')})"
        )


def load_best_model(folder: str | Path, model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Load a `save_best_dir` folder's merged weights into a freshly built plain `model`."""
    path = Path(folder) / "model.safetensors"
    if cfg.method != "none":
        adapters.prepare_base(model, cfg)  # the same BatchNorm policy as in training
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model of its config.yaml: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model


def task_model(
    cfg: Any, visual_dim: int, num_outputs: int, vocab_size: int,
    backbone: nn.Module | None = None, head: nn.Module | None = None,
) -> VLModel:  # fmt: skip
    """The plain model of a task config (`model`, `text`, `mode`, `backbone`, `tuning` fields):
    the head (`head`, else the registered `model.arch`), plus in end2end mode `backbone` or the
    config's CLIP image tower."""
    if backbone is None and cfg.mode == "end2end":
        backbone = GridBackbone(load_backbone(cfg.backbone)[0], cfg.tuning)
    if head is None:
        head = build_head(cfg.model, cfg.text, visual_dim, num_outputs, vocab_size)
    return VLModel(head, backbone)


def run_model(
    accelerator: Any, cfg: Any, side: ImageSide, num_outputs: int, vocab_size: int,
    eval_only: str | None, build_head: Callable[[], nn.Module] | None = None,
    init: Callable[[nn.Module], None] | None = None,
) -> nn.Module:  # fmt: skip
    """The run's model, seeded: a saved best/ folder's (`eval_only`) or a new one, `init`ialised
    (pretrained weights) before the config's PEFT adapters are attached; prints its size.
    `build_head` replaces the registered head (V&L pretraining's)."""
    set_seed(cfg.train.seed)
    head = build_head() if build_head else None
    model: nn.Module = task_model(cfg, side.dim, num_outputs, vocab_size, side.backbone, head)
    if eval_only:
        check_visual_dim(eval_only, side)
        model = load_best_model(eval_only, model, cfg.peft)
    else:
        if init is not None:
            init(model)
        model = attach_adapters(model, cfg.peft, accelerator.print)
    trainable, total = trainable_summary(model)
    accelerator.print(
        f"{cfg.model.arch} on {side.info['kind']} features ({side.dim} ch), {num_outputs} "
        f"outputs: {total:,} params, {trainable:,} trainable"
    )
    return model


def lr_scales(cfg: Any) -> dict[str, float]:
    """Learning-rate multipliers by parameter-name prefix: a fully fine-tuned backbone trains at
    `backbone_lr_scale` x lr; adapters and heads are new weights and train at the full lr."""
    return {} if cfg.peft.method != "none" else {"backbone.": cfg.backbone_lr_scale}
