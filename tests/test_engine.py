"""The engine on a toy task: batch planning, grad accumulation, kill/resume, 2 processes = 1,
the non-finite guard and config ranges. The task is a tiny regression with dropout, so every
check is about the loop, not a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from cliptransfer.engine import NonFiniteLossError, RunConfig, Task, TaskSpec, TrainConfig
from cliptransfer.engine.batches import plan_epoch
from cliptransfer.engine.evaluation import predict
from cliptransfer.engine.optim import OptimConfig
from cliptransfer.engine.run import run_task

N = 49  # 49 samples in global batches of 8: the last batch has 1 sample
CRASH_AT = {"step": 0}  # raise after this optimizer step (a killed process); not a config key


@dataclass
class ToyConfig(RunConfig):
    dropout: float = 0.0
    nan_at: int = -1  # a record whose input is NaN
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.05, warmup_steps=2))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=8, epochs=3, log_every=1, keep_last=5)
    )


class Points(Dataset):
    def __init__(self, nan_at: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
        if nan_at >= 0:
            self.x[nan_at, 0] = float("nan")

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "ids": i}


def collate(items: list[dict]) -> dict:
    return {
        "x": torch.stack([it["x"] for it in items]),
        "y": torch.stack([it["y"] for it in items]),
        "ids": torch.tensor([it["ids"] for it in items]),
    }


class ToyTask(Task):
    tracker = "toy"

    def setup(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(self.cfg.dropout), nn.Linear(16, 1))
        self.train_data = Points(self.cfg.nan_at)
        self.collate = collate
        loader = torch.utils.data.DataLoader(Points(-1), batch_size=16, collate_fn=collate)
        self.val_loader = self.run.accelerator.prepare(loader)

    def training_step(self, model, batch):
        mse = ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        return {"loss": mse, "mse": mse}

    def after_step(self, model) -> None:
        self.steps_done = getattr(self, "steps_done", 0) + 1
        if self.steps_done == CRASH_AT["step"]:
            raise KeyboardInterrupt("killed")  # the process dies: no more saves

    def evaluate(self, model, split):
        got = predict(self.run.accelerator, model, self.val_loader,
                      lambda m, b: {"err": (m(b["x"]).squeeze(-1) - b["y"]) ** 2})  # fmt: skip
        return None, {"mse": got["err"].mean().item(), "n": len(got["err"])}

    def score(self, metrics) -> float:
        return -metrics["mse"]


ToyTask.spec = TaskSpec("toy", ToyTask, ToyConfig, "tests/test_engine.py")


def _run(out: Path, *sets: str) -> dict:
    args = ["--set", f"train.out_dir={out}", "--set", "train.num_threads=1"]
    return run_task(ToyTask, [*args, *(a for s in sets for a in ("--set", s))])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return load_file(str(out / "checkpoints" / latest / "model.safetensors"))


def test_plan_splits_global_batches_over_processes_and_micro_batches():
    # 10 samples, global batch 4, 2 processes, 2 micro-batches: 3 steps, the last of 2 samples.
    plans = [list(plan_epoch(10, 4, seed=0, epoch=0, rank=r, world_size=2, grad_accum=2,
                             shuffle=False)) for r in (0, 1)]  # fmt: skip
    # the last global batch [8, 9]: one micro-batch each, both on process 0 ("earlier parts one
    # longer"); process 1 runs them as padding at weight 0
    assert [[mb.indices for mb in step] for step in plans[0]] == [
        [[0], [2]],
        [[4], [6]],
        [[8], [9]],
    ]
    assert [[mb.indices for mb in step] for step in plans[1]] == [
        [[1], [3]],
        [[5], [7]],
        [[8], [9]],
    ]
    # weight = samples of the slice x processes / samples of the global batch
    assert [[mb.weight for mb in step] for step in plans[0]] == [[0.5, 0.5], [0.5, 0.5], [1.0, 1.0]]
    assert [[mb.weight for mb in step] for step in plans[1]] == [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]
    # 9 samples: the last global batch has 1; process 1 runs one sample at weight 0.
    last = [list(plan_epoch(9, 4, seed=0, epoch=0, rank=r, world_size=2, shuffle=False))[-1]
            for r in (0, 1)]  # fmt: skip
    assert (last[0][0].indices, last[0][0].weight) == ([8], 2.0)
    assert (last[1][0].indices, last[1][0].weight) == ([8], 0.0)
    assert list(plan_epoch(9, 4, seed=0, epoch=0, drop_last=True, shuffle=False))[-1][
        0
    ].indices == [4, 5, 6, 7]
    # Same permutation for every process count: the union of the slices is the 1-process batch.
    one = list(plan_epoch(10, 4, seed=3, epoch=1))
    two = [list(plan_epoch(10, 4, seed=3, epoch=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [s[0].indices for s in one] == [a[0].indices + b[0].indices for a, b in zip(*two)]


def test_grad_accum_2_of_b_equals_batch_2b(tmp_path):
    a = _run(tmp_path / "a", "train.batch_size=8", "train.grad_accum=1")
    b = _run(tmp_path / "b", "train.batch_size=8", "train.grad_accum=2")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert a["samples_seen"] == b["samples_seen"] == 3 * N and a["steps"] == b["steps"] == 21


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    common = ["dropout=0.3", "train.save_every_steps=4"]
    full = _run(tmp_path / "full", *common)
    CRASH_AT["step"] = 10
    try:
        with pytest.raises(KeyboardInterrupt):  # dies after step 10 (mid epoch 2), saved at 8
            _run(tmp_path / "cut", *common)
    finally:
        CRASH_AT["step"] = 0
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run_task(ToyTask, ["--resume", "latest", "--set", f"train.out_dir={tmp_path / 'cut'}",
                                 "--set", "train.num_threads=1",
                                 *(a for s in common for a in ("--set", s))])  # fmt: skip
    saved = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut")]
    assert saved[0]["history"] == saved[1]["history"] and saved[0]["val"] == saved[1]["val"]
    assert resumed["val"] == full["val"] and resumed["best_epoch"] == full["best_epoch"]
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    report = run_task(ToyTask, ["--resume", "latest", "--set", f"train.out_dir={tmp_path}",
                                "--set", "train.epochs=1"])  # fmt: skip
    assert report["steps"] == 7


def _two_process(out: str) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run_task(ToyTask, ["--cpu", "--set", f"train.out_dir={out}", "--set", "train.num_threads=1"])


def test_two_processes_train_like_one(tmp_path):
    from accelerate import debug_launcher

    one = _run(tmp_path / "one")
    debug_launcher(_two_process, args=(str(tmp_path / "two"),), num_processes=2)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["samples_seen"] == one["samples_seen"] == 3 * N  # no padded duplicates counted
    assert two["val"]["n"] == one["val"]["n"] == N
    assert two["val"]["mse"] == pytest.approx(one["val"]["mse"], rel=1e-5)
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_naming_step_and_records(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        _run(tmp_path, "nan_at=17", "train.epochs=1")
    msg = str(err.value)
    assert "non-finite loss on process 0" in msg and "17" in msg.split("records:")[1]
    assert msg.startswith("step ") and not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.epochs=-3", "train.epochs: must be >= 1, got -3"),
        ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        ("train.save_every_minutes=nan", "save_every_minutes: must be a finite number >= 0"),
    ],
)
def test_config_ranges_are_usage_errors(tmp_path, capsys, setting, message):
    with pytest.raises(SystemExit):
        _run(tmp_path, setting)
    assert message in capsys.readouterr().err


def test_nan_feature_row_is_named_on_read():
    # The store's writer refuses NaN; a store damaged or written by other tools is caught on read.
    from cliptransfer.visual.inputs import StoreInputs

    class Damaged(dict):
        root = "/data/store"
        metadata = {"kind": "grid", "channels": 2, "grid_size": [1, 2]}

    store = Damaged({"7": {"features": torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])}})
    with pytest.raises(
        ValueError, match=r"/data/store: image 7 has non-finite features \(rows \[1\]\)"
    ):
        StoreInputs(store)(7)


class TwoOptimizerTask(ToyTask):
    """CLIP-ViL_p's shape: SGD with step decay for the "backbone" (first layer) beside AdamW."""

    def optimizers(self, model, total_steps):
        from cliptransfer.engine.optim import adamw_spec, sgd_step_spec

        return [
            adamw_spec(model[2], self.cfg.optim, total_steps, name="adamw"),
            sgd_step_spec(model[0], 0.003, weight_decay=4e-4, step_every=5, name="backbone_sgd"),
        ]


