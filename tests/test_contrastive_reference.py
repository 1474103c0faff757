"""`loss.recipe=reference`: each Sense-GVT/DeCLIP model-level choice pinned on small inputs.

Tiny towers (2 layers x 64 wide, 32-px images, 12-token captions) keep every test well under a
second on CPU; the 2-process test forks gloo ranks (`fork_ranks` in conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from cliptransfer.clip import create_clip
from cliptransfer.config import ConfigError
from cliptransfer.contrastive.data import PairDataConfig, PairDataset
from cliptransfer.contrastive.losses import clip_loss, mask_tokens, mlm_loss, mvs_loss, simclr_loss
from cliptransfer.contrastive.losses.filip_topk import filip_topk_loss, select_partner_tokens
from cliptransfer.contrastive.objectives import ContrastiveModel, LossConfig, clamp_logit_scales_
from cliptransfer.contrastive.pairs import load_pairs
from cliptransfer.contrastive.reference import encode_image_parts, encode_text_parts
from cliptransfer.defaults import resolve_tokenizer
from cliptransfer.engine.distributed import world_info

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("clip", "slip", "declip", "filip", "defilip", "siglip")
B, L, V, S = 8, 12, 50, 32
PAD, MASK, SOT, EOT = 0, V - 3, V - 2, V - 1  # EOT is the largest id (argmax pooling)


def tiny_clip(kind: str = "vit"):
    text = {"width": 64, "layers": 2, "heads": 2, "context_length": L, "vocab_size": V}
    if kind == "vit":
        vision = {"image_size": S, "width": 64, "heads": 2, "layers": 2, "patch_size": 8}
        return create_clip("ViT-tiny", embed_dim=32, vision=vision, text=text)
    return create_clip("RN-tiny", embed_dim=32, vision={"image_size": S}, text=text)


def make_batch(seed: int = 0, batch: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, L - 1, (batch,), generator=g)  # SOT + words, then EOT, padding
    ids = torch.randint(1, MASK, (batch, L), generator=g)
    ids = torch.where(torch.arange(L)[None] < lengths[:, None], ids, PAD)
    ids[:, 0] = SOT
    ids[torch.arange(batch), lengths] = EOT
    masked, labels = mask_tokens(ids, MASK, V, (PAD, SOT, EOT), prob=0.3, generator=g)
    views = {k: torch.randn(batch, 3, S, S, generator=g) for k in ("image", "image_view", "image_view2")}  # fmt: skip
    return {
        **views,
        "text": ids,
        "text_aug": ids.flip(0),
        "mlm_input": masked,
        "mlm_labels": labels,
    }


def keep_input(seen: dict[str, torch.Tensor], key: str):
    """A forward hook that records a module's first input (and leaves its output alone)."""

    def hook(module, args, output) -> None:
        seen.setdefault(key, args[0])

    return hook


def model_for(method: str, kind: str = "vit", **cfg) -> ContrastiveModel:
    torch.manual_seed(0)
    loss = LossConfig(method=method, recipe="reference", **cfg)
    return ContrastiveModel(tiny_clip(kind), loss).train()


# ---------------------------------------------------------------- FILIP: top-16 partner tokens


def test_selection_ranks_tokens_by_summed_similarity_to_the_partner():
    # One pair; unit vectors so every cosine is exact. By *max* similarity image token 0 or 1
    # would rank first (cosine 1); by the reference's *sum* token 2 does.
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]], dtype=torch.float64)
    txt = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.28, 0.96]]], dtype=torch.float64)
    # Row sums: image 1.28, 1.96, 2.336; column sums: text 1.6, 1.8, 2.176.
    kept_img, kept_txt = select_partner_tokens(img, txt, k=2)
    assert torch.equal(kept_img, img[:, [2, 1]])
    assert torch.equal(kept_txt, txt[:, [2, 1]])
    kept_img, kept_txt = select_partner_tokens(img, txt, k=16)  # fewer than 16: all kept
    assert kept_img.shape == (1, 3, 2) and kept_txt.shape == (1, 3, 2)


def reference_dense_logits(img, txt, scale, k):
    """A transcription of the reference's `get_weighted_dense_logits` (filip.py 71-106), one
    process: topk by summed matched-pair similarity, rows keep every token."""
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    cross = torch.matmul(img, txt.permute(0, 2, 1))
    _, id1 = torch.topk(cross.sum(dim=2), dim=1, k=k)
    _, id2 = torch.topk(cross.sum(dim=1), dim=1, k=k)
    bs, n1 = img.shape[:2]
    sel1 = img.reshape(bs * n1, -1)[id1 + (torch.arange(bs) * n1)[:, None]].reshape(bs, k, -1)
    bs, n2 = txt.shape[:2]
    sel2 = txt.reshape(bs * n2, -1)[id2 + (torch.arange(bs) * n2)[:, None]].reshape(bs, k, -1)

    def get_logits(f1, s2):
        i, j, d = f1.shape
        m, n, _ = s2.shape
        out = scale * f1.reshape(-1, d) @ s2.reshape(-1, d).t()
        return out.reshape(i, j, m, n).permute(0, 2, 1, 3)

    return get_logits(img, sel2).max(dim=-1)[0].mean(dim=-1), get_logits(txt, sel1).max(dim=-1)[0].mean(dim=-1)  # fmt: skip


