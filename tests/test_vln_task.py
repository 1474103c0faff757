"""tasks/vln.py: EnvDrop's follower, its rollouts (imitation, A2C, greedy) and the task end to end
on the tiny Shapes houses (metrics.json, results scored by `cliptransfer evaluate r2r`, resume)."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch
from vln_helpers import assert_equal_grads, follower, grad_dict, token_batch

from cliptransfer.cli import main as cli
from cliptransfer.config import ConfigError
from cliptransfer.defaults import HOUSES_SPEAKER
from cliptransfer.engine import run_task
from cliptransfer.fileio import read_json
from cliptransfer.nav import load_graphs, load_r2r
from cliptransfer.tasks.vln import rollout as rollout_module
from cliptransfer.tasks.vln.agent import FollowerConfig
from cliptransfer.tasks.vln.rollout import forward_walk, rollout
from cliptransfer.tasks.vln.task import VLNConfig, VLNTask

SMALL = ["--set", "agent.hidden=32", "--set", "agent.word_embed=16", "--set",
         "agent.angle_embed=8", "--set", "max_steps=8", "--set", "train.batch_size=16",
         "--set", "train.num_threads=1", "--set", "data.camera=64x48",
         "--set", "data.vocab_size=120", "--set", "data.houses.size=tiny",
         "--set", "stage=follower"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def test_follower_step_puts_stop_after_the_candidates(world):
    eps, _, env = world
    agent = follower(env).eval()
    ob = env.reset(eps[:4])
    tokens, lengths = token_batch(4)
    text, state = agent.encode(tokens, lengths)
    prev = torch.zeros(4, 128)
    logits, (h, c), h1 = agent.step(ob, prev, state, text)
    k = ob.cand_angles.shape[1]
    assert logits.shape == (4, k + 1) and h.shape == c.shape == h1.shape == (4, 32)
    for i in range(4):
        n = int(ob.cand_count[i])
        assert logits[i, n] == 0.0  # STOP: the zero candidate
        assert torch.isfinite(logits[i, :n]).all() and torch.isinf(logits[i, n + 1 :]).all()


@pytest.mark.parametrize("mode", ["dropout", "zero_vision", "env_mask"])
def test_views_gathered_again_in_backward_equal_the_kept_views(world, mode):
    # With recompute_views the step keeps no (B, 36, D + A) context for backward (checkpointed
    # attention, views gathered from the table again): same logits, same gradients, same RNG.
    eps, _, env = world
    agent = follower(env).train()
    agent.cfg.recompute_views = True
    tokens, lengths = token_batch(6)
    kw = {"zero_vision": mode == "zero_vision"}
    if mode == "env_mask":
        kw["env_mask"] = (torch.rand(1, env.features.shape[-1]) > 0.5).float() * 2
    results = []
    for table in (None, env.features):
        ob = env.reset(eps[:6])
        torch.manual_seed(3)
        text, state = agent.encode(tokens, lengths)
        prev, loss = torch.zeros(6, 128), 0.0
        for _ in range(3):  # the observation's viewpoints change under the kept ones
            logits, state, h1 = agent.step(ob, prev, state, text, view_table=table, **kw)
            loss = loss + logits.clamp(min=-1e4).sum() + h1.square().sum()
            ob = env.step(ob.teacher.clamp(min=0))
        agent.zero_grad()
        loss.backward()
        grads = grad_dict(agent)
        results.append((loss.detach(), grads, torch.rand(1)))
    (loss_a, grads_a, rng_a), (loss_b, grads_b, rng_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(rng_a, rng_b)
    assert_equal_grads(grads_a, grads_b, "feat_att.linear_in.weight")


def test_environmental_dropout_masks_each_episodes_channels_at_every_step(world):
    # agent.env_dropout: a (B, D) mask, one per episode, on every view and candidate feature:
    # an all-zero row is that episode without vision, an all-one row leaves it as it was.
    eps, _, env = world
    agent = follower(env).eval()
    tokens, lengths = token_batch(2)
    d = env.features.shape[-1]
    outs = []
    for kw in ({"env_mask": torch.stack([torch.zeros(d), torch.ones(d)])},
               {"zero_vision": True}, {}):  # fmt: skip
        ob = env.reset(eps[:2])
        text, state = agent.encode(tokens, lengths)
        prev, logits_seen = torch.zeros(2, 128), []
        with torch.no_grad():
            for _ in range(3):
                logits, state, _ = agent.step(ob, prev, state, text, **kw)
                logits_seen.append(logits.clamp(min=-1e4))
                ob = env.step(ob.teacher.clamp(min=0))
        outs.append(torch.cat(logits_seen, -1))
    masked, blind, plain = outs
    torch.testing.assert_close(masked[0], blind[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked[1], plain[1], rtol=0, atol=1e-6)
    assert not torch.allclose(blind[0], plain[0])
    with pytest.raises(ConfigError, match="bt.env_dropout"):
        VLNConfig(stage="bt", agent=FollowerConfig(env_dropout=0.3))


def test_teacher_rollout_reaches_every_goal_and_a2c_trains_the_critic(world):
    eps, graphs, env = world
    agent = follower(env)
    tokens, lengths = token_batch(8)
    out = rollout(agent, env, eps[:8], tokens, lengths, feedback="teacher", ml_weight=1.0)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    for ep, traj in zip(eps[:8], env.trajectories(), strict=True):
        assert traj["trajectory"][-1][0] == ep.goal
    out = rollout(agent, env, eps[:8], tokens, lengths, feedback="sample", rl=True)
    out["loss"].backward()
    assert agent.critic[0].weight.grad.abs().sum() > 0
    assert agent.cand_att.linear_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sampled actions"):
        rollout(agent, env, eps[:2], tokens[:2], lengths[:2], feedback="argmax", rl=True)


@pytest.mark.parametrize("feedback", ["teacher", "sample"])
def test_rollout_that_stops_computing_ended_episodes_equals_the_whole_batch(world, monkeypatch,
                                                                           feedback):  # fmt: skip
    # compact=True drops ended episodes from the computed rows (EnvDrop computes all of them and
    # masks their outputs): same losses, gradients and trajectories up to summation order.
    # Dropout off (its masks are drawn for the rows computed) and sampling made row-wise
    # deterministic (the sampler's draws follow the rows too), so both runs take the same paths.
    eps, _, env = world

    def least_likely(probs):  # row-wise, and stops some episodes early
        return probs.masked_fill(probs == 0, math.inf).argmin(-1)

    monkeypatch.setattr(rollout_module, "sample_actions", least_likely)
    agent = follower(env).eval()
    tokens, lengths = token_batch(12)
    d = env.features.shape[-1]
    env_mask = (torch.rand(12, d, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    runs = []
    for compact in (False, True):
        agent.zero_grad()
        out = rollout(agent, env, eps[:12], tokens, lengths, feedback=feedback, ml_weight=1.0,
                      rl=feedback == "sample", env_mask=env_mask, compact=compact)  # fmt: skip
        out["loss"].backward()
        grads = grad_dict(agent)
        runs.append((out, grads, env.trajectories()))
    (full, grads_full, traj_full), (part, grads_part, traj_part) = runs
    assert traj_part == traj_full and part["steps"] == full["steps"]
    assert full["rows"] == 12 * full["steps"] and part["rows"] < full["rows"]  # it compacted
    torch.testing.assert_close(part["loss"], full["loss"], rtol=1e-5, atol=1e-6)
    assert grads_part.keys() == grads_full.keys() and "embedding.weight" in grads_full
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_part[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_walker_goes_straight_five_steps(world):
    eps, graphs, env = world
    trajs = forward_walk(env, eps[:6])
    for ep, t in zip(eps[:6], trajs, strict=True):
        vps = [s[0] for s in t["trajectory"]]
        moves = [v for i, v in enumerate(vps) if i and v != vps[i - 1]]
        assert len(moves) <= 5 and vps[0] == ep.start
        p = [graphs[ep.scan].position(v) for v in [vps[0], *moves]]
        heading = ep.heading
        for a, b in zip(p, p[1:], strict=False):  # every move within 90 deg of the last heading
            h = math.atan2(b[0] - a[0], b[1] - a[1])
            assert abs((h - heading + math.pi) % (2 * math.pi) - math.pi) < math.pi / 2
            heading = h


def test_task_end_to_end_metrics_results_and_eval_only(houses, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*SMALL, "--set", f"data.houses.root={houses}", "--set", "train.epochs=2",
            "--set", f"train.out_dir={out}"]  # fmt: skip
    report = run_task(VLNTask, argv)
    metrics = read_json(out / "metrics.json")
    for split in ("val_seen", "val_unseen"):
        assert set(metrics[split]) >= {"nav_error", "success_rate", "spl", "ndtw", "sdtw"}
        for name in ("random", "forward", "no_vision"):
            assert 0 <= metrics["baselines"][name][split]["success_rate"] <= 1
    assert report["val_unseen"] == metrics["val_unseen"]
    printed = capsys.readouterr().out
    assert "| agent |" in printed and "| no_vision |" in printed
    # The saved results are what `cliptransfer evaluate r2r` scores to the same numbers.
    rc = cli(["evaluate", "r2r", "--episodes", str(houses / "r2r" / "R2R_val_unseen.json"),
              "--connectivity", str(houses / "r2r" / "connectivity"),
              "--results", str(out / "results_val_unseen.json")])  # fmt: skip
    assert rc == 0
    scored = json.loads(capsys.readouterr().out)
    best = read_json(out / "best" / "meta.json")["val"]["val_unseen"]
    assert scored == pytest.approx(best)
    again = run_task(VLNTask, ["--eval-only", str(out / "best"), "--set",
                               f"train.out_dir={tmp_path / 'eval'}"])  # fmt: skip
    assert again["val_unseen"] == pytest.approx(best)
    # The launcher itself honours --eval-only (it used to train instead).
    launcher = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tasks" / "vln.py"))
    scripted = launcher["main"](["--eval-only", str(out / "best"), "--set",
                                 f"train.out_dir={tmp_path / 'eval3'}"])  # fmt: skip
    assert scripted["val_unseen"] == pytest.approx(best)
    assert not (tmp_path / "eval3" / "checkpoints").exists()
    # The same checkpoint evaluated by 2 processes (each a shard, gathered): identical numbers.
    from accelerate import debug_launcher

    debug_launcher(_eval_two, args=(str(out / "best"), str(tmp_path / "eval2")), num_processes=2)
    two = read_json(tmp_path / "eval2" / "metrics.json")
    assert {s: two[s] for s in ("val_seen", "val_unseen")} == {
        s: again[s] for s in ("val_seen", "val_unseen")
    }
    assert read_json(tmp_path / "eval2" / "results_val_unseen.json") == read_json(
        tmp_path / "eval" / "results_val_unseen.json"
    )


def _eval_two(best: str, out: str) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    run_task(VLNTask, ["--cpu", "--eval-only", best, "--set", f"train.out_dir={out}",
                       "--set", "train.num_threads=1"])  # fmt: skip


@pytest.mark.parametrize("env_dropout", [0.0, 0.3])
def test_resume_reproduces_the_uninterrupted_run(houses, tmp_path, env_dropout):
    common = [*SMALL, "--set", f"data.houses.root={houses}", "--set", "train.epochs=1",
              "--set", "no_vision=false", "--set", "train.save_every_steps=1",
              "--set", f"agent.env_dropout={env_dropout}"]  # fmt: skip
    full = run_task(VLNTask, [*common, "--set", f"train.out_dir={tmp_path / 'a'}"])
    part = [*common, "--set", f"train.out_dir={tmp_path / 'b'}"]
    run_task(VLNTask, [*part, "--set", "train.max_steps=2"])
    resumed = run_task(VLNTask, [*part, "--resume", "latest"])
    assert resumed["history"][-1]["train_loss"] == full["history"][-1]["train_loss"]
    from safetensors.torch import load_file

    def last(run):  # the weights after the last step (best/ may hold the cut run's evaluation)
        folder = (tmp_path / run / "checkpoints" / "latest").read_text().strip()
        return load_file(str(tmp_path / run / "checkpoints" / folder / "model.safetensors"))

    a, b = last("a"), last("b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_two(houses: str, out: str) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    run_task(VLNTask, ["--cpu", *SMALL, "--set", f"data.houses.root={houses}", "--set",
                       "train.epochs=1", "--set", f"train.out_dir={out}"])  # fmt: skip


def test_two_processes_split_the_global_batch(houses, tmp_path):
    """2 processes (DDP) train on halves of each global batch of 16: the same number of steps
    and samples as one process; sampled actions and dropout are drawn per rank, so the weights
    differ from the 1-process run's (EnvDrop has no multi-process mode to compare with)."""
    from accelerate import debug_launcher

    debug_launcher(_train_two, args=(str(houses), str(tmp_path / "two")), num_processes=2)
    two = read_json(tmp_path / "two" / "metrics.json")
    one = run_task(VLNTask, [*SMALL, "--set", f"data.houses.root={houses}", "--set",
                             "train.epochs=1", "--set", f"train.out_dir={tmp_path / 'one'}"])  # fmt: skip
    assert two["steps"] == one["steps"] == 3  # 48 training instructions / 16
    assert set(two["baselines"]) == {"random", "forward", "no_vision"}
    assert two["baselines"]["forward"] == one["baselines"]["forward"]  # deterministic walkers


