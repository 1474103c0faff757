"""Contrastive pretraining: CLIP, SLIP, DeCLIP, FILIP, DeFILIP and SigLIP through Accelerate.

With no arguments it prepares the Shapes world (if needed) and trains the tiny CLIP on CPU, then
prints zero-shot classification and retrieval of the trained model next to its random init:

    accelerate launch pretrain/contrastive.py
    python pretrain/contrastive.py                                  # same, one process
    accelerate launch pretrain/contrastive.py --config configs/pretrain/declip_shapes.yaml
    accelerate launch --multi_gpu --num_processes 2 pretrain/contrastive.py --cpu   # 2 CPU procs
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml pretrain/contrastive.py \
        --config configs/pretrain/clip_pairs.yaml \
        --set data.train=/data/cc3m/train.jsonl --set data.val=/data/cc3m/val.jsonl \
        --set train.out_dir=runs/cc3m
    accelerate launch pretrain/contrastive.py --resume latest --set train.out_dir=runs/x

`train.batch_size` is the global batch (split over processes and train.grad_accum). The run folder
gets config.yaml (the resolved config), TensorBoard logs, checkpoints/ (resumable with --resume
latest, mid-epoch), final/ (the CLIP model, `load_clip`-able, with its tokenizer) and metrics.json.
"""

from __future__ import annotations

import sys

from cliptransfer.engine import fit, start_run
from cliptransfer.tasks.contrastive.task import ContrastiveTask


def main(argv: list[str] | None = None) -> dict:
    run = start_run(ContrastiveTask, argv, __doc__)  # flags, config, Accelerate, seed, threads
    task = ContrastiveTask(run.cfg, run)
    task.setup()  # pairs, tokenizer, CLIP + the loss terms' heads, tuning policy
    report = task.report(fit(run, task))  # steps; then zero-shot/retrieval and final/
    return run.finish(task.finish_report(report), show=task.print_report)  # + peak memory


if __name__ == "__main__":
    main(sys.argv[1:])
