"""Image and caption augmentations driven by an explicit per-sample generator.

Every random choice comes from a `torch.Generator` seeded by (seed, epoch, sample index), never from
the global RNG. So an augmented sample is a pure function of those three numbers: the data of a
resumed run, of a run with another number of workers, or of a 2-process run equals the data of the
uninterrupted 1-process run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cliptransfer.config import check, check_range

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def sample_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on its arguments (hash-mixed so nearby seeds differ)."""
    mixed = (seed * 1_000_003 + epoch * 10_007 + stream) * 2_147_483_647 + index
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


@dataclass
class ImageAugConfig:
    size: int = 64  # square output side
    scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop area range; (1, 1) = plain resize
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False  # off by default: flipping breaks "left of"/"right of" captions
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (SimCLR views use 0.4)
    blur_prob: float = 0.0
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        check_range("size", self.size, ge=1)
        for i, s in enumerate(self.scale):
            check_range(f"scale[{i}]", s, gt=0, le=1)  # fractions of the image area
        check(
            self.scale[0] <= self.scale[1], "scale", "must be (low, high), low <= high", self.scale
        )
        for i, r in enumerate(self.ratio):
            check_range(f"ratio[{i}]", r, gt=0)  # log() of it is taken
        check(
            self.ratio[0] <= self.ratio[1], "ratio", "must be (low, high), low <= high", self.ratio
        )
        # Jitter factors are drawn from [1 - s, 1 + s]; a negative factor is an error in torchvision.
        check_range("color_jitter", self.color_jitter, ge=0, le=1)
        check_range("blur_prob", self.blur_prob, ge=0, le=1)
        for i, m in enumerate(self.mean):
            check_range(f"mean[{i}]", m, ge=0, le=1)  # of pixels in [0, 1]
        for i, s in enumerate(self.std):
            check_range(f"std[{i}]", s, gt=0)  # divided by


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]."""
    return TF.to_dtype(TF.to_image(img.convert("RGB")), torch.float32, scale=True)


def crop_params(
    g: torch.Generator, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box sampling (top, left, height, width) from generator `g`."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            return top, left, ch, cw
    # Fallback like torchvision: the whole image, clipped to the ratio range.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augment_image(img: Image.Image, cfg: ImageAugConfig, g: torch.Generator) -> torch.Tensor:
    """One augmented, normalised view (3, size, size) of `img`."""
    x = to_tensor(img)
    _, h, w = x.shape
    top, left, ch, cw = crop_params(g, h, w, cfg.scale, cfg.ratio)
    x = TF.resized_crop(x, top, left, ch, cw, [cfg.size, cfg.size], antialias=True)
    if cfg.hflip and torch.rand((), generator=g).item() < 0.5:
        x = TF.horizontal_flip(x)
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        x = TF.adjust_brightness(x, _uniform(g, 1 - s, 1 + s))
        x = TF.adjust_contrast(x, _uniform(g, 1 - s, 1 + s))
        x = TF.adjust_saturation(x, _uniform(g, 1 - s, 1 + s))
    if cfg.blur_prob > 0 and torch.rand((), generator=g).item() < cfg.blur_prob:
        sigma = _uniform(g, 0.1, 2.0)
        x = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[sigma, sigma])
    return TF.normalize(x.clamp(0, 1), list(cfg.mean), list(cfg.std))


def eval_transform(img: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """Resize the short side to `size`, center crop, normalise (CLIP's eval preprocessing)."""
    x = TF.resize(to_tensor(img), [size], antialias=True)
    x = TF.center_crop(x, [size, size])
    return TF.normalize(x, list(mean), list(std))


def eda(words: list[str], g: torch.Generator, alpha: float = 0.1) -> list[str]:
    """EDA text augmentation (Wei & Zou 2019) without WordNet: random swap and random deletion.

    DeCLIP's augmented caption uses EDA; synonym replacement needs WordNet, which we don't ship, so
    only the two lexicon-free operations are applied (each with strength `alpha`).
    """
    words = list(words)
    if len(words) < 2:
        return words
    n = max(1, int(alpha * len(words)))
    for _ in range(n):  # random swap
        i, j = torch.randint(0, len(words), (2,), generator=g).tolist()
        words[i], words[j] = words[j], words[i]
    kept = [w for w in words if torch.rand((), generator=g).item() >= alpha]  # random deletion
    return kept or [words[int(torch.randint(0, len(words), (), generator=g))]]