def test_rxr_one_agent_four_languages(houses, tmp_path, capsys):
    report = run_task(VLNTask, [*SMALL, "--set", f"data.houses.root={houses}", "--set",
                                "data.dataset=rxr", "--set", "train.epochs=1", "--set",
                                "no_vision=false", "--set", f"train.out_dir={tmp_path}"])  # fmt: skip
    langs = report["val_unseen"]["languages"]
    assert set(langs) == {"en-US", "en-IN", "hi-IN", "te-IN"}
    assert "| val_unseen by language |" in capsys.readouterr().out
    only = run_task(VLNTask, [*SMALL, "--set", f"data.houses.root={houses}", "--set",
                              "data.dataset=rxr", "--set", "data.languages=hi-IN", "--set",
                              "train.max_steps=1", "--set", "no_vision=false", "--set",
                              f"train.out_dir={tmp_path / 'hi'}"])  # fmt: skip
    assert "languages" not in only["val_unseen"]  # one language: no per-language table


def test_symbolic_views_and_a_users_own_store_on_the_houses(houses, tmp_path):
    common = [*SMALL, "--set", f"data.houses.root={houses}", "--set", "train.max_steps=1",
              "--set", "no_vision=false", "--set", "train.eval_batch_size=64"]  # fmt: skip
    report = run_task(VLNTask, [*common, "--set", "encoder=symbolic", "--set",
                                f"train.out_dir={tmp_path / 'sym'}"])  # fmt: skip
    store = houses / "views-symbolic-v1"
    assert report["features"]["store"] == str(store) and report["features"]["channels"] == 69
    assert report["features"]["feature"] == "symbolic_floor_plan"
    # data.features on the houses: that store is read, nothing is extracted.
    own = run_task(VLNTask, [*common, "--set", f"data.features={store}", "--set",
                             f"train.out_dir={tmp_path / 'own'}"])  # fmt: skip
    assert own["features"]["store"] == str(store) and own["features"]["channels"] == 69
    assert own["val_unseen"]["success_rate"] == report["val_unseen"]["success_rate"]


