"""tasks.vln.lanes: a training step's rollouts on one or two threads give the same losses,
gradients and RNG state; failures, bf16 autocast and the no-gradient path."""

from __future__ import annotations

import pytest
import torch
from vln_helpers import assert_equal_grads, follower, grad_dict, token_batch

from cliptransfer.nav import NavEnv
from cliptransfer.tasks.vln import rollout as rollout_module
from cliptransfer.tasks.vln.config import RLConfig
from cliptransfer.tasks.vln.lanes import Rollout, run_rollouts
from cliptransfer.tasks.vln.rollout import imitation_and_a2c
from cliptransfer.tasks.vln.task import VLNModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rollouts_on_two_threads_equal_one_thread(world, monkeypatch):
    # tasks.vln.lanes: a step's rollouts (imitation + A2C of the agent and of its no-vision
    # twin, dropout on, actions sampled) on 2 threads give the same losses, terms, gradients
    # and RNG state afterwards as on 1, bit for bit (one intra-op thread per op in both).
    eps, _, env = world
    model = VLNModel(follower(env).train(), follower(env).train())
    tokens, lengths = token_batch(8)
    lanes_used = []
    lane = NavEnv.lane
    monkeypatch.setattr(NavEnv, "lane", lambda self, k: lanes_used.append(k) or lane(self, k))
    previous, runs = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        for threads in (1, 2):
            model.rollout_threads = threads
            torch.manual_seed(5)
            model.zero_grad()
            loss, terms = model.walk(env, eps[:8], tokens, lengths, RLConfig(), 0.5)
            loss.backward()
            grads = grad_dict(model)
            runs.append((loss.detach(), terms, grads, torch.rand(1)))
        assert torch.get_num_threads() == 1  # restored after the threaded part
    finally:
        torch.set_num_threads(previous)
    (loss_1, terms_1, grads_1, rng_1), (loss_2, terms_2, grads_2, rng_2) = runs
    assert 1 in lanes_used  # the second run did use a second thread's environment
    assert torch.equal(loss_1, loss_2) and torch.equal(rng_1, rng_2)
    assert terms_1.keys() == terms_2.keys() == {"ml_loss", "rl_loss", "blind_ml_loss",
                                                "blind_rl_loss"}  # fmt: skip
    for k, v in terms_1.items():
        assert torch.equal(v, terms_2[k]), k
    assert_equal_grads(grads_1, grads_2, "blind.critic.0.weight")


def test_a_failing_rollout_on_a_helper_thread_raises_on_the_caller(world):
    eps, _, env = world
    agent = follower(env).train()

    def fails(env):
        raise ValueError("rollout failed on purpose")

    ok = imitation_and_a2c(agent, eps[:2], *token_batch(2), RLConfig(), 1.0)
    previous = torch.get_num_threads()
    with pytest.raises(ValueError, match="on purpose"):
        run_rollouts([*ok, Rollout(fails, first=True)], env, list(agent.parameters()), 2)
    assert torch.get_num_threads() == previous


def test_rollouts_under_bf16_autocast_run_on_both_threads(world):
    # train.precision=bf16: each lane enters the caller's autocast; losses and gradients are
    # float32 and finite (the critic's bf16 bootstrap value once broke the A2C return).
    eps, _, env = world
    agent = follower(env).train()
    tokens, lengths = token_batch(4)
    for threads in (1, 2):
        agent.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rollouts = imitation_and_a2c(agent, eps[:4], tokens, lengths, RLConfig(), 1.0)
            loss, outputs = run_rollouts(rollouts, env, list(agent.parameters()), threads)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert outputs[1]["rl_loss"].dtype == torch.float32
        assert all(torch.isfinite(p.grad).all() for p in agent.parameters() if p.grad is not None)
        assert agent.lstm.weight_ih.grad.abs().sum() > 0


