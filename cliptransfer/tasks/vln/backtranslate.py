"""R2R-EnvDrop's back-translation with environmental dropout (`bt_envdrop`, r2r_src/agent.py
and speaker.py): augmented paths of the training houses, instructed by a trained speaker, and
one visual-channel dropout mask per batch applied to every view and step of those episodes (the
speaker describes, and the follower walks, the same "new environment").

Every optimizer step trains on the real batch (mlWeight 0.2) and on as many augmented episodes
(mlWeight 0.6), as EnvDrop alternates them; the no-vision twin, when kept, trains on both too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from cliptransfer.config import check_range
from cliptransfer.nav.env import NavEnv
from cliptransfer.nav.episodes import Episode
from cliptransfer.nav.graph import NavGraph
from cliptransfer.tasks.vln.rollout import pad_token_rows
from cliptransfer.tasks.vln.speaker import PathFeatures, Speaker, path_features

__all__ = [
    "BTConfig",
    "BTModel",
    "check_speaker",
    "load_speaker",
    "sample_aug_paths",
    "speaker_dir",
]

# What the speaker must share with the follower: the dataset (its language), the same view
# features, scaled alike.
SPEAKER_MATCH_KEYS = ("data.dataset", "encoder", "backbone", "data.features", "data.camera",
                      "data.feature_norm")  # fmt: skip


@dataclass
class BTConfig:
    # best/ folder of a speaker-stage run (its tokenizer is used throughout); "default": the
    # packaged houses speaker (the packaged CLIP's views, feature norm 20).
    speaker: str = "default"
    aug_paths: str = ""  # EnvDrop aug_paths.json; empty = sampled from the training scans
    aug_per_scan: int = 200  # sampled augmented paths per training scan
    aug_ml_weight: float = 0.6
    env_dropout: float = 0.3  # share of visual channels dropped per augmented batch

    def __post_init__(self) -> None:
        check_range("aug_per_scan", self.aug_per_scan, gt=0)
        check_range("aug_ml_weight", self.aug_ml_weight, ge=0)
        check_range("env_dropout", self.env_dropout, ge=0, lt=1)


def sample_aug_paths(graphs: dict[str, NavGraph], scans: list[str], per_scan: int,
                     seed: int, exclude: set[tuple[str, str]]) -> list[Episode]:  # fmt: skip
    """EnvDrop-style augmented paths: shortest paths of 4-7 viewpoints between viewpoint pairs
    of the training scans not used by a training episode, random start headings; path-only
    episodes (instruction "") with ids "aug{n}_0"."""
    from cliptransfer.worlds.houses.paths import sample_paths

    out = []
    for scan in scans:
        rng = random.Random(f"aug/{seed}/{scan}")
        for spec in sample_paths(graphs[scan], rng, per_scan, min_m=0.0, max_m=math.inf,
                                 exclude=exclude):  # fmt: skip
            n = len(out)
            out.append(Episode(f"aug{n}_0", scan, f"aug{n}", spec.path, spec.heading, "",
                               distance=spec.distance))  # fmt: skip
    return out


def write_aug_paths(path, episodes: list[Episode]) -> None:
    """EnvDrop's aug_paths.json: R2R records without instructions."""
    from cliptransfer.fileio import write_json

    write_json(path, [{"scan": e.scan, "path_id": e.path_id, "path": e.path,
                       "heading": e.heading, "distance": e.distance} for e in episodes])  # fmt: skip