def test_speaker_path_features_bleu_and_stage(houses, tmp_path, world):
    from cliptransfer.tasks.vln.speaker import corpus_bleu, path_features

    eps, graphs, env = world
    path = path_features(env, eps[:3])
    for i, ep in enumerate(eps[:3]):  # one step per move plus the STOP step (a zero action)
        assert int(path.lengths[i]) == len(ep.path)
        assert not path.actions[i, len(ep.path) - 1].any()
        assert path.actions[i, 0, -128:].abs().sum() > 0  # the first move's angle feature
    assert path.views.shape[2:] == (36, 12 + 128)
    # sacrebleu against several references: an exact copy of one scores 100.
    assert corpus_bleu(["walk to the red star and stop"], [["walk to the red star and stop",
                       "go to the star"]]) == pytest.approx(100.0)  # fmt: skip
    report = run_task(VLNTask, [*SMALL, "--set", f"data.houses.root={houses}", "--set",
                                "stage=speaker", "--set", "speaker.hidden=32", "--set",
                                "speaker.word_embed=16", "--set", "train.epochs=1", "--set",
                                f"train.out_dir={tmp_path}"])  # fmt: skip
    assert 0 <= report["val_unseen"]["bleu"] <= 100 and report["val_unseen"]["paths"] == 6
    rows = read_json(tmp_path / "results_val_unseen.json")
    assert len(rows) == 6 and all(len(r["references"]) == 3 for r in rows)


