"""R2R-EnvDrop's speaker (r2r_src/model.py SpeakerEncoder / SpeakerDecoder, r2r_src/speaker.py):
an instruction from a path's views, for back-translation.

Path features come from a teacher rollout along the shortest path (`path_features`): per step
the 36 views [feature ; angle] and the teacher action's candidate [feature ; angle] (a zero
vector for STOP, as EnvDrop). Encoder: bi-LSTM over the action features -> soft-dot attention
over that step's 36 views (h_tilde) -> a second bi-LSTM. Decoder: word embedding -> LSTM ->
soft-dot attention over the encoded path -> vocabulary logits; teacher forcing in training,
greedy decoding for BLEU (sacrebleu's corpus BLEU against every reference of the path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.config import check_range
from cliptransfer.dropout import Dropout, dropout
from cliptransfer.nav.env import NavEnv
from cliptransfer.nav.episodes import Episode
from cliptransfer.tasks.vln.attention import SoftDotAttention
from cliptransfer.tasks.vln.rollout import pad_token_rows

__all__ = ["PathFeatures", "Speaker", "SpeakerConfig", "SpeakerModel", "corpus_bleu",
           "instruction_tokens", "path_features", "speaker_bleu"]  # fmt: skip


@dataclass
class SpeakerConfig:
    word_embed: int = 256
    hidden: int = 512
    dropout: float = 0.5
    feat_dropout: float = 0.3
    max_decode: int = 80

    def __post_init__(self) -> None:
        for name in ("word_embed", "hidden", "max_decode"):
            check_range(name, getattr(self, name), gt=0)
        check_range("dropout", self.dropout, ge=0, lt=1)
        check_range("feat_dropout", self.feat_dropout, ge=0, lt=1)


@dataclass
class PathFeatures:
    views: torch.Tensor  # (B, T, 36, D + A)
    actions: torch.Tensor  # (B, T, D + A)
    lengths: torch.Tensor  # (B,) steps up to and including STOP


@torch.no_grad()
def path_features(env: NavEnv, episodes: list[Episode]) -> PathFeatures:
    """Walk each episode's shortest path with the teacher and record what the speaker reads."""
    ob = env.reset(episodes)
    views, actions, lengths = [], [], torch.zeros(len(episodes), dtype=torch.long)
    while not env.done:
        live = ~ob.ended
        views.append(torch.cat([ob.views.cpu(), ob.view_angles], -1))
        teacher = ob.teacher.clamp(min=0)
        moving = (teacher < ob.cand_count) & live
        k = teacher.clamp(max=ob.cand_angles.shape[1] - 1)
        cand = torch.cat([ob.cand_views.cpu(), ob.cand_angles], -1)[torch.arange(len(k)), k]
        actions.append(cand * moving.unsqueeze(1))
        lengths += live.long()
        ob = env.step(torch.where(live, ob.teacher, ob.cand_count))  # ended: STOP, ignored
    return PathFeatures(torch.stack(views, 1), torch.stack(actions, 1), lengths)


