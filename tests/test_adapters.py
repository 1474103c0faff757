"""PEFT adapters on a task-shaped model: presets, trainable fraction, save/reload/merge exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cliptransfer.adapters import (
    AdapterConfig,
    backbone_targets,
    load_adapter,
    merge,
    save_adapter,
    trainable_fraction,
    wrap,
)
from cliptransfer.clip import create_clip


class TaskModel(nn.Module):
    """backbone (CLIP image tower) -> fusion (Linear layers) -> classifier, like the task heads."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.backbone = create_clip(arch).visual
        self.fusion = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 32))
        self.classifier = nn.Linear(32, 5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fusion(self.backbone(pixels)))


def _model(arch: str) -> TaskModel:
    torch.manual_seed(0)
    model = TaskModel(arch)
    model(torch.zeros(1, 3, 64, 64))  # materialise the lazy layer
    return model


def _train_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    model.eval()


def test_presets_pick_the_documented_modules():
    rn = backbone_targets(_model("RN-tiny"))
    assert "backbone.stem.conv1.conv" in rn and "backbone.stages.3.0.conv3_1x1.conv" in rn
    assert all(n.endswith(".conv") for n in rn)
    vit = backbone_targets(_model("ViT-tiny"))
    assert sorted(n.rsplit(".", 2)[-2:][-1] for n in vit if ".blocks.0." in n) == [
        "fc1",
        "fc2",
        "proj",
        "qkv",
    ]


@pytest.mark.parametrize(
    "arch, method, scope",
    [
        ("RN-tiny", "lora", "backbone"),
        ("ViT-tiny", "loha", "backbone"),
        ("ViT-tiny", "ia3", "fusion"),
    ],
)
def test_save_reload_merge_exact(tmp_path, arch, method, scope):
    cfg = AdapterConfig(method=method, scope=scope, r=4, modules_to_save=["classifier"])
    model, targets = wrap(_model(arch), cfg)
    trainable, total, pct = trainable_fraction(model)
    assert 0 < pct < 50 and trainable < total
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in names)  # the new head trains in full
    marker = {"lora": "lora_", "loha": "hada_", "ia3": "ia3_"}[method]
    assert all(marker in n or "classifier" in n for n in names), names[:5]
    x = torch.randn(2, 3, 64, 64)
    _train_step(model, x)
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(_model(arch), tmp_path / "adapter", cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
        merged = merge(reloaded)
        assert isinstance(merged, TaskModel)
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)


def test_bn_policy_train_saves_batchnorms(tmp_path):
    model, _ = wrap(
        _model("RN-tiny"), AdapterConfig("lora", bn_policy="train", modules_to_save=["classifier"])
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".bn." in n for n in trainable)
    frozen, _ = wrap(_model("RN-tiny"), AdapterConfig("lora", bn_policy="freeze"))
    assert not any(".bn." in n for n, p in frozen.named_parameters() if p.requires_grad)


def test_bad_adapter_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown PEFT method"):
        wrap(_model("RN-tiny"), AdapterConfig(method="prefix"))
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        load_adapter(_model("RN-tiny"), tmp_path)
