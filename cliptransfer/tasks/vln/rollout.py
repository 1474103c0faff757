"""Episodes of the follower in a `NavEnv`: R2R-EnvDrop's `Seq2SeqAgent.rollout` (r2r_src/agent.py)
and the baselines scored next to it.

- Imitation ("teacher"): the teacher's action is both the target and the action taken;
  ml_loss = sum over steps of the cross entropy (ended episodes ignored).
- A2C ("sample"): actions sampled from the policy; reward per step = +2 / -2 for stopping within
  / beyond 3 m of the goal, else the sign of the distance gained (+1 / -1; 0 where a move keeps
  the distance); returns discounted by gamma from the critic's value of the last state for
  episodes that did not stop; loss = sum of -log p(a) * advantage + 0.5 * (return - value)^2
  - 0.01 * entropy, divided by the number of live steps (EnvDrop's normalize_loss="total").
- "argmax": greedy evaluation.
Baselines: Matterport3DSimulator's R2R RandomAgent (turn to a random heading, then walk forward
5 steps) and the forward-only agent (the same without the random turn).
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F

from cliptransfer.dropout import current_generator
from cliptransfer.nav.env import IGNORE_ACTION, NavEnv, NavObservation
from cliptransfer.nav.episodes import Episode
from cliptransfer.tasks.vln.lanes import Rollout

__all__ = ["encode_instructions", "forward_walk", "imitation_and_a2c", "pad_token_rows", "rollout",
           "sample_actions"]  # fmt: skip

SUCCESS_REWARD = 2.0
# A rollout stops computing ended episodes once the running ones are at most this share of the
# rows computed: each compaction copies the kept rows' instruction context (~10 MB at batch 64,
# 80 tokens, 512-d), so compacting at every stop would cost more than it saves.
COMPACT_AT = 0.75


def encode_instructions(
    tokenizer, episodes: list[Episode], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, L) padded with the tokenizer's pad id, lengths (B,)): the words, cut to
    max_len - 1, then EOT (EnvDrop appends <EOS>)."""
    rows = [tokenizer.tokenize_words(e.instruction)[: max_len - 1] + [tokenizer.eot_id]
            for e in episodes]  # fmt: skip
    return pad_token_rows(rows, tokenizer.pad_id)


