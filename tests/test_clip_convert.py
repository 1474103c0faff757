"""Golden-output checkpoint interop: open_clip / OpenAI layout, TorchScript, HF CLIPModel."""

from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
import transformers
from open_clip.model import CLIP as OpenCLIP
from safetensors.torch import save_file

from cliptransfer.clip import CheckpointError, UnknownArchError, create_clip, load_clip
from cliptransfer.clip.archs import get_arch
from cliptransfer.clip.convert import (
    hf_config_dict,
    infer_openai_config,
    openai_to_project,
    project_to_hf,
    project_to_openai,
)

torch.set_num_threads(1)

TEXT = dict(context_length=16, vocab_size=100, width=64, heads=1, layers=2)
FAMILIES = {
    "vit": dict(layers=2, width=64, patch_size=8, image_size=32),
    "resnet": dict(layers=(1, 1, 1, 1), width=16, image_size=64),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturb every float tensor (zero-init biases, BN stats, LN) so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in module.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn(v.shape, generator=g) * 0.05)


def _open_clip_model(family: str, seed: int = 0) -> OpenCLIP:
    torch.manual_seed(seed)
    model = OpenCLIP(32, vision_cfg=FAMILIES[family], text_cfg=TEXT, quick_gelu=True).eval()
    _randomize(model, seed)
    return model


def _inputs(
    image_size: int, vocab: int = 100, length: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, image_size, image_size, generator=g)
    ids = torch.randint(1, vocab - 1, (3, length), generator=g)
    for b, pos in enumerate([3, 9, length - 1]):
        ids[b, pos] = vocab - 1
        ids[b, pos + 1 :] = 0
    return pixels, ids


def _assert_matches_open_clip(ours, ref, image_size: int) -> None:
    pixels, ids = _inputs(image_size)
    with torch.no_grad():
        img_diff = (ours.encode_image(pixels) - ref.encode_image(pixels)).abs().max().item()
        txt_diff = (ours.encode_text(ids) - ref.encode_text(ids)).abs().max().item()
    assert img_diff <= 1e-5 and txt_diff <= 1e-5, (img_diff, txt_diff)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_open_clip_state_dict_files_load_exactly(family, tmp_path):
    ref = _open_clip_model(family)
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "m.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    # open_clip training checkpoints: {"state_dict": ...} with DDP "module." prefixes
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    size = FAMILIES[family]["image_size"]
    for name in ("m.pt", "m.safetensors", "epoch_3.pt"):
        ours = load_clip(tmp_path / name)
        assert ours.config.quick_gelu and ours.config.vision.kind == family
        assert ours.config.vision.image_size == size and ours.config.embed_dim == 32
        assert ours.config.text.layers == 2 and ours.config.text.vocab_size == 100
        _assert_matches_open_clip(ours, ref, size)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_torchscript_archive_loads_exactly(family, tmp_path):
    """OpenAI distributes TorchScript archives; a scripted open_clip model stands in for one."""
    ref = _open_clip_model(family, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        scripted = torch.jit.script(ref)
    scripted.save(str(tmp_path / "ViT-tiny.pt"))
    ours = load_clip(tmp_path / "ViT-tiny.pt")
    _assert_matches_open_clip(ours, ref, FAMILIES[family]["image_size"])


def test_fp16_openai_checkpoint_loads_in_fp32(tmp_path):
    ref = _open_clip_model("vit", seed=2)
    sd16 = {k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    torch.save(sd16, tmp_path / "fp16.pt")
    ours = load_clip(tmp_path / "fp16.pt")
    assert ours.dtype == torch.float32
    assert torch.equal(ours.token_embedding.weight, sd16["token_embedding.weight"].float())
    assert torch.equal(ours.visual.cls_token.flatten(), sd16["visual.class_embedding"].float())


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_openai_layout_round_trip_is_exact(family):
    sd = _open_clip_model(family, seed=3).state_dict()
    model = create_clip(infer_openai_config(sd))
    back = project_to_openai(openai_to_project(sd, model.visual))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "name", ["RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16"]
)  # fmt: skip
def test_full_size_shape_inference(name):
    """Full-size open_clip state dicts (meta tensors: no memory, no forward) map onto our model."""
    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta")
        sd = ref.state_dict()
        cfg = infer_openai_config(sd)
        assert cfg == get_arch(name)  # matched to the table, timm_name included
        ours = create_clip(cfg)
    converted = openai_to_project(sd, ours.visual)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }


