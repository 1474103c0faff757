"""R2R-EnvDrop's follower (airsplay/R2R-EnvDrop r2r_src/model.py, which CLIP-ViL's VLN code uses
unchanged but for the feature size), on `NavObservation`s.

Encoder: word embedding -> bidirectional LSTM; the decoder's first state is tanh(Linear) of the
last forward/backward states. Decoder step: the previous action's angle feature -> Linear ->
tanh (64); soft-dot attention of the previous hidden state over the 36 views [feature ; angle];
an LSTMCell over [action embedding ; attended view]; soft-dot attention over the instruction
gives h_tilde; candidate logits are dot products of Linear(h_tilde) with each candidate's
[feature ; angle], STOP being a zero candidate after the real ones (logit 0). A critic reads
h_tilde. Feature dropout drops visual channels only, never the angle features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cliptransfer.config import ConfigError, check_range
from cliptransfer.dropout import Dropout, draw_seed, masked
from cliptransfer.tasks.vln.attention import FixedContext, SoftDotAttention, VisualContext
from cliptransfer.tasks.vln.encoder import packed_bilstm
from cliptransfer.tasks.vln.step_linear import StepLinear, lstm_cell

__all__ = ["DecoderWeights", "Follower", "FollowerConfig"]


@dataclass
class FollowerConfig:
    word_embed: int = 256
    hidden: int = 512  # decoder; the bidirectional encoder has hidden/2 per direction
    angle_embed: int = 64
    dropout: float = 0.5
    feat_dropout: float = 0.3  # visual channels of views and candidates
    # > 0 (follower stage): instead of feat_dropout, one visual-channel mask per training
    # episode for all its views and steps (environmental dropout on the real episodes; the bt
    # stage draws one per augmented batch, bt.env_dropout).
    env_dropout: float = 0.0
    max_instruction: int = 80  # tokens kept (EnvDrop's maxInput)
    # Gather the 36 views again in backward instead of keeping them (checkpointed attention):
    # -200 MB of autograd memory per R2R batch at 512-d (more at 2048-d), ~20 % slower per step.
    recompute_views: bool = False

    def __post_init__(self) -> None:
        for name in ("word_embed", "hidden", "angle_embed", "max_instruction"):
            check_range(name, getattr(self, name), gt=0)
        if self.hidden % 2:
            raise ConfigError(f"hidden: must be even (a bidirectional encoder), got {self.hidden}")
        check_range("dropout", self.dropout, ge=0, lt=1)
        check_range("feat_dropout", self.feat_dropout, ge=0, lt=1)
        check_range("env_dropout", self.env_dropout, ge=0, lt=1)


def _pad_packed(packed: nn.utils.rnn.PackedSequence, lengths: torch.Tensor, total: int):
    """`pad_packed_sequence(packed, batch_first=True, total_length=total)[0]` as one gather.
    torch's version writes one time step at a time, so its backward copies the whole (T, B, H)
    gradient once per step (a third of the encoder's backward time at 80 tokens)."""
    sizes = packed.batch_sizes.to(lengths.device)
    offsets = torch.cumsum(sizes, 0) - sizes  # (T,) first packed row of each time step
    steps = torch.arange(total, device=lengths.device)
    valid = steps[None] < lengths[:, None]  # (B, L)
    rows = offsets[steps.clamp(max=len(sizes) - 1)][None] + packed.unsorted_indices[:, None]
    zero_row = packed.data.shape[0]
    rows = torch.where(valid, rows, zero_row)  # padding reads an appended zero row
    data = nn.functional.pad(packed.data, (0, 0, 0, 1))
    return data.index_select(0, rows.reshape(-1)).view(len(lengths), total, -1)


@dataclass
class DecoderWeights:
    """The decoder's linear layers for one rollout (`Follower.decoder_weights`): applied at
    every step, each weight's gradient is formed once per backward (`StepLinear`)."""

    angle: StepLinear  # previous action's angle feature -> its embedding
    view_query: StepLinear  # h -> the query over the 36 views
    gates: StepLinear  # [action ; attended view ; h] -> the LSTM's gates (W_ih | W_hh)
    text_query: StepLinear  # h1 -> the query over the instruction
    text_out: StepLinear  # [attended text ; h1] -> h_tilde
    cand_query: StepLinear  # h_tilde -> the query over the candidates


class Follower(nn.Module):
    def __init__(self, cfg: FollowerConfig, vocab_size: int, feature_dim: int, angle_dim: int,
                 pad_id: int = 0, critic: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.cfg, self.feature_dim, self.angle_dim = cfg, feature_dim, angle_dim
        h = cfg.hidden
        self.embedding = nn.Embedding(vocab_size, cfg.word_embed, padding_idx=pad_id)
        self.encoder = nn.LSTM(cfg.word_embed, h // 2, batch_first=True, bidirectional=True)
        self.encoder2decoder = nn.Linear(h, h)
        self.drop = Dropout(cfg.dropout)
        feat = feature_dim + angle_dim
        self.angle_embedding = nn.Linear(angle_dim, cfg.angle_embed)
        self.feat_att = SoftDotAttention(h, feat)
        self.lstm = nn.LSTMCell(cfg.angle_embed + feat, h)
        self.text_att = SoftDotAttention(h, h)
        self.text_out = nn.Linear(2 * h, h, bias=False)
        self.cand_att = SoftDotAttention(h, feat)
        # Only A2C needs the critic (an unused module would stall DDP's gradient reduction).
        self.critic = nn.Sequential(nn.Linear(h, h), nn.ReLU(), Dropout(cfg.dropout),
                                    nn.Linear(h, 1)) if critic else None  # fmt: skip

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor):
        """tokens (B, L) padded, lengths (B,) -> the instruction context (B, L, H) with its mask
        (B, L) as a `FixedContext` (attended at every step), and the decoder's (h0, c0)."""
        emb = self.drop(self.embedding(tokens))
        packed = nn.utils.rnn.pack_padded_sequence(
            emb, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, (h_n, c_n) = packed_bilstm(self.encoder, packed)
        ctx = _pad_packed(out, lengths, tokens.shape[1])  # (B, L, H)
        h_t = torch.cat([h_n[-1], h_n[-2]], -1)  # EnvDrop: the last layer's backward, forward
        c_t = torch.cat([c_n[-1], c_n[-2]], -1)
        decoder_init = torch.tanh(self.encoder2decoder(h_t))
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        return FixedContext(self.drop(ctx), mask), (decoder_init, c_t)

    def _mask_seed(self, env_mask: torch.Tensor | None) -> int | None:
        """The seed of one feature-dropout mask (`dropout.masked`), or None when there is no
        feature dropout (eval, p = 0, or environmental dropout instead)."""
        if env_mask is not None or not self.training or self.cfg.feat_dropout <= 0:
            return None
        return draw_seed()

    def _visual(self, features: torch.Tensor | None, angles: torch.Tensor,
                env_mask: torch.Tensor | None, mask_seed: int | None,
                zero_vision: bool) -> VisualContext:  # fmt: skip
        """[dropped visual features ; angle features] as a `VisualContext`: `env_mask` (B, D)
        is a per-episode channel mask (environmental dropout) applied to every view and step
        instead of feature dropout; `mask_seed` seeds feature dropout's mask (`_mask_seed`);
        `zero_vision` zeroes the visual channels (the "no vision" ablation: same agent, same
        draws; `features` may then be None)."""
        d = self.feature_dim
        if zero_vision:
            return VisualContext(None, angles, d)
        if env_mask is not None:
            return VisualContext(features, angles, d, env_mask)
        if mask_seed is not None:
            return VisualContext(masked(features, self.cfg.feat_dropout, mask_seed), angles, d)
        return VisualContext(features, angles, d)

    def decoder_weights(self) -> DecoderWeights:
        """The decoder's layers for one rollout: pass the result to every `step` of it. The LSTM
        cell's two products become one over [input ; h] (W_ih | W_hh, b_ih + b_hh)."""
        lstm = self.lstm
        return DecoderWeights(
            angle=StepLinear(self.angle_embedding.weight, self.angle_embedding.bias),
            view_query=StepLinear(self.feat_att.linear_in.weight),
            gates=StepLinear(
                torch.cat([lstm.weight_ih, lstm.weight_hh], 1), lstm.bias_ih + lstm.bias_hh
            ),  # fmt: skip
            text_query=StepLinear(self.text_att.linear_in.weight),
            text_out=StepLinear(self.text_out.weight),
            cand_query=StepLinear(self.cand_att.linear_in.weight),
        )

    def _attend_views(self, query: torch.Tensor, ob, mask_seed: int | None,
                      env_mask: torch.Tensor | None, zero_vision: bool,
                      view_table: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Soft attention of the projected `query` (B, D + A) over the 36 [view feature ; angle]
        vectors -> (B, D + A).

        With `recompute_views`, when gradients are recorded and `view_table` (the environment's
        (N, 36, D) feature table) is given, backward gathers the views from the table again
        instead of keeping the (B, 36, D) dropped-out views (torch.utils.checkpoint): they are
        most of the autograd memory of an R2R training batch (64 episodes, IL + A2C, 36
        decisions, 512-d). The dropout mask is rebuilt from its seed, so values and gradients
        equal the plain path's."""
        angles = ob.view_angles  # not `ob`: the closure must not keep ob.views alive

        def attend(q: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
            if views is None and not zero_vision:  # NavEnv's observation, gathered again
                views = view_table.index_select(0, viewpoint).float()
            visual = self._visual(views, angles, env_mask, mask_seed, zero_vision)
            return visual.weighted(torch.softmax(visual.logits(q), dim=1))

        if not self.cfg.recompute_views or view_table is None or not torch.is_grad_enabled():
            return attend(query, ob.views)
        viewpoint = ob.viewpoint.to(view_table.device)  # read by `attend` in forward and backward
        return checkpoint(attend, query, use_reentrant=False, preserve_rng_state=False)

    def step(self, ob, prev_angle: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor],
             text: FixedContext, env_mask: torch.Tensor | None = None,
             zero_vision: bool = False, view_table: torch.Tensor | None = None,
             weights: DecoderWeights | None = None):  # fmt: skip
        """One decision as EnvDrop's AttnDecoderLSTM: the recurrent state is (h_tilde, c) of
        the last step (EnvDrop feeds h_tilde back as the LSTM's h). Returns (logits (B, K + 1),
        STOP at index cand_count, masked; the new state; h1 (B, H), the critic's input).
        `prev_angle` (B, A): the last action's angle feature (zeros at the start); `view_table`:
        the environment's feature table, to gather the views again in backward (see
        `_attend_views`) rather than keep them; `weights`: the rollout's `decoder_weights()`
        (built for this step alone when not given)."""
        w = self.decoder_weights() if weights is None else weights
        # The random draws in EnvDrop's order: the views' and the candidates' feature dropout
        # (one seed each), then the action embedding's and the hidden state's dropout.
        view_seed, cand_seed = self._mask_seed(env_mask), self._mask_seed(env_mask)
        cands = self._visual(ob.cand_views, ob.cand_angles, env_mask, cand_seed, zero_vision)
        h_prev, c = state
        action = self.drop(torch.tanh(w.angle(prev_angle)))  # (B, 64)
        attended = self._attend_views(w.view_query(self.drop(h_prev)), ob, view_seed, env_mask,
                                      zero_vision, view_table)  # (B, D + A)  # fmt: skip
        h1, c1 = lstm_cell(w.gates(torch.cat([action, attended, h_prev], -1)), c)
        h1_drop = self.drop(h1)
        attended_text = text.attend(w.text_query(h1_drop))  # (B, H)
        h_tilde = torch.tanh(w.text_out(torch.cat([attended_text, h1_drop], -1)))
        logit = cands.logits(w.cand_query(self.drop(h_tilde)))  # (B, K)
        logit = logit.masked_fill(~ob.cand_mask, float("-inf"))
        # STOP: a zero candidate right after the real ones -> logit 0 at index cand_count.
        full = torch.nn.functional.pad(logit, (0, 1), value=float("-inf"))
        full = full.scatter(1, ob.cand_count.unsqueeze(1), 0.0)
        return full, (h_tilde, c1), h1
