"""The peer the benchmarks measure against: open_clip's own model of an arch, run at the
precisions an open_clip user picks, its grid-feature API, and ours with the same weights.
Shared by contrastive_step.py and grid_extract.py (run as `python bench/X.py`, so this folder
is on sys.path)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import open_clip
import torch

from cliptransfer.clip import CLIP, create_clip
from cliptransfer.clip.archs import CLIPConfig
from cliptransfer.clip.convert import openai_to_project
from cliptransfer.clip.grid import resample_pos_embed
from cliptransfer.clip.loading import load_state_dict_checked

# The open_clip_train `--precision` values a CPU user picks between: plain fp32 and bf16 autocast
# (fp16 autocast is CUDA-oriented; "bf16"/"pure_bf16" cast the weights, a different model).
PEER_PRECISIONS = ("fp32", "amp_bf16")


def peer_autocast(precision: str) -> contextlib.AbstractContextManager:
    """open_clip_train's own autocast for `--precision` on CPU (`precision.get_autocast`):
    `torch.amp.autocast("cpu", dtype=torch.bfloat16)` for amp_bf16, nothing for fp32."""
    from open_clip_train.precision import get_autocast

    return get_autocast(precision, device_type="cpu")()


def peer_label(precision: str) -> str:
    return "open_clip " + {"fp32": "fp32", "amp_bf16": "bf16"}[precision]


def ratio_columns(medians: dict[str, float], peers: list[str]) -> tuple[str, dict[str, str]]:
    """The fastest of the `peers` (names in `medians`, seconds per batch: "open_clip best"), and
    for every name the Markdown cells "**x vs best** | x vs peer 1 | x vs peer 2 ..."."""
    best = min(peers, key=lambda p: medians[p])
    cells = {
        name: " | ".join(
            [f"**{medians[best] / med:.2f}x**"] + [f"{medians[p] / med:.2f}x" for p in peers]
        )
        for name, med in medians.items()
    }
    return best, cells


def open_clip_model(
    arch: str, cfg: CLIPConfig, image_size: tuple[int, int] | None = None
) -> torch.nn.Module:
    """open_clip's own model for `arch`: its named config when it has one, else the same sizes
    through `open_clip.model.CLIP(embed_dim, vision_cfg, text_cfg)`. `image_size` (H, W) builds
    a ViT for that input (its position embedding sized for the new grid: load weights with
    `resize_pos_embed`)."""
    name = f"{arch}-quickgelu" if cfg.quick_gelu else arch
    if name in open_clip.list_models():
        logging.disable(logging.WARNING)  # "No pretrained weights loaded": intended
        try:
            return open_clip.create_model(name, pretrained=None, force_image_size=image_size)
        finally:
            logging.disable(logging.NOTSET)
    v, t = cfg.vision, cfg.text
    vision = dict(image_size=image_size or v.image_size, width=v.width, mlp_ratio=v.mlp_ratio)
    if v.kind == "resnet":
        vision["layers"] = list(v.layers)  # heads = 32 * width // 64, as ours
    else:
        vision.update(layers=v.layers, patch_size=v.patch_size, head_width=v.width // v.heads)
    text = dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=t.mlp_ratio,
    )
    return open_clip.model.CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.quick_gelu)


def ours_from_open_clip(arch: str, ref: torch.nn.Module) -> CLIP:
    """Our CLIP with open_clip's weights (its state dict is the OpenAI layout)."""
    model = create_clip(arch)
    sd = openai_to_project(ref.state_dict(), model.visual)
    load_state_dict_checked(model, sd, f"open_clip {arch} state dict")
    return model


# --- grid features (grid_extract.py) ---


def randomize_batchnorm_(model: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics.

    open_clip zero-initialises every bottleneck's last BN scale (bn3), so a freshly built
    ModifiedResNet's residual branches output exactly zero and an equality check would only see
    the shortcut path. Speed is unaffected (the same kernels run either way)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def open_clip_at_size(
    arch: str, cfg: CLIPConfig, ref: torch.nn.Module, size: tuple[int, int]
) -> torch.nn.Module:
    """`ref` for a `size` input. ResNets run at any size up to layer4 (only the attention pool,
    unused here, is tied to 224). ViTs: open_clip's usual route, a model built for the size
    (`force_image_size`) loaded through `resize_pos_embed`, with antialias=False like ours."""
    native = cfg.vision.image_size
    if cfg.vision.kind == "resnet" or size == (native, native):
        return ref
    model = open_clip_model(arch, cfg, image_size=size)
    sd = ref.state_dict()
    open_clip.model.resize_pos_embed(sd, model, interpolation="bicubic", antialias=False)
    model.load_state_dict(sd)
    return model.eval()


def open_clip_grid(visual: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) -> (B, H'*W', C) grid features with open_clip's `forward_intermediates`."""
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):

        def resnet(pixels: torch.Tensor) -> torch.Tensor:
            out = visual.forward_intermediates(pixels, indices=[4], intermediates_only=True)
            return out["image_intermediates"][0].flatten(2).transpose(1, 2)  # layer4

        return resnet

    def vit(pixels: torch.Tensor) -> torch.Tensor:
        out = visual.forward_intermediates(
            pixels,
            indices=1,  # the last block
            normalize_intermediates=True,  # ln_post
            intermediates_only=True,
            output_fmt="NLC",  # class token already split off
        )
        return out["image_intermediates"][0]

    return vit


def check_pos_embed(
    arch: str, cfg: CLIPConfig, ref: torch.nn.Module, peer: torch.nn.Module, size: tuple[int, int]
) -> None:
    """Our resampled ViT position embedding vs open_clip's resize_pos_embed (both antialias
    False), and how far open_clip's default (antialias=True: PIL's a=-0.5 cubic) is from it."""
    p = cfg.vision.patch_size
    grid_hw = (size[0] // p, size[1] // p)
    old = cfg.vision.image_size // p
    pos = ref.visual.positional_embedding.detach()
    ours = resample_pos_embed(pos[None], grid_hw, (old, old))[0]
    diff = (ours - peer.visual.positional_embedding.detach()).abs().max().item()
    sd = {"visual.positional_embedding": pos.clone()}
    open_clip.model.resize_pos_embed(sd, peer)  # defaults: bicubic, antialias=True
    aa = (ours - sd["visual.positional_embedding"]).abs().max().item()
    print(
        f"[{arch}] position embedding {old}x{old} -> {grid_hw[0]}x{grid_hw[1]}: ours vs open_clip "
        f"resize_pos_embed(antialias=False) max |diff| {diff:.1e}; vs its default antialias=True "
        f"{aa:.1e} (max |pos| {pos.abs().max().item():.2f})",
        flush=True,
    )
