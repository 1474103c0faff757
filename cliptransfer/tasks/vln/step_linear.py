"""Linear layers that every decoder step of a rollout applies, with their weight gradient formed
once per backward instead of once per step.

Why: through autograd, each of the ~35 decisions of a rollout writes a full weight-sized gradient
for every layer of the follower's decoder (LSTM gates 2048 x 1216, the attention and output
projections: ~15 MB at R2R-EnvDrop's sizes) as a (out, rows) @ (rows, in) product with a few
dozen rows, and adds it into the running sum. Those skinny, memory-bound products and the
additions were ~30 % of an A2C rollout's CPU time (bench/vln_train.py). `StepLinear` keeps each
step's input and output gradient instead (rows x in, rows x out) and forms the weight's gradient
once, as one (out, N) @ (N, in) product over all N rows of all steps, when backward reaches the
weight (the same scheme as `attention.FixedContext` for the instruction). Values and the
input's gradient are F.linear's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["StepLinear", "lstm_cell"]


class _WeightSink(torch.autograd.Function):
    """The weight's one node in the graph: every step's product returns no gradient for the
    token, so autograd runs this backward after all of them, and it forms the weight's (and
    the bias's) gradient from the inputs and output gradients they stashed."""

    @staticmethod
    def forward(ctx, weight, bias, stash: list) -> torch.Tensor:
        ctx.stash, ctx.has_bias = stash, bias is not None
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        stash, ctx.stash = ctx.stash, None
        if not stash:
            return None, None, None
        x = torch.cat([x for x, _ in stash])  # (N, in)
        grad_out = torch.cat([g for _, g in stash])  # (N, out)
        stash.clear()
        grad_bias = grad_out.sum(0) if ctx.has_bias else None
        return grad_out.t().mm(x), grad_bias, None  # (out, in), (out,)


class _Product(torch.autograd.Function):
    """F.linear(x, weight, bias) for a weight whose gradient is deferred to `_WeightSink`."""

    @staticmethod
    def forward(ctx, x, token, weight, bias, stash):
        ctx.save_for_backward(x)
        ctx.weight, ctx.stash = weight, stash
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        ctx.stash.append((x, grad_out))
        grad_x = grad_out.mm(ctx.weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class StepLinear:
    """F.linear(x, weight, bias) applied many times (once per decoder step), its weight and
    bias gradients summed over all applications in one product. `weight` (out, in) and `bias`
    (out,) may be parameters or tensors computed from them (their gradient flows on through
    autograd). Without gradients, or under autocast (whose casts the deferred product would
    bypass), it is plain F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self._stash: list = []
        self._token = None
        deferred = torch.is_grad_enabled() and not torch.is_autocast_enabled(weight.device.type)
        if deferred and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            self._token = _WeightSink.apply(weight, bias, self._stash)
            self._weight = weight.detach()
            self._bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) -> (B, out)."""
        if self._token is None or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _Product.apply(x, self._token, self._weight, self._bias, self._stash)


def lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTMCell's update from its summed gate pre-activations (B, 4H) in torch's order
    (input, forget, cell, output) and the cell state c (B, H) -> (h, c)."""
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c
