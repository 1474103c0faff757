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

A thread whose rollouts are done lends itself to the others' forked sub-jobs (`forkjoin`: the
instruction encoder's reverse direction), so the unequal rollouts (A2C walks longer than
imitation) leave less idle time at the end of a step.

Memory: a rollout forms its gradient as soon as it ends, on its lane, and its graph (~100 MB at
R2R-EnvDrop's sizes) is freed then, so at most one graph per lane is alive instead of every
rollout's until the step's backward; that backward only hands over the sum (scaled when the
loss was). Under fp16 autocast the graphs wait for backward instead: a GradScaler's loss scale
must reach the fp16 gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from cliptransfer.dropout import draw_seed, local_generator
from cliptransfer.forkjoin import run_tasks
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
        self.total: list[torch.Tensor | None] = [None] * len(params)  # the summed gradients
        self._ready: dict[int, tuple | None] = {}  # rollouts' gradients waiting for their turn
        self._added = 0  # the rollouts summed so far (in order)
        self._lock = threading.Lock()
        self.eager = False
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
        envs = [self.env] + [self.env.lane(k) for k in range(1, self.threads)]
        previous = torch.get_num_threads()
        try:  # OpenMP's thread count is per calling thread
            run_tasks(order, self.threads, lambda j, k: work(j, envs[k]),
                      setup=lambda k: torch.set_num_threads(1))  # fmt: skip
        finally:
            torch.set_num_threads(previous)

    def forward(self, record: bool = True) -> torch.Tensor:
        """Run every rollout; with `record`, form its gradient right after it (graphs are
        freed as soon as they are used: one per lane at a time) and add it to the running
        sum in the rollouts' order. Returns the losses' sum (their order too)."""
        device, enabled, dtype = self.autocast
        # fp16 needs the loss scale (GradScaler) through backward: those graphs stay until then.
        self.eager = record and not (enabled and dtype == torch.float16)

        def work(j: int, env: NavEnv) -> None:
            generator = torch.Generator().manual_seed(self.seeds[j])
            amp = torch.autocast(device, dtype=dtype) if enabled else nullcontext()
            with torch.set_grad_enabled(record), amp, local_generator(generator):
                out = self.rollouts[j].run(env)
            if self.eager:
                loss, out["loss"] = out["loss"], out["loss"].detach()
                grads = None
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                self._add(j, grads)
            self.outputs[j] = out

        self._lanes(work)
        return torch.stack([o["loss"].detach().float() for o in self.outputs]).sum()

    def backward(self, grad: torch.Tensor) -> list[torch.Tensor | None]:
        """grad (): d total / d the losses' sum -> every parameter's gradient."""
        if self.eager:
            total, self.total = self.total, []
            if float(grad) == 1.0:  # the usual case: exactly the gradients formed in forward
                return total
            return [None if g is None else g * grad.to(g.dtype) for g in total]

        def work(j: int, _env: NavEnv) -> None:
            loss, self.outputs[j]["loss"] = self.outputs[j]["loss"], None  # its graph goes
            grads = None
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, self.params, grad, allow_unused=True)
            self._add(j, grads)

        self._lanes(work)
        total, self.total = self.total, []
        return total

    def _add(self, j: int, grads: tuple | None) -> None:
        """Rollout j's gradients into the sum, in the rollouts' order whichever thread ends
        which rollout first: the same sum on any number of threads."""
        with self._lock:
            self._ready[j] = grads
            while self._added in self._ready:
                for i, g in enumerate(self._ready.pop(self._added) or ()):
                    if g is not None:
                        self.total[i] = g if self.total[i] is None else self.total[i] + g
                self._added += 1


class _Rollouts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *params: torch.Tensor) -> torch.Tensor:
        ctx.plan = plan
        return plan.forward()  # ()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan, ctx.plan = ctx.plan, None
        return (None, *plan.backward(grad))


def run_rollouts(rollouts: Sequence[Rollout], env: NavEnv, params: Sequence[torch.Tensor],
                 threads: int = 1) -> tuple[torch.Tensor, list[dict]]:  # fmt: skip
    """Run `rollouts` (each in `env` or, on other threads, in an environment over the same
    tables) on up to `threads` threads. Returns (the sum of their losses (), whose backward
    gives `params` the sum of every rollout's gradient; their outputs, "loss" detached).
    Without gradients (or no parameter that needs one) they just run, in order."""
    params = [p for p in params if p.requires_grad]
    plan = _Plan(rollouts, env, params, threads)
    if not params or not torch.is_grad_enabled():
        return plan.forward(record=False), plan.outputs
    total = _Rollouts.apply(plan, *params)
    # Copies: under fp16 the plan keeps the graphs (the losses) for backward.
    return total, [{**o, "loss": o["loss"].detach()} for o in plan.outputs]
