"""EnvDrop's soft-dot attention, and the same attention over a context that every decoder step
reads (the encoded instruction) with its gradient summed over the steps in one product.

Why the second form: the follower attends over the (B, L, H) instruction context at each of
~35 decisions. Through autograd, every step's backward writes a (B, L, H) context gradient (a
rank-2 product) and adds it into the running sum: at batch 64, 80 tokens, 512-d that is ~60 MB
of memory traffic per step, which made the text attention ~45 % of a CPU training step
(bench/vln_train.py). `FixedContext` keeps each step's two rank-1 factor pairs instead (a few
KB) and forms the whole gradient once, as one (B, L, 2T) @ (B, 2T, H) product, when backward
reaches the context. Forward and the query's gradient are the same matrix-vector products as
EnvDrop's `bmm`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FixedContext", "SoftDotAttention", "VisualContext", "matvec"]


class SoftDotAttention(nn.Module):
    """EnvDrop's SoftDotAttention: query -> Linear -> dot with the context, softmax over the
    unmasked positions; returns (weighted context, weights) or the raw logits."""

    def __init__(self, query_dim: int, ctx_dim: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(query_dim, ctx_dim, bias=False)

    def logits(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.linear_in(h)
        if context.requires_grad:
            # Multiply-and-sum: a (B, L, C) @ (B, C, 1) bmm's context gradient is a K=1 outer
            # product, which CPU BLAS ran ~5x slower than this (bench/vln_train.py).
            return (context * q.unsqueeze(1)).sum(-1)  # (B, L)
        # A constant context: one matrix-vector product, no product tensor is stored.
        return matvec(context.to(q.dtype), q)  # (B, L)

    def forward(self, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None):
        logit = self.logits(h, context)
        if mask is not None:
            logit = logit.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(logit, dim=1)
        if context.requires_grad:
            return (attn.unsqueeze(2) * context).sum(1), attn  # (B, C), (B, L)
        weighted = torch.bmm(attn.unsqueeze(1).to(context.dtype), context).squeeze(1)
        return weighted, attn  # (B, C), (B, L)


def matvec(context: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """context (B, L, C) @ v (B, C) -> (B, L), as (B, 1, C) @ (B, C, L): MKL runs this form
    ~10x faster on the CPU than (B, L, C) @ (B, C, 1) (0.13 vs 1.5 ms at 64 x 36 x 512, one
    thread), and its gradient for v is the fast form too."""
    return torch.bmm(v.unsqueeze(1), context.transpose(1, 2)).squeeze(1)


@dataclass
class VisualContext:
    """The (B, L, D + A) context [visual * scale ; angle] that the follower attends over (the
    36 views, or the candidates), kept as its parts: `visual` (B, L, D), or None for all zero
    (the "no vision" ablation); `scale` None or a (B, D) channel mask (environmental dropout);
    `angle` (B, L, A). The scale goes on the query and on the (B, D) result instead of a pass
    over the views, and there is no concatenation: backward keeps only `visual`."""

    visual: torch.Tensor | None
    angle: torch.Tensor
    visual_dim: int
    scale: torch.Tensor | None = None

    def logits(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, D + A) -> context @ q (B, L)."""
        d = self.visual_dim
        out = matvec(self.angle, q[:, d:])
        if self.visual is not None:
            q_visual = q[:, :d] if self.scale is None else q[:, :d] * self.scale
            out = out + matvec(self.visual, q_visual)
        return out

    def weighted(self, attn: torch.Tensor) -> torch.Tensor:
        """attn (B, L) -> attn @ context (B, D + A)."""
        a = attn.unsqueeze(1)
        angle = torch.bmm(a, self.angle).squeeze(1)
        if self.visual is None:
            return torch.cat([angle.new_zeros(len(angle), self.visual_dim), angle], -1)
        visual = torch.bmm(a, self.visual).squeeze(1)
        return torch.cat([visual if self.scale is None else visual * self.scale, angle], -1)

    def dense(self) -> torch.Tensor:
        """The context itself (B, L, D + A) (tests, reference)."""
        b, n = self.angle.shape[:2]
        if self.visual is None:
            visual = self.angle.new_zeros(b, n, self.visual_dim)
        else:
            visual = self.visual if self.scale is None else self.visual * self.scale.unsqueeze(1)
        return torch.cat([visual, self.angle], -1)


