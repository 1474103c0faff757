"""Scoring navigation agents on a split: the follower's greedy trajectories (sharded over the
processes, gathered back in the split's order), the official metrics per split (and per language
for RxR), and the random / forward-only walkers scored by the same evaluator."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from cliptransfer.nav.env import NavEnv
from cliptransfer.nav.episodes import Episode
from cliptransfer.nav.graph import NavGraph
from cliptransfer.nav.metrics import evaluate_nav
from cliptransfer.tasks.vln.agent import Follower
from cliptransfer.tasks.vln.rollout import forward_walk, rollout

__all__ = ["greedy_trajectories", "score_split", "walker_baselines"]

# (tokens (B, L), lengths (B,)) of a list of episodes, on the run's device
Encode = Callable[[Sequence[Episode]], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def greedy_trajectories(agent: Follower, env: NavEnv, episodes: Sequence[Episode], encode: Encode,
                        batch_size: int, accelerator: Accelerator, *,
                        zero_vision: bool = False) -> list[dict]:  # fmt: skip
    """Greedy (argmax) trajectories of every episode, in R2R's results format. Each process
    runs a contiguous shard, so 1 or 2 processes give the same list in the same order."""
    shard = np.array_split(np.arange(len(episodes)), accelerator.num_processes)
    mine = [episodes[i] for i in shard[accelerator.process_index]]
    was = agent.training
    agent.eval()
    out: list[dict] = []
    for start in range(0, len(mine), batch_size):
        part = mine[start : start + batch_size]
        tokens, lengths = encode(part)
        rollout(agent, env, part, tokens, lengths, feedback="argmax", zero_vision=zero_vision)
        out += env.trajectories()
    agent.train(was)
    return gather_object(out) if accelerator.num_processes > 1 else out


def score_split(episodes: Sequence[Episode], results: list[dict],
                graphs: dict[str, NavGraph]) -> dict:  # fmt: skip
    """NE / SR / SPL / nDTW / SDTW ... of `results` on `episodes`; with several languages (RxR,
    one agent for all) also `languages: {lang: {nav_error, success_rate, ndtw}}`."""
    metrics, _ = evaluate_nav(episodes, results, graphs)
    languages = sorted({e.language for e in episodes if e.language})
    if len(languages) > 1:
        by_id = {r["instr_id"]: r for r in results}
        metrics["languages"] = {}
        for lang in languages:
            sub = [e for e in episodes if e.language == lang]
            m, _ = evaluate_nav(sub, [by_id[e.instr_id] for e in sub], graphs)
            metrics["languages"][lang] = {k: m[k] for k in ("nav_error", "success_rate", "ndtw")}
    return metrics


def walker_baselines(env: NavEnv, splits: dict[str, Sequence[Episode]], graphs: dict[str, NavGraph],
                     seed: int, batch_size: int = 256) -> dict[str, dict]:  # fmt: skip
    """{"random" | "forward": {split: metrics}}: R2R's RandomAgent (seeded per split) and
    EnvDrop's forward-only heuristic."""
    out: dict[str, dict] = {"random": {}, "forward": {}}
    for split, eps in splits.items():
        rng = np.random.default_rng(seed)
        random_trajs, forward_trajs = [], []
        for start in range(0, len(eps), batch_size):
            part = eps[start : start + batch_size]
            random_trajs += forward_walk(env, part, rng=rng)
            forward_trajs += forward_walk(env, part)
        out["random"][split] = score_split(eps, random_trajs, graphs)
        out["forward"][split] = score_split(eps, forward_trajs, graphs)
    return out
