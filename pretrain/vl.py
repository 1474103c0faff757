"""V&L pretraining on CLIP grids (CLIP-ViL_p / LXMERT objectives), through Accelerate.

A single-stream transformer (`vlbert`) over the sentence and the image's CLIP grid cells learns
masked language modelling and image-text matching, then question answering from
`loss.qa_from_epoch` on; held-out MLM / ITM accuracy is printed for the untrained and the
pretrained model. With no arguments: the Shapes world's captions and VQA train questions written
as LXMERT JSON (`cliptransfer prepare vlp-corpus`, once), the packaged CLIP's grids (cached).

    accelerate launch pretrain/vl.py
    python pretrain/vl.py                                          # the same, one process
    accelerate launch --multi_gpu --num_processes 2 pretrain/vl.py --cpu --set train.num_threads=1
    accelerate launch pretrain/vl.py --set features.kind=bottomup           # BUTD-style regions
    accelerate launch pretrain/vl.py --set data.whole_word=true --set data.grid_keep=20
    accelerate launch --multi_gpu pretrain/vl.py \
        --set data.train=/data/lxmert/mscoco_train.json,/data/lxmert/mscoco_nominival.json \
        --set data.val=/data/lxmert/mscoco_minival.json --set data.images=/data/coco \
        --set backbone=/ckpt/RN50.pt --set features.size=384x640 \
        --set text.encoder=hf:/ckpt/bert-base-uncased --set model.vlbert.bert=/ckpt/bert-base-uncased
    accelerate launch pretrain/vl.py --resume latest                # continue a killed run

Then fine-tune from it: `accelerate launch tasks/vqa.py --set model.arch=vlbert
--set model.init_from=runs/vlp/final` (and tasks/snli_ve.py).

Run folder: config.yaml, TensorBoard logs (every loss term), checkpoints/, final/
(model.safetensors, config.yaml, tokenizer/, answers.json, meta.json) and metrics.json.
"""

from __future__ import annotations

import sys

from cliptransfer.engine import fit, start_run
from cliptransfer.tasks.vlp.task import VLPTask


def main(argv: list[str] | None = None) -> dict:
    run = start_run(VLPTask, argv, __doc__)  # flags, config, Accelerate, seed, CPU threads
    task = VLPTask(run.cfg, run)
    task.setup()  # LXMERT corpus (written once on Shapes), grid features (cached), vlbert
    report = task.report(fit(run, task))  # MLM + ITM, then + QA; held-out accuracy before/after
    return run.finish(task.finish_report(report), show=task.print_report)


if __name__ == "__main__":
    main(sys.argv[1:])
