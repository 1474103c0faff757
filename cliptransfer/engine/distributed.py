"""Rank/world helpers and all-gather with gradients.

Every helper is a no-op when torch.distributed is unavailable, not initialised, or the world has
one process, so the same loss code runs under `python script.py` and `accelerate launch`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "set_cpu_threads",
    "gather_no_grad",
    "gather_with_grad",
    "global_mean",
    "is_distributed",
    "reduce_sum",
    "world_info",
]


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def set_cpu_threads(device: torch.device, requested: int = 0, local_processes: int = 1) -> int:
    """Set torch's intra-op threads for a CPU run and return the count.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless told `--num_cpu_threads_per_process`,
    which leaves a single-process CPU run on one core. 0 = the machine's cores shared evenly by
    this node's processes; a positive `requested` is used as given. GPU runs are left alone.
    """
    if device.type != "cpu" and not requested:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", local_processes) or 1)
    n = requested or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(n)
    return n


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # gloo has no reduce-scatter: all-reduce the whole gradient and keep our block.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(world, dim=0)[rank].contiguous()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from all ranks in rank order -> (world*B, ...), keeping gradients.

    The backward pass sums the incoming gradient over ranks (reduce-scatter), so each rank's
    features receive the gradient of every rank's loss. With DDP's gradient averaging this makes
    the per-rank "local rows x gathered columns" loss exactly equal to the global loss.
    Every rank must pass the same shape (use drop_last=True in the sampler).
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from all ranks in rank order -> (world*B, ...), without gradients."""
    if not is_distributed():
        return x.detach()
    x = x.detach().contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


@torch.no_grad()
def reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over ranks (a new detached tensor; `x` itself is not modified)."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def global_mean(total: torch.Tensor, count: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """A loss averaged over a number of items that differs per rank (masked tokens, matched
    pairs): this rank's sum `total` over its `count` items, divided by the count over all ranks
    times the world size, so DDP's gradient mean is the exact mean over the global batch. With
    no item on any rank the loss is 0, built from `graph` so backward still works."""
    _, world = world_info()
    count = reduce_sum(count)
    if count.item() == 0:
        return graph.sum() * 0.0
    return total * world / count.to(total.dtype)
