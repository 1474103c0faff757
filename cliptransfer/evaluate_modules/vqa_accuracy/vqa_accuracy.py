"""Hugging Face ``evaluate`` wrapper of the official VQA accuracy (cliptransfer.tasks.vqa.metric).

Load it from its folder, offline:
    evaluate.load("<path>/cliptransfer/evaluate_modules/vqa_accuracy")            # current scorer
    evaluate.load("<path>/cliptransfer/evaluate_modules/vqa_accuracy", "legacy")  # pre-2021 scorer
"""

from __future__ import annotations

import datasets
import evaluate

from cliptransfer.tasks.vqa.metric import vqa_accuracy

_DESCRIPTION = (
    "VQA accuracy as the official GT-Vision-Lab/VQA scorer: per question, the average over the "
    "GT answers of min(1, matching other annotators / 3), after the official answer normalisation."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted answer strings.
    references: list of lists of ground-truth answer strings (usually 10 per question).
Returns:
    accuracy: mean of the unrounded per-question accuracies, in [0, 1].
Config names: "default" (current official scorer) or "legacy" (pre-2021 scorer).
"""
_CITATION = """@inproceedings{antol2015vqa,
  title={{VQA}: Visual Question Answering}, author={Antol, Stanislaw and Agrawal, Aishwarya and
  Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV}, year={2015}}
"""
_CONFIGS = ("default", "legacy")


class VqaAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _CONFIGS:
            raise ValueError(
                f"vqa_accuracy: config_name must be one of {_CONFIGS}, got {self.config_name!r}"
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        legacy = self.config_name == "legacy"
        accs = [vqa_accuracy(r, p, legacy=legacy) for p, r in zip(predictions, references)]
        if not accs:
            raise ValueError("vqa_accuracy: no predictions to score")
        return {"accuracy": float(sum(accs)) / len(accs)}
