"""CLIP model family: configs, towers, text conventions, per-token outputs, project round trip."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.layers import GELU as TimmGELU
from timm.layers import QuickGELU as TimmQuickGELU

from cliptransfer.clip import (
    CLIP,
    CLIPConfig,
    CLIPOutput,
    UnknownArchError,
    create_clip,
    list_archs,
    load_clip,
)
from cliptransfer.clip.text import QuickGELU

torch.set_num_threads(1)  # the CI box has 2 shared cores; one thread avoids oversubscription


def _tiny(arch: str, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return create_clip(arch).eval()


def _tokens(batch: int, length: int, vocab: int, eot_at: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 1, (batch, length), generator=g)
    for b, pos in enumerate(eot_at):
        ids[b, pos] = vocab - 1  # EOT is the highest id
        ids[b, pos + 1 :] = 0  # padding
    return ids


def test_archs_listed_and_unknown_arch_message():
    assert {"RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16", "RN-tiny", "ViT-tiny"} <= set(
        list_archs()
    )
    with pytest.raises(UnknownArchError, match=r"'RN51'.*available.*RN50"):
        create_clip("RN51")


def test_overrides_top_level_and_nested():
    model = create_clip("RN-tiny", quick_gelu=True, text={"layers": 3, "width": 64, "heads": 1})
    cfg = model.config
    assert cfg.quick_gelu and cfg.text.layers == 3 and cfg.text.width == 64
    assert cfg.text.context_length == 48  # untouched nested field kept
    assert len(model.transformer.resblocks) == 3
    assert model.text_projection.shape == (64, 128)
    with pytest.raises(ValueError, match="unknown CLIP config field 'depth'"):
        create_clip("RN-tiny", depth=3)
    with pytest.raises(ValueError, match=r"unknown text config field.*\['depth'\]"):
        create_clip("RN-tiny", text={"depth": 3})
    with pytest.raises(ValueError, match="heads must be width"):
        create_clip("RN-tiny", vision={"heads": 3})


def test_config_dict_round_trip_is_json():
    cfg = create_clip("RN-tiny").config
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CLIPConfig.from_dict(d) == cfg
    assert d["vision"]["layers"] == [1, 1, 1, 1]
    assert math.isclose(d["init_logit_scale"], math.log(1 / 0.07))


@pytest.mark.parametrize(
    ("name", "timm_name"), [("RN50", "resnet50_clip"), ("RN50x4", "resnet50x4_clip")]
)
def test_resnet_towers_are_timm_clip_resnets(name, timm_name):
    """Explicit sizes and the timm registered model give the same module tree (meta: no memory)."""
    with torch.device("meta"):
        ours = create_clip(name)
        from_sizes = create_clip(name, vision={"timm_name": None})
        ref = timm.create_model(timm_name, pretrained=False, num_classes=ours.config.embed_dim)
    shapes = {k: tuple(v.shape) for k, v in ours.visual.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in from_sizes.visual.state_dict().items()}


def test_vit_tower_is_timm_quickgelu_vit():
    with torch.device("meta"):
        ours = create_clip("ViT-B-32")
        ref = timm.create_model("vit_base_patch32_clip_quickgelu_224", num_classes=512)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "head.bias"}
    assert {k: tuple(v.shape) for k, v in ours.visual.state_dict().items()} == ref_shapes
    assert ours.visual.head.bias is None  # OpenAI's proj has no bias
    assert isinstance(ours.visual.blocks[0].mlp.act, TimmQuickGELU)
    assert isinstance(ours.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_gelu_choice_applies_to_both_towers():
    model = create_clip("ViT-tiny", quick_gelu=False)
    assert isinstance(model.visual.blocks[0].mlp.act, TimmGELU)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    model = create_clip("ViT-tiny", quick_gelu=True)
    assert isinstance(model.visual.blocks[0].mlp.act, TimmQuickGELU)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_openai_text_parameter_names():
    """Everything outside `visual.` is named exactly as in OpenAI / open_clip checkpoints."""
    keys = {k for k in create_clip("ViT-tiny").state_dict() if not k.startswith("visual.")}
    per_block = [
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
        "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    ]  # fmt: skip
    expected = {f"transformer.resblocks.{i}.{n}" for i in range(2) for n in per_block} | {
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "text_projection",
        "logit_scale",
    }
    assert keys == expected


@pytest.mark.parametrize("arch", ["RN-tiny", "ViT-tiny"])
def test_forward_shapes_and_logit_scale(arch):
    model = _tiny(arch)
    pixels = torch.randn(4, 3, 64, 64)
    ids = _tokens(4, 32, 1024, [5, 31, 0, 12])
    with torch.no_grad():
        out = model(pixels, ids)
    assert isinstance(out, CLIPOutput)
    assert out.image_embeds.shape == (4, 128) and out.text_embeds.shape == (4, 128)
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-6)
    assert model.image_size == 64 and model.context_length == 48
    # unnormalized, like OpenAI
    assert not torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(4))


def test_text_pools_at_eot_and_ignores_padding():
    model = _tiny("ViT-tiny")
    ids = _tokens(2, 32, 1024, [4, 9])
    changed = ids.clone()
    changed[:, 10:] = 7  # after both EOTs: invisible to causal attention at the EOT
    with torch.no_grad():
        a, b = model.encode_text(ids), model.encode_text(changed)
        tokens, mask = model.encode_text_tokens(ids)
        short = model.encode_text(ids[:, :10])  # shorter than the context is fine
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, short, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[0, 4], a[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[1, 9], a[1], rtol=0, atol=1e-6)
    assert tokens.shape == (2, 32, 128)
    assert mask[0].tolist() == [True] * 5 + [False] * 27
    assert mask[1].tolist() == [True] * 10 + [False] * 22


def test_bidirectional_text_flag():
    model = _tiny("ViT-tiny")
    ids = _tokens(1, 32, 1024, [6])
    later = ids.clone()
    later[0, 3] = 11  # a later token changes position 0 only when attention is bidirectional
    with torch.no_grad():
        causal = model.encode_text_tokens(ids)[0]
        bi, mask = model.encode_text_tokens(ids, causal=False)
        bi_later = model.encode_text_tokens(later, causal=False)[0]
        causal_later = model.encode_text_tokens(later)[0]
        padded = ids.clone()
        padded[0, 7:] = 5  # keys after EOT are masked in bidirectional mode
        bi_padded = model.encode_text_tokens(padded, causal=False)[0]
    torch.testing.assert_close(causal[0, 0], causal_later[0, 0], rtol=0, atol=1e-6)
    assert (bi[0, 0] - bi_later[0, 0]).abs().max() > 1e-3
    assert (bi[0, :6] - causal[0, :6]).abs().max() > 1e-3
    torch.testing.assert_close(bi[0, :7], bi_padded[0, :7], rtol=0, atol=1e-5)
    assert mask.sum().item() == 7


def test_bad_token_ids_raise_clear_errors():
    model = _tiny("ViT-tiny")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1024\)"):
        model.encode_text(torch.full((1, 8), 5000))
    with pytest.raises(ValueError, match="exceeds context_length 48"):
        model.encode_text(torch.ones(1, 60, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\) integer tensor"):
        model.encode_text(torch.ones(8))
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, H, W\)"):
        model.encode_image(torch.ones(1, 1, 64, 64))


def test_vit_image_tokens_are_projected_patch_tokens():
    model = _tiny("ViT-tiny")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.encode_image_tokens(pixels)
        feats = model.visual.forward_features(pixels)  # (B, 1 + 64, C), after ln_post
        pooled = model.encode_image(pixels)
    assert tokens.shape == (2, 64, 128)
    torch.testing.assert_close(tokens, feats[:, 1:] @ model.visual.head.weight.T)
    torch.testing.assert_close(pooled, feats[:, 0] @ model.visual.head.weight.T)


def test_resnet_image_tokens_average_to_pooled_embedding():
    """With q/k zeroed the attention pool is a uniform mean over [mean-token, tokens]; the
    per-location tokens must then average (with the mean token's value) to encode_image."""
    model = _tiny("RN-tiny")
    head = model.visual.head
    with torch.no_grad():
        for lin in (head.q, head.k):
            lin.weight.zero_()
            lin.bias.zero_()
        pixels = torch.randn(2, 3, 64, 64)
        tokens = model.encode_image_tokens(pixels)  # (B, 4, D)
        feats = model.visual.forward_features(pixels).flatten(2).transpose(1, 2)  # (B, 4, C)
        mean_value = head.proj(head.v(feats.mean(1) + head.pos_embed[0]))  # (B, D)
        expected = (mean_value + tokens.sum(1)) / (tokens.shape[1] + 1)
        pooled = model.encode_image(pixels)
    assert tokens.shape == (2, 4, 128)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["RN-tiny", "ViT-tiny"])
