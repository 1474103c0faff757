"""cliptransfer's RMSprop: torch.optim.RMSprop's update bit for bit, state dicts that load in both
directions, and no torch._dynamo import (checked in a child process: this session has it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cliptransfer.engine.rmsprop import RMSprop


def make_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(7, 5, generator=g)),
        torch.nn.Parameter(torch.randn(5, 3, generator=g).t()),  # not contiguous
        torch.nn.Parameter(torch.randn(11, generator=g)),
        torch.nn.Parameter(torch.randn(2, generator=g)),  # never gets a gradient
    ]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=g) * (step + 1)


def run(opt_cls, params, steps: range, **kw) -> torch.optim.Optimizer:
    opt = opt_cls(params, **kw)
    for s in steps:
        set_grads(params, s)
        opt.step()
    return opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_update_is_torchs_bit_for_bit(weight_decay):
    ours, theirs = make_params(0), make_params(0)
    kw = dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=weight_decay)
    o = run(RMSprop, ours, range(6), **kw)
    t = run(torch.optim.RMSprop, theirs, range(6), foreach=False, **kw)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ours[3], make_params(0)[3])  # no gradient: untouched, no state
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        assert torch.equal(o.state[a]["square_avg"], t.state[b]["square_avg"])
        assert o.state[a]["step"].dtype == t.state[b]["step"].dtype
        assert o.state[a]["step"].item() == t.state[b]["step"].item() == 6
    assert ours[3] not in o.state


def test_first_step_by_hand():
    # v = (1 - alpha) g^2; p -= lr * g / (sqrt(v) + eps)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, -4.0])
    RMSprop([p], lr=0.1, alpha=0.75, eps=0.0).step()
    # sqrt(0.25 * 0.25) = 0.25 -> 1 - 0.1 * 2; sqrt(0.25 * 16) = 2 -> -2 + 0.1 * 2
    assert p.tolist() == pytest.approx([0.8, -1.8], abs=1e-7)


@pytest.mark.parametrize("first", [RMSprop, torch.optim.RMSprop])
def test_state_dicts_load_in_both_directions(first):
    second = torch.optim.RMSprop if first is RMSprop else RMSprop
    a, b, ref = make_params(1), make_params(1), make_params(1)
    kw = dict(lr=1e-3, alpha=0.95)
    sd = run(first, a, range(3), **kw).state_dict()
    for pa, pb in zip(a, b, strict=True):
        pb.data.copy_(pa.data)
    opt = second(b, **kw)
    opt.load_state_dict(sd)
    for s in range(3, 5):
        set_grads(b, s)
        opt.step()
    run(torch.optim.RMSprop, ref, range(5), **kw)  # uninterrupted
    for pb, pr in zip(b, ref, strict=True):
        assert torch.equal(pb, pr)


def test_unsupported_options_are_refused():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = RMSprop([p])
    opt.param_groups[0]["momentum"] = 0.9  # e.g. loaded from a torch.optim.RMSprop(momentum=...)
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    with pytest.raises(ValueError, match="alpha"):
        RMSprop([p], alpha=1.5)


CHILD = r"""
import sys, torch
from cliptransfer.engine.rmsprop import RMSprop
m = torch.nn.Linear(8, 4)
opt = RMSprop(m.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
m(torch.randn(3, 8)).sum().backward()
opt.step(); sched.step(); opt.zero_grad()
opt.load_state_dict(opt.state_dict())
print("torch._dynamo" in sys.modules)
"""


def test_does_not_import_dynamo():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert out.stdout.split()[-1] == "False", out.stderr
