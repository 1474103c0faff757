"""Peak CPU memory of one forward + backward of the FILIP and DeCLIP objectives vs batch size.

torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the peak is read
from the kernel: each objective runs in a fresh subprocess (started with a fixed glibc mmap
threshold, so a freed tensor goes back to the OS at once and RSS follows live memory); before
each size the process's RSS high-water mark is reset to its current RSS (`/proc/self/clear_refs`
= 5, Linux >= 4.0) and the reported figure is VmHWM - VmRSS: the extra memory of forward +
backward beyond the inputs and weights. Where the reset is not allowed, each size gets its own
subprocess and the figure is ru_maxrss - RSS before the step (valid when the step's peak is
above the import-time peak; a row says so when it is not).

Objectives (all fp32, one process thread):
  filip loss, chunk C   `filip_loss` on random (B, n, D) image / (B, k, D) text tokens,
                        candidates in checkpointed blocks of C: linear in B
  filip loss, no chunk  the same with chunk_size=None: the (B, B, n, k) similarity, quadratic
  declip / defilip      `ContrastiveModel` with the tiny ViT CLIP: encoders + every term

    python bench/loss_memory.py                   # batch 8 16 32 64, < 60 s on 2 cores
    python bench/loss_memory.py --batch 16 32 64 128 --tokens 49 77 --dim 128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{STATUS} has no {field} line (not Linux?)")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def objective_runner(name: str, args: argparse.Namespace):
    """A function batch_size -> (inputs, step) where step(inputs) runs forward + backward."""
    from cliptransfer.contrastive.losses.filip import filip_loss

    if name.startswith("filip loss"):
        n, k = args.tokens
        chunk = args.chunk if "chunk" in name and "no chunk" not in name else None

        def make(batch: int):
            g = torch.Generator().manual_seed(batch)
            img = torch.randn(batch, n, args.dim, generator=g, requires_grad=True)
            txt = torch.randn(batch, k, args.dim, generator=g, requires_grad=True)
            lengths = torch.randint(k // 4, k + 1, (batch,), generator=g)
            mask = torch.arange(k)[None] < lengths[:, None]  # (B, k) True for real tokens
            return img, txt, mask

        def step(inputs) -> None:
            img, txt, mask = inputs
            filip_loss(img, txt, mask, 100.0, chunk_size=chunk).backward()
            img.grad = txt.grad = None

        return make, step

    from cliptransfer.clip import create_clip
    from cliptransfer.contrastive.losses.declip import mask_tokens
    from cliptransfer.contrastive.objectives import ContrastiveModel, LossConfig

    torch.manual_seed(0)
    clip = create_clip(args.arch)
    method = name.split(",")[0]
    model = ContrastiveModel(clip, LossConfig(method=method, filip_chunk=args.chunk)).train()
    size, length, vocab = clip.image_size, clip.context_length, clip.vocab_size

    def make(batch: int):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(1, vocab - 2, (batch, length), generator=g)
        eot = torch.randint(length // 4, length, (batch,), generator=g)
        ids = torch.where(torch.arange(length)[None] < eot[:, None], ids, 0)
        ids[torch.arange(batch), eot] = vocab - 1  # EOT = largest id (argmax pooling)
        aug = ids.roll(1, dims=0)  # stands in for the EDA caption: same shape and padding
        mlm_input, mlm_labels = mask_tokens(ids, vocab - 2, vocab, [0, vocab - 1], generator=g)
        return {
            "image": torch.randn(batch, 3, size, size, generator=g),
            "image_view": torch.randn(batch, 3, size, size, generator=g),
            "text": ids,
            "text_aug": aug,
            "mlm_input": mlm_input,
            "mlm_labels": mlm_labels,
        }

    def step(batch) -> None:
        model(batch)["loss"].backward()
        model.zero_grad(set_to_none=True)

    return make, step


def measure(name: str, sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """Run in the child: peak extra KiB of forward + backward for each batch size."""
    torch.set_num_threads(1)  # the peak must not depend on per-thread scratch buffers
    make, step = objective_runner(name, args)
    step(make(2))  # first-call lazies (oneDNN, autograd) belong to the baseline, not the step
    out = []
    for batch in sizes:
        inputs = make(batch)
        gc.collect()
        base = _status_kb("VmRSS")
        can_reset = reset_peak()
        before = _status_kb("VmHWM") if can_reset else resource.getrusage(0).ru_maxrss
        step(inputs)
        peak = _status_kb("VmHWM") if can_reset else resource.getrusage(0).ru_maxrss
        out.append(
            {
                "batch": batch,
                "kib": peak - base,
                "resolved": can_reset or peak > before,
                "reset": can_reset,
            }
        )
        del inputs
    return out


def run_child(name: str, sizes: list[int], args: argparse.Namespace) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--batch",
        *map(str, sizes),
        "--tokens",
        *map(str, args.tokens),
        "--dim",
        str(args.dim),
        "--chunk",
        str(args.chunk),
        "--arch",
        args.arch,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {name!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def can_reset_peak() -> bool:
    return STATUS.is_file() and reset_peak()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument(
        "--tokens", type=int, nargs=2, default=[196, 32], help="FILIP image n, text k"
    )
    parser.add_argument("--dim", type=int, default=64, help="FILIP token dim D")
    parser.add_argument("--chunk", type=int, default=8, help="FILIP candidates per block")
    parser.add_argument("--arch", default="ViT-tiny", help="CLIP for the full objectives")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args)))
        return
    if not STATUS.is_file():
        sys.exit("loss_memory.py reads /proc/self/status: Linux only")
    sizes = sorted(args.batch)
    n, k = args.tokens
    names = [
        f"filip loss, chunk {args.chunk}",
        "filip loss, no chunk",
        "declip",
        f"defilip, chunk {args.chunk}",
    ]
    reset = can_reset_peak()
    print(
        f"torch {torch.__version__}; FILIP loss tokens n={n}, k={k}, D={args.dim}; "
        f"declip/defilip on {args.arch}; peak = "
        + ("VmHWM reset per size" if reset else "ru_maxrss, one process per size")
    )
    rows = []
    for name in names:
        results = (
            run_child(name, sizes, args)
            if reset
            else [r for s in sizes for r in run_child(name, [s], args)]
        )
        prev = None
        for r in results:
            mib = r["kib"] / 1024
            ratio = f"{mib / prev:.2f}" if prev else "-"
            note = "" if r["resolved"] else " (below import peak: not resolved)"
            rows.append(
                f"| {name} | {r['batch']} | {mib:.1f} | {r['kib'] / r['batch']:.0f} | "
                f"{ratio}{note} |"
            )
            prev = mib
    print(
        "\n| objective | batch | peak extra MiB | KiB/sample | x previous size |\n"
        "|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
