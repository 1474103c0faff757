"""Vision-and-language navigation (R2R / RxR): R2R-EnvDrop's follower (imitation + A2C) on CLIP
view features, in a simulator-free environment exact to MatterSim's graph and EnvDrop's
candidates, with EnvDrop's speaker and back-translation, through Accelerate.

With no arguments: the `large` Shapes houses (generated, their 36 views rendered and encoded by
the packaged CLIP, and a SentencePiece tokenizer trained, all once and cached) and EnvDrop's
back-translation stage: every update trains the follower on a real batch and on as many
augmented paths of the training houses instructed by the packaged houses speaker under one
environmental-dropout mask (imitation + A2C, mlWeight 1.0 / 0.6); its no-vision twin trains
on the same batches. The report prints NE / SR / SPL / nDTW / SDTW on val_seen and val_unseen
next to the random and forward-only walkers and the no-vision agent. On the CPU a step's
rollouts (imitation and A2C, agent and twin) run side by side on the process's threads, one
intra-op thread each (`rollout_threads`; a generator per rollout, so the numbers do not depend
on how many threads ran them), and a thread whose rollouts are done takes the others' forked
sub-jobs (`cliptransfer.forkjoin`). 3 epochs, ~7 minutes on 2 cores.

    accelerate launch tasks/vln.py
    python tasks/vln.py                                            # the same, one process
    accelerate launch --multi_gpu --num_processes 2 tasks/vln.py --cpu --set train.num_threads=1
    accelerate launch tasks/vln.py --set stage=follower            # the follower alone
    accelerate launch tasks/vln.py --set stage=follower --set rl.feedback=teacher  # imitation
    accelerate launch tasks/vln.py --config configs/tasks/vln_speaker.yaml    # train a speaker
    accelerate launch tasks/vln.py --set bt.speaker=runs/vln-speaker/best     # bt with it
    accelerate launch tasks/vln.py --config configs/tasks/vln_rxr.yaml           # 4 languages
    accelerate launch tasks/vln.py --config configs/tasks/vln_r2r_envdrop.yaml \\
        --set data.train=/data/R2R/R2R_train.json --set data.val_seen=/data/R2R/R2R_val_seen.json \\
        --set data.val_unseen=/data/R2R/R2R_val_unseen.json \\
        --set data.connectivity=/data/connectivity --set data.features=/data/views-clip-vit-b32

Run folder: config.yaml, TensorBoard logs, checkpoints/ (--resume latest), best/
(model.safetensors, config.yaml, tokenizer/, meta.json), results_val_seen.json and
results_val_unseen.json (R2R results format, scored by `cliptransfer evaluate r2r|rxr`) and
metrics.json ({split: {metric}}, baselines: {random | forward | no_vision: {split: {metric}}}).
"""

from __future__ import annotations

import sys

from cliptransfer.engine import fit, start_run
from cliptransfer.tasks.vln.task import VLNTask


def main(argv: list[str] | None = None) -> dict:
    run = start_run(VLNTask, argv, __doc__)  # flags, config, Accelerate, seed, CPU threads
    task = VLNTask(run.cfg, run)
    task.setup()  # episodes, graphs, view features, tokenizer, env, agents, baselines
    if task.eval_only:  # --eval-only runs/vln/best: score a saved agent, no training
        report = task.evaluate_only()
    else:
        report = task.report(fit(run, task))  # epochs; best val_unseen SR (R2R) / nDTW (RxR) kept
    return run.finish(task.finish_report(report), show=task.print_report)


if __name__ == "__main__":
    main(sys.argv[1:])