class BTModel(nn.Module):
    """The follower (a `VLNModel`) and a frozen speaker; `forward` = real batch + augmented
    batch, the latter instructed by the speaker under one environmental-dropout mask."""

    def __init__(self, follower: nn.Module, speaker: Speaker) -> None:
        super().__init__()
        self.follower, self.speaker = follower, speaker
        for p in speaker.parameters():
            p.requires_grad_(False)

    def instruct(self, env: NavEnv, episodes: list[Episode], env_mask: torch.Tensor, tokenizer,
                 max_len: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Greedy speaker instructions for the augmented paths, seen through `env_mask`:
        (tokens (B, L), lengths) in the follower's input form (words, EOT)."""
        path = path_features(env, episodes)
        device = env_mask.device
        d = env_mask.shape[-1]
        drop = torch.cat([env_mask, torch.ones(path.views.shape[-1] - d, device=device)])
        path = PathFeatures(path.views.to(device) * drop, path.actions.to(device) * drop,
                            path.lengths)  # fmt: skip
        self.speaker.eval()
        ids = self.speaker.generate(path, tokenizer.sot_id, tokenizer.eot_id)
        rows = [r[: max_len - 1] + [tokenizer.eot_id] for r in ids]
        tokens, lengths = pad_token_rows(rows, tokenizer.pad_id)
        return tokens.to(device), lengths.to(device)

    def forward(self, env, episodes, tokens, lengths, rl, aug, aug_tokens, aug_lengths,
                env_mask, bt: BTConfig) -> dict:  # fmt: skip
        terms = self.follower(env, episodes, tokens, lengths, rl)
        # The no-vision twin walks the same augmented episodes with the same instructions, so
        # the margin between them is vision's, not the augmented data's.
        terms["loss"], aug_terms = self.follower.walk(
            env, aug, aug_tokens, aug_lengths, rl, bt.aug_ml_weight,
            env_mask.expand(len(aug), -1), prefix="aug_", loss=terms["loss"],
        )  # fmt: skip
        terms.update(aug_terms)
        return terms


def speaker_dir(name: str) -> Path:
    """bt.speaker -> its folder ("default": the packaged houses speaker)."""
    from cliptransfer.defaults import HOUSES_SPEAKER

    return HOUSES_SPEAKER if name == "default" else Path(name)


def _speaker_config(folder: Path) -> dict:
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"bt.speaker: no speaker best/ folder at {folder}")
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    if cfg.get("stage") != "speaker":
        raise ValueError(f"bt.speaker: {folder} holds a {cfg.get('stage')!r} model, not a speaker")
    return cfg


def check_speaker(name: str, run: dict) -> None:
    """Raise ConfigError when the speaker at bt.speaker `name` was trained on another dataset or
    other view features than this run's resolved config `run` (a dict) gives the follower
    (SPEAKER_MATCH_KEYS)."""
    from cliptransfer.config import ConfigError, flat_hparams

    folder = speaker_dir(name)
    spk, own = flat_hparams(_speaker_config(folder)), flat_hparams(run)
    wrong = [f"{k}: speaker {spk.get(k)!r}, this run {own.get(k)!r}"
             for k in SPEAKER_MATCH_KEYS if spk.get(k) != own.get(k)]  # fmt: skip
    if wrong:
        raise ConfigError(
            f"bt.speaker={name} ({folder}) was trained on other data or views than this run's: "
            + "; ".join(wrong) + ". Train a speaker on these views (--config "
            "configs/tasks/vln_speaker.yaml with the same settings) and pass its best/ folder, or "
            "run the follower alone (--set stage=follower)."
        )  # fmt: skip


def load_speaker(name: str, feature_dim: int, angle_dim: int) -> tuple[Speaker, object]:
    """(speaker, tokenizer) of bt.speaker `name`: a speaker-stage best/ folder or "default"
    (weights read with safetensors; fp16 assets are cast to the module's fp32)."""
    from safetensors.torch import load_file

    from cliptransfer.tasks.vln.speaker import SpeakerConfig
    from cliptransfer.tokenization import load_tokenizer

    folder = speaker_dir(name)
    cfg = _speaker_config(folder)
    tokenizer = load_tokenizer(folder / "tokenizer")
    speaker = Speaker(SpeakerConfig(**cfg["speaker"]), tokenizer.vocab_size, feature_dim,
                      angle_dim, tokenizer.pad_id)  # fmt: skip
    state = {
        k.removeprefix("speaker."): v
        for k, v in load_file(str(folder / "model.safetensors")).items()
    }
    speaker.load_state_dict(state)
    return speaker, tokenizer