def test_grad_checkpointing_same_outputs_and_grads(arch):
    model = _tiny(arch).train()
    pixels = torch.randn(2, 3, 64, 64)
    ids = _tokens(2, 32, 1024, [7, 20])

    def run():
        model.zero_grad()
        out = model(pixels, ids)
        (out.image_embeds.square().sum() + out.text_embeds.square().sum()).backward()
        return out, model.token_embedding.weight.grad.clone()

    if arch == "RN-tiny":
        model.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    ref, ref_grad = run()
    model.set_grad_checkpointing(True)
    out, grad = run()
    torch.testing.assert_close(out.image_embeds, ref.image_embeds)
    torch.testing.assert_close(out.text_embeds, ref.text_embeds)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("arch", ["RN-tiny", "ViT-tiny"])
def test_save_pretrained_round_trip_is_bitwise(arch, tmp_path):
    model = _tiny(arch, seed=3)
    with torch.no_grad():  # make BN running stats / zero-init weights non-trivial
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.01)
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["cliptransfer"]["kind"] == "clip"
    for source in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors"):
        loaded = load_clip(source)
        assert loaded.config == model.config
        sd, sd2 = model.state_dict(), loaded.state_dict()
        assert sd.keys() == sd2.keys()
        assert all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)
        pixels, ids = torch.randn(2, 3, 64, 64), _tokens(2, 32, 1024, [3, 30])
        with torch.no_grad():
            assert torch.equal(model.encode_image(pixels), loaded.encode_image(pixels))
            assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))
            assert torch.equal(model.encode_grid(pixels)[0], loaded.encode_grid(pixels)[0])


def test_load_clip_dtype_and_eval(tmp_path):
    model = _tiny("ViT-tiny")
    model.save_pretrained(tmp_path)
    loaded = load_clip(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    torch.testing.assert_close(
        loaded.positional_embedding.float(), model.positional_embedding.bfloat16().float()
    )