TwoOptimizerTask.spec = TaskSpec("toy2", TwoOptimizerTask, ToyConfig, "tests/test_engine.py")


def test_two_optimizers_step_schedule_and_resume_exactly(tmp_path):
    sets = ["--set", "train.num_threads=1", "--set", "train.save_every_steps=4"]
    full = run_task(TwoOptimizerTask, ["--set", f"train.out_dir={tmp_path / 'a'}", *sets])
    ckpt = tmp_path / "a" / "checkpoints"
    assert (ckpt / "step-0000021" / "optimizer-1.pt").is_file()
    sched = json.loads((ckpt / "step-0000021" / "scheduler-1.json").read_text())
    assert sched["last_epoch"] == 21 and sched["_last_lr"] == [pytest.approx(0.003 * 0.1**4)]
    # Resume from a mid-epoch checkpoint of the same run: both optimizers continue exactly.
    resumed = run_task(TwoOptimizerTask, ["--set", f"train.out_dir={tmp_path / 'b'}", *sets,
                                          "--resume", str(ckpt / "step-0000012")])  # fmt: skip
    assert resumed["val"] == full["val"] and resumed["history"][-1] == full["history"][-1]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_precision_auto_is_bf16_where_it_is_native(monkeypatch):
    from cliptransfer.engine import run as run_module

    monkeypatch.setattr(run_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(run_module, "native_bf16_cpu", lambda: True)
    assert run_module.resolve_precision("auto", cpu=True) == "bf16"
    monkeypatch.setattr(run_module, "native_bf16_cpu", lambda: False)
    assert run_module.resolve_precision("auto", cpu=True) == "no"  # emulated bf16 is slower
    assert run_module.resolve_precision("fp16", cpu=True) == "fp16"  # an explicit choice stays


def test_a_registered_task_appears_in_the_cli_and_compare(capsys):
    # What adding a task package does: its @register_task is all the CLI and compare need.
    from cliptransfer.cli import main
    from cliptransfer.compare import _spec
    from cliptransfer.engine import CompareColumns, EvaluateCommand, register_task, registered
    from cliptransfer.engine.task import _REGISTRY

    def add_args(p):
        p.add_argument("--value", type=float, required=True)

    @register_task("toy-eval", config=ToyConfig, launcher="tests/test_engine.py",
                   compare=CompareColumns("mse", "parts", ("a",), "zero predictor"),
                   evaluate=EvaluateCommand("toy metric", add_args, lambda a: {"mse": a.value}))  # fmt: skip
    class ToyEval(ToyTask):
        pass

    try:
        assert "toy-eval" in registered()
        assert main(["evaluate", "toy-eval", "--value", "0.25"]) == 0
        assert json.loads(capsys.readouterr().out) == {"mse": 0.25}
        spec = _spec("toy-eval")
        assert spec.columns == ("mse", "a") and spec.launcher == "tests/test_engine.py"
    finally:
        del _REGISTRY["toy-eval"]
