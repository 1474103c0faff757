"""Follower training speed and memory at R2R-EnvDrop's setting (tasks/vln.py's model and rollouts).

    python bench/vln_train.py                   # 1 thread, 2 warm-up + 5 timed iterations, then
                                                # 3 of EnvDrop's code alternating with 3 of ours
                                                # (~1 min)
    python bench/vln_train.py --threads 2 --iters 10
    python bench/vln_train.py --no-compact               # compute ended episodes too, as EnvDrop
    python bench/vln_train.py --feature-dtype float32    # the view table kept float32
    python bench/vln_train.py --precision bf16           # CPU autocast (AVX512-BF16 / AMX)
    python bench/vln_train.py --malloc fixed             # mmap threshold pinned at 2 MiB
    python bench/vln_train.py --recompute-views          # agent.recompute_views=true
    python bench/vln_train.py --peer-iters 0             # without the same-run peer

Setting (the issue's, so the figures compare with R2R-EnvDrop's own train.py + MatterSim): the
real R2R val_seen episodes as the training split, random 36 x 512 features for every viewpoint
of the val_seen + val_unseen scans (../shared/data/r2r or --r2r), EnvDrop's follower sizes
(word 256, hidden 512, angle 64), batch 64, max 35 actions, one iteration = an imitation rollout
(teacher forcing) + an A2C rollout (sampled actions) + backward + RMSprop, as EnvDrop's
`train(feedback="sample")`. A SentencePiece vocabulary of 1000 pieces stands in for EnvDrop's
word vocabulary (same embedding size). Ours runs as tasks/vln.py does by default: the view
table kept float16 (data.feature_dtype) and rollouts that stop computing ended episodes
(EnvDrop computes all 64 until the last one stops; `--no-compact` does too).

Printed: ms per batched decision step (both rollouts' steps, forward + backward + update
amortised; the median / min / max over iterations), the matrix-product FLOPs per step and the
time they take at this CPU's best GEMM rate, iterations/s, the episodes computed per step,
peak RSS in MiB and GB (the features' share, what was resident before training, among it the
CUDA libraries a CUDA build of torch maps on a CPU run, and what training adds; the
FLOP count runs after the peak is read). The optimizer is tasks/vln.py's
(`cliptransfer.engine.rmsprop`: torch's RMSprop update without torch.optim's torch._dynamo
import, which brings Triton and sympy: ~105 MiB of peak RSS here; tasks/vln.py itself
imports torch._dynamo anyway, through timm -> torchvision, for its CLIP towers). For
comparison, R2R-EnvDrop's train.py on this class of 2-core CPU at that setting (from the
issue): 86 ms per decision step on 1 thread (0.6 it/s), 61 ms on 2 threads, peak RSS 3.4 GB;
target >= 2x faster, <= 1.5 GB.

The peer measured in the same run: EnvDrop's follower code as written (bench/envdrop_peer.py:
nn.LSTM encoder, nn.LSTMCell decoder, bmm attentions, nn.Dropout, the whole batch computed
until its last episode ends, three torch.optim.RMSprop) on our environment, `--peer-iters`
iterations alternating with ours on the same batches, at the same precision and thread count
(after the peak RSS is read). This VM's speed drifts by up to 1.5x between hours; the ratio
to a peer timed in the same minutes does not. The peer leaves out MatterSim's cost, so its
ratio is a lower bound on the speed-up over EnvDrop's train.py.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from envdrop_peer import EnvDropFollower
from machine import count_flops, cpu_features, gemm_rates, load_average, resident_mib

from cliptransfer import malloc
from cliptransfer.engine.rmsprop import RMSprop
from cliptransfer.nav import NavEnv, NavTables, load_graphs, load_r2r
from cliptransfer.tasks.vln.agent import Follower, FollowerConfig
from cliptransfer.tasks.vln.config import RLConfig
from cliptransfer.tasks.vln.data import FEATURE_DTYPES, train_tokenizer
from cliptransfer.tasks.vln.lanes import run_rollouts
from cliptransfer.tasks.vln.rollout import encode_instructions, imitation_and_a2c

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--r2r", type=Path, default=REPO.parent / "shared" / "data" / "r2r")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rollout-threads", type=int, default=0,
                    help="threads running the two rollouts side by side (tasks/vln.py's "
                         "rollout_threads; 0: --threads)")  # fmt: skip
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--max-steps", type=int, default=35)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: CPU autocast (what train.precision=bf16 runs)")  # fmt: skip
    ap.add_argument("--feature-dtype", choices=sorted(FEATURE_DTYPES), default="float16",
                    help="the in-memory view table (tasks/vln.py's data.feature_dtype)")  # fmt: skip
    ap.add_argument("--malloc", choices=["glibc", "fixed"], default="glibc",
                    help="glibc: the C library's sliding mmap threshold (tasks/vln.py); fixed: "
                         "pinned at 2 MiB (cliptransfer.malloc): ~90 MiB less peak RSS, "
                         "10-30 %% more time (page faults)")  # fmt: skip
    ap.add_argument("--recompute-views", action="store_true",
                    help="agent.recompute_views: no view context kept for backward")  # fmt: skip
    ap.add_argument("--peer-iters", type=int, default=3,
                    help="iterations of EnvDrop's follower code (bench/envdrop_peer.py), "
                         "alternating with ours on the same batches (0: none)")  # fmt: skip
    ap.add_argument("--no-compact", action="store_true",
                    help="compute every episode until the batch ends, as EnvDrop (rollouts "
                         "otherwise stop computing the episodes that have ended)")  # fmt: skip
    args = ap.parse_args()
    malloc.single_arena()  # as tasks/vln.py: the rollout threads share the main heap
    if not (args.r2r / "connectivity").is_dir():
        sys.exit(f"no R2R data under {args.r2r}: pass --r2r DIR (../shared/data/r2r)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {cpu_features()}; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"load before: {load_average()}")

    train = load_r2r(args.r2r / "R2R_val_seen.json")
    scans = sorted(
        {e.scan for e in train} | {e.scan for e in load_r2r(args.r2r / "R2R_val_unseen.json")}
    )
    # Training needs only the tables: the graphs' all-pairs caches (~170 MB of dicts) go.
    tables = NavTables.build(load_graphs(args.r2r / "connectivity", scans))
    malloc.trim()  # as tasks/vln.py after its table build
    if args.malloc == "fixed":
        malloc.fix_mmap_threshold()  # 2 MiB
    # Drawn in the table's dtype: a float32 source would be a 593 MB transient (kept by jemalloc).
    features = torch.randn(len(tables), 36, args.dim, dtype=FEATURE_DTYPES[args.feature_dtype])
    env = NavEnv(tables, features, max_steps=args.max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer([e.instruction for e in train], Path(tmp) / "tok", 1000)
    cfg = FollowerConfig(recompute_views=args.recompute_views)
    threads = args.rollout_threads or args.threads
    agent = Follower(cfg, tok.vocab_size, args.dim, tables.view_angles.shape[-1])
    opt = RMSprop(agent.parameters(), lr=1e-4)  # tasks/vln.py's (torch's update)
    print(f"{len(scans)} scans, {len(tables)} viewpoints, {len(train)} training instructions, "
          f"batch {args.batch}, D={args.dim}, max {args.max_steps} actions, {args.precision}, "
          f"{args.feature_dtype} view table, rollouts on {min(threads, 2)} thread(s), malloc "
          f"{args.malloc}, recompute views "
          f"{args.recompute_views}, ended episodes {'computed' if args.no_compact else 'dropped'}; "
          f"follower "
          f"{sum(p.numel() for p in agent.parameters()):,} parameters\n")  # fmt: skip

    def precision() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    gen = torch.Generator().manual_seed(0)
    compact, computed_rows = not args.no_compact, []  # episode decisions per iteration

    def draw_batch() -> tuple[list, torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(train), generator=gen)[: args.batch].tolist()
        eps = [train[i] for i in idx]
        return (eps, *encode_instructions(tok, eps, 80))

    def iteration(threads: int = threads, batch: tuple | None = None) -> int:
        eps, tokens, lengths = batch or draw_batch()
        rollouts = imitation_and_a2c(agent, eps, tokens, lengths, RLConfig(), 0.2,
                                     compact=compact)  # fmt: skip
        with precision():
            loss, outs = run_rollouts(rollouts, env, list(agent.parameters()), threads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), 40.0)
        opt.step()
        # As the engine's loop: no gradient is kept through the next step's rollouts.
        opt.zero_grad(set_to_none=True)
        computed_rows.append(sum(o["rows"] for o in outs))
        return sum(o["steps"] for o in outs)

    setup = resident_mib()  # torch, the tables, the features, the model and the optimizer
    # Two warm-up iterations (the heap grows to its working size over the first two: page
    # faults that later iterations do not pay).
    iteration()
    iteration()
    steps, per_step = 0, []
    computed_rows.clear()  # the timed iterations' only
    t0 = time.perf_counter()
    for _ in range(args.iters):
        t = time.perf_counter()
        n = iteration()
        per_step.append(1000 * (time.perf_counter() - t) / n)
        steps += n
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    rows_per_step = sum(computed_rows) / steps
    # The peer in the same minutes (a shared VM's speed drifts by up to 1.5x between hours):
    # EnvDrop's follower code, iterations alternating with ours on the same batches. After the
    # peak is read: its memory is not ours.
    pairs = []
    if args.peer_iters:
        peer = EnvDropFollower(env.lane(7), tok.vocab_size, args.dim,
                               tables.view_angles.shape[-1], tok.pad_id)  # fmt: skip

        def peer_iteration(batch: tuple) -> int:
            with precision():  # the peer at ours: bf16 autocast wherever ours uses it
                return peer.iteration(*batch)

        peer_iteration(draw_batch())  # warm-up
        for _ in range(args.peer_iters):
            batch = draw_batch()
            pair = []
            for run in (lambda b: iteration(batch=b), peer_iteration):
                t = time.perf_counter()
                n = run(batch)
                pair.append((time.perf_counter() - t, n))
            pairs.append(pair)
    # After the peak is read: the FLOP counter's imports are not the training's memory.
    # On one thread: the FLOP counter (a dispatch mode) sees only its own thread's ops.
    counted_steps, flops = count_flops(lambda: iteration(1))
    dtype = "fp32" if args.precision == "fp32" else "bf16"
    rate = gemm_rates(dtypes=(dtype,))[dtype]
    ms = 1000 * seconds / steps
    print("| measure | ours | R2R-EnvDrop (quoted) |\n|---|---|---|")
    quoted = {1: 86, 2: 61}.get(args.threads)
    ratio = f" (**{quoted / ms:.1f}x** faster)" if quoted else ""
    print(f"| ms per decision step | {ms:.1f}{ratio} | {quoted or '-'} |")
    # A shared VM's speed drifts between iterations: the spread says how much.
    print(
        f"| per iteration: median / min / max | {statistics.median(per_step):.1f} / "
        f"{min(per_step):.1f} / {max(per_step):.1f} | - |"
    )
    # The arithmetic floor: this many FLOPs at the machine's large square-GEMM rate.
    gflop_step = flops / counted_steps / 1e9
    print(f"| matrix-product work per decision step | {gflop_step:.2f} GFLOP (FlopCounterMode): "
          f"{1000 * gflop_step / rate:.1f} ms at this CPU's {rate:.0f} GFLOP/s "
          f"{args.precision} 2048^3 GEMM rate | same model |")  # fmt: skip
    if pairs:
        ours_ms, peer_ms = (1000 * sum(p[k][0] for p in pairs) / sum(p[k][1] for p in pairs)
                            for k in (0, 1))  # fmt: skip
        ratios = [(p[1][0] / p[1][1]) / (p[0][0] / p[0][1]) for p in pairs]
        print(f"| ms per decision step, alternating with EnvDrop's follower code on the same "
              f"{len(pairs)} batches (bench/envdrop_peer.py; our environment, no simulator) | "
              f"{ours_ms:.1f} (**{peer_ms / ours_ms:.1f}x** faster; per batch "
              f"{min(ratios):.1f}-{max(ratios):.1f}x) | {peer_ms:.1f} (measured here) |")  # fmt: skip
    print(f"| iterations/s | {args.iters / seconds:.2f} | {'0.6' if args.threads == 1 else '-'} |")
    print(f"| decision steps per iteration | {steps / args.iters:.1f} | - |")
    # EnvDrop computes all 64 episodes at every step until the batch ends.
    print(f"| episodes computed per step (mean) | {rows_per_step:.1f} of "
          f"{args.batch} | {args.batch} |")  # fmt: skip
    print(f"| peak RSS | {rss:.0f} MiB = {rss * 2**20 / 1e9:.2f} GB (features "
          f"{features.nbytes / 2**20:.0f} MiB) | 3.4 GB |")  # fmt: skip
    if setup:  # where the peak's memory is: what is there before training, what training adds
        print(f"| of which before training | {setup['total']:.0f} MiB: CUDA/Triton libraries "
              f"{setup['gpu_libraries']:.0f} MiB (this torch build maps them on a CPU run), "
              f"the rest "
              f"{setup['other']:.0f} MiB | - |")  # fmt: skip
        print(f"| added by training (peak) | {rss - setup['total']:.0f} MiB | - |")
    print(f"\nload after: {load_average()}")


if __name__ == "__main__":
    main()
