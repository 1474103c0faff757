"""Global batches split over processes and micro-batches: the same samples, in the same order,
whatever the number of processes.

An epoch is a permutation of the dataset that depends only on (seed, epoch). Step k trains on the
global batch perm[k*B:(k+1)*B]; it is cut into `grad_accum` contiguous micro-batches, and each of
those into one contiguous slice per process. Each slice carries the weight n_slice * P / n_micro
/ grad_accum, so the sum over micro-batches of the per-process mean losses times their weights,
averaged over processes (DDP), is exactly the mean loss over the global batch. An uneven last
batch is split as evenly as possible; a process left with nothing gets one sample at weight 0
(it must still take part in the gradient all-reduce) which then counts for nothing. With
`drop_last` (contrastive losses, which gather equal batches) the last partial batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["MicroBatch", "epoch_permutation", "plan_epoch", "steps_per_epoch"]


@dataclass(frozen=True)
class MicroBatch:
    indices: list[int]  # dataset indices this process loads
    weight: float  # the loss multiplier (1.0 for an even split without accumulation)
    global_size: int  # samples in the whole global batch of this step


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous, as even as possible, earlier parts one longer."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (i < r)
        out.append(items[start:end])
        start = end
    return out


def plan_epoch(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
    drop_last: bool = False,
    shuffle: bool = True,
    start_step: int = 0,
) -> Iterator[list[MicroBatch]]:
    """This process's micro-batches of each step of `epoch`, from `start_step` on."""
    if n == 0:
        raise ValueError("the training set is empty")
    perm = epoch_permutation(n, seed, epoch, shuffle)
    for step in range(start_step, steps_per_epoch(n, batch_size, drop_last)):
        batch = perm[step * batch_size : (step + 1) * batch_size]
        micro = []
        for part in _split(batch, grad_accum):
            if not part:  # a last batch smaller than grad_accum: fewer micro-batches
                continue
            mine = _split(part, world_size)[rank]
            if mine:
                micro.append(MicroBatch(mine, len(mine) * world_size / len(batch), len(batch)))
            else:
                micro.append(MicroBatch(part[:1], 0.0, len(batch)))
        yield micro
