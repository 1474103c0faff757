"""Fine-tuning from V&L pretraining: a `pretrain/vl.py` `final/` folder into a task's `vlbert`
head (`--set model.init_from=FOLDER`).

Every transformer and visual-embedding weight loads; the pretraining-only heads (MLM, ITM, ITC,
feature regression) are dropped. The answer MLP's hidden layers load too; its output layer
(LXMERT's `load_lxmert_qa`) takes the QA head's row for every answer both tables share and keeps
its fresh initialisation for the others (all of them for SNLI-VE's three labels, which no QA
table has).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from cliptransfer.tasks.vqa.answers import load_answer_vocab

__all__ = ["load_pretrained_head"]

_PRETRAIN_ONLY = ("mlm_transform.", "mlm_bias", "itm.", "itc_image.", "itc_text.", "feature_head.")
_OUTPUT = "classifier.3."  # the answer MLP's last Linear


def load_pretrained_head(head: nn.Module, folder: str | Path,
                         answers: Sequence[str] | None) -> dict[str, int]:  # fmt: skip
    """Load `folder`'s pretrained weights into `head` (a `VLBert`); `answers` names the head's
    outputs (VQA) or is None (no answer is shared). Returns {"loaded", "answers_shared"}."""
    folder = Path(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={folder}: no model.safetensors (a pretrain/vl.py "
                                "final/ folder)")  # fmt: skip
    state = {k[len("head.") :]: v for k, v in load_file(str(path)).items() if k.startswith("head.")}
    if not state:
        raise ValueError(f"{path}: no head.* weights (not a pretrain/vl.py final/ folder)")
    state = {k: v for k, v in state.items() if not k.startswith(_PRETRAIN_ONLY)}
    out_w, out_b = state.pop(_OUTPUT + "weight"), state.pop(_OUTPUT + "bias")
    own = head.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{path} does not fit this head (another tokenizer or size?): {wrong[:3]}")
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_OUTPUT)]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    shared = 0
    if answers is not None and (folder / "answers.json").is_file():
        pre = {a: i for i, a in enumerate(load_answer_vocab(folder / "answers.json"))}
        layer = head.classifier[3]
        with torch.no_grad():
            for i, answer in enumerate(answers):
                if answer in pre:
                    layer.weight[i] = out_w[pre[answer]]
                    layer.bias[i] = out_b[pre[answer]]
                    shared += 1
    return {"loaded": len(state), "answers_shared": shared}
