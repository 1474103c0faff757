"""Dropout with the mask drawn by a fast generator on the CPU (the navigation agents, the scan head).

nn.Dropout's CPU kernel draws one Bernoulli variate per element from torch's Mersenne Twister:
42 ms for the follower's (64, 80, 512) instruction context and 6 ms for the (64, 36, 512) view
features, one thread, which made dropout ~15 % of a training step (bench/vln_train.py). Here one
draw from torch's generator seeds numpy's SFC64, whose raw 64-bit words give the uniforms,
compared in numpy: ~4x less time for the same distribution (keep with probability 1 - p to
2^-32, kept values scaled by 1 / (1 - p)); p = 0.5 (EnvDrop's dropout) takes one bit per value
instead of 32, its draws ~3x faster again. Runs stay deterministic and resumable: everything
follows from torch's RNG state. On other devices torch draws the mask.

`local_generator` gives the calling thread its own generator for these draws: work run on
several threads at once (the follower's rollouts) then draws the same numbers on any thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["Dropout", "current_generator", "draw_seed", "dropout", "dropout_mask",
           "local_generator", "masked"]  # fmt: skip

_local = threading.local()


@contextmanager
def local_generator(generator: torch.Generator) -> Iterator[torch.Generator]:
    """Within the block, this thread's masks and `draw_seed` draw from `generator` (a CPU
    generator) instead of torch's default one."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield generator
    finally:
        _local.generator = previous


def current_generator() -> torch.Generator | None:
    """The calling thread's `local_generator`, or None (torch's default generator)."""
    return getattr(_local, "generator", None)


def draw_seed() -> int:
    """One draw from the thread's generator (`local_generator`, else torch's default one), to
    seed a mask (`dropout_mask(seed=...)`)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=current_generator()))


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int | None = None) -> torch.Tensor:  # fmt: skip
    """A dropout mask of `shape`: 1 / (1 - p) with probability 1 - p, else 0. `seed` (from
    `draw_seed`) makes the mask a function of it, to rebuild it later (a recomputed forward);
    without, it is drawn from the thread's generator (`local_generator`, else torch's)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability {p}: must be in [0, 1)")
    device = torch.device(device)
    if device.type != "cpu":
        if seed is None and current_generator() is not None:
            seed = draw_seed()
        gen = None if seed is None else torch.Generator(device).manual_seed(seed)
        return (torch.rand(shape, device=device, generator=gen) >= p).to(dtype) / (1.0 - p)
    n = math.prod(shape)
    mask = _draw_mask(np.random.SFC64(draw_seed() if seed is None else seed), n, p)
    return torch.from_numpy(mask).view(shape).to(dtype)


# p = 0.5: the mask values (0 or 2) of each byte's 8 bits, low bit first: (256, 8) float32.
_HALF_MASKS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
_HALF_MASKS = _HALF_MASKS.astype(np.float32) * np.float32(2.0)


def _values_per_word(p: float) -> int:
    """Mask values per 64-bit word of the stream: 64 at p = 0.5 (one bit each), else 2."""
    return 64 if p == 0.5 else 2


def _draw_mask(stream: np.random.SFC64, n: int, p: float) -> np.ndarray:
    """The next n mask values (float32, 1 / (1 - p) or 0) of an SFC64 stream. p = 0.5: one bit
    per value, set = kept; other p: each word gives two int32 uniforms on [-2^31, 2^31),
    P(x >= t) = 1 - round(p 2^32) / 2^32."""
    words = stream.random_raw(-(-n // _values_per_word(p)))
    if p == 0.5:  # each byte's 8 mask values (low bit first) looked up at once
        return np.take(_HALF_MASKS, words.view(np.uint8), axis=0).reshape(-1)[:n]
    keep = words.view(np.int32)[:n] >= np.int32(round(p * 2**32) - 2**31)
    return np.multiply(keep, np.float32(1.0 / (1.0 - p)), dtype=np.float32)


def masked(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * dropout_mask(x.shape, p, seed=seed) as a new tensor, bit for bit, with no
    x-sized temporaries on the CPU: the mask is drawn and applied a few rows at a time (one
    SFC64 stream, so the same mask). Why: the follower's views (B, 36, D) take this product
    every decision, and the draw and the float mask were each a ~5 MB block (batch 64, D 512)
    written and read again every step: a few rows at a time they stay in cache, ~6 % less
    time per training step on two threads (bench/vln_train.py, in-process A/B)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability {p}: must be in [0, 1)")
    whole_words = x.dim() >= 2 and x[0].numel() % _values_per_word(p) == 0
    if x.device.type != "cpu" or not whole_words or x.requires_grad:
        return x * dropout_mask(tuple(x.shape), p, x.device, x.dtype, seed)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    stream = np.random.SFC64(seed)
    rows = max(1, (1 << 17) // max(1, x[0].numel()))  # ~0.5 MB of draws at a time
    for start in range(0, len(x), rows):  # whole words: the stream continues word for word
        part = x[start : start + rows]
        mask = torch.from_numpy(_draw_mask(stream, part.numel(), p)).view(part.shape)
        torch.mul(part, mask.to(x.dtype), out=out[start : start + rows])
    return out


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """nn.functional.dropout(x, p, training), its mask from `dropout_mask`."""
    if not training or p == 0:
        return x
    return x * dropout_mask(tuple(x.shape), p, x.device, x.dtype)


class Dropout(nn.Module):
    """nn.Dropout with `dropout_mask`'s faster CPU draw (no parameters, same state dict)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p}: must be in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