def _masked_attention(context: torch.Tensor, q: torch.Tensor, mask: torch.Tensor):
    """softmax(context @ q over the unmasked positions) @ context -> (weighted (B, C), attention
    (B, L)), without autograd bookkeeping for the context."""
    attn = torch.softmax(matvec(context, q).masked_fill(~mask, float("-inf")), dim=1)
    return torch.bmm(attn.unsqueeze(1), context).squeeze(1), attn


class _Sink(torch.autograd.Function):
    """The context's one node in the graph: every step's attention returns no gradient for the
    token, so autograd runs this backward after all of them, and it forms the context's
    gradient from the factors they stashed."""

    @staticmethod
    def forward(ctx, context: torch.Tensor, stash: list) -> torch.Tensor:
        ctx.stash, ctx.batch = stash, context.shape[0]
        return context.new_zeros(())

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        stash, ctx.stash = ctx.stash, None
        if not stash:
            return None, None

        def full(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            # A step that read some rows only (FixedContext.select): zero for the others.
            if rows is None:
                return t
            return t.new_zeros((ctx.batch, *t.shape[1:])).index_copy_(0, rows, t)

        left = torch.stack([full(t, rows) for pair, _, rows in stash for t in pair], 2)
        right = torch.stack([full(t, rows) for _, pair, rows in stash for t in pair], 1)
        # left (B, L, 2T), right (B, 2T, C)
        stash.clear()
        return torch.bmm(left, right), None  # (B, L, C)


class _Attend(torch.autograd.Function):
    """softmax(masked context @ q) @ context for a context whose gradient is deferred to
    `_Sink`. Returns the weighted context (B, C); backward gives q's gradient and stashes the
    two rank-1 terms of the context's: d logits x q and attention x d weighted, with `rows`
    (the full batch's rows that `context` holds, None for all)."""

    @staticmethod
    def forward(ctx, q, token, context, mask, stash, rows):  # q (B, C), context (B, L, C)
        weighted, attn = _masked_attention(context, q, mask)
        ctx.save_for_backward(q, attn)
        ctx.context, ctx.stash, ctx.rows = context, stash, rows
        return weighted

    @staticmethod
    def backward(ctx, grad_out):
        q, attn = ctx.saved_tensors
        context = ctx.context
        grad_attn = matvec(context, grad_out)  # (B, L)
        grad_logit = attn * (grad_attn - (attn * grad_attn).sum(1, keepdim=True))  # softmax'
        grad_q = torch.bmm(grad_logit.unsqueeze(1), context).squeeze(1)  # (B, C)
        ctx.stash.append(((grad_logit, attn), (q, grad_out), ctx.rows))
        return grad_q, None, None, None, None, None


class FixedContext:
    """A (B, L, C) context with its (B, L) mask, attended by many queries (one per decoder
    step) through `attend(linear_in(h))`. Values and gradients equal the plain
    attention's (up to summation order); the context's gradient is formed once per backward."""

    def __init__(self, context: torch.Tensor, mask: torch.Tensor) -> None:
        self.context, self.mask = context, mask
        # Attended in at least float32 (see `attend`): a bf16 context under autocast is cast once.
        self._detached = context.detach().to(torch.promote_types(context.dtype, torch.float32))
        self._stash: list = []
        self._token = _Sink.apply(context, self._stash) if context.requires_grad else None
        self._rows: torch.Tensor | None = None  # the full batch's rows held (None: all)

    def select(self, keep: torch.Tensor) -> FixedContext:
        """The rows `keep` (positions in this context) as a context over the same instruction
        batch: attention reads only them (a rollout that stops computing ended episodes), and
        the context's gradient is still formed once, for the whole batch."""
        sub = FixedContext.__new__(FixedContext)
        sub.context, sub._stash, sub._token = self.context, self._stash, self._token
        sub._detached = self._detached.index_select(0, keep)
        sub.mask = self.mask.index_select(0, keep)
        sub._rows = keep if self._rows is None else self._rows.index_select(0, keep)
        return sub

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, C) -> the attention-weighted context (B, C), in float32 or wider."""
        with torch.autocast(q.device.type, enabled=False):  # bandwidth-bound: no cast copies
            context = self._detached
            q = q.to(context.dtype)
            if self._token is None or not torch.is_grad_enabled():
                return _masked_attention(context, q, self.mask)[0]
            return _Attend.apply(q, self._token, context, self.mask, self._stash, self._rows)
