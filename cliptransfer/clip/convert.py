"""State-dict key mappings: OpenAI / open_clip <-> project <-> Hugging Face `CLIPModel`.

Project layout = OpenAI's text keys + timm's image-tower keys under `visual.` + `logit_scale`.
OpenAI -> project reuses timm's own `checkpoint_filter_fn`s for the image tower; the reverse
maps are written out here. HF `CLIPModel` has only ViT image towers.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from timm.models import byobnet
from timm.models import vision_transformer as timm_vit
from torch import nn

from .archs import ARCHS, CLIPConfig, TextConfig, VisionConfig

__all__ = [
    "CheckpointError",
    "config_from_hf",
    "detect_layout",
    "hf_config_dict",
    "hf_to_project",
    "infer_openai_config",
    "match_arch",
    "openai_to_project",
    "project_to_hf",
    "project_to_openai",
]

StateDict = dict[str, torch.Tensor]

# Non-weight entries of OpenAI's TorchScript archives (its build_model drops them too), and the
# causal mask buffer that TorchScript state dicts include even when it is non-persistent.
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def detect_layout(sd: StateDict) -> str:
    """'openai', 'project' or 'hf' from characteristic keys; raises CheckpointError otherwise."""
    if "visual.conv1.weight" in sd:
        return "openai"
    if "visual.patch_embed.proj.weight" in sd or "visual.stem.conv1.conv.weight" in sd:
        return "project"
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        return "hf"
    raise CheckpointError(
        "unrecognized CLIP state dict layout (expected OpenAI/open_clip 'visual.conv1.weight', "
        f"cliptransfer 'visual.*' timm keys, or HF 'vision_model.*'); first keys: {list(sd)[:5]}"
    )


# ---------------------------------------------------------------- OpenAI / open_clip <-> project


def _require(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"not an OpenAI/open_clip CLIP state dict: missing key {key!r}")
    return sd[key]


def _count(sd: StateDict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def infer_openai_config(sd: StateDict) -> CLIPConfig:
    """Architecture from an OpenAI-layout state dict's shapes, like OpenAI's `build_model`.

    Heads are width // 64 (OpenAI's convention, not recorded in the weights); QuickGELU assumed.
    """
    text_width = _require(sd, "ln_final.weight").shape[0]
    text = TextConfig(
        context_length=_require(sd, "positional_embedding").shape[0],
        vocab_size=_require(sd, "token_embedding.weight").shape[0],
        width=text_width,
        heads=max(text_width // 64, 1),
        layers=_count(sd, "transformer.resblocks."),
        mlp_ratio=_require(sd, "transformer.resblocks.0.mlp.c_fc.weight").shape[0] / text_width,
    )
    if "visual.proj" in sd:
        conv1 = _require(sd, "visual.conv1.weight")
        width, patch = conv1.shape[0], conv1.shape[-1]
        grid = round(math.sqrt(_require(sd, "visual.positional_embedding").shape[0] - 1))
        fc = _require(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight")
        vision = VisionConfig(
            kind="vit",
            image_size=patch * grid,
            width=width,
            layers=_count(sd, "visual.transformer.resblocks."),
            heads=max(width // 64, 1),
            patch_size=patch,
            mlp_ratio=fc.shape[0] / width,
        )
    else:
        width = _require(sd, "visual.layer1.0.conv1.weight").shape[0]
        out = round(math.sqrt(_require(sd, "visual.attnpool.positional_embedding").shape[0] - 1))
        vision = VisionConfig(
            kind="resnet",
            image_size=out * 32,
            width=width,
            layers=tuple(_count(sd, f"visual.layer{b}.") for b in range(1, 5)),
            heads=width * 32 // 64,
        )
    embed_dim = _require(sd, "text_projection").shape[1]
    cfg = CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=True)
    name = match_arch(cfg)
    return CLIPConfig.from_dict(ARCHS[name].to_dict()) if name else cfg


def match_arch(cfg: CLIPConfig) -> str | None:
    """Name of the table architecture with exactly these sizes (ignoring timm_name), if any."""

    def key(c: CLIPConfig) -> dict[str, Any]:
        d = c.to_dict()
        d["vision"].pop("timm_name")
        d.pop("init_logit_scale")
        return d

    want = key(cfg)
    return next((name for name, c in ARCHS.items() if key(c) == want), None)


def openai_to_project(sd: StateDict, visual: nn.Module) -> StateDict:
    """OpenAI/open_clip layout -> project layout, with timm's filter for the image tower."""
    sd = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in OPENAI_EXTRA_KEYS}
    out = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    if isinstance(visual, timm_vit.VisionTransformer):
        vis = timm_vit.checkpoint_filter_fn(sd, visual)
        # timm's converter adds an all-zero head bias; our projection is bias-free like OpenAI's.
        vis.pop("head.bias", None)
    else:
        vis = byobnet.checkpoint_filter_fn(sd, visual)
    out.update({"visual." + k: v for k, v in vis.items()})
    return out


