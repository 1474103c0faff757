"""A one-layer bidirectional LSTM over a packed batch, as nn.LSTM computes it, with a backward
that is linear in the sequence length on the CPU.

Why: torch's CPU LSTM over a PackedSequence slices each time step's gates out of the whole
(N, 4H) input projection; the backward of each slice zero-fills an (N, 4H) gradient and adds
it to the running sum, so backward does O(T * N) memory work. For the follower's instructions
(64 x ~35 tokens, 80 at most, 512-d) that made the encoder's backward ~70 % of its cost and the
encoder ~40 % of a training iteration (bench/vln_train.py). Here the projection is split into
time steps once (its backward is one concatenation) and the recurrence is written out: the
same values and gradients (tested against nn.LSTM), ~2x less time forward + backward. On other
devices nn.LSTM (cuDNN) runs as it is.

The two directions are independent: each is an autograd island of its own, and the reverse
one is forked (`forkjoin`), so an idle rollout thread computes it while this one computes the
forward one; the encoder's backward is the last ~25 % of a rollout's backward, where the
longer A2C rollout otherwise runs alone (bench/vln_train.py: -6 to -10 % time per step on
two threads).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from cliptransfer.forkjoin import can_fork, fork
from cliptransfer.tasks.vln.step_linear import StepLinear, lstm_cell

__all__ = ["packed_bilstm"]


def _direction(data: torch.Tensor, sizes: list[int], weights: list[torch.Tensor],
               reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One direction over packed rows (time-major, batch sizes non-increasing). Returns the
    outputs (N, H) in packed order and the final (h, c) (B, H) in the packed (sorted) order."""
    w_ih, w_hh, b_ih, b_hh = weights
    hidden = w_hh.shape[1]
    gates_in = torch.addmm(b_ih + b_hh, data, w_ih.t()).split(sizes)  # T x (B_t, 4H)
    recurrent = StepLinear(w_hh)  # its gradient formed once over all steps, not once per step
    outs: list[torch.Tensor | None] = [None] * len(sizes)
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # forward: sequences as they end
    # A zero initial state, as nn.LSTM's (its product keeps w_hh in the graph for 1-step batches).
    h = c = data.new_zeros(sizes[-1] if reverse else sizes[0], hidden)
    for t in reversed(range(len(sizes))) if reverse else range(len(sizes)):
        size = sizes[t]
        if size > len(h):  # reverse: batches grow backwards in time, new rows start at zero
            h = torch.cat([h, h.new_zeros(size - len(h), hidden)])
            c = torch.cat([c, c.new_zeros(size - len(c), hidden)])
        elif size < len(h):  # forward: the longest sequences come first, the tail rows end
            done.append((h[size:], c[size:]))
            h, c = h[:size], c[:size]
        h, c = lstm_cell(gates_in[t] + recurrent(h), c)
        outs[t] = h
    if reverse:
        return torch.cat(outs), h, c
    done.append((h, c))
    done.reverse()  # the longest sequences (first rows) ended last
    return torch.cat(outs), torch.cat([d[0] for d in done]), torch.cat([d[1] for d in done])


class _Island:
    """One direction's graph, built on leaves of its own (the packed input and the weights), so
    that its backward is one `torch.autograd.grad` call that any thread can run."""

    def __init__(self, data: torch.Tensor, sizes: list[int], weights: list[torch.Tensor],
                 reverse: bool) -> None:  # fmt: skip
        with torch.enable_grad():
            self.data = data.detach().requires_grad_(data.requires_grad)
            self.weights = [w.detach().requires_grad_(w.requires_grad) for w in weights]
            self.outputs = _direction(self.data, sizes, self.weights, reverse)

    def grads(self, grad_outputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
        """The gradients of (data, *weights) from those of (outputs, h, c); the graph goes."""
        inputs = [t for t in (self.data, *self.weights) if t.requires_grad]
        got = iter(torch.autograd.grad(self.outputs, inputs, grad_outputs, allow_unused=True))
        self.outputs = None
        return [next(got) if t.requires_grad else None for t in (self.data, *self.weights)]


class _TwoDirections(torch.autograd.Function):
    """Both directions, each an `_Island`; backward forms the reverse direction's gradients on
    an idle rollout thread if there is one (`forkjoin`) while this thread forms the forward
    one's: the last work of a rollout's backward, halved when the other rollouts are done."""

    @staticmethod
    def forward(ctx, data, sizes, *weights):  # weights: the forward four, then the reverse four
        device = data.device.type
        amp = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

        def reverse_island() -> _Island:  # wherever it runs, under this thread's autocast
            with torch.autocast(device, dtype=amp[1], enabled=amp[0]):
                return _Island(data, sizes, list(weights[4:]), True)

        reverse = fork(reverse_island)
        forward = _Island(data, sizes, list(weights[:4]), False)
        ctx.islands = (forward, reverse.join())
        return tuple(t.detach() for island in ctx.islands for t in island.outputs)

    @staticmethod
    def backward(ctx, *grads):  # those of (out, h, c) forward, then reverse
        forward, reverse = ctx.islands
        ctx.islands = None
        job = fork(lambda: reverse.grads(grads[3:]))
        grad_f = forward.grads(grads[:3])
        grad_r = job.join()
        # Both islands read the same input: it needs a gradient in both or in neither.
        grad_data = None if grad_f[0] is None else grad_f[0] + grad_r[0]
        return (grad_data, None, *grad_f[1:], *grad_r[1:])


def packed_bilstm(
    lstm: nn.LSTM, packed: PackedSequence
) -> tuple[PackedSequence, tuple[torch.Tensor, torch.Tensor]]:
    """`lstm(packed)` for a one-layer bidirectional nn.LSTM with biases: (output, (h_n, c_n)),
    h_n and c_n (2, B, H) in the batch's original order."""
    if not (lstm.bidirectional and lstm.num_layers == 1 and lstm.bias and not lstm.proj_size):
        raise ValueError(f"packed_bilstm: a one-layer bidirectional LSTM with biases, got {lstm}")
    if packed.data.device.type != "cpu":
        return lstm(packed)
    sizes = packed.batch_sizes.tolist()
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    weights = [getattr(lstm, n) for n in names] + [getattr(lstm, n + "_reverse") for n in names]
    inputs = (packed.data, *weights)
    # As islands only beside other rollout threads: alone, the split costs ~4 % of a step for
    # nothing (the results are the same bit for bit either way, tested).
    if can_fork() and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out_f, h_f, c_f, out_r, h_r, c_r = _TwoDirections.apply(packed.data, sizes, *weights)
    else:
        out_f, h_f, c_f = _direction(packed.data, sizes, weights[:4], False)
        out_r, h_r, c_r = _direction(packed.data, sizes, weights[4:], True)
    order = packed.unsorted_indices
    if order is None:
        order = torch.arange(sizes[0])
    h_n = torch.stack([h_f, h_r])[:, order]  # (2, B, H)
    c_n = torch.stack([c_f, c_r])[:, order]
    out = packed._replace(data=torch.cat([out_f, out_r], 1))  # (N, 2H)
    return out, (h_n, c_n)
