"""The follower's speed rewrites against the torch / EnvDrop forms they replace: same values,
same gradients (bench/vln_train.py says what each one saves), and the dropout masks' law."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cliptransfer.dropout import Dropout, draw_seed, dropout, dropout_mask, masked
from cliptransfer.tasks.vln.agent import _pad_packed
from cliptransfer.tasks.vln.attention import FixedContext, SoftDotAttention, VisualContext
from cliptransfer.tasks.vln.encoder import packed_bilstm
from cliptransfer.tasks.vln.step_linear import StepLinear, lstm_cell


def test_encoder_padding_equals_torchs_pad_packed_sequence():
    # The encoder's one-gather padding is a speed rewrite of pad_packed_sequence: same values,
    # same gradients.
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 7, 1, 5])
    data = torch.randn(4, 9, 6, generator=gen)
    packed = torch.nn.utils.rnn.pack_padded_sequence(data, lengths, batch_first=True,
                                                     enforce_sorted=False)  # fmt: skip
    leaf = packed.data.clone().requires_grad_()
    mine = _pad_packed(packed._replace(data=leaf), lengths, 9)
    ref, _ = torch.nn.utils.rnn.pad_packed_sequence(packed._replace(data=leaf), batch_first=True,
                                                    total_length=9)  # fmt: skip
    assert torch.equal(mine, ref) and (mine[0, 3:] == 0).all()
    weight = torch.randn(4, 9, 6, generator=gen)
    (g_mine,) = torch.autograd.grad((mine * weight).sum(), leaf)
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), leaf)
    assert torch.equal(g_mine, g_ref)


@pytest.mark.parametrize("form", ["multiply_sum", "constant_bmm", "fixed_context"])
def test_soft_dot_attention_forms_equal_envdrops_bmm(form):
    # Three forms of EnvDrop's SoftDotAttention (bmm -> masked softmax -> bmm), all speed
    # rewrites: multiply-and-sum for a context that needs a gradient, bmm for a constant one
    # (view features), and FixedContext for the instruction read at every step, whose context
    # gradient is summed over the steps in one product when backward reaches it. Same values,
    # same gradients (the query's, the context's, linear_in's) over 4 steps.
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 7, 1, 5])
    mask = torch.arange(9)[None] < lengths[:, None]
    att = SoftDotAttention(5, 6).double()
    base = torch.randn(4, 9, 6, generator=gen, dtype=torch.double, requires_grad=True)
    hs = [torch.randn(4, 5, generator=gen, dtype=torch.double, requires_grad=True)
          for _ in range(4)]  # fmt: skip
    weights = [torch.randn(4, 6, generator=gen, dtype=torch.double) for _ in range(4)]

    def run(kind: str):
        ctx = base * 2.0 if form != "constant_bmm" else base.detach() * 2.0
        fixed = FixedContext(ctx, mask) if kind == "fixed_context" else None
        loss = 0.0
        for h, w in zip(hs, weights):
            if kind == "reference":
                logit = (ctx @ att.linear_in(h).unsqueeze(2)).squeeze(2)
                attn = torch.softmax(logit.masked_fill(~mask, float("-inf")), 1)
                out = (attn.unsqueeze(1) @ ctx).squeeze(1)
            elif fixed is not None:
                out = fixed.attend(att.linear_in(h))
            else:
                out = att(h, ctx, mask)[0]
            loss = loss + (out * w).sum()
        wrt = [*hs, att.linear_in.weight] + ([base] if form != "constant_bmm" else [])
        return loss, torch.autograd.grad(loss, wrt)

    ref_loss, ref_grads = run("reference")
    loss, grads = run(form)
    torch.testing.assert_close(loss, ref_loss)
    for mine, ref in zip(grads, ref_grads):
        torch.testing.assert_close(mine, ref)
    if form == "fixed_context":
        with torch.no_grad():  # evaluation: the same values without the deferred node
            fixed = FixedContext(base * 2.0, mask)
            torch.testing.assert_close(fixed.attend(att.linear_in(hs[0])),
                                       att(hs[0], base * 2.0, mask)[0])  # fmt: skip


@pytest.mark.parametrize("lengths", [[3, 7, 1, 5, 7], [4, 4, 4], [1]])
def test_packed_bilstm_equals_nn_lstm(lengths):
    # Outputs (packed and padded), final states in the batch's order, and the gradients of the
    # input and of every weight and bias.
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, batch_first=True, bidirectional=True).double()
    lengths = torch.tensor(lengths)
    x = torch.randn(len(lengths), int(lengths.max()), 6, generator=gen, dtype=torch.double)
    x.requires_grad_()
    results = []
    for run in (packed_bilstm, lambda m, p: m(p)):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)  # fmt: skip
        out, (h, c) = run(lstm, packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        w = torch.arange(padded.numel(), dtype=torch.double).view_as(padded).sin()
        loss = (padded * w).sum() + (h * 1.5).sum() + (c * 0.5).sum()
        grads = torch.autograd.grad(loss, [x, *lstm.parameters()])
        results.append((out.data, padded, h, c, grads))
    for mine, ref in zip(*results):
        if isinstance(mine, tuple):
            for a, b in zip(mine, ref):
                torch.testing.assert_close(a, b)
        else:
            torch.testing.assert_close(mine, ref)
    with pytest.raises(ValueError, match="one-layer bidirectional"):
        packed_bilstm(nn.LSTM(6, 5, batch_first=True), packed)


def test_visual_context_equals_its_dense_concatenation():
    # [visual * scale ; angle] attended without forming it: logits and weighted sums equal the
    # dense (B, L, D + A) context's, for no scale, a channel scale, and no vision.
    gen = torch.Generator().manual_seed(1)
    visual = torch.randn(3, 4, 6, generator=gen, dtype=torch.double)
    angle = torch.randn(3, 4, 2, generator=gen, dtype=torch.double)
    q = torch.randn(3, 8, generator=gen, dtype=torch.double)
    attn = torch.softmax(torch.randn(3, 4, generator=gen, dtype=torch.double), 1)
    scale = torch.randn(3, 6, generator=gen, dtype=torch.double)
    for ctx in (VisualContext(visual, angle, 6), VisualContext(visual, angle, 6, scale),
                VisualContext(None, angle, 6)):  # fmt: skip
        dense = ctx.dense()
        torch.testing.assert_close(ctx.logits(q), (dense @ q.unsqueeze(2)).squeeze(2))
        torch.testing.assert_close(ctx.weighted(attn), (attn.unsqueeze(1) @ dense).squeeze(1))
    assert (VisualContext(None, angle, 6).dense()[..., :6] == 0).all()


@pytest.mark.parametrize("p", [0.3, 0.5])  # 32 and 1 bits of the stream per value
def test_dropout_mask_law_at_both_bit_widths(p):
    # Values are exactly 0 or 1 / (1 - p); the drop rate is p (binomial: n = 2^20, sd <=
    # 0.0005, so p +- 0.003 is > 6 sd); a mask is a function of its seed; consecutive values
    # are independent (the rate of drop-drop pairs is p^2, 6 sd of ~0.0004).
    mask = dropout_mask((1024, 1024), p, seed=7)
    assert mask.dtype == torch.float32 and mask.shape == (1024, 1024)
    assert torch.equal(mask.unique(), torch.tensor([0.0, 1 / (1 - p)]))
    dropped = (mask == 0).flatten()
    assert abs(float(dropped.float().mean()) - p) < 0.003
    assert abs(float((dropped[:-1] & dropped[1:]).float().mean()) - p * p) < 0.0025
    assert torch.equal(dropout_mask((1024, 1024), p, seed=7), mask)
    assert not torch.equal(dropout_mask((1024, 1024), p, seed=8), mask)
    if p == 0.5:  # by definition: the stream's bits, low bit first, 1 = kept (value 2)
        word = int(np.random.SFC64(7).random_raw())
        assert mask.flatten()[:64].tolist() == [2.0 * (word >> i & 1) for i in range(64)]


def test_dropout_mask_law_seed_and_rng_use():
    # One mask costs torch's generator exactly one draw (what `draw_seed` takes), so runs stay
    # reproducible, and the mask is the one that draw seeds.
    p = 0.3
    torch.manual_seed(0)
    mask = dropout_mask((1024, 1024), p)
    torch.manual_seed(0)
    seed = draw_seed()
    after_one_draw = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(dropout_mask((1024, 1024), p), mask)  # same stream
    assert torch.equal(torch.rand(1), after_one_draw)
    assert torch.equal(dropout_mask((1024, 1024), p, seed=seed), mask)
    assert not torch.equal(dropout_mask((1024, 1024), p, seed=seed + 1), mask)
    assert torch.equal(dropout_mask((5,), 0.0), torch.ones(5))
    with pytest.raises(ValueError, match="must be in"):
        dropout_mask((5,), 1.0)
    # The module: nn.Dropout's contract (identity in eval and at p = 0, mean kept in train).
    x = torch.ones(512, 512)
    layer = Dropout(0.5)
    assert torch.equal(layer.eval()(x), x) and torch.equal(dropout(x, 0.0), x)
    y = layer.train()(x)
    assert set(y.unique().tolist()) == {0.0, 2.0} and abs(float(y.mean()) - 1.0) < 0.01
    assert Dropout(0.5).state_dict() == nn.Dropout(0.5).state_dict() == {}
    # `masked`: the same product, drawn and applied a few rows at a time (whole 64-bit words
    # of the stream per chunk: 2 values a word at p = 0.3, 64 at p = 0.5).
    for q in (p, 0.5):
        for shape in ((64, 36, 512), (5, 36, 6), (3, 7), (3, 128)):
            x = torch.randn(shape)
            assert torch.equal(masked(x, q, seed), x * dropout_mask(shape, q, seed=seed)), shape


def test_step_linear_equals_f_linear_over_steps_of_changing_rows():
    # The weight's gradient is formed once from every step's stashed input and output
    # gradient: same values, same gradients (input, weight through a computed tensor, bias)
    # as F.linear applied step by step, rows shrinking as a compacting rollout's do.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=gen, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, 3, generator=gen, dtype=torch.double, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.double, requires_grad=True)
    xs = [torch.randn(n, 7, generator=gen, dtype=torch.double, requires_grad=True)
          for n in (5, 5, 3, 1)]  # fmt: skip
    outs = [torch.randn(n, 6, generator=gen, dtype=torch.double) for n in (5, 5, 3, 1)]

    def run(deferred: bool):
        weight = torch.cat([a, b], 1)  # (6, 7), as the LSTM's W_ih | W_hh
        layer = StepLinear(weight, bias) if deferred else None
        loss = 0.0
        for x, w in zip(xs, outs):
            y = layer(x) if deferred else F.linear(x, weight, bias)
            loss = loss + (y.tanh() * w).sum()
        return loss, torch.autograd.grad(loss, [a, b, bias, *xs])

    ref_loss, ref_grads = run(False)
    loss, grads = run(True)
    torch.testing.assert_close(loss, ref_loss)
    for mine, ref in zip(grads, ref_grads):
        torch.testing.assert_close(mine, ref)
    with torch.no_grad():  # evaluation: plain F.linear, no deferred node
        assert torch.equal(StepLinear(a, None)(xs[0][:, :4]), F.linear(xs[0][:, :4], a))


def test_lstm_cell_from_summed_gates_equals_nn_lstm_cell():
    # One product over [x ; h] with (W_ih | W_hh) and b_ih + b_hh, then lstm_cell: nn.LSTMCell's
    # values and gradients.
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cell = nn.LSTMCell(5, 4).double()
    x = torch.randn(3, 5, generator=gen, dtype=torch.double, requires_grad=True)
    h = torch.randn(3, 4, generator=gen, dtype=torch.double, requires_grad=True)
    c = torch.randn(3, 4, generator=gen, dtype=torch.double, requires_grad=True)
    ref = cell(x, (h, c))
    gates = StepLinear(torch.cat([cell.weight_ih, cell.weight_hh], 1),
                       cell.bias_ih + cell.bias_hh)(torch.cat([x, h], 1))  # fmt: skip
    mine = lstm_cell(gates, c)
    for m, r in zip(mine, ref):
        torch.testing.assert_close(m, r)
    wrt = [x, h, c, *cell.parameters()]
    for m, r in zip(torch.autograd.grad(sum(t.sum() * k for k, t in enumerate(mine, 1)), wrt),
                    torch.autograd.grad(sum(t.sum() * k for k, t in enumerate(ref, 1)), wrt)):  # fmt: skip
        torch.testing.assert_close(m, r)
