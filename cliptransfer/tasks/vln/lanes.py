"""A training step's rollouts run side by side on CPU threads, with a result that does not depend
on how many threads ran them.

Why: one follower update runs several independent rollouts (imitation and A2C, of the agent and
of its no-vision twin, on the real and on the augmented batch). A rollout is a chain of ~35
decisions of small products and element-wise ops, and a second intra-op thread barely speeds it
up: much of a decision is serial (Python, dispatch, autograd bookkeeping) and the rest waits at
OpenMP barriers (bench/vln_train.py). Two rollouts on two threads with one intra-op thread each
overlap all of it: torch releases the GIL inside its ops.

Determinism: each rollout draws its random numbers (dropout masks, sampled actions) from its own
generator (`dropout.local_generator`), seeded in the rollouts' order from torch's default
generator before any of them runs; each rollout's gradient is formed on its own
(torch.autograd.grad) and the gradients are summed in the rollouts' order. So 1 or 2 threads
give the same losses and gradients (at the same intra-op thread count per op), and a resumed run
reproduces the uninterrupted one. To autograd (and DDP) the rollouts are one node whose
backward returns every parameter's gradient.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from cliptransfer.dropout import draw_seed, local_generator
from cliptransfer.nav.env import NavEnv

__all__ = ["Rollout", "run_rollouts"]


@dataclass
class Rollout:
    """One rollout of a training step: `run(env)` -> {"loss": scalar, **terms}."""

    run: Callable[[NavEnv], dict]
    first: bool = False  # start it before the others (the longer A2C rollouts: balance)


class _Plan:
    """The rollouts of one step, their outputs (forward) and their gradients (backward)."""

    def __init__(self, rollouts: Sequence[Rollout], env: NavEnv, params: list[torch.Tensor],
                 threads: int) -> None:  # fmt: skip
        self.rollouts, self.env, self.params = list(rollouts), env, params
        self.threads = max(1, min(threads, len(self.rollouts)))
        self.seeds = [draw_seed() for _ in self.rollouts]  # in order, whatever runs them
        self.outputs: list[dict | None] = [None] * len(self.rollouts)
        device = env.features.device.type  # where the rollouts compute
        self.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )

    def _lanes(self, work: Callable[[int, NavEnv], None]) -> None:
        """work(j, env) for every rollout j, the `first` ones first, on `threads` threads
        (each with one intra-op thread and its own environment)."""
        order = sorted(range(len(self.rollouts)), key=lambda j: not self.rollouts[j].first)
        if self.threads == 1:
            for j in order:
                work(j, self.env)
            return
        pending, lock, errors = collections.deque(order), threading.Lock(), []

        def lane(k: int) -> None:
            torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
            env = self.env.lane(k)
            while True:
                with lock:
                    if not pending or errors:
                        return
                    j = pending.popleft()
                try:
                    work(j, env)
                except BaseException as e:  # re-raised on the calling thread
                    errors.append(e)
                    return

        previous = torch.get_num_threads()
        helpers = [threading.Thread(target=lane, args=(k,), daemon=True)
                   for k in range(1, self.threads)]  # fmt: skip
        try:
            for t in helpers:
                t.start()
            lane(0)
        finally:
            for t in helpers:
                t.join()
            torch.set_num_threads(previous)
        if errors:
            raise errors[0]

    def forward(self, record: bool = True) -> list[dict]:
        """Run every rollout, recording its graph when `record`."""
        device, enabled, dtype = self.autocast

        def work(j: int, env: NavEnv) -> None:
            generator = torch.Generator().manual_seed(self.seeds[j])
            amp = torch.autocast(device, dtype=dtype) if enabled else nullcontext()
            with torch.set_grad_enabled(record), amp, local_generator(generator):
                self.outputs[j] = self.rollouts[j].run(env)

        self._lanes(work)
        return self.outputs

    def backward(self, grad: torch.Tensor) -> list[torch.Tensor | None]:
        """grad (J,): d total / d each rollout's loss -> every parameter's gradient."""
        grads: list = [None] * len(self.rollouts)

        def work(j: int, _env: NavEnv) -> None:
            loss, self.outputs[j]["loss"] = self.outputs[j]["loss"], None  # its graph goes
            if loss.requires_grad:
                grads[j] = torch.autograd.grad(loss, self.params, grad[j], allow_unused=True)

        self._lanes(work)
        total: list[torch.Tensor | None] = [None] * len(self.params)
        for per_param in grads:  # the rollouts' order: the same sum on any number of threads
            for i, g in enumerate(per_param or ()):
                if g is not None:
                    total[i] = g if total[i] is None else total[i] + g
        return total


class _Rollouts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *params: torch.Tensor) -> torch.Tensor:
        outputs = plan.forward()
        ctx.plan = plan
        return torch.stack([o["loss"].detach().float() for o in outputs])  # (J,)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan, ctx.plan = ctx.plan, None
        return (None, *plan.backward(grad))


def run_rollouts(rollouts: Sequence[Rollout], env: NavEnv, params: Sequence[torch.Tensor],
                 threads: int = 1) -> tuple[torch.Tensor, list[dict]]:  # fmt: skip
    """Run `rollouts` (each in `env` or, on other threads, in an environment over the same
    tables) on up to `threads` threads. Returns (their losses (J,), whose backward gives
    `params` every rollout's gradient; their outputs without "loss"). Without gradients (or no
    parameter that needs one) they just run, in order."""
    params = [p for p in params if p.requires_grad]
    plan = _Plan(rollouts, env, params, threads)
    if not params or not torch.is_grad_enabled():
        outputs = plan.forward(record=False)
        losses = torch.stack([o.pop("loss").float() for o in outputs])
        return losses, outputs
    losses = _Rollouts.apply(plan, *params)
    return losses, [{k: v for k, v in o.items() if k != "loss"} for o in plan.outputs]
