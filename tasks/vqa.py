"""VQA v2 transfer of a CLIP backbone (CLIP-ViL's "direct fine-tuning" setting), through Accelerate.

With no arguments it prepares the Shapes world (if needed), extracts the packaged small CLIP's grid
features into a cached feature store, trains the word-to-region head (`scan`: each question word
attends over the cells, fused element-wise) for 2 epochs of batch 64, scores it on val with the
official VQA metric and prints it next to the answer prior (most frequent train answer per
question type):

    accelerate launch tasks/vqa.py
    python tasks/vqa.py                                            # the same, one process
    accelerate launch --multi_gpu --num_processes 2 tasks/vqa.py --cpu --set train.num_threads=1
    accelerate launch tasks/vqa.py --set model.arch=mcan                         # or vlbert
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_topdown.yaml       # BUTD top-down
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_bottomup.yaml      # BUTD regions
    accelerate launch tasks/vqa.py --config configs/tasks/vqa_end2end_lora.yaml  # pixels + LoRA
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml tasks/vqa.py \
        --config configs/tasks/vqa_v2_rn50.yaml \
        --set data.train_questions=/data/vqa/v2_OpenEnded_mscoco_train2014_questions.json \
        --set data.train_annotations=/data/vqa/v2_mscoco_train2014_annotations.json \
        --set data.val_questions=/data/vqa/v2_OpenEnded_mscoco_val2014_questions.json \
        --set data.val_annotations=/data/vqa/v2_mscoco_val2014_annotations.json \
        --set features.store=/data/features/rn50-grid-600x1000 --set backbone=/ckpt/RN50.pt
    accelerate launch tasks/vqa.py --resume latest                 # continue a killed run
    python tasks/vqa.py --eval-only runs/vqa/best --set train.out_dir=runs/vqa-testdev \
        --set data.val_questions=/data/vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json \
        --set data.val_annotations=                                # predictions for EvalAI only

(`accelerate launch --cpu --num_processes 2` starts a single process; use --multi_gpu as above.)
`train.batch_size` is the global batch, split over the processes.

The run folder gets config.yaml, TensorBoard logs, checkpoints/ (resume with --resume latest),
best/ (the best epoch's model.safetensors, config.yaml, answers.json, tokenizer/, meta.json:
reload with `cliptransfer.tasks.vqa.task.load_trained`), results_val.json (EvalAI format) and
metrics.json.
"""

from __future__ import annotations

import sys

from cliptransfer.engine import fit, start_run
from cliptransfer.tasks.vqa.task import VQATask


def main(argv: list[str] | None = None) -> dict:
    run = start_run(VQATask, argv, __doc__)  # flags, config, Accelerate, seed, CPU threads
    task = VQATask(run.cfg, run)
    task.setup()  # questions, answers, features (cached), MCAN/top-down head, PEFT
    if task.eval_only:
        report = task.evaluate_only()
    else:
        report = task.report(fit(run, task))  # epochs, best val epoch in best/, checkpoints
    return run.finish(task.finish_report(report), show=task.print_report)


if __name__ == "__main__":
    main(sys.argv[1:])