_VIT_TO_OPENAI = [
    (r"^patch_embed\.proj\.", "conv1."),
    (r"^norm_pre\.", "ln_pre."),
    (r"^norm\.", "ln_post."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"transformer.resblocks.\1.ln_\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
]
_RN_TO_OPENAI = [
    (r"^stem\.conv(\d)\.conv\.", r"conv\1."),
    (r"^stem\.conv(\d)\.bn\.", r"bn\1."),
    (r"^head\.pos_embed$", "attnpool.positional_embedding"),
    (r"^head\.(q|k|v)\.", r"attnpool.\1_proj."),
    (r"^head\.proj\.", "attnpool.c_proj."),
]


def _rn_stage_key(k: str) -> str:
    """timm `stages.{s}.{b}.*` -> OpenAI `layer{s+1}.{b}.*` (inverse of timm's regexes)."""
    m = re.match(r"^stages\.(\d+)\.(\d+)\.(.+)$", k)
    if not m:
        return k
    layer, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^conv(\d)_\w+?\.conv\.", r"conv\1.", rest)
    rest = re.sub(r"^conv(\d)_\w+?\.bn\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.conv\.conv\.", "downsample.0.", rest)
    rest = re.sub(r"^shortcut\.conv\.bn\.", "downsample.1.", rest)
    return f"layer{layer}.{block}.{rest}"


def _rename(k: str, table: list[tuple[str, str]]) -> str:
    for pat, rep in table:
        if re.match(pat, k):
            return re.sub(pat, rep, k)
    return k


def project_to_openai(sd: StateDict) -> StateDict:
    """Project layout -> OpenAI/open_clip layout (inverse of `openai_to_project`)."""
    out: StateDict = {}
    vit = "visual.patch_embed.proj.weight" in sd
    for k, v in sd.items():
        if not k.startswith("visual."):
            out[k] = v
            continue
        k = k[len("visual.") :]
        if vit:
            if k == "cls_token":
                k, v = "class_embedding", v.reshape(-1)
            elif k == "pos_embed":
                k, v = "positional_embedding", v.squeeze(0)
            elif k == "head.weight":
                k, v = "proj", v.t().contiguous()
            else:
                k = _rename(k, _VIT_TO_OPENAI)
        else:
            k = _rn_stage_key(k) if k.startswith("stages.") else _rename(k, _RN_TO_OPENAI)
        out["visual." + k] = v
    return out


# ---------------------------------------------------------------- HF CLIPModel <-> project

_HF_TEXT = [
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^text_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"transformer.resblocks.\1.ln_\2."),
    (r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
]  # fmt: skip
_HF_VISION = [
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed.proj."),
    (r"^vision_model\.pre_layrnorm\.", "visual.norm_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual.blocks.\1.norm\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"visual.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual.blocks.\1.mlp."),
    (r"^visual_projection\.weight$", "visual.head.weight"),
]  # fmt: skip
_HF_QKV = re.compile(
    r"^(text|vision)_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$"
)


def hf_to_project(sd: StateDict) -> StateDict:
    """HF `CLIPModel` state dict -> project layout (q/k/v fused, projections transposed)."""
    out: StateDict = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue  # a non-persistent buffer in newer HF versions
        if m := _HF_QKV.match(k):
            tower, layer, which, kind = m.groups()
            qkv.setdefault((tower, layer, kind), {})[which] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k == "vision_model.embeddings.class_embedding":
            out["visual.cls_token"] = v.reshape(1, 1, -1)
        elif k == "vision_model.embeddings.position_embedding.weight":
            out["visual.pos_embed"] = v.unsqueeze(0)
        else:
            out[_rename(k, _HF_TEXT + _HF_VISION)] = v
    for (tower, layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"HF checkpoint: layer {layer} of the {tower} tower lacks some of q/k/v_proj.{kind}"
            )
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        if tower == "text":
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
        else:
            out[f"visual.blocks.{layer}.attn.qkv.{kind}"] = fused
    return out


_PROJECT_QKV = re.compile(
    r"^(transformer\.resblocks|visual\.blocks)\.(\d+)\.attn\.(in_proj_|qkv\.)(weight|bias)$"
)


def project_to_hf(sd: StateDict) -> StateDict:
    """Project layout (ViT tower) -> HF `CLIPModel` state dict."""
    if "visual.patch_embed.proj.weight" not in sd:
        raise CheckpointError("HF CLIPModel supports only ViT image towers")
    out: StateDict = {}
    for k, v in sd.items():
        if k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k == "visual.cls_token":
            out["vision_model.embeddings.class_embedding"] = v.reshape(-1)
        elif k == "visual.pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = v.squeeze(0)
        elif m := _PROJECT_QKV.match(k):
            tower = "text" if m.group(1).startswith("transformer") else "vision"
            prefix = f"{tower}_model.encoder.layers.{m.group(2)}.self_attn"
            for which, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{prefix}.{which}_proj.{m.group(4)}"] = part
        else:
            out[_rename(k, _HF_REVERSE)] = v
    return out


_HF_REVERSE = [
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_(\d)\.", r"text_model.encoder.layers.\1.layer_norm\2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"text_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"text_model.encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"text_model.encoder.layers.\1.mlp.fc2."),
    (r"^visual\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.norm_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.norm\.", "vision_model.post_layernorm."),
    (r"^visual\.blocks\.(\d+)\.norm(\d)\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^visual\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^visual\.head\.weight$", "visual_projection.weight"),
]  # fmt: skip


def config_from_hf(hf: Any) -> CLIPConfig:
    """CLIPConfig from a `transformers.CLIPConfig` (honouring `hidden_act`)."""
    t, v = hf.text_config, hf.vision_config
    acts = {t.hidden_act, v.hidden_act}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(
            f"HF CLIP hidden_act must be 'quick_gelu' or 'gelu' and equal in both towers, "
            f"got text={t.hidden_act!r} vision={v.hidden_act!r}"
        )
    for name, eps in (("text", t.layer_norm_eps), ("vision", v.layer_norm_eps)):
        if abs(eps - 1e-5) > 1e-12:
            raise CheckpointError(f"HF CLIP {name} layer_norm_eps={eps} unsupported (need 1e-5)")
    return CLIPConfig(
        embed_dim=hf.projection_dim,
        vision=VisionConfig(
            kind="vit",
            image_size=v.image_size,
            width=v.hidden_size,
            layers=v.num_hidden_layers,
            heads=v.num_attention_heads,
            patch_size=v.patch_size,
            mlp_ratio=v.intermediate_size / v.hidden_size,
        ),
        text=TextConfig(
            context_length=t.max_position_embeddings,
            vocab_size=t.vocab_size,
            width=t.hidden_size,
            heads=t.num_attention_heads,
            layers=t.num_hidden_layers,
            mlp_ratio=t.intermediate_size / t.hidden_size,
        ),
        quick_gelu=acts == {"quick_gelu"},
        init_logit_scale=float(hf.logit_scale_init_value),
    )


def hf_config_dict(cfg: CLIPConfig) -> dict[str, Any]:
    """kwargs for `transformers.CLIPConfig(**d)` describing a project ViT config.

    The text `eos_token_id` is the last vocab id: EOT is the highest id in every project
    tokenizer, and HF then pools at its first occurrence (the same position as argmax).
    """
    if cfg.vision.kind != "vit":
        raise CheckpointError("HF CLIPModel supports only ViT image towers")
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    t, v = cfg.text, cfg.vision
    return dict(
        projection_dim=cfg.embed_dim,
        logit_scale_init_value=cfg.init_logit_scale,
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=int(t.width * t.mlp_ratio),
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.context_length,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=cfg.embed_dim,
            eos_token_id=t.vocab_size - 1,
            bos_token_id=t.vocab_size - 2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=v.width,
            intermediate_size=int(v.width * v.mlp_ratio),
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=cfg.embed_dim,
        ),
    )
