"""FSDP with 2 CPU processes (gloo): what works with this torch + Accelerate.

One torchrun launch of 2 processes trains a 2-Linear model for a few AdamW steps on a fixed
global batch (each rank takes its half) in three ways, and compares the parameters with one plain
process on the whole batch:

- torch's FSDP2 (`fully_shard` on a CPU device mesh): sharded, and equal to the plain run;
- torch's FSDP1 (`FullyShardedDataParallel(device_id=cpu)`): sharded, and equal to the plain run;
- Accelerate with a `FullyShardedDataParallelPlugin` and `Accelerator(cpu=True)`: Accelerate
  (1.16) ignores the plugin on CPU processes (distributed_type stays MULTI_CPU) and wraps the model
  in DistributedDataParallel: equal to the plain run, but nothing is sharded. If this test starts
  failing because the model comes back FSDP-wrapped, Accelerate has learnt FSDP on CPU: turn the
  check into the equality test of the sharded model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import functools, json, sys

    import torch
    import torch.distributed as dist
    from torch import nn

    STEPS, GLOBAL_BATCH, LR = 3, 8, 1e-2


    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


    def batch(step):
        g = torch.Generator().manual_seed(100 + step)
        return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


    def train(model, rank, world, backward=None):
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        for step in range(STEPS):
            x, y = (t.chunk(world)[rank] for t in batch(step))
            loss = ((model(x) - y) ** 2).mean()
            backward(loss) if backward else loss.backward()
            opt.step()
            opt.zero_grad()
        return model


    def max_diff(ref, sd):
        assert sorted(ref) == sorted(sd), (sorted(ref), sorted(sd))
        return max((ref[k] - sd[k].detach().cpu()).abs().max().item() for k in ref)


    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="size_based_wrap",
        min_num_params=0, state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False,
    )
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    rank, world = acc.process_index, acc.num_processes
    ref = train(make(), 0, 1).state_dict()  # one plain process on the whole global batch
    out = {"world": world, "backend": dist.get_backend()}

    # 1. Accelerate with the FSDP plugin.
    model = acc.prepare(make())
    out["acc_distributed_type"] = str(acc.distributed_type)
    out["acc_model_type"] = type(model).__name__
    train(model, rank, world, backward=acc.backward)
    out["acc_diff"] = max_diff(ref, acc.unwrap_model(model).state_dict())

    # 2. torch FSDP2 on a CPU device mesh.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out["fsdp2_local_rows"] = [p.to_local().shape[0] for p in model.parameters()]
    train(model, rank, world)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    out["fsdp2_diff"] = max_diff(ref, full)

    # 3. torch FSDP1 with device_id=cpu.
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    model = FSDP(
        make(), device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD,
        auto_wrap_policy=functools.partial(size_based_auto_wrap_policy, min_num_params=0),
        use_orig_params=True,
    )
    out["fsdp1_local_numel"] = sum(p.numel() for p in model.parameters())
    train(model, rank, world)
    cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
        out["fsdp1_diff"] = max_diff(ref, model.state_dict())

    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    acc.end_training()
    """
)

N_PARAMS = 6 * 16 + 16 + 16 * 3 + 3  # 163


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_cpu")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # One retry: in a long suite on a loaded 2-core machine the rendezvous has failed once in a
    # few full runs (never alone); a second launch tells a flaky start from a real failure.
    for _attempt in range(2):
        proc = subprocess.run(
            [*cmd, str(script), str(tmp)], env=env, cwd=tmp, capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_gloo_ranks(results):
    assert [r["world"] for r in results] == [2, 2]
    assert all(r["backend"] == "gloo" for r in results)


def test_torch_fsdp2_on_cpu_shards_and_matches_one_process(results):
    for r in results:
        assert r["fsdp2_diff"] < 1e-6
    # Linear(6,16) rows 8+8, Linear(16,3) rows 2+1: every parameter is split over the ranks.
    rows = [r["fsdp2_local_rows"] for r in results]
    assert [a + b for a, b in zip(*rows)] == [16, 16, 3, 3]
    assert all(a > 0 and b > 0 for a, b in zip(*rows))  # both ranks hold a piece


def test_torch_fsdp1_on_cpu_shards_and_matches_one_process(results):
    for r in results:
        assert r["fsdp1_diff"] < 1e-6
    local = [r["fsdp1_local_numel"] for r in results]
    assert sum(local) >= N_PARAMS and max(local) < N_PARAMS  # sharded (plus padding)


def test_accelerate_fsdp_plugin_is_ignored_on_cpu(results):
    """Accelerate 1.16 only turns MULTI_GPU-like runs into FSDP: on CPU processes the plugin is
    dropped silently and the model is trained with DDP (still exact, but not sharded)."""
    for r in results:
        assert r["acc_distributed_type"] == "DistributedType.MULTI_CPU"
        assert r["acc_model_type"] == "DistributedDataParallel"
        assert r["acc_diff"] < 1e-6
