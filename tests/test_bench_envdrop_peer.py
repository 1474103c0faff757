"""bench/envdrop_peer.py, the peer bench/vln_train.py times against ours: EnvDrop's follower code
on our NavEnv walks the teacher's paths under teacher forcing and trains every module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from vln_helpers import token_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from envdrop_peer import EnvDropFollower  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def small_peer(env) -> EnvDropFollower:
    torch.manual_seed(0)
    return EnvDropFollower(env, 50, env.features.shape[-1], env.tables.view_angles.shape[-1],
                           0, word_embed=16, hidden=32, angle_embed=8)  # fmt: skip


def test_teacher_rollout_reaches_every_goal(world):
    eps, _, env = world
    eps = [e for e in eps if len(e.path) < env.max_steps][:6]
    peer = small_peer(env)
    tokens, lengths = token_batch(len(eps))
    loss, steps = peer.rollout(eps, tokens, lengths.tolist(), "teacher")
    # Teacher forcing: len(path) - 1 moves and a STOP for the longest path, every episode at its
    # goal, a finite imitation loss with a gradient.
    assert steps == max(len(e.path) for e in eps)
    assert env.done and (env.distances() == 0).all()
    assert torch.isfinite(loss) and loss.requires_grad


def test_an_iteration_updates_encoder_decoder_and_critic(world):
    eps, _, env = world
    peer = small_peer(env)
    before = [[p.detach().clone() for p in m.parameters()] for m in peer.models]
    tokens, lengths = token_batch(8)
    lengths = torch.tensor([7, 3, 5, 7, 2, 6, 4, 1])  # unsorted: the peer sorts, as EnvDrop
    steps = peer.iteration(eps[:8], tokens, lengths)
    assert steps >= 2  # at least one decision in each of the two rollouts
    for model, old in zip(peer.models, before, strict=True):
        changed = [not torch.equal(p, q) for p, q in zip(model.parameters(), old, strict=True)]
        assert any(changed), type(model).__name__
        assert all(torch.isfinite(p).all() for p in model.parameters())
