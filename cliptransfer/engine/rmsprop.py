"""RMSprop as EnvDrop trains with it: torch.optim.RMSprop's update, bit for bit, lighter to run.

Two differences from `torch.optim.RMSprop`, neither in the arithmetic:
- It does not import `torch._dynamo`. torch.optim's methods import it lazily on their first
  call (`Optimizer.add_param_group`, `zero_grad`, `state_dict`, `load_state_dict` are wrapped
  in `torch._disable_dynamo`, and every `step` in `_use_grad_for_differentiable`), and with it
  Triton and sympy: ~105 MiB of resident memory (bench/vln_train.py) that an eager CPU run
  never uses. Here the same methods are bound unwrapped, so nothing changes but the import.
- The square root of the running average is written into one reused scratch buffer instead of
  a fresh tensor per parameter: no per-step allocation as large as the largest weight.

The update is torch's single-tensor one (what torch.optim.RMSprop runs on CPU tensors):
    v = alpha * v + (1 - alpha) * g^2;   p -= lr * g / (sqrt(v) + eps)
with `g = grad + weight_decay * p` when weight decay is on. The state (`step`, `square_avg`)
and the param-group keys are torch's, so checkpoints load in either direction.
Momentum, `centered`, `maximize` and sparse or complex parameters are not implemented (an
error says so); EnvDrop uses none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


def _unwrapped(method: Callable) -> Callable:
    # torch._disable_dynamo keeps the original under functools.wraps' __wrapped__; a torch
    # without it keeps the inherited method (correct, it just imports torch._dynamo).
    return getattr(method, "__wrapped__", method)


class RMSprop(Optimizer):
    add_param_group = _unwrapped(Optimizer.add_param_group)
    zero_grad = _unwrapped(Optimizer.zero_grad)
    state_dict = _unwrapped(Optimizer.state_dict)
    load_state_dict = _unwrapped(Optimizer.load_state_dict)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"RMSprop: invalid lr {lr}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"RMSprop: invalid alpha {alpha} (0 <= alpha <= 1)")
        if not eps >= 0:
            raise ValueError(f"RMSprop: invalid eps {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"RMSprop: invalid weight_decay {weight_decay}")
        # torch.optim.RMSprop's group keys, so either optimizer loads the other's state_dict.
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=0,
                        centered=False, capturable=False, foreach=None, maximize=False,
                        differentiable=False)  # fmt: skip
        super().__init__(params, defaults)
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def _sqrt_into_scratch(self, square_avg: torch.Tensor) -> torch.Tensor:
        key = (square_avg.dtype, square_avg.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < square_avg.numel():
            buf = self._scratch[key] = torch.empty(
                square_avg.numel(), dtype=square_avg.dtype, device=square_avg.device
            )
        out = buf[: square_avg.numel()].view(square_avg.shape)
        return torch.sqrt(square_avg, out=out)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if any(group.get(k) for k in ("momentum", "centered", "maximize")):
                raise ValueError(
                    "cliptransfer RMSprop implements neither momentum, centered nor maximize; "
                    "use torch.optim.RMSprop for those"
                )
            lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("cliptransfer RMSprop: sparse or complex parameters are "
                                       "not supported; use torch.optim.RMSprop")  # fmt: skip
                state = self.state[p]
                if not state:  # as torch: a scalar step counter, a zero running average
                    double = torch.get_default_dtype() == torch.float64
                    state["step"] = torch.zeros(
                        (), dtype=torch.float64 if double else torch.float32
                    )
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                square_avg = state["square_avg"]
                square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
                avg = self._sqrt_into_scratch(square_avg).add_(eps)
                p.addcdiv_(grad, avg, value=-lr)
        return loss
