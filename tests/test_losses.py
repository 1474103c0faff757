"""Contrastive losses against values worked out by hand (plain Python floats and `math`)."""

from __future__ import annotations

import math

import pytest
import torch

from cliptransfer.contrastive.losses import (
    DEFILIP_WEIGHTS,
    DeCLIPWeights,
    FeatureQueue,
    SimSiamHead,
    clamp_logit_scale_,
    clip_loss,
    declip_loss,
    filip_loss,
    filip_similarity,
    mask_tokens,
    mlm_loss,
    mvs_loss,
    nns_loss,
    select_image_tokens,
    siglip_loss,
    simclr_loss,
    simsiam_loss,
    slip_loss,
)


def ce(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], by hand."""
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def log_sigmoid(u: float) -> float:
    return -math.log(1.0 + math.exp(-u))


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# Unit-norm pairs (3,4)/5 etc. keep every cosine exact. Inputs are scaled: losses normalise.
IMG = [[1.0, 0.0], [0.0, 1.0]]
TXT = [[0.6, 0.8], [0.0, 1.0]]
DOT = [[0.6, 0.0], [0.8, 1.0]]  # DOT[i][j] = IMG[i] . TXT[j]


def test_clip_loss_by_hand():
    s = 2.0
    i2t = [ce([s * DOT[i][0], s * DOT[i][1]], i) for i in range(2)]
    t2i = [ce([s * DOT[0][j], s * DOT[1][j]], j) for j in range(2)]
    expected = (sum(i2t) / 2 + sum(t2i) / 2) / 2
    got = clip_loss(3 * t(IMG), t([[3.0, 4.0], [0.0, 0.5]]), torch.tensor(s, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_clip_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="clip_loss.*same shape"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0)


def test_clamp_logit_scale():
    p = torch.nn.Parameter(torch.tensor(math.log(250.0)))
    clamp_logit_scale_(p)
    assert p.exp().item() == pytest.approx(100.0)
    p.data.fill_(math.log(0.5))
    clamp_logit_scale_(p, min_scale=1.0)
    assert p.item() == 0.0
    with pytest.raises(ValueError, match="min_scale"):
        clamp_logit_scale_(p, max_scale=1.0, min_scale=2.0)


def test_siglip_loss_by_hand():
    s, b = 2.0, -1.0
    total = 0.0
    for i in range(2):
        for j in range(2):
            z = 1.0 if i == j else -1.0
            total += log_sigmoid(z * (s * DOT[i][j] + b))
    expected = -total / 2
    got = siglip_loss(t(IMG), t(TXT), torch.tensor(s, dtype=torch.float64), b)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_siglip_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(7, 5, generator=gen, requires_grad=True)
    txt = torch.randn(7, 5, generator=gen, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    results = []
    for chunk in (None, 1, 3, 7, 100):
        loss = siglip_loss(img, txt, scale, bias, chunk_size=chunk)
        grads = torch.autograd.grad(loss, (img, txt, scale, bias))
        results.append((loss, grads))
    ref_loss, ref_grads = results[0]
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def test_simclr_loss_by_hand():
    z1 = [[1.0, 0.0], [0.0, 1.0]]
    z2 = [[0.6, 0.8], [0.8, 0.6]]
    tau = 0.5

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def view(q_all, other, same):
        # candidates: all `other` embeddings, then `same` embeddings except itself
        losses = []
        for i, q in enumerate(q_all):
            logits = [dot(q, k) / tau for k in other]
            logits += [dot(q, k) / tau for j, k in enumerate(same) if j != i]
            losses.append(ce(logits, i))
        return sum(losses) / len(losses)

    expected = (view(z1, z2, z1) + view(z2, z1, z2)) / 2
    got = simclr_loss(t(z1), 5 * t(z2), temperature=tau)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_slip_is_clip_plus_simclr():
    gen = torch.Generator().manual_seed(1)
    img, txt, z1, z2 = (torch.randn(4, 6, generator=gen) for _ in range(4))
    out = slip_loss(img, txt, z1, z2, logit_scale=5.0)
    torch.testing.assert_close(out["clip"], clip_loss(img, txt, 5.0))
    torch.testing.assert_close(out["ssl"], simclr_loss(z1, z2, 0.1))
    torch.testing.assert_close(out["loss"], out["clip"] + out["ssl"])


def test_simsiam_loss_by_hand_and_stop_gradient():
    p1 = t([[1.0, 0.0], [2.0, 0.0]]).requires_grad_()
    p2 = t([[0.0, 1.0], [1.0, 1.0]]).requires_grad_()
    z1 = t([[3.0, 4.0], [1.0, 0.0]]).requires_grad_()
    z2 = t([[1.0, 1.0], [0.0, 5.0]]).requires_grad_()
    # cos(p1, z2): 1/sqrt(2), 0 ; cos(p2, z1): 4/5, 1/sqrt(2)
    expected = -((1 / math.sqrt(2) + 0.0) / 2 + (0.8 + 1 / math.sqrt(2)) / 2) / 2
    loss = simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert z1.grad is None and z2.grad is None  # stop-gradient on the projections
    assert p1.grad is not None and p1.grad.abs().sum() > 0


def test_simsiam_head_shapes():
    torch.manual_seed(0)
    head = SimSiamHead(8, proj_dim=16, pred_dim=4)
    p, z = head(torch.randn(5, 8))
    assert p.shape == (5, 16) and z.shape == (5, 16)


def test_mlm_loss_by_hand():
    logits = t([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [5.0, 1.0, 1.0]]])  # (1, 3, V=3)
    labels = torch.tensor([[1, -100, 2]])
    expected = (ce([1.0, 2.0, 0.0], 1) + ce([5.0, 1.0, 1.0], 2)) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-12)
    none = mlm_loss(logits.clone().requires_grad_(), torch.full((1, 3), -100))
    assert none.item() == 0.0
    none.backward()  # still differentiable


def test_mask_tokens_rules():
    special = [0, 1, 2]  # pad, sot, eot
    ids = torch.tensor([[1, 10, 11, 12, 2, 0, 0]])
    out, labels = mask_tokens(ids, mask_id=3, vocab_size=20, special_ids=special, prob=0.0)
    assert torch.equal(out, ids) and (labels == -100).all()

    out, labels = mask_tokens(
        ids, 3, 20, special, prob=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert labels.tolist() == [[-100, 10, 11, 12, -100, -100, -100]]
    assert out[0, [0, 4, 5, 6]].tolist() == [1, 2, 0, 0]  # specials untouched
    assert ids.tolist() == [[1, 10, 11, 12, 2, 0, 0]]  # input not modified
    with pytest.raises(ValueError, match="int32/int64"):
        mask_tokens(ids.float(), 3, 20, special)


def test_mask_tokens_80_10_10_and_determinism():
    vocab, special, mask_id = 1000, [0, 1, 2], 3
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (200, 100), generator=gen)
    out, labels = mask_tokens(ids, mask_id, vocab, special, 1.0, torch.Generator().manual_seed(1))
    n = ids.numel()
    masked = (out == mask_id).sum().item() / n
    kept = (out == ids).sum().item() / n
    replaced = 1.0 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01
    assert not torch.isin(out, torch.tensor(special)).any()  # random draws avoid specials
    again, labels2 = mask_tokens(
        ids, mask_id, vocab, special, 1.0, torch.Generator().manual_seed(1)
    )
    assert torch.equal(out, again) and torch.equal(labels, labels2)
    other, _ = mask_tokens(ids, mask_id, vocab, special, 0.15, torch.Generator().manual_seed(2))
    assert abs((other != ids).float().mean().item() - 0.15 * 0.9) < 0.01


def test_feature_queue_wraparound_and_state_dict():
    q = FeatureQueue(size=4, dim=2, seed=0)
    assert set(q.state_dict()) == {"features", "ptr"}
    torch.testing.assert_close(q.features.norm(dim=1), torch.ones(4))
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    q.enqueue(a)
    assert q.ptr.item() == 3
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(q.features[:3], torch.tensor([[1.0, 0.0], [0.0, 1.0], [r, r]]))
    q.enqueue(torch.tensor([[-1.0, 0.0], [0.0, -1.0], [3.0, 4.0]]))  # slots 3, 0, 1
    assert q.ptr.item() == 2
    expected = torch.tensor([[0.0, -1.0], [0.6, 0.8], [r, r], [-1.0, 0.0]])
    torch.testing.assert_close(q.features, expected)

    other = FeatureQueue(size=4, dim=2, seed=7)
    other.load_state_dict(q.state_dict())
    torch.testing.assert_close(other.features, q.features)
    assert other.ptr.item() == 2

    q.enqueue(torch.arange(10.0).reshape(5, 2) + 1)  # more rows than slots: newest 4 survive
    torch.testing.assert_close(
        q.features, torch.nn.functional.normalize(torch.arange(2.0, 10.0).reshape(4, 2) + 1)
    )
    assert q.ptr.item() == 0
    with pytest.raises(ValueError, match="FeatureQueue.enqueue"):
        q.enqueue(torch.randn(2, 3))


def test_nns_loss_by_hand():
    q = FeatureQueue(size=3, dim=2)
    q.features.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    txt = torch.tensor([[0.9, 0.1], [0.5, 0.9]])  # NN: [1, 0] and [0.6, 0.8]
    img = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    expected = (ce([0.0, 0.8], 0) + ce([1.0, 0.6], 1)) / 2
    assert nns_loss(img, txt, q, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_declip_composition():
    gen = torch.Generator().manual_seed(3)
    b, d = 4, 6
    imgs = [torch.randn(b, d, generator=gen) for _ in range(2)]
    txts = [torch.randn(b, d, generator=gen) for _ in range(2)]
    sims = tuple(torch.randn(b, 5, generator=gen) for _ in range(4))
    mlm = (torch.randn(b, 7, 11, generator=gen), torch.randint(-1, 11, (b, 7), generator=gen))
    mlm[1][mlm[1] < 0] = -100
    queue = FeatureQueue(32, d)
    queue.enqueue(torch.randn(8, d, generator=gen))
    snapshot = FeatureQueue(32, d)
    snapshot.load_state_dict(queue.state_dict())

    out = declip_loss(imgs, txts, 5.0, simsiam=sims, mlm=mlm, queue=queue)
    mvs = sum(clip_loss(i, x, 5.0) for i in imgs for x in txts) / 4
    nns = sum(nns_loss(i, x, snapshot, 5.0) for i in imgs for x in txts) / 4
    torch.testing.assert_close(out["mvs"], mvs)
    torch.testing.assert_close(out["mvs"], mvs_loss(imgs, txts, 5.0))
    torch.testing.assert_close(out["nns"], nns)  # looked up before this batch was enqueued
    torch.testing.assert_close(out["simsiam"], simsiam_loss(*sims))
    torch.testing.assert_close(out["mlm"], mlm_loss(*mlm))
    total = 0.4 * mvs + 0.2 * out["simsiam"] + 0.2 * out["mlm"] + 0.2 * nns
    torch.testing.assert_close(out["loss"], total)
    assert queue.ptr.item() == 8 + 2 * b  # both text views enqueued

    filip = torch.tensor(1.5)
    defilip = declip_loss(imgs, txts, 5.0, sims, mlm, queue, DEFILIP_WEIGHTS, {"filip": filip})
    expected = 0.4 * defilip["mvs"] + 0.2 * (defilip["simsiam"] + defilip["mlm"] + defilip["nns"])
    torch.testing.assert_close(defilip["loss"], expected + 0.3)
    with pytest.raises(ValueError, match="'nns' has weight"):
        declip_loss(imgs, txts, 5.0, sims, mlm, queue=None)
    only_mvs = declip_loss(imgs, txts, 5.0, weights=DeCLIPWeights(1.0, 0.0, 0.0, 0.0))
    torch.testing.assert_close(only_mvs["loss"], mvs)


# FILIP example: 2 images x 2 tokens, 2 texts x 2 tokens (text 0's second token is padding).
F_IMG = [[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]]
F_TXT = [[[1.0, 0.0], [7.0, -3.0]], [[0.0, 1.0], [0.6, 0.8]]]
F_MASK = [[1, 0], [1, 1]]
# sim_i2t[i][j] = mean over image tokens of max over valid text tokens, worked out by hand:
F_I2T = [[(1.0 + 0.0) / 2, (0.6 + 1.0) / 2], [(0.6 + 0.8) / 2, (1.0 + 0.96) / 2]]
# sim_t2i[j][i] = mean over valid text tokens of max over image tokens:
F_T2I = [[1.0, 0.8], [(1.0 + 0.8) / 2, (0.8 + 1.0) / 2]]


def test_filip_by_hand():
    s = 3.0
    img, txt, mask = t(F_IMG), t(F_TXT), torch.tensor(F_MASK)
    i2t, t2i = filip_similarity(img, txt, mask)
    torch.testing.assert_close(i2t, t(F_I2T))
    torch.testing.assert_close(t2i, t(F_T2I))
    expected_i2t = sum(ce([s * v for v in F_I2T[i]], i) for i in range(2)) / 2
    expected_t2i = sum(ce([s * v for v in F_T2I[j]], j) for j in range(2)) / 2
    got = filip_loss(img, txt, mask, s)
    assert got.item() == pytest.approx((expected_i2t + expected_t2i) / 2, abs=1e-12)


def test_filip_padding_is_masked():
    img = t(F_IMG).requires_grad_()
    txt = t(F_TXT).requires_grad_()
    mask = torch.tensor(F_MASK).bool()
    loss = filip_loss(img, txt, mask, 3.0)
    g_img, g_txt = torch.autograd.grad(loss, (img, txt))
    assert g_txt[0, 1].abs().sum() == 0  # the padded token gets no gradient
    for pad in ([100.0, 100.0], [float("nan"), float("inf")]):
        txt2 = txt.detach().clone()
        txt2[0, 1] = torch.tensor(pad)
        txt2.requires_grad_()
        loss2 = filip_loss(img, txt2, mask, 3.0)
        g_img2, g_txt2 = torch.autograd.grad(loss2, (img, txt2))
        assert loss2.item() == loss.item()
        torch.testing.assert_close(g_img2, g_img)
        torch.testing.assert_close(g_txt2, g_txt)
    with pytest.raises(ValueError, match=r"texts \[1\] have no valid token"):
        filip_loss(img, txt, torch.tensor([[1, 0], [0, 0]]), 3.0)


def _filip_inputs(seed: int = 0, b: int = 6, n: int = 5, k: int = 4, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(b, n, d, generator=gen, requires_grad=True)
    txt = torch.randn(b, k, d, generator=gen, requires_grad=True)
    lengths = torch.randint(1, k + 1, (b,), generator=gen)
    mask = torch.arange(k)[None, :] < lengths[:, None]
    return img, txt, mask


def test_filip_chunked_equals_unchunked():
    img, txt, mask = _filip_inputs()
    scale = torch.tensor(7.0, requires_grad=True)
    results = []
    for chunk in (None, 1, 4, 6):
        loss = filip_loss(img, txt, mask, scale, chunk_size=chunk)
        results.append((loss, torch.autograd.grad(loss, (img, txt, scale))))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=1e-6)
        for g, r in zip(grads, results[0][1]):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def test_filip_chunking_never_saves_full_similarity():
    img, txt, mask = _filip_inputs(b=8, n=6, k=5, d=4)
    full = 8 * 6 * 8 * 5  # numel of the (B, N, n, k) token similarity

    def largest_saved(chunk: int | None) -> int:
        sizes = [0]

        def pack(x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            filip_loss(img, txt, mask, 5.0, chunk_size=chunk).backward()
        return max(sizes)

    assert largest_saved(None) >= full  # the unchunked path does keep it (test is sensitive)
    assert largest_saved(2) < full // 4  # chunked: only inputs and (B, N) logits are kept


def test_filip_token_selection():
    # Image tokens 0 and 2 align with text tokens; 1 and 3 point away from every text.
    img = t([[[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0], [-0.2, -1.0]]])
    txt = t([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]]).bool()
    kept = select_image_tokens(img, txt, mask, keep=0.5)
    torch.testing.assert_close(kept, t([[[1.0, 0.0], [0.0, 1.0]]]))
    assert select_image_tokens(img, txt, mask, keep=0.01).shape == (1, 1, 2)  # at least one
    img2, txt2, mask2 = _filip_inputs(seed=4, b=3, n=8)
    normed = torch.nn.functional.normalize
    sel = select_image_tokens(normed(img2, dim=-1), normed(txt2, dim=-1), mask2, keep=0.25)
    torch.testing.assert_close(
        filip_loss(img2, txt2, mask2, 4.0, image_token_keep=0.25),
        filip_loss(sel, txt2, mask2, 4.0),
    )