def test_back_translation_stage_runs_and_resumes(houses, tmp_path):
    from cliptransfer.tasks.vln.backtranslate import sample_aug_paths, write_aug_paths

    speaker_args = [*SMALL, "--set", f"data.houses.root={houses}", "--set", "stage=speaker",
                    "--set", "speaker.hidden=32", "--set", "speaker.word_embed=16", "--set",
                    "train.epochs=1", "--set", f"train.out_dir={tmp_path / 'spk'}"]  # fmt: skip
    run_task(VLNTask, speaker_args)
    graphs = load_graphs(houses / "r2r" / "connectivity")
    train = load_r2r(houses / "r2r" / "R2R_train.json")
    scans = sorted({e.scan for e in train})
    aug = sample_aug_paths(graphs, scans, 5, 0, {(e.start, e.goal) for e in train})
    assert len(aug) == 5 * len(scans)
    assert all(4 <= len(e.path) <= 7 and not e.instruction for e in aug)
    assert not {(e.start, e.goal) for e in aug} & {(e.start, e.goal) for e in train}
    write_aug_paths(tmp_path / "aug_paths.json", aug)
    assert [e.path for e in load_r2r(tmp_path / "aug_paths.json")] == [e.path for e in aug]
    bt = [*SMALL, "--set", f"data.houses.root={houses}", "--set", "stage=bt", "--set",
          f"bt.speaker={tmp_path / 'spk' / 'best'}", "--set",
          f"bt.aug_paths={tmp_path / 'aug_paths.json'}",
          "--set", "train.epochs=1", "--set", "train.save_every_steps=1"]  # fmt: skip
    full = run_task(VLNTask, [*bt, "--set", f"train.out_dir={tmp_path / 'a'}"])
    # the no-vision twin is kept and walks the augmented episodes too
    assert "val_unseen" in full and set(full["baselines"]) == {"random", "forward", "no_vision"}
    run_task(VLNTask, [*bt, "--set", f"train.out_dir={tmp_path / 'b'}", "--set",
                       "train.max_steps=2"])  # fmt: skip
    resumed = run_task(VLNTask, [*bt, "--set", f"train.out_dir={tmp_path / 'b'}",
                                 "--resume", "latest"])  # fmt: skip
    assert resumed["history"][-1]["train_loss"] == full["history"][-1]["train_loss"]


