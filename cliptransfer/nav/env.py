"""A batched R2R / RxR environment: R2R-EnvDrop's `R2RBatch` + `make_equiv_action` without
MatterSim, vectorised over the batch through `NavTables`.

Per step an observation holds, for every episode of the batch, the 36 view features with
EnvDrop's angle features relative to the agent's view column, the candidates (EnvDrop's
`make_candidate` records) with the pointId view's feature and the 128-d angle feature of the
candidate relative to the agent's heading, the teacher action (index of the candidate that is the
next hop of the shortest path to the goal, or STOP = the candidate count at the goal), and the
geodesic distance to the goal. `step(actions)` moves each agent to the chosen candidate and
leaves it looking at that candidate's pointId view, as EnvDrop's `make_equiv_action` does
(elevation first, then right turns, then the move; every intermediate state is recorded in the
trajectory as EnvDrop records it). Trajectories come out in the R2R results format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cliptransfer.nav.episodes import Episode
from cliptransfer.nav.tables import NUM_VIEWS, NavTables, angle_feature
from cliptransfer.nav.views import HEADING_COUNT, start_view, view_angles

__all__ = ["IGNORE_ACTION", "NavEnv", "NavObservation", "turn_sequence"]

IGNORE_ACTION = -100  # the teacher's action for an episode that has ended (CrossEntropy ignore)


def turn_sequence(src: int, trg: int) -> list[int]:
    """View indices EnvDrop's `make_equiv_action` passes through from view `src` to view `trg`:
    'up'/'down' (±12) to the target row, then 'right' (+1 within the row) to the target."""
    out, view = [], src
    while view // HEADING_COUNT < trg // HEADING_COUNT:
        view += HEADING_COUNT
        out.append(view)
    while view // HEADING_COUNT > trg // HEADING_COUNT:
        view -= HEADING_COUNT
        out.append(view)
    while view != trg:
        view = (view // HEADING_COUNT) * HEADING_COUNT + (view % HEADING_COUNT + 1) % HEADING_COUNT
        out.append(view)
    return out


_TURNS = [[turn_sequence(s, t) for t in range(NUM_VIEWS)] for s in range(NUM_VIEWS)]
_ANGLES = [view_angles(ix) for ix in range(NUM_VIEWS)]


@dataclass
class NavObservation:
    """One step of a batch of B episodes; K = the largest candidate count in the batch, A = the
    angle feature size, D = the view feature size. Candidates past `cand_count` are padding."""

    viewpoint: torch.Tensor  # (B,) long, global viewpoint id (NavTables.keys)
    view_index: torch.Tensor  # (B,) long, 0..35
    views: torch.Tensor  # (B, 36, D) view features
    view_angles: torch.Tensor  # (B, 36, A) relative to the agent's view column
    cand_views: torch.Tensor  # (B, K, D) feature of each candidate's pointId view
    cand_angles: torch.Tensor  # (B, K, A) relative to the agent's heading
    cand_mask: torch.Tensor  # (B, K) bool, True for real candidates
    cand_count: torch.Tensor  # (B,) long; action == cand_count is STOP
    cand_viewpoint: torch.Tensor  # (B, K) long global ids, -1 padding
    teacher: torch.Tensor  # (B,) long candidate index, cand_count = STOP, IGNORE_ACTION if ended
    distance: torch.Tensor  # (B,) float64 geodesic metres to the goal
    ended: torch.Tensor  # (B,) bool, ended before this step


class NavEnv:
    """Batched episodes over `tables` with view features `features` (N, 36, D) indexed by global
    viewpoint id (`load_view_table`), on any device: the feature tensors of an observation are
    gathered there, the rest stays on the CPU. The table may be kept in float16/bfloat16 to halve
    its memory; observations are float32 either way. Use `reset(episodes)`, then `step(actions)`
    until `done`."""

    def __init__(
        self,
        tables: NavTables,
        features: torch.Tensor,
        *,
        max_steps: int = 35,
        record_turns: bool = True,
    ) -> None:
        if features.dim() != 3 or features.shape[:2] != (len(tables), NUM_VIEWS):
            raise ValueError(
                f"features have shape {tuple(features.shape)}, expected ({len(tables)}, 36, D)"
            )
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.tables, self.features = tables, features
        self.max_steps, self.record_turns = max_steps, record_turns
        features = features.contiguous()
        self._flat = features.view(-1, features.shape[-1])  # (N * 36, D)
        self._view_angles = torch.from_numpy(tables.view_angles)  # (12, 36, A)
        self.episodes: list[Episode] = []
        self._lanes: dict[int, NavEnv] = {}  # `lane`

    def lane(self, k: int) -> NavEnv:
        """Environment k of a set over the same tables and features (0: this one), for other
        batches of episodes run at the same time on other threads (`tasks.vln.lanes`)."""
        if k == 0:
            return self
        if k not in self._lanes:
            self._lanes[k] = NavEnv(self.tables, self.features, max_steps=self.max_steps,
                                    record_turns=self.record_turns)  # fmt: skip
        self._lanes[k].max_steps = self.max_steps
        return self._lanes[k]

    # --- episode state ---------------------------------------------------------------------
    def reset(self, episodes: Sequence[Episode]) -> NavObservation:
        """Start every episode at its first viewpoint with MatterSim's discretised heading."""
        if not episodes:
            raise ValueError("reset needs at least one episode")
        t = self.tables
        self.episodes = list(episodes)
        vps, goals, views = [], [], []
        for ep in self.episodes:
            try:
                start, goal = t.ids(ep.scan, [ep.start, ep.goal])
            except KeyError as e:
                raise KeyError(f"episode {ep.instr_id}: {e.args[0]}") from None
            vps.append(start)
            goals.append(goal)
            views.append(start_view(ep.heading)[0])
        self.vp = np.array(vps, np.int64)
        self.goal = np.array(goals, np.int64)
        self.view = np.array(views, np.int64)
        self.ended = np.zeros(len(vps), bool)
        self.steps = 0
        # Moves are logged as arrays, one entry per step (rows, from view, to viewpoint, to
        # view), and turned into trajectories only when asked: training never pays for them.
        self._start = (self.vp.copy(), self.view.copy())
        self._log: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        return self.observe()

    @property
    def done(self) -> bool:
        return bool(self.ended.all())

    def distances(self) -> np.ndarray:
        """(B,) float64 geodesic metres from each episode's viewpoint to its goal."""
        t = self.tables
        return t.pair_distance[t.pair_index(self.vp, self.goal)]

    def observe(self, rows: np.ndarray | None = None) -> NavObservation:
        """The observation of every episode, or of the episodes `rows` (sorted indices into the
        batch) only: a rollout that stops computing ended episodes gathers no views for them."""
        t = self.tables
        sel = slice(None) if rows is None else np.asarray(rows, np.int64)
        vp, goal, view, ended = self.vp[sel], self.goal[sel], self.view[sel], self.ended[sel]
        count = t.cand_count[vp]
        k = max(int(count.max()), 1)
        target = t.cand_target[vp, :k]
        point = t.cand_point[vp, :k]
        mask = target >= 0
        heading = t.candidate_headings(vp, view)[:, :k]
        cand_angles = angle_feature(heading, t.cand_elevation[vp, :k], t.view_angles.shape[-1])
        cand_angles[~mask] = 0.0

        # Teacher: STOP at the goal, otherwise the candidate that is the next hop.
        at_goal = vp == goal
        pair = t.pair_index(vp, goal)  # once: the teacher and the distance both read it
        nxt = t.pair_next[pair]
        hit = target == nxt[:, None]
        teacher = np.where(at_goal, count, hit.argmax(1))
        lost = ~at_goal & ~hit.any(1) & ~ended
        if lost.any():
            i = int(np.flatnonzero(lost)[0])
            episode = self.episodes[i if rows is None else int(rows[i])]
            raise RuntimeError(
                f"episode {episode.instr_id}: the goal cannot be reached from "
                f"{t.keys[vp[i]][1]} through its candidates (disconnected scan graph?)"
            )
        teacher = np.where(ended, IGNORE_ACTION, teacher)

        # index_select, and a flat one for the candidates: ~2x and ~5x faster than advanced
        # indexing on the CPU; the indices go to the features' device (a GPU table gathers there).
        dev = self.features.device
        vp_t = torch.from_numpy(vp.copy())  # a snapshot: step() moves self.vp in place
        flat = torch.from_numpy(vp[:, None] * NUM_VIEWS + point).view(-1).to(dev)
        cand_views = self._flat.index_select(0, flat).view(len(vp), k, -1).float()
        return NavObservation(
            viewpoint=vp_t,
            view_index=torch.from_numpy(view.copy()),
            views=self.features.index_select(0, vp_t.to(dev)).float(),
            view_angles=self._view_angles[torch.from_numpy(view % HEADING_COUNT)],
            cand_views=cand_views,
            cand_angles=torch.from_numpy(cand_angles),
            cand_mask=torch.from_numpy(mask),
            cand_count=torch.from_numpy(count),
            cand_viewpoint=torch.from_numpy(target),
            teacher=torch.from_numpy(teacher.astype(np.int64)),
            distance=torch.from_numpy(t.pair_distance[pair]),
            ended=torch.from_numpy(ended.copy()),
        )

    def step(self, actions: torch.Tensor | np.ndarray | Sequence[int]) -> NavObservation:
        """Apply one decision per episode: a candidate index, or STOP (= the candidate count, or
        -1). Ended episodes ignore theirs. After `max_steps` decisions every episode ends."""
        self.act(actions)
        return self.observe()

    def act(self, actions: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """`step` without the observation (take it with `observe`, e.g. of some rows only)."""
        a = np.asarray(actions.cpu() if isinstance(actions, torch.Tensor) else actions, np.int64)
        if a.shape != self.vp.shape:
            raise ValueError(f"{a.shape[0] if a.ndim else 'a scalar'} actions for {len(self.vp)}")
        t = self.tables
        count = t.cand_count[self.vp]
        live = ~self.ended
        stop = live & ((a == count) | (a == -1))
        move = live & ~stop
        bad = move & ((a < 0) | (a > count))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"episode {self.episodes[i].instr_id}: action {a[i]} with {count[i]} candidates "
                f"(0..{count[i] - 1} move, {count[i]} or -1 stops)"
            )
        rows = np.flatnonzero(move)
        new_vp = t.cand_target[self.vp[rows], a[rows]]
        new_view = t.cand_point[self.vp[rows], a[rows]]
        self._log.append((rows, self.view[rows], new_vp, new_view))
        self.vp[rows], self.view[rows] = new_vp, new_view
        self.ended |= stop
        self.steps += 1
        if self.steps >= self.max_steps:
            self.ended[:] = True

    def trajectories(self) -> list[dict]:
        """R2R results records: [{"instr_id", "trajectory": [[viewpoint, heading, elevation]]}]."""
        keys = self.tables.keys
        paths = [
            [[keys[v][1], *_ANGLES[ix]]] for v, ix in zip(*map(np.ndarray.tolist, self._start))
        ]
        for rows, src, vps, trg in self._log:
            for i, s, v, t in zip(*(x.tolist() for x in (rows, src, vps, trg)), strict=True):
                path = paths[i]
                if self.record_turns:
                    here = path[-1][0]
                    path += [[here, *_ANGLES[ix]] for ix in _TURNS[s][t]]
                path.append([keys[v][1], *_ANGLES[t]])
        return [
            {"instr_id": ep.instr_id, "trajectory": path}
            for ep, path in zip(self.episodes, paths, strict=True)
        ]
