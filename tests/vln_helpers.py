"""Helpers of the navigation tests (tests/test_vln_*.py): a tiny follower, instruction token
batches, and a model's gradients by parameter name."""

from __future__ import annotations

import torch
from torch import nn

from cliptransfer.nav import NavEnv
from cliptransfer.tasks.vln.agent import Follower, FollowerConfig


def follower(env: NavEnv, vocab: int = 50) -> Follower:
    """A small follower for `env`'s features, the same weights at every call."""
    torch.manual_seed(0)
    cfg = FollowerConfig(word_embed=16, hidden=32, angle_embed=8)
    return Follower(cfg, vocab, env.features.shape[-1], env.tables.view_angles.shape[-1])


def token_batch(n: int, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n, length), lengths (n,)): the same random instructions at every call."""
    tokens = torch.randint(1, 50, (n, length), generator=torch.Generator().manual_seed(1))
    return tokens, torch.full((n,), length)


def grad_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter gradient of `model`, by name (parameters without one left out)."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_equal_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], named: str) -> None:
    """`grad_dict`s with the same parameters, `named` among them, bit for bit equal."""
    assert a.keys() == b.keys() and named in a
    for name, grad in a.items():
        assert torch.equal(grad, b[name]), name