class Speaker(nn.Module):
    def __init__(self, cfg: SpeakerConfig, vocab_size: int, feature_dim: int, angle_dim: int,
                 pad_id: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.cfg, self.angle_dim, self.pad_id = cfg, angle_dim, pad_id
        h, feat = cfg.hidden, feature_dim + angle_dim
        self.enc_lstm = nn.LSTM(feat, h // 2, batch_first=True, bidirectional=True)
        self.enc_att = SoftDotAttention(h, feat)
        self.enc_out = nn.Linear(feat + h, h, bias=False)
        self.post_lstm = nn.LSTM(h, h // 2, batch_first=True, bidirectional=True)
        self.embedding = nn.Embedding(vocab_size, cfg.word_embed, padding_idx=pad_id)
        self.dec_lstm = nn.LSTM(cfg.word_embed, h, batch_first=True)
        self.dec_att = SoftDotAttention(h, h)
        self.dec_out = nn.Linear(2 * h, h, bias=False)
        self.projection = nn.Linear(h, vocab_size)
        self.drop = Dropout(cfg.dropout)

    def _feat_drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cfg.feat_dropout == 0:
            return x
        visual = dropout(x[..., : -self.angle_dim], self.cfg.feat_dropout)
        return torch.cat([visual, x[..., -self.angle_dim :]], -1)

    def encode(self, path: PathFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(ctx (B, T, H), mask (B, T))."""
        b, t = path.actions.shape[:2]
        ctx, _ = self.enc_lstm(self._feat_drop(path.actions))
        ctx = self.drop(ctx)
        views = self._feat_drop(path.views).reshape(b * t, 36, -1)
        q = ctx.reshape(b * t, -1)
        attended, _ = self.enc_att(q, views)
        x = torch.tanh(self.enc_out(torch.cat([attended, q], -1))).view(b, t, -1)
        x, _ = self.post_lstm(self.drop(x))
        mask = torch.arange(t, device=x.device)[None] < path.lengths.to(x.device)[:, None]
        return self.drop(x), mask

    def decode(self, words: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor, state=None):
        """words (B, L) -> logits (B, L, V), LSTM state."""
        x, state = self.dec_lstm(self.drop(self.embedding(words)), state)
        x = self.drop(x)
        b, length, h = x.shape
        q = x.reshape(b * length, h)
        c = ctx.unsqueeze(1).expand(b, length, *ctx.shape[1:]).reshape(b * length, -1, h)
        m = mask.unsqueeze(1).expand(b, length, -1).reshape(b * length, -1)
        attended, _ = self.dec_att(q, c, m)
        out = torch.tanh(self.dec_out(torch.cat([attended, q], -1)))
        return self.projection(self.drop(out)).view(b, length, -1), state

    def loss(self, path: PathFeatures, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross entropy; tokens (B, L) = SOT, words..., EOT, padding."""
        ctx, mask = self.encode(path)
        logits, _ = self.decode(tokens[:, :-1], ctx, mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                               ignore_index=self.pad_id)  # fmt: skip

    @torch.no_grad()
    def generate(self, path: PathFeatures, sot: int, eot: int) -> list[list[int]]:
        """Greedy decoding up to max_decode tokens; the ids before EOT."""
        ctx, mask = self.encode(path)
        b = ctx.shape[0]
        word = torch.full((b, 1), sot, dtype=torch.long, device=ctx.device)
        out, done, state = [[] for _ in range(b)], torch.zeros(b, dtype=torch.bool), None
        for _ in range(self.cfg.max_decode):
            logits, state = self.decode(word, ctx, mask, state)
            word = logits[:, -1].argmax(-1, keepdim=True)
            for i, w in enumerate(word[:, 0].tolist()):
                if not done[i]:
                    if w == eot:
                        done[i] = True
                    else:
                        out[i].append(w)
            if done.all():
                break
        return out


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100), each hypothesis against all its references."""
    import sacrebleu

    depth = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else r[0] for r in references] for k in range(depth)]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def instruction_tokens(tokenizer, episodes: list[Episode], max_len: int) -> torch.Tensor:
    """(B, L): SOT, the words (cut to max_len - 2), EOT, padding."""
    rows = [[tokenizer.sot_id, *tokenizer.tokenize_words(e.instruction)[: max_len - 2],
             tokenizer.eot_id] for e in episodes]  # fmt: skip
    return pad_token_rows(rows, tokenizer.pad_id)[0]


class SpeakerModel(nn.Module):
    """The speaker stage's model: `forward` walks the paths and returns the loss (one DDP
    forward per step)."""

    def __init__(self, speaker: Speaker) -> None:
        super().__init__()
        self.speaker = speaker

    def forward(self, env: NavEnv, episodes: list[Episode], tokens: torch.Tensor) -> dict:
        path = path_features(env, episodes)
        device = tokens.device
        path = PathFeatures(path.views.to(device), path.actions.to(device), path.lengths)
        loss = self.speaker.loss(path, tokens)
        return {"loss": loss, "speaker_xent": loss.detach()}


def speaker_bleu(speaker: Speaker, env: NavEnv, episodes: list[Episode], tokenizer,
                 batch: int, device: torch.device) -> tuple[float, list[dict]]:  # fmt: skip
    """Greedy instructions for every distinct path of `episodes` (R2R: 3 instructions share one)
    and the corpus BLEU against all of each path's instructions."""
    by_path: dict[str, list[Episode]] = {}
    for e in episodes:
        by_path.setdefault(f"{e.scan}/{e.path_id}", []).append(e)
    firsts = [eps[0] for eps in by_path.values()]
    was = speaker.training
    speaker.eval()
    rows, hyps, refs = [], [], []
    for start in range(0, len(firsts), batch):
        part = firsts[start : start + batch]
        path = path_features(env, part)
        path = PathFeatures(path.views.to(device), path.actions.to(device), path.lengths)
        ids = speaker.generate(path, tokenizer.sot_id, tokenizer.eot_id)
        for e, seq in zip(part, ids, strict=True):
            text = tokenizer.decode(seq)
            group = by_path[f"{e.scan}/{e.path_id}"]
            hyps.append(text)
            refs.append([g.instruction for g in group])
            rows.append({"path_id": e.path_id, "scan": e.scan, "instruction": text,
                         "references": refs[-1]})  # fmt: skip
    speaker.train(was)
    return corpus_bleu(hyps, refs), rows
