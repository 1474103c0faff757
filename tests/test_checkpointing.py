from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from cliptransfer.engine.checkpointing import (
    CheckpointError,
    TrainerState,
    atomic_save_dir,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cliptransfer.engine.optim import OptimConfig, build_adamw, param_groups, warmup_cosine


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.drop = nn.Dropout(0.5)  # consumes the torch RNG, so a resume must restore it
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("queue", torch.zeros(3, 4))

    def forward(self, x):
        return self.ln(self.drop(self.fc(x))) * self.logit_scale


def _train(model, opt, sched, steps, start=0):
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)  # the data of step k is fixed by k
        x = torch.randn(8, 4, generator=g)
        noise = torch.rand(1).item() + random.random() + float(np.random.rand())
        loss = (model(x) ** 2).mean() * (1 + 1e-3 * noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        model.queue[step % 3] = x[0].detach()


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = build_adamw(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    return model, opt, warmup_cosine(opt, 2, 10)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    model, opt, sched = _fresh()
    _train(model, opt, sched, 10)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    model, opt, sched = _fresh()
    _train(model, opt, sched, 4)
    cfg = {"lr": 0.01, "resume": None}
    save_checkpoint(tmp_path, TrainerState(step=4, config=cfg), model.state_dict(), opt, sched)
    torch.manual_seed(999), random.seed(999), np.random.seed(999)  # clobber the RNGs

    model, opt, sched = _fresh(seed=5)  # different init: everything must come from the file
    path = find_checkpoint(tmp_path, "latest")
    state = load_checkpoint(path, model, opt, sched, config={"lr": 0.01, "resume": "latest"})
    assert state.step == 4
    _train(model, opt, sched, 10, start=state.step)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_latest_pointer_pruning_and_no_temp_left(tmp_path):
    model, opt, sched = _fresh()
    _train(model, opt, sched, 1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, TrainerState(step=step), model.state_dict(), opt, sched)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000003"]
    assert find_checkpoint(tmp_path).name == "step-0000003"
    # optimizer state reloads under weights_only=True (no pickle of arbitrary objects)
    assert torch.load(root / "step-0000003" / "optimizer.pt", weights_only=True)["state"]


def test_config_mismatch_names_keys(tmp_path):
    model, opt, sched = _fresh()
    cfg = {"optim": {"lr": 0.1}, "model": "RN-tiny"}
    save_checkpoint(tmp_path, TrainerState(step=1, config=cfg), model.state_dict(), opt, sched)
    other = {"optim": {"lr": 0.2}, "model": "RN-tiny"}
    with pytest.raises(ValueError, match=r"optim.lr: saved 0.1 vs now 0.2"):
        load_checkpoint(find_checkpoint(tmp_path), model, opt, sched, config=other)


def test_missing_checkpoint_is_a_fresh_start_and_a_dangling_pointer_an_error(tmp_path):
    assert find_checkpoint(tmp_path) is None  # killed before its first checkpoint: start over
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-0000009\n")
    with pytest.raises(CheckpointError, match="latest names step-0000009, which is incomplete"):
        find_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def _two_checkpoints(tmp_path):
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, 1, 10)
    for step in (1, 2):
        save_checkpoint(tmp_path, TrainerState(step=step), model.state_dict(), opt, sched)
    return model, opt, sched, tmp_path / "checkpoints"


@pytest.mark.parametrize(
    "damage, what",
    [
        ("model.safetensors", "model weights"),
        ("optimizer.pt", "optimizer state"),
        ("rng-rank0.pt", "RNG state"),
        ("scheduler.json", "schedule"),
    ],
)
def test_damaged_checkpoint_names_the_file_and_the_earlier_one(tmp_path, damage, what):
    model, opt, sched, root = _two_checkpoints(tmp_path)
    target = root / "step-0000002" / damage
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # truncated
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(find_checkpoint(tmp_path), model, opt, sched)
    msg = str(err.value)
    assert str(target) in msg and f"the checkpoint's {what} cannot be read" in msg
    assert f"--resume {root / 'step-0000001'}" in msg and "weights_only=False" not in msg


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched, root = _two_checkpoints(tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cliptransfer.engine.checkpointing.save_file", no_space)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, TrainerState(step=3), model.state_dict(), opt, sched)
    assert "No space left on device" in str(err.value)
    assert f"previous checkpoint {root / 'step-0000002'} is intact" in str(err.value)
    assert find_checkpoint(tmp_path) == root / "step-0000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000001", "step-0000002"]


def test_resume_ignores_where_and_how_fast_a_run_goes(tmp_path):
    model, opt, sched, _ = _two_checkpoints(tmp_path)
    cfg = {"train": {"num_threads": 1, "out_dir": "a", "save_every_steps": 5}, "optim": {"lr": 1}}
    save_checkpoint(tmp_path, TrainerState(step=3, config=cfg), model.state_dict(), opt, sched)
    now = {"train": {"num_threads": 2, "out_dir": "b", "save_every_steps": 7}, "optim": {"lr": 1}}
    assert load_checkpoint(find_checkpoint(tmp_path), model, opt, sched, config=now).step == 3


def test_atomic_save_dir_leaves_nothing_on_failure(tmp_path):
    def broken(d):
        (d / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_save_dir(broken, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    atomic_save_dir(lambda d: (d / "ok.txt").write_text("y"), tmp_path / "out")
    assert (tmp_path / "out" / "ok.txt").read_text() == "y"


def test_no_decay_on_norms_biases_and_logit_scale():
    groups = param_groups(Net(), weight_decay=0.1, lr_scales={"fc.": 0.1})
    by_name = {n: (g["weight_decay"], g["lr_scale"]) for g in groups for n in g["param_names"]}
    assert by_name == {
        "fc.weight": (0.1, 0.1),
        "fc.bias": (0.0, 0.1),
        "ln.weight": (0.0, 1.0),
        "ln.bias": (0.0, 1.0),
        "logit_scale": (0.0, 1.0),
    }


def test_warmup_cosine_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6, min_lr_ratio=0.0)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup: (0+1)/2, (1+1)/2; cosine over 4 steps: 0.5*(1+cos(pi*k/4)), k=0..4
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0])
