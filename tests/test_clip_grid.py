"""Grid features: CLIP-ViL shapes, OpenAI floor-mode pooling, rectangular pos-embed resampling."""

from __future__ import annotations

import pytest
import torch
import transformers
from open_clip.model import CLIP as OpenCLIP

from cliptransfer.clip import create_clip, load_clip
from cliptransfer.clip.grid import resample_pos_embed, vit_tokens

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("arch", "size", "grid", "channels"),
    [
        ("RN50", (600, 1000), (18, 31), 2048),  # CLIP-ViL VQA setting
        ("RN50x4", (600, 1000), (18, 31), 2560),
        ("RN101", (224, 224), (7, 7), 2048),
        ("ViT-B-32", (384, 640), (12, 20), 768),  # CLIP-ViL V&L pretraining setting
    ],
)
def test_full_size_grid_shapes(arch, size, grid, channels):
    """Exact full-size shapes via meta tensors: the real code path, no memory or compute."""
    with torch.device("meta"):
        model = create_clip(arch)
        feats, hw = model.encode_grid(torch.empty(1, 3, *size))
        tokens = model.encode_image_tokens(torch.empty(1, 3, *size))
    assert hw == grid
    assert tuple(feats.shape) == (1, grid[0] * grid[1], channels)
    assert tuple(tokens.shape) == (1, grid[0] * grid[1], model.config.embed_dim)


def test_resnet_grid_matches_open_clip_layer4_at_odd_sizes(tmp_path):
    """OpenAI floors every avg-pool: 72x104 makes layer3/4 inputs odd (timm's ceil would not)."""
    torch.manual_seed(0)
    ref = OpenCLIP(
        32,
        vision_cfg=dict(layers=(1, 1, 1, 1), width=16, image_size=64),
        text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=1, layers=2),
        quick_gelu=True,
    ).eval()
    with torch.no_grad():
        for v in ref.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.05)
    torch.save(ref.state_dict(), tmp_path / "rn.pt")
    model = load_clip(tmp_path / "rn.pt")
    pixels = torch.randn(2, 3, 72, 104)
    with torch.no_grad():
        v = ref.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(pixels)))))  # (B, C, H, W)
        feats, hw = model.encode_grid(pixels)
    assert hw == (2, 3) == tuple(x.shape[-2:])  # 72 -> 36 -> 18 -> 18 -> 9 -> 4 -> 2
    assert (feats - x.flatten(2).transpose(1, 2)).abs().max().item() <= 1e-5


def test_vit_native_grid_equals_forward_tokens():
    torch.manual_seed(0)
    model = create_clip("ViT-tiny").eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, hw = model.encode_grid(pixels)
        ref = model.visual.forward_features(pixels)[:, 1:]  # un-resampled timm forward
    assert hw == (8, 8) and feats.shape == (2, 64, 128)
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-6)


def test_resample_is_identity_at_native_size_and_keeps_class_entry():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 7 * 7, 16)
    assert torch.equal(resample_pos_embed(pos, (7, 7), (7, 7)), pos)
    out = resample_pos_embed(pos, (12, 20), (7, 7))
    assert out.shape == (1, 1 + 240, 16)
    assert torch.equal(out[:, 0], pos[:, 0])
    # bicubic interpolation reproduces a constant field exactly
    const = torch.cat([pos[:, :1], torch.full((1, 49, 16), 0.25)], dim=1)
    resampled = resample_pos_embed(const, (12, 20), (7, 7))[:, 1:]
    torch.testing.assert_close(resampled, torch.full((1, 240, 16), 0.25))


def test_vit_rectangular_grid_uses_resampled_pos_embed():
    """At 48x80 the output differs from CLIP-ViL's zeroed patch position embedding."""
    torch.manual_seed(0)
    model = create_clip("ViT-tiny").eval()
    pixels = torch.randn(1, 3, 48, 80)
    visual = model.visual
    zeroed = torch.cat([visual.pos_embed[:, :1], torch.zeros(1, 6 * 10, 128)], dim=1)
    with torch.no_grad():
        feats, hw = model.encode_grid(pixels)
        buggy = vit_tokens(visual, pixels, pos_embed=zeroed)[0][:, 1:]
        explicit = resample_pos_embed(visual.pos_embed, (6, 10), (8, 8))
        same = vit_tokens(visual, pixels, pos_embed=explicit)[0][:, 1:]
    assert hw == (6, 10) and feats.shape == (1, 60, 128)
    assert (feats - buggy).abs().max().item() > 1e-2
    torch.testing.assert_close(feats, same, rtol=0, atol=0)


def test_vit_rectangular_grid_matches_hf_interpolate_pos_encoding(tmp_path):
    """Independent reference: HF CLIP's `interpolate_pos_encoding` (bicubic, no align_corners)."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=16,
                         eos_token_id=99),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=1, image_size=32, patch_size=8),
        projection_dim=32,
    )  # fmt: skip
    hf = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for v in hf.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.05)
    hf.save_pretrained(tmp_path)
    model = load_clip(tmp_path)
    pixels = torch.randn(2, 3, 40, 72)  # 4x4 trained grid -> 5x9
    with torch.no_grad():
        out = hf.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
        ref = hf.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
        feats, hw = model.encode_grid(pixels)
    assert hw == (5, 9)
    assert (feats - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["RN-tiny", "ViT-tiny"])
def test_grid_dtype(arch):
    torch.manual_seed(0)
    model = create_clip(arch).eval()
    pixels = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        fp32, hw = model.encode_grid(pixels)
        bf16, hw16 = model.encode_grid(pixels, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and hw == hw16
    rel = (bf16.float() - fp32).norm() / fp32.norm()
    assert rel < 0.05


def test_grid_rejects_bad_pixels():
    model = create_clip("RN-tiny")
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, H, W\)"):
        model.encode_grid(torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="smaller than the tower's stride"):
        create_clip("ViT-tiny").encode_grid(torch.zeros(1, 3, 4, 64))