def pad_token_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, L) right-padded with `pad_id`, lengths (B,)) of token-id rows."""
    tokens = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, torch.tensor([len(r) for r in rows])


def imitation_and_a2c(agent, episodes: list[Episode], tokens: torch.Tensor,
                      lengths: torch.Tensor, rl, ml_weight: float, *, zero_vision: bool = False,
                      env_mask: torch.Tensor | None = None,
                      compact: bool = True) -> list[Rollout]:  # fmt: skip
    """EnvDrop's `train(feedback="sample")` on one batch, as rollouts for `run_rollouts`: the
    teacher-forced rollout weighted by `ml_weight`, then (when `rl.feedback == "sample"`) the
    A2C rollout. Their outputs hold the logged terms `ml_loss` (per episode) and `rl_loss`,
    and `steps` and `rows` (`rollout`'s)."""
    kw = {"zero_vision": zero_vision, "env_mask": env_mask, "compact": compact}

    kept = ("loss", "steps", "rows")

    def imitation(env: NavEnv) -> dict:
        out = rollout(agent, env, episodes, tokens, lengths, feedback="teacher",
                      ml_weight=ml_weight, **kw)  # fmt: skip
        return {**{k: out[k] for k in kept}, "ml_loss": out["ml_loss"] / len(episodes)}

    def a2c(env: NavEnv) -> dict:
        out = rollout(agent, env, episodes, tokens, lengths, feedback="sample", rl=True,
                      gamma=rl.gamma, entropy_weight=rl.entropy, **kw)  # fmt: skip
        return {k: out[k] for k in (*kept, "rl_loss")}

    if rl.feedback != "sample":
        return [Rollout(imitation)]
    return [Rollout(imitation), Rollout(a2c, first=True)]  # A2C walks longer: start it first


def _to(ob: NavObservation, device: torch.device) -> NavObservation:
    return NavObservation(**{f.name: getattr(ob, f.name).to(device) for f in fields(ob)})


def sample_actions(probs: torch.Tensor) -> torch.Tensor:
    """One action per row of probs (B, K) -> (B,), drawn on the CPU from the thread's generator
    (`dropout.local_generator`: rollouts on several threads, tasks.vln.lanes)."""
    draw = torch.multinomial(probs.detach().cpu(), 1, True, generator=current_generator())
    return draw.squeeze(1).to(probs.device)


def rollout(model, env: NavEnv, episodes: list[Episode], tokens: torch.Tensor,
            lengths: torch.Tensor, *, feedback: str, ml_weight: float | None = None,
            rl: bool = False, gamma: float = 0.9, entropy_weight: float = 0.01,
            env_mask: torch.Tensor | None = None, zero_vision: bool = False,
            compact: bool = True) -> dict:  # fmt: skip
    """Run one batch of episodes to the end. Returns {"loss" (when training), "ml_loss",
    "rl_loss", "steps" (batched decisions), "rows" (episode decisions computed)}; the
    trajectories stay in `env.trajectories()`.

    `compact`: stop computing episodes that have ended (EnvDrop computes the whole batch until
    the last one stops; their outputs are masked out, so the losses, gradients and
    trajectories are the same up to summation order, but feature dropout's masks are drawn for
    the rows computed)."""
    if feedback not in ("teacher", "sample", "argmax"):
        raise ValueError(f"feedback {feedback!r}: use teacher, sample or argmax")
    if rl and feedback != "sample":
        raise ValueError("the A2C loss needs sampled actions (feedback='sample')")
    device = tokens.device
    ob = env.reset(episodes)
    text, state = model.encode(tokens, lengths)
    weights = model.decoder_weights()  # every step's layers, weight gradients formed once
    batch = len(episodes)
    rows = np.arange(batch)  # the episodes computed: every running one, maybe some ended
    rows_t = torch.arange(batch, device=device)
    prev_angle = torch.zeros(batch, env.tables.view_angles.shape[-1], device=device)
    stopped = np.zeros(batch, bool)
    last_dist = ob.distance.numpy().copy()
    ml_loss = torch.zeros((), device=device)
    rewards, masks, log_probs, entropies, values_in, step_rows = [], [], [], [], [], []
    steps = computed = 0
    while not env.done:
        dev_ob = _to(ob, device)
        logits, state, h1 = model.step(dev_ob, prev_angle, state, text, env_mask,
                                       zero_vision, env.features, weights)  # fmt: skip
        if ml_weight is not None:
            ml_loss = ml_loss + F.cross_entropy(logits, dev_ob.teacher, ignore_index=IGNORE_ACTION,
                                                reduction="sum")  # fmt: skip
        if feedback == "teacher":
            action = dev_ob.teacher.clamp(min=0)
        elif feedback == "argmax":
            action = logits.argmax(1)
        else:
            dist = torch.distributions.Categorical(logits=logits)
            action = sample_actions(dist.probs)
            log_probs.append(dist.log_prob(action))
            entropies.append(dist.entropy())
            values_in.append(h1)
            step_rows.append(rows_t)
        action_np = action.cpu().numpy()
        k = ob.cand_angles.shape[1]
        moved = (action < dev_ob.cand_count).unsqueeze(1)
        prev_angle = dev_ob.cand_angles[torch.arange(len(rows), device=device),
                                        action.clamp(max=k - 1)] * moved  # fmt: skip
        live = ~env.ended
        stop_now = np.zeros(batch, bool)
        stop_now[rows] = live[rows] & (action_np == ob.cand_count.numpy())
        full_action = np.zeros(batch, np.int64)  # ended episodes ignore theirs
        full_action[rows] = action_np
        env.act(full_action)
        steps, computed = steps + 1, computed + len(rows)
        if rl:
            dist_now = env.distances()
            reward = np.where(stop_now, np.where(dist_now < 3.0, SUCCESS_REWARD, -SUCCESS_REWARD),
                              np.sign(last_dist - dist_now))  # fmt: skip
            rewards.append(np.where(live, reward, 0.0).astype(np.float32))
            masks.append(live.astype(np.float32))
            last_dist = dist_now
        stopped |= stop_now
        running = ~env.ended
        if compact and running.any() and running.sum() <= COMPACT_AT * len(rows):
            kept = np.flatnonzero(running[rows])  # positions in the computed rows
            keep = torch.from_numpy(kept).to(device)
            rows = rows[kept]
            rows_t = rows_t.index_select(0, keep)
            state = tuple(s.index_select(0, keep) for s in state)
            prev_angle = prev_angle.index_select(0, keep)
            text = text.select(keep)
            env_mask = None if env_mask is None else env_mask.index_select(0, keep)
        ob = env.observe(None if len(rows) == batch else rows)
    out = {"ml_loss": ml_loss.detach(), "steps": steps, "rows": computed}
    loss = torch.zeros((), device=device)
    if ml_weight is not None:
        loss = loss + ml_loss * ml_weight / batch
    if rl:
        with torch.no_grad():  # the critic's value of the final state, for unfinished episodes
            _, _, h_last = model.step(_to(ob, device), prev_angle, state, text, env_mask,
                                      zero_vision, weights=weights)  # fmt: skip
            last_value = model.critic(h_last).squeeze(1).float()  # bf16 under autocast
        # Episodes no longer computed have stopped: their return starts at 0.
        ret = torch.zeros(batch, device=device).index_copy_(
            0, rows_t, torch.where(torch.from_numpy(stopped[rows]).to(device), 0.0, last_value)
        )
        rl_loss, total = torch.zeros((), device=device), 0.0
        # One critic GEMM over all steps' computed rows, not one per step.
        values = model.critic(torch.cat(values_in)).squeeze(1).split([len(r) for r in step_rows])
        for t in range(len(rewards) - 1, -1, -1):
            ret = ret * gamma + torch.from_numpy(rewards[t]).to(device)
            r = step_rows[t]
            mask = torch.from_numpy(masks[t]).to(device)[r]
            value, ret_t = values[t], ret[r]
            advantage = (ret_t - value).detach()
            rl_loss = rl_loss + (-log_probs[t] * advantage * mask).sum()
            rl_loss = rl_loss + ((ret_t - value) ** 2 * mask).sum() * 0.5
            rl_loss = rl_loss - entropy_weight * (entropies[t] * mask).sum()
            total += float(masks[t].sum())
        rl_loss = rl_loss / max(total, 1.0)
        loss = loss + rl_loss
        out["rl_loss"] = rl_loss.detach()
    out["loss"] = loss
    return out


def forward_walk(env: NavEnv, episodes: list[Episode], *, steps: int = 5,
                 rng: np.random.Generator | None = None) -> list[dict]:  # fmt: skip
    """Matterport3DSimulator's RandomAgent when `rng` is given (a random start heading), the
    forward-only agent otherwise: each step, the candidate nearest straight ahead (within 90 deg
    of the walker's heading, else stop), `steps` moves, then stop. Returns the trajectories."""
    ob = env.reset(episodes)
    heading = np.array([e.heading for e in episodes], np.float64)
    if rng is not None:
        heading = rng.uniform(0, 2 * math.pi, len(episodes))
    t = env.tables
    for _ in range(steps):
        vp = ob.viewpoint.numpy()
        count = ob.cand_count.numpy()
        k = ob.cand_viewpoint.shape[1]
        # Absolute heading of each candidate (EnvDrop's normalized_heading).
        absolute = t.cand_state_heading[vp, :k] + t.cand_rel_heading[vp, :k]
        off = np.abs((absolute - heading[:, None] + math.pi) % (2 * math.pi) - math.pi)
        off[~ob.cand_mask.numpy()] = np.inf
        best = off.argmin(1)
        ahead = off[np.arange(len(vp)), best] < math.pi / 2
        action = np.where(ahead, best, count)
        heading = np.where(ahead, absolute[np.arange(len(vp)), best], heading)
        ob = env.step(action)
        if env.done:
            break
    if not env.done:
        env.step(ob.cand_count.numpy())
    return env.trajectories()
