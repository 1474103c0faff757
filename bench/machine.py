"""What the benchmarks print about the machine: the CPU features each figure came from, the load
average during the run, this machine's fp32 / bf16 GEMM rate and FLOP counts of a step (so a
figure can be read against what the CPU can do), glibc malloc settings and page-fault counts.
Shared by contrastive_step.py and grid_extract.py (run as `python bench/X.py`, so this folder
is on sys.path)."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cliptransfer.malloc import keep_freed_memory  # noqa: F401 - re-exported for the benches

# The flags that decide which kernels oneDNN/MKL can use: AVX2 (fp32 FMA, bf16 emulated),
# AVX-512F, AVX512-BF16 (native bf16 dot products), AMX (bf16 tile matmul).
FEATURE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU", set()
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def native_bf16_cpu() -> bool:
    """True if the CPU computes bf16 natively (AVX512-BF16 or AMX). Without it, oneDNN emulates
    bf16 by converting to fp32, and autocast is usually slower than plain fp32."""
    return bool(_cpuinfo()[1] & {"avx512_bf16", "amx_bf16"})


def cpu_features() -> str:
    """One line: model name, logical CPUs, which of FEATURE_FLAGS are present / absent, torch's
    dispatch level. E.g. "AMD EPYC, 2 CPUs; avx2 avx512f avx512_bf16, no amx_bf16 ..."."""
    model, flags = _cpuinfo()
    have = [f for f in FEATURE_FLAGS if f in flags]
    lack = [f for f in FEATURE_FLAGS if f not in flags]
    return (
        f"{model}, {os.cpu_count()} logical CPUs; flags: {' '.join(have) or '-'}"
        + (f"; absent: {' '.join(lack)}" if lack else "")
        + f"; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def load_average() -> str:
    """1-, 5-, 15-minute load average (includes the benchmark's own threads while it runs)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def gemm_rates(
    n: int = 2048, repeats: int = 9, dtypes: tuple[str, ...] = ("fp32", "bf16")
) -> dict[str, float]:
    """This machine's fp32 and bf16 GEMM rate in GFLOP/s on the current torch thread count: an
    (n, n) @ (n, n) matmul (2 n^3 FLOPs), the dtypes interleaved, 2 warm-up calls each,
    median of `repeats`. bf16 here is what autocast hands to oneDNN for Linear/matmul (slow
    where the CPU emulates it: ask for `dtypes=("fp32",)` alone there)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    pairs = {k: v for k, v in pairs.items() if k in dtypes}
    times: dict[str, list[float]] = {k: [] for k in pairs}
    for i in range(2 + repeats):
        for name, (x, y) in pairs.items() if i % 2 == 0 else reversed(pairs.items()):
            start = time.perf_counter()
            torch.mm(x, y)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {k: 2 * n**3 / statistics.median(v) / 1e9 for k, v in times.items()}


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's registry knows the CUDA attention kernels only; the CPU flash kernel (what SDPA runs
# here, ours and open_clip's nn.MultiheadAttention alike) gets the same dense formula.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """Run `fn` once under torch.utils.flop_counter.FlopCounterMode; (its result, FLOPs). Counts
    matmuls, convolutions and attention (forward and backward, 2 FLOPs per multiply-add; causal
    attention counted dense); elementwise ops, norms and the optimizer are not counted, so the
    figure is the GEMM-like work. torch.utils.flop_counter is imported here, not with this
    module: it brings torch._dynamo and triton (~80 MB resident), which a memory bench must not
    count as its workload's."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        out = fn()
    return out, counter.get_total_flops()


def fraction_line(
    label: str, flops: int, seconds: float, rates: dict[str, float], what: str = "step"
) -> str:
    """ "<label>: 9.6 GFLOP per step ... = 61 GFLOP/s: 14% of the machine's bf16 GEMM rate, ..."
    for one variant (`rates` from `gemm_rates`)."""
    achieved = flops / seconds / 1e9
    parts = [
        f"{100 * achieved / rates[k]:.0f}% of the machine's {k} GEMM rate" for k in ("bf16", "fp32")
    ]
    return (
        f"{label}: {flops / 1e9:.1f} GFLOP per {what} (FlopCounterMode) in {seconds:.3f} s = "
        f"{achieved:.0f} GFLOP/s: {parts[0]}, {parts[1]}"
    )


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_GPU_LIBRARIES = ("/nvidia/", "triton", "libtorch_cuda", "libcu", "libnv")


def resident_mib() -> dict[str, float]:
    """This process's resident memory now (MiB) by kind, from /proc/self/smaps: "total",
    "gpu_libraries" (CUDA and Triton shared libraries with their zero-initialised data: a CUDA
    build of torch maps them even on a CPU run, and torch._dynamo, which torch.optim's first
    optimizer and torchvision import, loads Triton), and "other". Empty off Linux."""
    path = Path("/proc/self/smaps")
    if not path.is_file():
        return {}
    total = gpu = 0
    name, gpu_mapping, previous_gpu_end = "", False, -1
    for line in path.read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            start, end = (int(a, 16) for a in head[0].split("-"))
            name = head[5] if len(head) > 5 else ""
            gpu_mapping = any(k in name for k in _GPU_LIBRARIES) or (
                # A library's .bss is the nameless mapping right after its file's last one
                # (libcublasLt's is ~80 MiB, all of it touched by its initialisers).
                not name and start == previous_gpu_end
            )
            previous_gpu_end = end if gpu_mapping and name else -1
        elif line.startswith("Rss:"):
            kib = int(head[1])
            total += kib
            if gpu_mapping:
                gpu += kib
    return {"total": total / 1024, "gpu_libraries": gpu / 1024, "other": (total - gpu) / 1024}
