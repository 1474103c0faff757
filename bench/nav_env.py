"""The batched navigation environment (cliptransfer.nav.env) at training scale.

    python bench/nav_env.py                      # batch 64, 512-d features, 1 thread
    python bench/nav_env.py --threads 2 --batch 64 --dim 2048

Setting (issue 11's bench setting): the real R2R val_seen + val_unseen episodes and their scans'
connectivity from ../shared/data/r2r (or --r2r DIR), random 36 x D features for every viewpoint.

Printed:
- table build: EnvDrop candidate sweeps + all-pairs distances / first hops for every scan, and
  the tables' memory next to the features';
- env step (observe + step, features gathered) at batch B under teacher actions and under random
  actions (random walks move every step, up to --max-steps), ms per batched step and agent-steps/s;
- the peer measured in the same run: R2R-EnvDrop's per-environment Python `_get_obs` (buffered
  `make_candidate`: per candidate a dict copy, `angle_feature`, `np.concatenate`; the obs feature
  concatenated with the base view's angle features; the teacher from path tables), fed by the same
  tables in place of MatterSim's getState/makeAction — i.e. EnvDrop's Python share alone, with the
  C++ simulator's own time (quoted below for scale, not measured here) left out;
- the env's share of an agent training step: the same rollouts with a stand-in decision step of
  EnvDrop's follower sizes (LSTMCell 512 over [angle 64 ; attended 36-view feature], attention
  over an 80-word instruction and the candidates, teacher-forced, backward at the episode's end).
  bench/vln_train.py (issue 11) measures the real follower.

For scale (R2R-EnvDrop + MatterSim on this class of CPU, from the issue): ~0.3-0.55 ms per
`make_candidate` sweep, ~100-170k simulator actions/s, 86 ms per follower decision step at batch
64 on 1 thread.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_features, load_average

from cliptransfer.nav import load_graphs, load_r2r
from cliptransfer.nav.env import NavEnv
from cliptransfer.nav.tables import NavTables, angle_feature

REPO = Path(__file__).resolve().parents[1]


def envdrop_get_obs(tables, features, env, buffered):
    """R2R-EnvDrop's `_get_obs` + buffered `make_candidate` + `_teacher_action`, per env."""
    view_angle = tables.view_angles
    obs = []
    for i in range(len(env.vp)):
        vp, view, goal = int(env.vp[i]), int(env.view[i]), int(env.goal[i])
        feature = features[vp]  # (36, D) numpy
        base_heading = (view % 12) * math.radians(30)
        if vp not in buffered:  # EnvDrop sweeps the simulator once per viewpoint
            buffered[vp] = [
                {"viewpointId": int(tables.cand_target[vp, k]),
                 "pointId": int(tables.cand_point[vp, k]),
                 "normalized_heading": float(tables.cand_state_heading[vp, k]
                                             + tables.cand_rel_heading[vp, k]),
                 "elevation": float(tables.cand_elevation[vp, k])}
                for k in range(int(tables.cand_count[vp]))
            ]  # fmt: skip
        candidate = []
        for c in buffered[vp]:
            c_new = c.copy()
            c_new["heading"] = c_new["normalized_heading"] - base_heading
            angle = angle_feature(np.array(c_new["heading"]), np.array(c_new["elevation"]))
            c_new["feature"] = np.concatenate((feature[c_new["pointId"]], angle), -1)
            candidate.append(c_new)
        nxt = int(tables.next_hop(np.array([vp]), np.array([goal]))[0])
        teacher = len(candidate)
        for k, c in enumerate(candidate):
            if c["viewpointId"] == nxt:
                teacher = k
        obs.append({"feature": np.concatenate((feature, view_angle[view % 12]), -1),
                    "candidate": candidate, "teacher": teacher})  # fmt: skip
    return obs


class StandInDecoder(torch.nn.Module):
    """EnvDrop follower decision-step sizes (not the agent itself; see the module docstring)."""

    def __init__(self, dim: int, hidden: int = 512, angle: int = 128) -> None:
        super().__init__()
        feat = dim + angle
        self.angle_embed = torch.nn.Linear(angle, 64)
        self.feat_att = torch.nn.Linear(hidden, feat, bias=False)
        self.lstm = torch.nn.LSTMCell(64 + feat, hidden)
        self.text_att = torch.nn.Linear(hidden, hidden, bias=False)
        self.text_out = torch.nn.Linear(2 * hidden, hidden)
        self.cand_att = torch.nn.Linear(hidden, feat, bias=False)

    def forward(self, ob, prev_angle, h, c, ctx):
        views = torch.cat([ob.views, ob.view_angles], -1)  # (B, 36, D + A)
        cands = torch.cat([ob.cand_views, ob.cand_angles], -1)  # (B, K, D + A)
        att = torch.softmax((views @ self.feat_att(h)[:, :, None]).squeeze(-1), -1)
        attended = (att[:, :, None] * views).sum(1)
        h, c = self.lstm(torch.cat([self.angle_embed(prev_angle), attended], -1), (h, c))
        w = torch.softmax((ctx @ self.text_att(h)[:, :, None]).squeeze(-1), -1)
        h_tilde = torch.tanh(self.text_out(torch.cat([(w[:, :, None] * ctx).sum(1), h], -1)))
        logits = (cands @ self.cand_att(h_tilde)[:, :, None]).squeeze(-1)
        # STOP is EnvDrop's extra zero-feature candidate after the real ones: index cand_count.
        logits = torch.nn.functional.pad(
            logits.masked_fill(~ob.cand_mask, -1e9), (0, 1), value=-1e9
        )
        logits = logits.scatter(1, ob.cand_count[:, None], 0.0)
        return logits, h, c  # (B, K + 1)


