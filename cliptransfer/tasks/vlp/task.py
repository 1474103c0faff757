"""V&L pretraining on CLIP grids (CLIP-ViL_p, derived from LXMERT) as a task of the engine: the
`vlbert` transformer with MLM + ITM heads, QA joining from `loss.qa_from_epoch` on (LXMERT added
QA for the last epochs), on an LXMERT-format corpus over any feature store (CLIP grid, BottomUp
regions) or end to end on pixels.

Before and after training it scores held-out pairs (LXMERT's minival): MLM accuracy on the masked
tokens and ITM accuracy (matched vs swapped sentence, swaps drawn once), so the report puts the
pretrained model next to the untrained one. `final/` holds the model in the task heads' format:
`tasks/vqa.py` / `tasks/snli_ve.py` start from it with `--set model.init_from=runs/vlp/final`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cliptransfer.config import ConfigError, check_range, split_list
from cliptransfer.engine.config import TrainConfig
from cliptransfer.engine.evaluation import predict
from cliptransfer.engine.optim import OptimConfig
from cliptransfer.engine.task import register_task
from cliptransfer.heads.model import HeadConfig
from cliptransfer.heads.question import QuestionConfig
from cliptransfer.heads.vlbert import VLBertConfig
from cliptransfer.tasks.common import VLTask, VLTaskConfig, markdown_table
from cliptransfer.tasks.vqa.answers import save_answer_vocab
from cliptransfer.tasks.vqa.data import with_image_files
from cliptransfer.vlp.corpus import build_shapes_vlp_corpus, load_lxmert
from cliptransfer.vlp.data import (
    MLMVocab,
    VLPDataConfig,
    VLPDataset,
    VLPSplit,
    collate_vlp,
    image_key,
)
from cliptransfer.vlp.model import VLPHead, vlp_losses
from cliptransfer.vlp.objectives import IGNORE

__all__ = ["VLPConfig", "VLPLossConfig", "VLPTask"]

_VISUAL = ("features", "visual_mask", "spatial", "pixels")


@dataclass
class VLPLossConfig:
    mlm: float = 1.0
    itm: float = 1.0
    qa: float = 1.0
    mfr: float = 1.0  # masked feature regression, on when data.mask_cells > 0 (LXMERT's "feat")
    qa_from_epoch: int = 1  # stage 2: QA joins from this (0-based) epoch on
    min_answer_count: int = 1  # QA table: answers given (as a label) at least this often
    # ALBEF (beyond CLIP-ViL_p, off by default): ITC before fusion, ITM hard negatives by it.
    itc: float = 0.0
    itc_dim: int = 128
    itc_temperature: float = 0.07
    hard_negatives: bool = False

    def __post_init__(self) -> None:
        for name in ("mlm", "itm", "qa", "mfr", "itc"):
            check_range(name, getattr(self, name), ge=0)
        check_range("qa_from_epoch", self.qa_from_epoch, ge=0)
        check_range("min_answer_count", self.min_answer_count, ge=1)
        check_range("itc_dim", self.itc_dim, gt=0)
        check_range("itc_temperature", self.itc_temperature, gt=0)
        if self.hard_negatives and not self.itc:
            raise ConfigError("loss.hard_negatives: drawn by ITC similarity, set loss.itc > 0")


@dataclass
class VLPConfig(VLTaskConfig):
    data: VLPDataConfig = field(default_factory=VLPDataConfig)
    loss: VLPLossConfig = field(default_factory=VLPLossConfig)
    text: QuestionConfig = field(default_factory=lambda: QuestionConfig(max_length=24))
    model: HeadConfig = field(
        default_factory=lambda: HeadConfig(arch="vlbert", vlbert=VLBertConfig())
    )
    optim: OptimConfig = field(
        # lr 2e-3: held-out MLM 41 % at 5e-4 -> 75 % in the same 4 epochs (Shapes default)
        default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=100)
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/vlp", epochs=4))


@register_task("vlp", config=VLPConfig, launcher="pretrain/vl.py")
class VLPTask(VLTask):
    tracker = "vlp"
    collate_fn = staticmethod(collate_vlp)
    evaluate_every_epoch = False  # held-out MLM / ITM once before and once after training

    @classmethod
    def apply_arguments(cls, cfg: VLPConfig, args: Any) -> None:
        if cfg.model.arch != "vlbert":
            raise ConfigError(
                f"model.arch: V&L pretraining trains 'vlbert', got {cfg.model.arch!r}"
            )
        if cfg.mode == "end2end" and cfg.data.grid_keep:
            raise ConfigError("data.grid_keep: sub-samples stored grids; end2end has pixels")
        if cfg.mode == "end2end" and cfg.data.mask_cells:
            raise ConfigError("data.mask_cells: masks stored cells; end2end has pixels")
        super().apply_arguments(cfg, args)

    def uses_world(self) -> bool:
        return not self.cfg.data.train

    def load_splits(self, world: Path | None) -> dict[str, Any]:
        d = self.cfg.data
        if world is not None:
            corpus = world / f"vlp-corpus-q{d.questions_per_image}"
            with self.run.accelerator.main_process_first():
                build_shapes_vlp_corpus(world, corpus, questions_per_image=d.questions_per_image)
            train, val = [corpus / "mscoco_train.json"], [corpus / "mscoco_minival.json"]
            self.images = Path(d.images) if d.images else world / "images"
        else:
            train, val = (
                [Path(p) for p in split_list(d.train)],
                [Path(p) for p in split_list(d.val)],
            )
            if not val:
                raise ConfigError("data.val: held-out LXMERT files are needed with data.train")
            self.images = Path(d.images) if d.images else None
        sources = split_list(d.sources) or None
        splits = {
            "train": VLPSplit(",".join(map(str, train)),
                              [s for f in train for s in load_lxmert(f, sources)]),
            "val": VLPSplit(",".join(map(str, val)), [s for f in val for s in load_lxmert(f, sources)]),
        }  # fmt: skip
        counts: dict[str, int] = {}
        for s in splits["train"].examples:
            for answer in s.label or {}:
                counts[answer] = counts.get(answer, 0) + 1
        self.answers = sorted(a for a, c in counts.items() if c >= self.cfg.loss.min_answer_count)
        self.ans2label = {a: i for i, a in enumerate(self.answers)}
        return splits

    def image_files(self, splits: dict[str, Any]) -> tuple[dict[str, Any], dict[Any, Path]]:
        if self.images is None:
            raise ConfigError("data.images (the COCO image root) is needed to extract grids")
        img_ids = {image_key(s.img_id): s.img_id for sp in splits.values() for s in sp.examples}

        def locate(split: VLPSplit, key: int | str) -> Path:
            img_id = img_ids[key]  # COCO_<subset>_<id> lives in <root>/<subset>/
            subset = img_id.split("_")[1] if img_id.startswith("COCO_") else ""
            return self.images / subset / f"{img_id}.jpg"

        return with_image_files(splits, locate, f"image folder {self.images}",
                                self.cfg.data.skip_missing)  # fmt: skip

    def dataset(self, split: VLPSplit) -> VLPDataset:
        return VLPDataset(split.examples, self.tokenizer, MLMVocab.of(self.tokenizer), self.side.inputs,
                          self.ans2label, self.cfg.data, seed=self.cfg.train.seed,
                          train=split is self.splits.get("train"))  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {"answers": len(self.answers), "pretrain": "vlp"}

    def best_files(self) -> dict[str, Any]:
        return {"answers.json": lambda path: save_answer_vocab(self.answers, path)}

    def num_outputs(self) -> int:
        return max(len(self.answers), 1)

    def build_head(self) -> nn.Module:
        loss = self.cfg.loss
        return VLPHead(self.cfg.model.vlbert, self.tokenizer.vocab_size, self.side.dim,
                       len(self.answers), itc_dim=loss.itc_dim if loss.itc else 0,
                       itc_temperature=loss.itc_temperature,
                       hard_negatives=loss.hard_negatives,
                       feature_regression=bool(self.cfg.data.mask_cells))  # fmt: skip

    def weights(self) -> dict[str, float]:
        loss = self.cfg.loss
        epoch = getattr(self.train_data, "epoch", 0)
        qa = loss.qa if self.answers and epoch >= loss.qa_from_epoch else 0.0
        mfr = loss.mfr if self.cfg.data.mask_cells else 0.0
        return {"mlm": loss.mlm, "itm": loss.itm, "qa": qa, "mfr": mfr, "itc": loss.itc}

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return vlp_losses(model(batch), batch, self.weights(), self.cfg.loss.itc_temperature)

    def evaluate(self, model: nn.Module, split: str) -> tuple[None, dict]:
        def per_item(m: nn.Module, b: dict) -> dict[str, torch.Tensor]:
            out = m(b)
            picked = b["mlm_labels"] != IGNORE
            hit = (out["mlm"].argmax(-1) == b["mlm_labels"]) & picked
            # The same sentences over the cells of the item half a batch away (another image,
            # as a batch holds many): MLM that reads the image drops here, text-only MLM does not.
            half = len(b["index"]) // 2
            other = {k: v.roll(half, 0) if k in _VISUAL else v for k, v in b.items()}
            hit_other = (m(other)["mlm"].argmax(-1) == b["mlm_labels"]) & picked
            qa_ok = b["qa"] != IGNORE
            return {"index": b["index"], "mlm_hit": hit.sum(1), "mlm_n": picked.sum(1),
                    "mlm_other_hit": hit_other.sum(1),
                    "itm_hit": (out["itm"].argmax(-1) == b["itm"]).long(),
                    "qa_hit": ((out["qa"].argmax(-1) == b["qa"]) & qa_ok).long(),
                    "qa_n": qa_ok.long()}  # fmt: skip

        got = predict(self.run.accelerator, model, self.loaders[split], per_item)

        def pct(hit: str, n: torch.Tensor | int) -> float | None:
            total = int(n.sum()) if isinstance(n, torch.Tensor) else n
            return 100.0 * int(got[hit].sum()) / total if total else None

        metrics = {"mlm_accuracy": pct("mlm_hit", got["mlm_n"]),
                   "mlm_accuracy_other_image": pct("mlm_other_hit", got["mlm_n"]),
                   "itm_accuracy": pct("itm_hit", len(got["itm_hit"])),
                   "qa_accuracy": pct("qa_hit", got["qa_n"]),
                   "pairs": len(got["itm_hit"]), "masked_tokens": int(got["mlm_n"].sum())}  # fmt: skip
        return None, metrics

    def score(self, metrics: dict) -> float:
        return (metrics["mlm_accuracy"] or 0.0) + (metrics["itm_accuracy"] or 0.0)

    def on_start(self, model: nn.Module, resumed: bool) -> None:
        if not resumed:
            self.initial = self.evaluate(model, "val")[1]
            self.run.print(f"untrained model, held-out: {self.initial}")

    def state_dict(self) -> dict[str, Any]:
        return {"initial_eval": getattr(self, "initial", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = state.get("initial_eval")

    def report(self, result: Any) -> dict[str, Any]:
        if self.run.is_main:
            self.save_model(self.run.out / "final", self.run.accelerator.unwrap_model(self.model))
        self.run.accelerator.wait_for_everyone()
        report = {**self.base_report(), "steps": result.steps, "samples_seen": result.samples_seen,
                  "untrained": getattr(self, "initial", None), "pretrained": result.final}  # fmt: skip
        return report

    def print_report(self, report: dict) -> None:
        rows = []
        for name, key in (("untrained", "untrained"), ("pretrained", "pretrained")):
            m = report.get(key) or {}
            rows.append([name, m.get("mlm_accuracy"), m.get("mlm_accuracy_other_image"),
                         m.get("itm_accuracy"), m.get("qa_accuracy")])  # fmt: skip
        head = ["held-out pairs", "MLM accuracy", "MLM, another image's cells", "ITM accuracy",
                "QA accuracy"]  # fmt: skip
        print(markdown_table(head, rows))
        print(f"skipped: {report['skipped']}; model written to {self.run.out / 'final'}")
