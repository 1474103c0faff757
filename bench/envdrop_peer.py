"""R2R-EnvDrop's follower and its `train(feedback="sample")` iteration as its code is written
(airsplay/R2R-EnvDrop r2r_src/model.py and agent.py), in plain torch: the peer that
bench/vln_train.py times in the same run as ours.

What is EnvDrop's: the modules (EncoderLSTM over a length-sorted PackedSequence,
AttnDecoderLSTM with nn.LSTMCell and three bmm SoftDotAttentions, the Critic, nn.Dropout
everywhere, feature dropout written into the visual channels of the view and candidate tensors),
the rollouts (the whole batch computed until its last episode ends; the critic applied step by
step), the losses, three torch.optim.RMSprop optimizers and the gradient clipping.
What is ours: the environment. The peer reads `NavEnv` observations (MatterSim cannot be built
here), so its per-step cost leaves out the simulator's and EnvDrop's Python feature assembly,
which makes the measured ratio a lower bound on the speed-up over EnvDrop's train.py. One input
differs, at the same cost: the action embedding reads the last move's candidate angle feature
(as ours), where EnvDrop reads the agent's heading.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cliptransfer.nav import NavEnv
from cliptransfer.nav.env import IGNORE_ACTION


class EncoderLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, dropout: float, pad_id: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=pad_id)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.encoder2decoder = nn.Linear(2 * hidden, 2 * hidden)

    def forward(self, tokens: torch.Tensor, lengths: list[int]):
        embeds = self.drop(self.embedding(tokens))  # (B, L, E), sorted by length
        enc_h, (h_n, c_n) = self.lstm(pack_padded_sequence(embeds, lengths, batch_first=True))
        h_t = torch.cat((h_n[-1], h_n[-2]), 1)
        c_t = torch.cat((c_n[-1], c_n[-2]), 1)
        ctx, _ = pad_packed_sequence(enc_h, batch_first=True)
        return self.drop(ctx), torch.tanh(self.encoder2decoder(h_t)), c_t


class SoftDotAttention(nn.Module):
    def __init__(self, query_dim: int, ctx_dim: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(query_dim, ctx_dim, bias=False)
        self.linear_out = nn.Linear(query_dim + ctx_dim, query_dim, bias=False)

    def forward(self, h, context, mask=None, output_tilde=True, output_prob=True):
        target = self.linear_in(h).unsqueeze(2)  # (B, C, 1)
        attn = torch.bmm(context, target).squeeze(2)  # (B, L)
        logit = attn
        if mask is not None:
            attn.masked_fill_(mask, -float("inf"))
        attn = torch.softmax(attn, 1)
        weighted = torch.bmm(attn.unsqueeze(1), context).squeeze(1)  # (B, C)
        if not output_prob:
            attn = logit
        if output_tilde:
            return torch.tanh(self.linear_out(torch.cat((weighted, h), 1))), attn
        return weighted, attn


class AttnDecoderLSTM(nn.Module):
    def __init__(self, angle_dim: int, embed: int, hidden: int, dropout: float,
                 feat_dropout: float, feature_size: int) -> None:  # fmt: skip
        super().__init__()
        self.angle_dim = angle_dim
        self.embedding = nn.Sequential(nn.Linear(angle_dim, embed), nn.Tanh())
        self.drop = nn.Dropout(dropout)
        self.drop_env = nn.Dropout(feat_dropout)
        self.lstm = nn.LSTMCell(embed + feature_size, hidden)
        self.feat_att_layer = SoftDotAttention(hidden, feature_size)
        self.attention_layer = SoftDotAttention(hidden, hidden)
        self.candidate_att_layer = SoftDotAttention(hidden, feature_size)

    def forward(self, action, feature, cand_feat, prev_h1, c_0, ctx, ctx_mask):
        a = self.angle_dim
        action_embeds = self.drop(self.embedding(action))
        feature[..., :-a] = self.drop_env(feature[..., :-a])  # never the angle features
        attn_feat, _ = self.feat_att_layer(self.drop(prev_h1), feature, output_tilde=False)
        h_1, c_1 = self.lstm(torch.cat((action_embeds, attn_feat), 1), (prev_h1, c_0))
        h_tilde, _ = self.attention_layer(self.drop(h_1), ctx, ctx_mask)
        cand_feat[..., :-a] = self.drop_env(cand_feat[..., :-a])
        _, logit = self.candidate_att_layer(self.drop(h_tilde), cand_feat, output_prob=False)
        return h_1, c_1, logit, h_tilde


class EnvDropFollower:
    """EnvDrop's Seq2SeqAgent for training: `iteration(episodes, tokens, lengths)` is one
    `train(1, feedback="sample")` (teacher rollout x ml_weight, then the A2C rollout, backward,
    clipping, three RMSprop steps) and returns the batched decision steps taken."""

    def __init__(self, env: NavEnv, vocab: int, feature_dim: int, angle_dim: int, pad_id: int, *,
                 word_embed: int = 256, hidden: int = 512, angle_embed: int = 64,
                 dropout: float = 0.5, feat_dropout: float = 0.3, lr: float = 1e-4,
                 ml_weight: float = 0.2, gamma: float = 0.9, entropy: float = 0.01) -> None:  # fmt: skip
        self.env, self.angle_dim, self.pad_id = env, angle_dim, pad_id
        self.ml_weight, self.gamma, self.entropy = ml_weight, gamma, entropy
        feat = feature_dim + angle_dim
        self.encoder = EncoderLSTM(vocab, word_embed, hidden // 2, dropout, pad_id)
        self.decoder = AttnDecoderLSTM(angle_dim, angle_embed, hidden, dropout, feat_dropout, feat)
        self.critic = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden, 1))  # fmt: skip
        self.models = (self.encoder, self.decoder, self.critic)
        self.optimizers = [torch.optim.RMSprop(m.parameters(), lr=lr) for m in self.models]

    def parameters(self) -> int:
        return sum(p.numel() for m in self.models for p in m.parameters())

    def _inputs(self, ob):
        """EnvDrop's get_input_feat: f_t (B, 36, D + A), the candidates (B, K + 1, D + A) with
        a zero END candidate after the real ones, and candidate_leng (count + 1)."""
        f_t = torch.cat([ob.views, ob.view_angles], -1)
        cands = torch.cat([ob.cand_views, ob.cand_angles], -1)
        cand_feat = F.pad(cands * ob.cand_mask.unsqueeze(-1), (0, 0, 0, 1))
        return f_t, cand_feat, ob.cand_count + 1

    def rollout(self, episodes, tokens, lengths, feedback: str) -> tuple[torch.Tensor, int]:
        env, batch = self.env, len(episodes)
        ob = env.reset(episodes)  # episodes sorted by length: EnvDrop's perm_obs
        ctx, h_t, c_t = self.encoder(tokens[:, : lengths[0]], lengths)
        ctx_mask = tokens[:, : lengths[0]] == self.pad_id
        h1, prev_angle = h_t, torch.zeros(batch, self.angle_dim)
        last_dist = ob.distance.numpy().astype(np.float32)
        stopped = np.zeros(batch, bool)  # chose STOP (not cut at the step limit)
        ml_loss = torch.zeros(())
        rewards, hidden_states, log_probs, masks, entropies = [], [], [], [], []
        steps = 0
        while not env.done:
            ended = env.ended.copy()  # before this action
            f_t, cand_feat, cand_leng = self._inputs(ob)
            h_t, c_t, logit, h1 = self.decoder(prev_angle, f_t, cand_feat, h1, c_t, ctx, ctx_mask)
            hidden_states.append(h_t)
            k = cand_feat.shape[1]
            logit.masked_fill_(torch.arange(k)[None] >= cand_leng[:, None], -float("inf"))
            target = ob.teacher
            ml_loss = ml_loss + F.cross_entropy(logit, target, ignore_index=IGNORE_ACTION,
                                                reduction="sum")  # fmt: skip
            if feedback == "teacher":
                a_t = target.clamp(min=0)
            else:
                c = torch.distributions.Categorical(torch.softmax(logit, 1))
                entropies.append(c.entropy())
                a_t = c.sample().detach()
                log_probs.append(c.log_prob(a_t))
            a_np = a_t.numpy()
            stop = (a_np == cand_leng.numpy() - 1) & ~ended
            moved = (a_t < cand_leng - 1).unsqueeze(1)
            prev_angle = ob.cand_angles[torch.arange(batch), a_t.clamp(max=k - 2)] * moved
            ob = env.step(np.where(ended, -1, a_np))
            steps += 1
            dist = ob.distance.numpy().astype(np.float32)
            reward = np.where(stop, np.where(dist < 3, 2.0, -2.0), np.sign(last_dist - dist))
            rewards.append(np.where(ended, 0.0, reward).astype(np.float32))
            masks.append((~ended).astype(np.float32))
            last_dist = dist
            stopped |= stop
        if feedback == "teacher":
            return ml_loss * self.ml_weight / batch, steps
        # A2C: the critic's value of the last state (for episodes that did not stop, those cut
        # at the step limit included, as EnvDrop), then the discounted returns, step by step.
        f_t, cand_feat, _ = self._inputs(ob)
        last_h, _, _, _ = self.decoder(prev_angle, f_t, cand_feat, h1, c_t, ctx, ctx_mask)
        last_value = self.critic(last_h).squeeze(1).detach().numpy()
        discount = np.where(stopped, 0.0, last_value).astype(np.float32)
        rl_loss, total = torch.zeros(()), 0.0
        for t in range(len(rewards) - 1, -1, -1):
            discount = discount * self.gamma + rewards[t]
            mask, r = torch.from_numpy(masks[t]), torch.from_numpy(discount.copy())
            v = self.critic(hidden_states[t]).squeeze(1)
            advantage = (r - v).detach()
            rl_loss = rl_loss + (-log_probs[t] * advantage * mask).sum()
            rl_loss = rl_loss + ((r - v) ** 2 * mask).sum() * 0.5
            rl_loss = rl_loss + (-self.entropy * entropies[t] * mask).sum()
            total += float(masks[t].sum())
        return rl_loss / total, steps

    def iteration(self, episodes, tokens: torch.Tensor, lengths: torch.Tensor) -> int:
        for m in self.models:
            m.train()
        for opt in self.optimizers:
            opt.zero_grad()
        order = torch.argsort(lengths, descending=True, stable=True)  # EnvDrop's _sort_batch
        episodes = [episodes[i] for i in order.tolist()]
        tokens, sorted_lengths = tokens[order], lengths[order].tolist()
        ml, ml_steps = self.rollout(episodes, tokens, sorted_lengths, "teacher")
        rl, rl_steps = self.rollout(episodes, tokens, sorted_lengths, "sample")
        (ml + rl).backward()
        nn.utils.clip_grad_norm_(self.encoder.parameters(), 40.0)
        nn.utils.clip_grad_norm_(self.decoder.parameters(), 40.0)
        for opt in self.optimizers:
            opt.step()
        return ml_steps + rl_steps