@pytest.mark.parametrize("chunk", [None, 2])
def test_filip_topk_loss_equals_the_reference_transcription(chunk):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(5, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(5, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    i2t, t2i = reference_dense_logits(img, txt, scale, k=3)
    target = torch.arange(5)
    want = (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2
    got = filip_topk_loss(img, txt, scale, top_k=3, chunk_size=chunk)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    grads_got = torch.autograd.grad(got, (img, txt, scale))
    grads_want = torch.autograd.grad(want, (img, txt, scale))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    # Selecting 3 of 7/9 tokens matters: keeping all of them gives another loss.
    assert abs(filip_topk_loss(img, txt, scale, top_k=9).item() - got.item()) > 1e-3


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_filip_token_features_and_dense_temperature(kind):
    model = model_for("filip", kind)
    clip, batch = model.clip, make_batch()
    seen: dict[str, torch.Tensor] = {}
    model.image_mapping.register_forward_hook(keep_input(seen, "img"))
    model.text_mapping.register_forward_hook(keep_input(seen, "txt"))
    if kind == "vit":  # the input of ln_post (timm's `norm`), class token dropped
        clip.visual.norm.register_forward_hook(keep_input(seen, "pre_ln"))
    out = model(batch)
    with torch.no_grad():
        if kind == "vit":
            assert torch.equal(seen["img"], seen["pre_ln"][:, 1:])
            assert seen["img"].shape == (B, (S // 8) ** 2, 64)
        else:  # the layer4 grid before the attention pool
            grid = clip.visual.forward_features(batch["image"])
            torch.testing.assert_close(seen["img"], grid.flatten(2).transpose(1, 2))
        # Every text position (padding included) of the masked caption's final-LN states.
        torch.testing.assert_close(seen["txt"], clip.encode_text_hidden(batch["mlm_input"]))
        assert model.image_mapping.out_features == model.text_mapping.out_features == 256
        # The FILIP term runs on its own temperature, initialised to log(1/0.07).
        assert model.logit_scale_dense.item() == pytest.approx(math.log(1 / 0.07))
        want = filip_topk_loss(
            model.image_mapping(seen["img"]), model.text_mapping(seen["txt"]),
            model.logit_scale_dense.exp(), 16,
        )  # fmt: skip
    torch.testing.assert_close(out["filip"], want)
    out["loss"].backward()
    assert model.logit_scale_dense.grad.abs().item() > 0
    # FILIP's CLIP term has weight 0 (the reference's `clip_loss: 0.0`): in the graph, no pull.
    assert model.clip.logit_scale.grad.item() == 0.0 and out["loss"].item() == out["filip"].item()


def test_logit_scales_are_clamped_like_the_reference_solver():
    model = model_for("defilip")
    cfg = model.cfg
    for main, dense, want_main, want_dense in ((10.0, 10.0, math.log(100), 6.0),
                                               (0.0, -1.0, 3.0, 3.0), (4.0, 5.0, 4.0, 5.0)):  # fmt: skip
        with torch.no_grad():
            model.clip.logit_scale.fill_(main)
            model.logit_scale_dense.fill_(dense)
        clamp_logit_scales_(model, cfg)
        assert model.clip.logit_scale.item() == pytest.approx(want_main)
        assert model.logit_scale_dense.item() == pytest.approx(want_dense)
    # The configured bounds still apply inside [3, 6]; SigLIP keeps its own.
    model = model_for("clip", logit_scale_min=50.0)
    with torch.no_grad():
        model.clip.logit_scale.fill_(0.0)
    clamp_logit_scales_(model, model.cfg)
    assert model.clip.logit_scale.item() == pytest.approx(math.log(50))
    model = model_for("siglip")
    with torch.no_grad():
        model.clip.logit_scale.fill_(1.0)
    clamp_logit_scales_(model, model.cfg)
    assert model.clip.logit_scale.item() == 1.0


# ---------------------------------------------------------------- DeCLIP: the masked caption


@pytest.mark.parametrize("method", ["declip", "defilip"])
def test_declip_uses_the_masked_caption_causally_and_a_per_rank_queue(method):
    model = model_for(method, queue_size=64)
    clip, batch = model.clip, make_batch()
    assert not model.queue.gather
    seen: dict[str, torch.Tensor] = {}
    if method == "defilip":
        model.text_mapping.register_forward_hook(keep_input(seen, "txt"))
    out = model(batch)
    with torch.no_grad():
        masked = clip.encode_text(batch["mlm_input"])
        eda = clip.encode_text(batch["text_aug"])
        img, img2 = clip.encode_image(batch["image"]), clip.encode_image(batch["image_view"])
        scale = clip.logit_scale.exp()
        # MVS on the masked caption's embedding (and the unmasked EDA caption).
        torch.testing.assert_close(out["mvs"], mvs_loss([img, img2], [masked, eda], scale))
        # The queue got the EDA caption first, then the masked caption (declip.py 285-288).
        torch.testing.assert_close(model.queue.features[:B], F.normalize(eda, dim=-1))
        torch.testing.assert_close(model.queue.features[B : 2 * B], F.normalize(masked, dim=-1))
        assert model.queue.ptr.item() == 2 * B
        # MLM from the causal pass (left context only), on the text width, not the projection.
        hidden = clip.encode_text_hidden(batch["mlm_input"], causal=True)
        want = mlm_loss(model.mlm_head(hidden), batch["mlm_labels"])
        torch.testing.assert_close(out["mlm"], want)
        assert model.mlm_head.in_features == 64
        bidirectional = clip.encode_text_hidden(batch["mlm_input"], causal=False)
        assert abs(mlm_loss(model.mlm_head(bidirectional), batch["mlm_labels"]) - want) > 1e-4
        if method == "defilip":  # FILIP's text tokens: the masked caption's as well
            torch.testing.assert_close(seen["txt"], hidden)


def test_recipe_sizes_and_config_checks():
    assert LossConfig().queue_size == 4096 and LossConfig().simclr_hidden == 1024
    ref = LossConfig(recipe="reference")
    assert ref.queue_size == 65536 and ref.simclr_hidden == 4096
    assert LossConfig(recipe="reference", queue_size=8).queue_size == 8
    with pytest.raises(ConfigError, match="filip_token_keep: must be 1 with recipe=reference"):
        LossConfig(recipe="reference", filip_token_keep=0.25)
    with pytest.raises(ConfigError, match="logit_scale_max: must be >= exp"):
        LossConfig(recipe="reference", logit_scale_max=10.0)
    default = ContrastiveModel(tiny_clip(), LossConfig(method="defilip", queue_size=8))
    assert default.queue.gather and not hasattr(default, "logit_scale_dense")
    assert default.mlm_head.in_features == 32  # the default predicts from the joint space


# ---------------------------------------------------------------- SLIP: three views


@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_slip_clip_on_a_base_view_simclr_4096_wide_bn_per_view(kind):
    model = model_for("slip", kind)
    clip, batch = model.clip, make_batch()
    head = model.simclr_head
    width = 64 if kind == "vit" else clip.visual.num_features  # pre-projection width
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (width, 4096, 256)
    out = model(batch)
    with torch.no_grad():
        for pixels in (batch["image"], batch["image_view"]):  # parts agree with the tower
            torch.testing.assert_close(encode_image_parts(clip.visual, pixels).embeds,
                                       clip.encode_image(pixels))  # fmt: skip
        txt = clip.encode_text(batch["text"])
        assert torch.equal(encode_text_parts(clip, batch["text"])[0], txt)
        torch.testing.assert_close(out["clip"], clip_loss(clip.encode_image(batch["image"]), txt,
                                                          clip.logit_scale.exp()))  # fmt: skip
        f1 = encode_image_parts(clip.visual, batch["image_view"]).pooled
        f2 = encode_image_parts(clip.visual, batch["image_view2"]).pooled
        if kind == "vit":  # ln_post(cls), before the projection
            vis = clip.visual
            torch.testing.assert_close(f1, vis.norm(vis.forward_features(batch["image_view"]))[:, 0])  # fmt: skip
        want = simclr_loss(head(f1), head(f2))  # BatchNorm statistics of each view alone
        torch.testing.assert_close(out["simclr"], want)
        joint = simclr_loss(*head(torch.cat([f1, f2])).chunk(2))  # the default's one BN pass
        assert abs(joint - want) > 1e-4


def test_third_view_is_drawn_last(tiny_world):
    records = load_pairs(tiny_world / "pairs" / "train.jsonl", str(tiny_world))[:2]
    tok = resolve_tokenizer("shapes")
    two = PairDataset(records, tok, PairDataConfig(second_view=True, text_aug=True, mlm_prob=0.15))
    three = PairDataset(records, tok, PairDataConfig(second_view=True, text_aug=True,
                                                      mlm_prob=0.15, third_view=True))  # fmt: skip
    a, b = two[1], three[1]
    assert set(b) - set(a) == {"image_view2"}
    for key in ("image", "image_view", "text_aug", "mlm_input"):  # unchanged by the third view
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(b["image_view2"], b["image_view"])


# ---------------------------------------------------------------- every method trains


@pytest.mark.parametrize("kind", ["vit", "rn"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_reference(method, kind):
    model = model_for(method, kind, queue_size=64, simclr_hidden=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, losses = make_batch(), []
    for _ in range(5):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        # Every parameter is in the graph (DDP needs no find_unused_parameters).
        assert [n for n, p in model.named_parameters() if p.grad is None] == []
        opt.step()
        clamp_logit_scales_(model, model.cfg)
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    # Step 0 runs at the initial scale 14.3, before the clamp to >= exp(3): compare from step 1.
    assert losses[-1] < losses[1], losses


# ---------------------------------------------------------------- 1 vs 2 processes


def run_reference() -> dict[str, torch.Tensor]:
    """Two steps of the reference FILIP and CLIP models on this rank's half of a fixed batch,
    DDP-style gradient averaging; and the DeCLIP model's per-rank NNS queue."""
    rank, world = world_info()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    out: dict[str, torch.Tensor] = {}
    for method in ("filip", "clip", "declip"):
        model = model_for(method, queue_size=24)
        total = []
        for step in range(2):
            batch = {k: v[rows] for k, v in make_batch(seed=step).items()}
            terms = model(batch)
            loss = terms["nns"] if method == "declip" else terms["loss"]
            if method != "declip":
                loss.backward()
            total.append(loss.detach())
        total = torch.stack(total)  # (2,) per-step losses
        if world > 1:
            dist.all_reduce(total)
        out[f"{method}/loss"] = total / world
        if method == "declip":
            out["queue"] = model.queue.features.clone()
            continue
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            if world > 1:
                dist.all_reduce(grad)
            out[f"{method}/grad/{name}"] = grad / world
    return out


def test_two_processes_equal_one_except_the_per_rank_queue(fork_ranks):
    single = run_reference()  # first, in this process: it also warms the lazy imports
    ranks = fork_ranks(run_reference, 2)
    for key, ref in single.items():
        if key.startswith("declip") or key == "queue":
            continue
        # fp32 sums in another order: ~4e-7 of the largest gradient entry (the embeddings').
        atol = 2e-6 * max(1.0, ref.abs().max().item())
        for r, res in enumerate(ranks):
            torch.testing.assert_close(res[key], ref, atol=atol, rtol=1e-5, msg=f"{key} rank {r}")
    assert sum(v.abs().sum().item() for k, v in single.items() if "/grad/" in k) > 0
    # The reference's NNS queue is per rank: the first step (same seeded queue everywhere) is
    # exact, after that each rank looks up its own rows only, so 2 processes differ from 1.
    nns_one, nns_two = single["declip/loss"], ranks[0]["declip/loss"]
    torch.testing.assert_close(nns_two[0], nns_one[0], atol=1e-6, rtol=1e-5)
    assert abs(nns_two[1] - nns_one[1]) > 1e-4
    assert not torch.equal(ranks[0]["queue"], ranks[1]["queue"])


# ---------------------------------------------------------------- through the trainer


@pytest.mark.parametrize("method", ["slip", "defilip"])
def test_trainer_runs_the_reference_recipe(tiny_world, tmp_path, method):
    from cliptransfer.engine import run_task
    from cliptransfer.tasks.contrastive.task import ContrastiveTask

    args = [
        f"world.dir={tiny_world}", "world.size=tiny", f"train.out_dir={tmp_path}",
        "train.batch_size=16", "train.eval_max_images=16", "train.max_steps=2",
        "train.log_every=1", "data.num_workers=0", "loss.recipe=reference",
        f"loss.method={method}", "loss.queue_size=48", "loss.simclr_hidden=64",
        "loss.simsiam_proj_dim=64", "loss.simsiam_pred_dim=32",
    ]  # fmt: skip
    report = run_task(ContrastiveTask, [a for arg in args for a in ("--set", arg)])
    assert report["steps"] == 2
    state = load_file(str(tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"))
    # The solver's clamp ran: the initial log(1/0.07) = 2.66 is now >= 3.
    assert 3.0 <= state["clip.logit_scale"].item() <= math.log(100)
    if method == "defilip":
        assert 3.0 <= state["logit_scale_dense"].item() <= 6.0
        assert state["image_mapping.weight"].shape[0] == 256
        # 2 steps x 2 text views x 16 rows, one process: the per-rank queue holds this rank's.
        assert state["queue.ptr"].item() == 64 % 48 and state["queue.features"].shape == (48, 128)
    else:
        assert state["simclr_head.0.weight"].shape == (64, 256)  # RN-tiny layer4: 4 * 8 * 2**3
