"""`load_clip`: OpenAI / open_clip files, OpenAI TorchScript archives, HF `CLIPModel` folders,
and the project's own `save_pretrained` folders, all into the project `CLIP`.

Never unpickles arbitrary objects: safetensors, `torch.load(weights_only=True)`, or
`torch.jit.load` for TorchScript archives (OpenAI's distribution format; no Python pickles).
"""

from __future__ import annotations

import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from cliptransfer.fileio import JSONFileError, read_json

from .archs import CLIPConfig, get_arch
from .convert import (
    CheckpointError,
    config_from_hf,
    detect_layout,
    hf_to_project,
    infer_openai_config,
    openai_to_project,
    project_to_openai,
)
from .model import CLIP, CONFIG_NAME, WEIGHTS_NAME

__all__ = ["CheckpointError", "load_clip", "load_state_dict_checked", "read_state_dict"]

StateDict = dict[str, torch.Tensor]


def _is_safetensors(path: Path) -> bool:
    # 8-byte little-endian header length followed by a JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        # TorchScript archives carry compiled code and constants; torch.save archives don't.
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a .safetensors / torch.save / TorchScript file, unwrapped and de-prefixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    try:
        if _is_safetensors(path):
            obj: Any = load_file(str(path))
        elif _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"could not read CLIP checkpoint {path} (truncated, corrupt, or not a "
            f"safetensors / torch.save / TorchScript file): {type(e).__name__}: {e}"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # open_clip training checkpoints
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}  # DDP-wrapped saves
    return sd


def _check_shapes(sd: StateDict, expected: dict[str, torch.Size], source: str) -> None:
    """Raise on the first key (in the model's order) whose checkpoint shape differs."""
    for k, shape in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {k!r}: checkpoint {tuple(sd[k].shape)} "
                f"vs model {tuple(shape)}"
            )


def load_state_dict_checked(model: torch.nn.Module, sd: StateDict, source: str) -> None:
    """Strict load with readable errors: first shape mismatch, then missing/unexpected keys."""
    own = model.state_dict()
    _check_shapes(sd, {k: v.shape for k, v in own.items()}, source)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    model.load_state_dict(sd, strict=True)


def _read_json(path: Path) -> dict[str, Any]:
    # Checkpoint callers catch CheckpointError; JSONFileError's text already names the place.
    try:
        return read_json(path)
    except JSONFileError as e:
        raise CheckpointError(str(e)) from e
    except OSError as e:
        raise CheckpointError(f"could not read {path}: {e}") from e


def _hf_weights(folder: Path) -> StateDict:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            files = sorted(set(_read_json(folder / index)["weight_map"].values()))
            sd: StateDict = {}
            for f in files:
                sd.update(read_state_dict(folder / f))
            return sd
    raise FileNotFoundError(
        f"HF CLIPModel folder {folder} has no model.safetensors/pytorch_model.bin"
    )


def _from_hf_folder(folder: Path, meta: dict[str, Any]) -> tuple[CLIPConfig, StateDict]:
    import transformers  # heavy import, only for this format

    hf_cfg = transformers.CLIPConfig.from_dict(meta)
    cfg = config_from_hf(hf_cfg)
    eos = hf_cfg.text_config.eos_token_id
    if eos not in (2, cfg.text.vocab_size - 1):
        # HF pools at the first eos_token_id (2 means argmax); the project pools at argmax.
        warnings.warn(
            f"{folder}: HF text eos_token_id={eos} is not the last vocab id; cliptransfer pools "
            "at the argmax id (OpenAI convention), HF at the first eos_token_id",
            stacklevel=3,
        )
    return cfg, hf_to_project(_hf_weights(folder))


def _is_model_folder_config(meta: dict[str, Any]) -> bool:
    return "cliptransfer" in meta or meta.get("model_type") == "clip"


def _from_folder(folder: Path) -> tuple[CLIPConfig, StateDict, str]:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{folder}: no {CONFIG_NAME}; expected a cliptransfer save_pretrained folder or a "
            "Hugging Face CLIPModel folder"
        )
    meta = _read_json(cfg_path)
    if "cliptransfer" in meta:
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"cliptransfer CLIP folder {folder} has no {WEIGHTS_NAME}")
        return CLIPConfig.from_dict(meta["config"]), read_state_dict(weights), str(weights)
    if meta.get("model_type") == "clip":
        cfg, sd = _from_hf_folder(folder, meta)
        return cfg, sd, str(folder)
    raise CheckpointError(
        f"{cfg_path}: neither a cliptransfer CLIP config (no 'cliptransfer' key) nor a HF CLIP "
        f"config (model_type={meta.get('model_type')!r}, need 'clip')"
    )


def _from_file(path: Path) -> tuple[CLIPConfig, StateDict, str, str]:
    sd = read_state_dict(path)
    layout = detect_layout(sd)
    if layout == "hf":
        raise CheckpointError(
            f"{path}: HF CLIPModel weights need their folder with config.json; pass the folder"
        )
    openai_sd = sd if layout == "openai" else project_to_openai(sd)
    return infer_openai_config(openai_sd), sd, str(path), layout


def load_clip(
    path: str | Path, *, arch: str | None = None, dtype: torch.dtype = torch.float32
) -> CLIP:
    """Load a CLIP checkpoint of any supported format (see module doc) in `dtype` (fp32).

    Single files (OpenAI/open_clip state dicts, TorchScript archives, bare project weights) get
    their architecture inferred from shapes like OpenAI's `build_model` (QuickGELU assumed,
    heads = width // 64); `arch` names a table architecture to use instead.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    if path.is_file() and path.name in (WEIGHTS_NAME, "pytorch_model.bin"):
        sibling = path.parent / CONFIG_NAME
        if sibling.is_file() and _is_model_folder_config(_read_json(sibling)):
            path = path.parent  # weights inside a saved folder: use its config, not inference
    if path.is_dir():
        cfg, sd, source = _from_folder(path)
        layout = "project"
    else:
        cfg, sd, source, layout = _from_file(path)
    if arch is not None:
        cfg = get_arch(arch)
    model = _uninitialized_clip(cfg)
    if layout == "openai":
        # Check shapes in the checkpoint's own key names first: timm's filter would otherwise
        # silently resample a mismatched position/patch embedding.
        expected = {k: v.shape for k, v in project_to_openai(model.state_dict()).items()}
        _check_shapes(sd, expected, source)
        sd = openai_to_project(sd, model.visual)
    load_state_dict_checked(model, sd, source)
    return model.to(dtype).eval()


def _uninitialized_clip(cfg: CLIPConfig) -> CLIP:
    """A CLIP with allocated but uninitialized weights: random init is wasted before loading."""
    with torch.device("meta"):
        model = CLIP(cfg)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return CLIP(cfg)  # a non-persistent buffer would never be filled by the checkpoint
    return model.to_empty(device="cpu")