def test_instruction_tokenizer_keeps_house_words_whole(houses, tmp_path):
    # Unigram with a soft vocabulary limit collapsed this small corpus to near-characters
    # ("gr" "ay", "a" "nd"); the BPE tokenizer keeps each of its words one piece.
    from cliptransfer.tasks.vln.data import train_tokenizer

    texts = [e.instruction for e in load_r2r(houses / "r2r" / "R2R_train.json")]
    tok = train_tokenizer(texts, tmp_path / "tok", 1000)
    words = "walk past the gray star and turn left then stop in the kitchen".split()
    assert len(tok.tokenize_words(" ".join(words))) == len(words)
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()


def test_packaged_speaker_describes_house_paths_and_is_the_bt_default(houses, tmp_path, capsys):
    # The default run is back-translation with the packaged houses speaker, which reads the
    # packaged CLIP's 128x96 views at norm 20; on these tiny houses (never seen in its training)
    # it writes instructions that differ per path and share words with the references.
    cfg = VLNConfig()
    assert cfg.stage == "bt" and cfg.bt.speaker == "default"
    base = ["--set", "train.num_threads=1", "--set", "data.houses.size=tiny",
            "--set", f"data.houses.root={houses}", "--set", "train.eval_batch_size=64"]  # fmt: skip
    spoken = run_task(VLNTask, [*base, "--set", "stage=speaker", "--eval-only",
                                str(HOUSES_SPEAKER),
                                "--set", f"train.out_dir={tmp_path / 'spk'}"])  # fmt: skip
    rows = read_json(tmp_path / "spk" / "results_val_unseen.json")
    assert len(rows) == 6 and len({r["instruction"] for r in rows}) >= 4
    assert spoken["val_unseen"]["bleu"] > 15
    # Its views must be the run's: a speaker of 128x96 views refuses 64x48 ones.
    with pytest.raises(SystemExit):
        run_task(VLNTask, [*base, "--set", "data.camera=64x48",
                           "--set", f"train.out_dir={tmp_path / 'x'}"])  # fmt: skip
    assert "data.camera: speaker '128x96', this run '64x48'" in capsys.readouterr().err
    report = run_task(VLNTask, [*base, "--set", "agent.hidden=32", "--set", "agent.word_embed=16",
                                "--set", "max_steps=8", "--set", "train.batch_size=16",
                                "--set", "train.max_steps=1",
                                "--set", f"train.out_dir={tmp_path / 'bt'}"])  # fmt: skip
    assert set(report["baselines"]) == {"random", "forward", "no_vision"}