def test_rollout_lanes_gradients_equal_one_backward_of_the_summed_losses(world, monkeypatch):
    # The lanes' per-rollout gradients, summed, equal autograd's over the summed losses (dropout
    # off and sampling made deterministic, so a plain run draws the same): shared gradient
    # tensors (b_ih + b_hh's two biases) included.
    eps, _, env = world
    monkeypatch.setattr(rollout_module, "sample_actions", lambda probs: probs.argmax(1))
    agent = follower(env).eval()
    tokens, lengths = token_batch(6)
    rollouts = imitation_and_a2c(agent, eps[:6], tokens, lengths, RLConfig(), 0.5)
    loss, _ = run_rollouts(rollouts, env, list(agent.parameters()), 2)
    agent.zero_grad()
    loss.backward()
    mine = grad_dict(agent)
    agent.zero_grad()
    sum(r.run(env)["loss"] for r in rollouts).backward()
    assert mine.keys() == {n for n, p in agent.named_parameters() if p.grad is not None}
    for name, p in agent.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(mine[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_rollouts_without_gradients_just_run(world):
    # No parameter needing a gradient (a frozen agent) or no autograd: the rollouts run in
    # order and return their losses and terms, with no graph.
    eps, _, env = world
    agent = follower(env).train().requires_grad_(False)
    rollouts = imitation_and_a2c(agent, eps[:3], *token_batch(3), RLConfig(), 1.0)
    for threads in (1, 2):
        loss, outputs = run_rollouts(rollouts, env, list(agent.parameters()), threads)
        assert loss.shape == () and not loss.requires_grad and torch.isfinite(loss)
        assert torch.equal(loss, outputs[0]["loss"] + outputs[1]["loss"])
        assert set(outputs[1]) >= {"loss", "rl_loss", "steps", "rows"}


def test_a_scaled_backward_scales_the_gradients_formed_in_forward(world):
    # Each rollout's gradient is formed as soon as it ends (its graph freed then); a backward
    # with d total / d loss != 1 (gradient accumulation divides the loss) scales their sum.
    eps, _, env = world
    agent = follower(env).eval()
    tokens, lengths = token_batch(4)
    grads = []
    for scale in (1.0, 0.25):
        torch.manual_seed(3)
        rollouts = imitation_and_a2c(agent, eps[:4], tokens, lengths, RLConfig(), 0.5)
        loss, outputs = run_rollouts(rollouts, env, list(agent.parameters()), 2)
        assert all(o["loss"].grad_fn is None for o in outputs)
        agent.zero_grad()
        (loss * scale).backward()
        grads.append(grad_dict(agent))
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g * 0.25, rtol=1e-6, atol=0, msg=name)


def test_fp16_autocast_keeps_the_graphs_for_the_loss_scale(world, monkeypatch):
    # Under fp16 autocast a GradScaler multiplies the loss before backward so that small
    # gradients survive in fp16: the rollouts' graphs wait for that backward instead of
    # forming their gradients at scale 1 in forward (fp32 and bf16 form them in forward).
    eps, _, env = world
    agent = follower(env).eval()
    tokens, lengths = token_batch(3)
    calls, grad = [], torch.autograd.grad

    def counted(outputs, *args, **kwargs):  # a rollout's loss (not the encoder's islands)
        if isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
            calls.append(1)
        return grad(outputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    grads = []
    for dtype, scale in ((None, 1.0), (torch.float16, 1.0), (torch.float16, 1024.0)):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            rollouts = imitation_and_a2c(agent, eps[:3], tokens, lengths, RLConfig(), 0.5)
            loss, _ = run_rollouts(rollouts, env, list(agent.parameters()), 2)
        formed_in_forward = len(calls)
        agent.zero_grad()
        (loss * scale).backward()
        assert (formed_in_forward, len(calls)) == ((2, 2) if dtype is None else (0, 2))
        calls.clear()
        grads.append({k: v / scale for k, v in grad_dict(agent).items()})
    assert torch.isfinite(loss)
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[2][name], g, rtol=2e-2, atol=1e-5, msg=name)
