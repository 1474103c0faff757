"""The `accelerate config` files in configs/accelerate/: each loads with Accelerate's own loader,
the launcher reads it as intended, and cpu_2proc.yaml really starts two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"

# file -> (distributed_type, num_processes, num_machines, mixed_precision, use_cpu)
EXPECTED = {
    "cpu.yaml": (DistributedType.NO, 1, 1, "no", True),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1, "no", True),
    "1gpu.yaml": (DistributedType.NO, 1, 1, "bf16", False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16", False),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16", False),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1, "bf16", False),
}


def test_every_file_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    assert (CONFIGS / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_with_accelerates_loader(name):
    # load_config_from_file raises on unknown keys, a missing distributed_type or bad enums.
    cfg = load_config_from_file(str(CONFIGS / name))
    dtype, nproc, nmach, mp, cpu = EXPECTED[name]
    assert cfg.distributed_type == dtype
    assert cfg.num_processes == nproc
    assert cfg.num_machines == nmach
    assert cfg.mixed_precision == mp
    assert cfg.use_cpu is cpu
    assert cfg.machine_rank == 0
    assert cfg.gpu_ids in (None, "all")  # GPUs are chosen with CUDA_VISIBLE_DEVICES
    assert cfg.fsdp_config == {} or name == "fsdp.yaml"
    if nmach > 1:
        assert cfg.main_process_ip and cfg.main_process_port
        assert nproc % nmach == 0


def test_fsdp_settings():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD in FSDP2 terms
    assert fsdp["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP"
    assert fsdp["fsdp_min_num_params"] > 0
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_offload_params"] is False
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False


def _launch_args(name: str, *extra: str):
    """What `accelerate launch --config_file NAME [extra] script.py` resolves to (no process)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(CONFIGS / name), *extra, "script.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args


@pytest.mark.parametrize(
    "name, extra, nproc_per_node, nnodes",
    [
        ("cpu_2proc.yaml", (), "2", None),
        ("multi_gpu.yaml", (), "8", None),
        ("fsdp.yaml", (), "8", None),
        ("multi_node.yaml", ("--machine_rank", "1"), "8", "2"),
    ],
)
def test_torchrun_launcher_settings(name, extra, nproc_per_node, nnodes):
    """These files go through torchrun (the launcher that starts num_processes processes)."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _launch_args(name, *extra)
    assert args.multi_gpu or args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert args.nproc_per_node == nproc_per_node
    assert getattr(args, "nnodes", None) == nnodes
    if nnodes:
        assert args.node_rank == 1  # the command line wins over the file's placeholder
        assert args.rdzv_endpoint == "192.0.2.10:29500"  # the file's main_process_ip:port
    expected_mp = EXPECTED[name][3]
    assert env["ACCELERATE_MIXED_PRECISION"] == expected_mp
    if name == "fsdp.yaml":
        assert env["ACCELERATE_USE_FSDP"] == "true"
        assert env["FSDP_VERSION"] == "2"
        assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "SIZE_BASED_WRAP"
        assert env["FSDP_MIN_NUM_PARAMS"] == "1000000"
    else:
        assert env.get("ACCELERATE_USE_FSDP", "false") != "true"


@pytest.mark.parametrize("name", ["cpu.yaml", "1gpu.yaml"])
def test_single_process_launcher_settings(name):
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = _launch_args(name)
    assert not (args.multi_gpu or args.use_fsdp)
    cmd, env = prepare_simple_launcher_cmd_env(args)
    assert cmd[-1] == "script.py"
    assert env["ACCELERATE_USE_CPU"] == str(EXPECTED[name][4])
    assert env["ACCELERATE_MIXED_PRECISION"] == EXPECTED[name][3]


WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator(cpu="--cpu" in sys.argv)
    total = torch.tensor([float(acc.process_index)])
    if dist.is_initialized():
        dist.all_reduce(total)
    info = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": str(acc.device),
        "rank_sum": total.item(),
    }
    Path(sys.argv[1], f"rank{acc.process_index}.json").write_text(json.dumps(info))
    acc.end_training()
    """
)


def test_cpu_2proc_starts_two_gloo_processes(tmp_path):
    """`accelerate launch --config_file cpu_2proc.yaml script.py --cpu` runs ranks 0 and 1 of a
    2-process gloo world on the CPU (the way the project's scripts are launched)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    cmd += ["--config_file", str(CONFIGS / "cpu_2proc.yaml"), str(script), str(out), "--cpu"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = sorted(
        (json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda d: d["rank"]
    )
    assert [d["rank"] for d in infos] == [0, 1], proc.stderr[-3000:]
    for d in infos:
        assert d["world_size"] == 2
        assert d["backend"] == "gloo"
        assert d["distributed_type"] == str(DistributedType.MULTI_CPU)
        assert d["device"].startswith("cpu")
        assert d["rank_sum"] == 1.0  # an all-reduce across both ranks went through