def rollouts(env, episodes, batch, policy, rng, decoder=None):
    """(batched steps, env seconds) over the episodes in batches of `batch`."""
    steps, env_s = 0, 0.0
    for start in range(0, len(episodes) - batch + 1, batch):
        t0 = time.perf_counter()
        ob = env.reset(episodes[start : start + batch])
        env_s += time.perf_counter() - t0
        if decoder is not None:
            h = c = torch.zeros(batch, 512)
            ctx = torch.randn(batch, 80, 512)
            prev = torch.zeros(batch, 128)
            loss = 0.0
        while not env.done:
            if decoder is not None:
                logits, h, c = decoder(ob, prev, h, c, ctx)
                loss = loss + torch.nn.functional.cross_entropy(
                    logits, ob.teacher, ignore_index=-100
                )
            if policy == "teacher":
                action = ob.teacher.clamp(min=0)
            else:  # random candidate, never stop: every step moves
                action = torch.from_numpy(rng.integers(0, ob.cand_count.numpy()))
            t0 = time.perf_counter()
            nxt = env.step(action)
            env_s += time.perf_counter() - t0
            if decoder is not None:  # the taken candidate's angle feature (zeros for STOP)
                k = action.clamp(max=ob.cand_angles.shape[1] - 1)
                prev = ob.cand_angles[torch.arange(batch), k] * (action < ob.cand_count)[:, None]
            ob = nxt
            steps += 1
        if decoder is not None:
            loss.backward()
    return steps, env_s


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--r2r", type=Path, default=REPO.parent / "shared" / "data" / "r2r")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=35)
    ap.add_argument("--episodes", type=int, default=1024, help="episodes per measurement")
    args = ap.parse_args()
    if not (args.r2r / "connectivity").is_dir():
        sys.exit(f"no R2R connectivity under {args.r2r}: pass --r2r DIR (../shared/data/r2r)")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_features()}; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"load before: {load_average()}")

    episodes = load_r2r(args.r2r / "R2R_val_seen.json") + load_r2r(args.r2r / "R2R_val_unseen.json")
    scans = sorted({e.scan for e in episodes})
    graphs = load_graphs(args.r2r / "connectivity", scans)
    t0 = time.perf_counter()
    tables = NavTables.build(graphs, scans)
    build_s = time.perf_counter() - t0
    table_mb = sum(getattr(tables, f).nbytes for f in tables.__dataclass_fields__
                   if isinstance(getattr(tables, f), np.ndarray)) / 2**20  # fmt: skip
    features = torch.randn(len(tables), 36, args.dim, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    episodes = [episodes[i] for i in rng.permutation(len(episodes))[: args.episodes]]
    env = NavEnv(tables, features, max_steps=args.max_steps)

    print(f"\n{len(scans)} scans, {len(tables)} viewpoints, {len(episodes)} episodes, batch "
          f"{args.batch}, D={args.dim}, max {args.max_steps} steps\n")  # fmt: skip
    print("| measure | value |\n|---|---|")
    print(f"| table build (sweeps + all-pairs paths) | {build_s:.2f} s "
          f"({1000 * build_s / len(tables):.3f} ms per viewpoint) |")  # fmt: skip
    print(f"| tables / features memory | {table_mb:.1f} MB / {features.nbytes / 2**20:.0f} MB |")
    rollouts(env, episodes[: args.batch], args.batch, "teacher", rng)  # warm-up
    for policy in ("teacher", "random"):
        steps, env_s = rollouts(env, episodes, args.batch, policy, rng)
        ms = 1000 * env_s / steps
        print(f"| env step, {policy} actions | {ms:.3f} ms per batched step, "
              f"{args.batch * steps / env_s:,.0f} agent-steps/s |")  # fmt: skip

    # Peer: EnvDrop's Python observation code on the same states (teacher rollouts).
    feats_np, buffered = features.numpy(), {}
    peer_s, ours_s, n = 0.0, 0.0, 0
    for start in range(0, len(episodes) - args.batch + 1, args.batch):
        ob = env.reset(episodes[start : start + args.batch])
        while not env.done:
            t0 = time.perf_counter()
            envdrop_get_obs(tables, feats_np, env, buffered)
            t1 = time.perf_counter()
            env.observe()
            t2 = time.perf_counter()
            peer_s, ours_s, n = peer_s + t1 - t0, ours_s + t2 - t1, n + 1
            ob = env.step(ob.teacher.clamp(min=0))
    print(f"| observation, EnvDrop's per-env Python (peer) | {1000 * peer_s / n:.3f} ms |")
    print(f"| observation, ours (vectorised) | {1000 * ours_s / n:.3f} ms "
          f"(**{peer_s / ours_s:.1f}x** faster) |")  # fmt: skip

    decoder = StandInDecoder(args.dim)
    t0 = time.perf_counter()
    steps, env_s = rollouts(env, episodes[: 4 * args.batch], args.batch, "teacher", rng, decoder)
    total_s = time.perf_counter() - t0
    print(f"| stand-in agent step (fwd + bwd) incl. env | {1000 * total_s / steps:.1f} ms |")
    print(f"| env share of that step | **{100 * env_s / total_s:.1f} %** (target < 5 %) |")
    print(
        f"| env share of EnvDrop's 86 ms step (quoted) | {100 * 1000 * env_s / steps / 86:.1f} % |"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"| peak RSS | {rss:.0f} MB |")
    print(f"\nload after: {load_average()}")


if __name__ == "__main__":
    main()