# ---------------------------------------------------------------- HF CLIPModel


def _hf_model(act: str, seed: int) -> transformers.CLIPModel:
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, hidden_act=act,
            eos_token_id=99, bos_token_id=98, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, hidden_act=act,
        ),
        projection_dim=32,
    )  # fmt: skip
    model = transformers.CLIPModel(cfg).eval()
    _randomize(model, seed)
    return model


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_folder_loads_exactly(act, tmp_path):
    hf = _hf_model(act, seed=4)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_clip(tmp_path / "hf")
    assert ours.config.quick_gelu == (act == "quick_gelu")
    assert ours.config.vision.mlp_ratio == 2.0 and ours.config.text.mlp_ratio == 4.0
    pixels, ids = _inputs(32)
    with torch.no_grad():
        img = _features(hf.get_image_features(pixel_values=pixels))
        txt = _features(hf.get_text_features(input_ids=ids))
        assert (ours.encode_image(pixels) - img).abs().max().item() <= 1e-5
        assert (ours.encode_text(ids) - txt).abs().max().item() <= 1e-5
        assert torch.equal(ours.logit_scale, hf.logit_scale)


def test_hf_pytorch_model_bin_and_export(tmp_path):
    hf = _hf_model("quick_gelu", seed=5)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_clip(tmp_path)
    # export back: HF keys and values exactly, and a fresh CLIPModel accepts them strictly
    exported = project_to_hf(ours.state_dict())
    ref = hf.state_dict()
    assert exported.keys() == ref.keys()
    assert all(torch.equal(exported[k], ref[k]) for k in ref)
    fresh = transformers.CLIPModel(transformers.CLIPConfig(**hf_config_dict(ours.config)))
    fresh.load_state_dict(exported, strict=True)
    pixels, ids = _inputs(32)
    with torch.no_grad():
        torch.testing.assert_close(
            _features(fresh.get_text_features(input_ids=ids)), ours.encode_text(ids)
        )


# ---------------------------------------------------------------- errors


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_clip(tmp_path / "nope.pt")
    sd = _open_clip_model("vit").state_dict()
    torch.save(sd, tmp_path / "full.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "full.safetensors"))
    for name in ("full.pt", "full.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=rf"could not read CLIP checkpoint .*cut_{name}"):
            load_clip(tmp_path / ("cut_" + name))


def test_wrong_shape_reports_key_and_both_shapes(tmp_path):
    torch.save(_open_clip_model("vit").state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as err:
        load_clip(tmp_path / "m.pt", arch="ViT-tiny")
    msg = str(err.value)
    # the first mismatch in the model's own key order, with checkpoint and model shapes
    assert "m.pt" in msg and "'positional_embedding'" in msg
    assert "checkpoint (16, 64) vs model (48, 128)" in msg


def test_missing_keys_listed(tmp_path):
    sd = _open_clip_model("vit").state_dict()
    del sd["ln_final.bias"]
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \['ln_final.bias'\]"):
        load_clip(tmp_path / "m.pt")


def test_unknown_formats_and_arch(tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unrecognized CLIP state dict layout"):
        load_clip(tmp_path / "odd.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_clip(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        load_clip(tmp_path / "bert")
    torch.save(_open_clip_model("vit").state_dict(), tmp_path / "m.pt")
    with pytest.raises(UnknownArchError, match="available"):
        load_clip(tmp_path / "m.pt", arch="ViT-Z-99")
