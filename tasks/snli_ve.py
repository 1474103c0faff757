"""SNLI-VE (visual entailment) transfer of a CLIP backbone, through Accelerate.

The image is the premise, `sentence2` the hypothesis; a head over grid cells (or BottomUp regions)
and the hypothesis predicts entailment / neutral / contradiction (cross-entropy). The best epoch
on dev is kept and scored on test. With no arguments: the Shapes world's Flickr30k-style images
and SNLI-VE files, the packaged small CLIP's grid features, the word-to-region head (`scan`: each
hypothesis word attends over the cells, fused element-wise), batch 64 for 8 epochs; the report
prints accuracy overall and per gold label next to the majority-label prior.

    accelerate launch tasks/snli_ve.py
    python tasks/snli_ve.py                                        # the same, one process
    accelerate launch --multi_gpu --num_processes 2 tasks/snli_ve.py --cpu --set train.num_threads=1
    accelerate launch tasks/snli_ve.py --set features.kind=bottomup       # BUTD-style regions
    accelerate launch tasks/snli_ve.py --set model.arch=mcan       # or topdown, vlbert
    accelerate launch tasks/snli_ve.py --set mode=end2end --set peft.method=lora
    accelerate launch tasks/snli_ve.py --config configs/tasks/snli_ve_rn50.yaml \\
        --set data.train=/data/snli_ve/snli_ve_train.jsonl \\
        --set data.val=/data/snli_ve/snli_ve_dev.jsonl \\
        --set data.test=/data/snli_ve/snli_ve_test.jsonl \\
        --set data.images=/data/flickr30k/flickr30k_images --set train.out_dir=runs/ve-rn50
    python tasks/snli_ve.py --eval-only runs/snli_ve/best --set data.val=other.jsonl

Run folder: config.yaml, TensorBoard logs, checkpoints/ (--resume latest), best/
(model.safetensors, config.yaml, tokenizer/, meta.json; adapter/ with PEFT), results_val.json and
results_test.json (`[{"pairID", "label"}]`, scored by `cliptransfer evaluate snli-ve`) and
metrics.json.
"""

from __future__ import annotations

import sys

from cliptransfer.engine import fit, start_run
from cliptransfer.tasks.snli_ve.task import VETask


def main(argv: list[str] | None = None) -> dict:
    run = start_run(VETask, argv, __doc__)  # flags, config, Accelerate, seed, CPU threads
    task = VETask(run.cfg, run)
    task.setup()  # SNLI-VE pairs, features (cached), head, PEFT
    if task.eval_only:
        report = task.evaluate_only()
    else:
        report = task.report(fit(run, task))  # epochs, best dev epoch in best/, then test once
    return run.finish(task.finish_report(report), show=task.print_report)


if __name__ == "__main__":
    main(sys.argv[1:])
