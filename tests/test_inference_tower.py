"""The extraction copy of an image tower (BatchNorm folded, channels_last) computes the same grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cliptransfer.clip import create_clip, grid
from cliptransfer.clip.inference import fold_batchnorm_, inference_tower


def _randomised(arch: str) -> nn.Module:
    torch.manual_seed(0)
    visual = create_clip(arch).visual.eval()
    for m in visual.modules():  # non-trivial statistics (timm zero-inits each block's last BN)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return visual


def test_folded_conv_bn_pair_is_the_same_affine_map():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 9.0]))
    holder = nn.Module()
    holder.conv, holder.bn = conv, bn
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = bn(conv(x))
        assert fold_batchnorm_(holder) == 1
        torch.testing.assert_close(holder.bn(holder.conv(x)), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(holder.bn, nn.Identity)


@pytest.mark.parametrize("arch", ["RN-tiny", "ViT-tiny"])
def test_inference_tower_matches_the_eval_forward(arch: str):
    visual = _randomised(arch)
    tower, channels_last = inference_tower(visual)
    assert channels_last == (arch == "RN-tiny")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in tower.modules()) or arch == "ViT-tiny"
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref, hw = grid.encode_grid(visual, x)
        fx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        got, hw2 = grid.encode_grid(tower, fx)
    assert hw == hw2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # The original tower is untouched (a copy was folded).
    assert any(isinstance(m, nn.BatchNorm2d) for m in visual.modules()) or arch == "ViT-tiny"
