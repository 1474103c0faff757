"""Vision-and-language navigation (R2R / RxR) as a task of the engine: R2R-EnvDrop's follower
(imitation + A2C) on 36-view CLIP features in our simulator-free `NavEnv`, scored by the
official metrics; the same agent with zeroed visual features trained beside it ("no vision"),
and the random / forward-only walkers, as baselines. Also `cliptransfer evaluate r2r|rxr`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cliptransfer import malloc
from cliptransfer.config import ConfigError, to_dict
from cliptransfer.engine.evaluation import peak_memory
from cliptransfer.engine.optim import OptimizerSpec
from cliptransfer.engine.rmsprop import RMSprop
from cliptransfer.engine.task import CompareColumns, EvalOnlyTask, register_task
from cliptransfer.nav.env import NavEnv
from cliptransfer.nav.tables import NavTables, load_view_table
from cliptransfer.tasks.vl_model import save_model_dir
from cliptransfer.tasks.vln import evaluate as _evaluate  # noqa: F401 - cliptransfer evaluate r2r|rxr
from cliptransfer.tasks.vln.agent import Follower
from cliptransfer.tasks.vln.backtranslate import (
    BTModel,
    check_speaker,
    load_speaker,
    sample_aug_paths,
    speaker_dir,
)
from cliptransfer.tasks.vln.config import RLConfig, VLNConfig
from cliptransfer.tasks.vln.data import FEATURE_DTYPES, load_vln_data, train_tokenizer
from cliptransfer.tasks.vln.lanes import run_rollouts
from cliptransfer.tasks.vln.report import EVAL_SPLITS, report_text
from cliptransfer.tasks.vln.rollout import encode_instructions, imitation_and_a2c
from cliptransfer.tasks.vln.scoring import greedy_trajectories, score_split, walker_baselines
from cliptransfer.tasks.vln.speaker import Speaker, SpeakerModel, instruction_tokens, speaker_bleu
from cliptransfer.visual.store import FeatureStore

__all__ = ["RLConfig", "VLNConfig", "VLNModel", "VLNTask"]

METRICS = ("nav_error", "success_rate", "spl", "ndtw", "sdtw")


class VLNModel(nn.Module):
    """The follower and, optionally, its no-vision twin; `forward` runs the training rollouts
    of one batch (so that DDP sees one forward per step) and returns the loss terms."""

    def __init__(self, agent: Follower, blind: Follower | None, rollout_threads: int = 0) -> None:
        super().__init__()
        self.agent, self.blind, self.rollout_threads = agent, blind, rollout_threads

    def forward(self, env: NavEnv, episodes, tokens, lengths, rl: RLConfig,
                env_mask: torch.Tensor | None = None) -> dict:  # fmt: skip
        ml_weight = rl.ml_weight if rl.feedback == "sample" else 1.0
        loss, terms = self.walk(env, episodes, tokens, lengths, rl, ml_weight, env_mask)
        return {"loss": loss, **terms}

    def walk(self, env: NavEnv, episodes, tokens, lengths, rl: RLConfig, ml_weight: float,
             env_mask: torch.Tensor | None = None, *, prefix: str = "",
             loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:  # fmt: skip
        """Imitation (+ A2C) rollouts of the agent, then of its twin (zeroed views, so no
        `env_mask`), on one batch, on `rollout_threads` threads (`lanes.run_rollouts`): their
        losses added to `loss` (zero when None), and their terms named
        `prefix` + ("" | "blind_") + term."""
        loss = torch.zeros((), device=tokens.device) if loss is None else loss
        agents = [("", self.agent, False)] + ([("blind_", self.blind, True)] if self.blind else [])
        rollouts, names = [], []
        for name, agent, zero in agents:
            mine = imitation_and_a2c(agent, episodes, tokens, lengths, rl, ml_weight,
                                     zero_vision=zero, env_mask=None if zero else env_mask)  # fmt: skip
            rollouts += mine
            names += [prefix + name] * len(mine)
        total, outputs = run_rollouts(rollouts, env, list(self.parameters()),
                                      self.threads(tokens.device))  # fmt: skip
        terms = {name + k: v for name, out in zip(names, outputs) for k, v in out.items()
                 if k in ("ml_loss", "rl_loss")}  # fmt: skip
        return loss + total, terms

    def threads(self, device: torch.device) -> int:
        """The threads that run a step's rollouts: `rollout_threads`, or when 0, the process's
        intra-op threads on the CPU (one rollout per thread) and 1 elsewhere."""
        if self.rollout_threads:
            return self.rollout_threads
        return torch.get_num_threads() if device.type == "cpu" else 1


@register_task(
    "vln",
    config=VLNConfig,
    launcher="tasks/vln.py",
    configs=("configs/tasks/vln_*.yaml",),
    compare=CompareColumns(
        "success_rate",
        None,
        ("spl", "ndtw", "sdtw", "nav_error"),
        "",
        split="val_unseen",
        features_key="encoder",
        feature_kinds=("clip", "supervised", "symbolic"),
        backbone_kind="clip",
        references_key="baselines",
        fractions=("success_rate", "spl", "ndtw", "sdtw"),
        unit="rates in %, NE in m",
        # The follower alone at its budget (~6 minutes): back-translation needs a speaker per
        # feature kind. As docs/results/compare_vln_houses.md was measured.
        defaults=("stage=follower", "train.epochs=5"),
    ),  # fmt: skip
)
class VLNTask(EvalOnlyTask):
    tracker = "vln"

    @classmethod
    def apply_arguments(cls, cfg: VLNConfig, args: argparse.Namespace) -> None:
        super().apply_arguments(cfg, args)
        if cfg.stage == "bt":
            if not cfg.bt.speaker:
                raise ConfigError("stage=bt needs bt.speaker (the best/ folder of a speaker run)")
            check_speaker(cfg.bt.speaker, to_dict(cfg))

    def setup(self) -> None:
        cfg, acc = self.cfg, self.run.accelerator
        self.started = time.monotonic()
        data = load_vln_data(
            cfg.data, cfg.backbone, acc, need_train=not self.eval_only, encoder=cfg.encoder
        )
        self.data = data
        self.tokenizer = self._tokenizer(data)
        self.tables = NavTables.build(data.graphs)
        features = load_view_table(
            data.features,
            self.tables,
            norm=cfg.data.feature_norm,
            dtype=FEATURE_DTYPES[cfg.data.feature_dtype],
        )  # (N, 36, D)
        features = features.to(acc.device)
        malloc.trim()  # the table builds' and the feature store reads' freed heap (~100 MB on R2R)
        malloc.single_arena()  # the rollout threads (tasks.vln.lanes) share this heap
        self.env = NavEnv(self.tables, features, max_steps=cfg.max_steps)
        vocab = self.tokenizer.vocab_size
        dim, angle = features.shape[-1], self.tables.view_angles.shape[-1]
        a2c = cfg.rl.feedback == "sample"

        def follower() -> Follower:
            return Follower(cfg.agent, vocab, dim, angle, self.tokenizer.pad_id, critic=a2c)

        if cfg.stage == "speaker":
            self.model = SpeakerModel(
                Speaker(cfg.speaker, vocab, dim, angle, self.tokenizer.pad_id)
            )
        else:
            self.model = VLNModel(follower(), follower() if cfg.no_vision else None,
                                  cfg.rollout_threads)  # fmt: skip
        if cfg.stage == "bt":
            self.model = BTModel(self.model, load_speaker(cfg.bt.speaker, dim, angle)[0])
            self.aug = self._aug_episodes()
        self.train_data = data.episodes.get("train", [])
        self.collate = lambda items: {"episodes": items}
        self.blind_best: dict | None = None
        self.baselines = self._baselines() if cfg.stage != "speaker" else {}

    def _tokenizer(self, data):
        from cliptransfer.tokenization import load_tokenizer

        if self.eval_only:
            return load_tokenizer(Path(self.eval_only) / "tokenizer")
        if self.cfg.stage == "bt":  # the speaker's vocabulary, so its words reach the follower
            return load_tokenizer(speaker_dir(self.cfg.bt.speaker) / "tokenizer")
        if self.cfg.data.tokenizer:
            return load_tokenizer(self.cfg.data.tokenizer)
        root = data.houses if data.houses is not None else self.run.out
        folder = root / f"tokenizer-{self.cfg.data.dataset}-bpe{self.cfg.data.vocab_size}"
        acc = self.run.accelerator
        with acc.main_process_first():
            if acc.is_main_process and not (folder / "tokenizer_config.json").is_file():
                texts = [e.instruction for e in data.episodes["train"]]
                train_tokenizer(texts, folder, self.cfg.data.vocab_size)
        return load_tokenizer(folder)

    def _encode(self, episodes):
        tokens, lengths = encode_instructions(
            self.tokenizer, episodes, self.cfg.agent.max_instruction
        )
        return tokens.to(self.run.accelerator.device), lengths.to(self.run.accelerator.device)

    def _aug_episodes(self):
        from cliptransfer.nav.episodes import load_r2r

        if self.cfg.bt.aug_paths:
            return load_r2r(self.cfg.bt.aug_paths)
        train = self.data.episodes["train"]
        scans = sorted({e.scan for e in train})
        return sample_aug_paths(self.data.graphs, scans, self.cfg.bt.aug_per_scan,
                                self.cfg.train.seed, {(e.start, e.goal) for e in train})  # fmt: skip

    def optimizers(self, model: nn.Module, total_steps: int) -> list[OptimizerSpec]:
        # EnvDrop: RMSprop at a constant lr (torch's update; ours does not import torch._dynamo).
        params = [p for p in model.parameters() if p.requires_grad]
        opt = RMSprop(params, lr=self.cfg.optim.lr)
        return [
            OptimizerSpec("rmsprop", opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        ]

    def record_ids(self, batch) -> list[Any]:
        return [e.instr_id for e in batch["episodes"]]

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        episodes = batch["episodes"]
        if self.cfg.stage == "speaker":
            tokens = instruction_tokens(self.tokenizer, episodes, self.cfg.agent.max_instruction)
            return model(self.env, episodes, tokens.to(self.run.accelerator.device))
        tokens, lengths = self._encode(episodes)
        if self.cfg.stage == "bt":
            inner, bt = self.run.accelerator.unwrap_model(model), self.cfg.bt
            pick = torch.randint(len(self.aug), (len(episodes),)).tolist()
            aug = [self.aug[i] for i in pick]
            keep = self._env_mask((), bt.env_dropout, tokens.device)  # (D,): one per batch
            aug_tokens, aug_lengths = inner.instruct(self.env, aug, keep, self.tokenizer,
                                                     self.cfg.agent.max_instruction)  # fmt: skip
            return model(self.env, episodes, tokens, lengths, self.cfg.rl, aug, aug_tokens,
                         aug_lengths, keep.unsqueeze(0), bt)  # fmt: skip
        env_mask = None
        if self.cfg.agent.env_dropout > 0:  # (B, D): one mask per episode, all views and steps
            env_mask = self._env_mask((len(episodes),), self.cfg.agent.env_dropout, tokens.device)
        return model(self.env, episodes, tokens, lengths, self.cfg.rl, env_mask=env_mask)

    def _env_mask(self, lead: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
        """Environmental dropout's visual-channel mask (*lead, D): keep with 1 - p, scaled."""
        d = self.env.features.shape[-1]
        return ((torch.rand(*lead, d) >= p).float() / (1.0 - p)).to(device)

    # ---- evaluation
    def _eval_episodes(self, split: str):
        eps = self.data.episodes[split]
        return eps[: self.cfg.data.max_eval] if self.cfg.data.max_eval else eps

    def _greedy(self, agent: Follower, split: str, zero_vision: bool) -> list[dict]:
        return greedy_trajectories(agent, self.env, self._eval_episodes(split), self._encode,
                                   self.cfg.train.eval_batch_size, self.run.accelerator,
                                   zero_vision=zero_vision)  # fmt: skip

    def _score_split(self, split: str, results: list[dict]) -> dict:
        return score_split(self._eval_episodes(split), results, self.data.graphs)

    def evaluate(self, model: nn.Module, split: str) -> tuple[Any, dict | None]:
        inner = self.run.accelerator.unwrap_model(model)
        if self.cfg.stage == "speaker":
            return self._evaluate_speaker(inner.speaker)
        if self.cfg.stage == "bt":
            inner = inner.follower
        results, metrics = {}, {}
        for s in EVAL_SPLITS:
            if s in self.data.episodes:
                results[s] = self._greedy(inner.agent, s, False)
                metrics[s] = self._score_split(s, results[s])
        if inner.blind is not None:
            blind = {s: self._score_split(s, self._greedy(inner.blind, s, True)) for s in metrics}
            metrics["no_vision"] = blind
            if self.blind_best is None or self._key(blind) > self._key(self.blind_best):
                self.blind_best = blind
        return results, metrics

    def _evaluate_speaker(self, speaker: Speaker) -> tuple[dict, dict]:
        """BLEU of greedy instructions per split (every process decodes all paths: cheap)."""
        results, metrics = {}, {}
        for s in EVAL_SPLITS:
            if s in self.data.episodes:
                bleu, rows = speaker_bleu(speaker, self.env, self._eval_episodes(s), self.tokenizer,
                                          self.cfg.train.eval_batch_size, self.run.accelerator.device)  # fmt: skip
                results[s], metrics[s] = rows, {"bleu": bleu, "paths": len(rows)}
        return results, metrics

    def _key(self, m: dict) -> float:
        split = "val_unseen" if "val_unseen" in m else "val_seen"
        if self.cfg.stage == "speaker":
            return float(m[split]["bleu"])
        return float(m[split]["success_rate" if self.cfg.data.dataset == "r2r" else "ndtw"])

    def score(self, metrics: dict) -> float:
        return self._key(metrics)

    def scalars(self, metrics: dict) -> dict[str, float]:
        if self.cfg.stage == "speaker":
            return {f"{s}/bleu": float(metrics[s]["bleu"]) for s in EVAL_SPLITS if s in metrics}
        return {
            f"{s}/{k}": float(metrics[s][k]) for s in EVAL_SPLITS if s in metrics for k in METRICS
        }

    def state_dict(self) -> dict[str, Any]:
        return {"blind_best": self.blind_best}

    def load_state_dict(self, state) -> None:
        self.blind_best = state.get("blind_best")

    def save_best(self, folder: Path, model: nn.Module, best: dict, results: Any) -> None:
        meta = {"epoch": best["epoch"], "step": best["step"], "val": best["val"],
                "features": str(self.data.features), "feature_dim": int(self.env.features.shape[-1])}  # fmt: skip
        files = {"config.yaml": yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
                 "tokenizer": self.tokenizer.save, "meta.json": meta}  # fmt: skip
        save_model_dir(folder, model.state_dict(), files)
        for split, trajs in results.items():
            self.run.write_json(f"results_{split}.json", trajs)

    def evaluate_only(self) -> dict[str, Any]:
        """--eval-only best/: the saved agent (and no-vision twin) on val_seen / val_unseen."""
        from safetensors.torch import load_file

        state = load_file(str(Path(self.eval_only) / "model.safetensors"))
        self.model.load_state_dict(state)
        model = self.run.accelerator.prepare(self.model)
        results, metrics = self.evaluate(model, "val")
        for split, trajs in results.items():
            self.run.write_json(f"results_{split}.json", trajs)
        return {**{s: metrics[s] for s in EVAL_SPLITS if s in metrics},
                "baselines": {**self.baselines, **({"no_vision": metrics["no_vision"]}
                                                   if "no_vision" in metrics else {})},
                "evaluated": str(self.eval_only)}  # fmt: skip

    # ---- baselines and the report
    def _baselines(self) -> dict[str, dict]:
        splits = {s: self._eval_episodes(s) for s in EVAL_SPLITS if s in self.data.episodes}
        return walker_baselines(self.env, splits, self.data.graphs, self.cfg.train.seed)

    def report(self, result) -> dict[str, Any]:
        best = result.best["val"] if result.best else result.final
        baselines = dict(self.baselines)
        if self.blind_best is not None:
            baselines["no_vision"] = self.blind_best
        agent = {s: best[s] for s in EVAL_SPLITS if s in best}
        return {**agent, "baselines": baselines, "best_epoch": result.best and result.best["epoch"],
                "history": result.history, "steps": result.steps,
                "train_samples_per_s": result.train_samples_per_s,
                "data": "houses" if self.data.houses else "real",
                "features": self._features_info(), "skipped": self.data.skipped}  # fmt: skip

    def _features_info(self) -> dict[str, Any]:
        """What the views store holds (compare's table columns), from its metadata."""
        meta = FeatureStore.open(self.data.features).metadata
        camera = meta.get("camera") or {}
        return {"kind": "views", "encoder": self.cfg.encoder, "store": str(self.data.features),
                "backbone": meta.get("backbone"), "feature": meta.get("feature"),
                "channels": meta.get("channels"),
                "input_size": [camera["height"], camera["width"]] if camera else None}  # fmt: skip

    def finish_report(self, report: dict[str, Any]) -> dict[str, Any]:
        report.update(peak_memory=peak_memory(self.run.accelerator.device),
                      seconds=time.monotonic() - self.started)  # fmt: skip
        return report

    def print_report(self, report: dict[str, Any]) -> None:
        print(report_text(report, self.cfg.stage))
        print(f"{report.get('seconds', 0):.0f} s; metrics.json in {self.run.out}")
