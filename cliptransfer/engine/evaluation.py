"""Evaluation across processes and the run's resource report."""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

__all__ = ["peak_memory", "predict"]


@torch.no_grad()
def predict(
    accelerator: Accelerator,
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    step: Callable[[nn.Module, dict[str, Any]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Run `step(model, batch) -> {name: (B, ...) tensor}` over a prepared loader and gather the
    outputs of every process, in order and without the duplicates that pad uneven shards."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        with accelerator.autocast():
            out = step(model, batch)
        out = accelerator.gather_for_metrics({k: v.contiguous() for k, v in out.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(v.cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this process: GPU `max_memory_allocated`, or CPU `ru_maxrss` (MiB)."""
    if device.type == "cuda":
        return {
            "kind": "cuda_max_memory_allocated",
            "mib": torch.cuda.max_memory_allocated() / 2**20,
        }
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kind": "cpu_ru_maxrss", "mib": kib / 1024}
