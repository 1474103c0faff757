"""SNLI-VE (visual entailment) transfer of a CLIP backbone, through Accelerate.

The image is the premise, `sentence2` the hypothesis; a head over grid cells (or BottomUp regions)
and the hypothesis predicts entailment / neutral / contradiction (cross-entropy). The best epoch
on dev is kept and scored on test. With no arguments: the Shapes world's Flickr30k-style images
and SNLI-VE files, the packaged tiny CLIP's grid features, a top-down head; the report prints
accuracy overall and per gold label next to the majority-label prior.

    accelerate launch tasks/snli_ve.py
    python tasks/snli_ve.py                                        # the same, one process
    accelerate launch --multi_gpu --num_processes 2 tasks/snli_ve.py --cpu --set train.num_threads=1
    accelerate launch tasks/snli_ve.py --set features.kind=bottomup       # BUTD-style regions
    accelerate launch tasks/snli_ve.py --set model.arch=mcan
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

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from cliptransfer.adapters import AdapterConfig
from cliptransfer.clip.tuning import TuningConfig
from cliptransfer.config import ConfigError, load_config, save_config, to_dict
from cliptransfer.engine.finetune import TaskHooks, fit, start_run
from cliptransfer.engine.optim import OptimConfig
from cliptransfer.heads.model import HeadConfig, VLModel, shapes_head
from cliptransfer.heads.question import QuestionConfig, build_question_tokenizer
from cliptransfer.tasks.common import (
    FeatureConfig,
    TaskTrainConfig,
    WorldConfig,
    image_side,
    markdown_table,
    peak_memory,
    predict,
    prepare_world,
    write_json,
)
from cliptransfer.tasks.snli_ve.data import (
    VEDataset,
    VESplit,
    collate_ve,
    flickr_image_path,
    label_prior,
    load_snli_ve,
)
from cliptransfer.tasks.snli_ve.metric import SNLI_VE_LABELS, snli_ve_accuracy
from cliptransfer.tasks.vl_model import (
    load_best_model,
    lr_scales,
    run_model,
    save_best_dir,
    task_model,
)
from cliptransfer.tasks.vqa.data import check_available


@dataclass
class DataConfig:
    # Real SNLI-VE JSONL files; all empty = the Shapes world's.
    train: str = ""
    val: str = ""  # model selection (snli_ve_dev.jsonl)
    test: str = ""  # scored once with the best model; empty on real data: skipped
    images: str = ""  # flickr30k_images/ (end2end / grid extraction)
    skip_missing: bool = False  # skip (and count) pairs whose image/features are missing
    num_workers: int = 0


@dataclass
class VEConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    backbone: str = "default"  # "default" (packaged tiny CLIP), a checkpoint, or an arch name
    mode: Literal["features", "end2end"] = "features"
    tuning: TuningConfig = field(default_factory=TuningConfig)  # end2end: lock_image or full
    backbone_lr_scale: float = 0.1
    peft: AdapterConfig = field(default_factory=AdapterConfig)
    text: QuestionConfig = field(
        default_factory=lambda: QuestionConfig(embed_dim=64, hidden=128, max_length=40)
    )
    model: HeadConfig = field(default_factory=shapes_head)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=100)
    )
    train: TaskTrainConfig = field(
        default_factory=lambda: TaskTrainConfig(out_dir="runs/snli_ve", epochs=6)
    )


SHAPES_FILES = {
    "train": "snli_ve/snli_ve_train.jsonl",
    "val": "snli_ve/snli_ve_dev.jsonl",
    "test": "snli_ve/snli_ve_test.jsonl",
    "images": "flickr30k_images",
}


def _data_files(d: DataConfig, world: Path | None) -> DataConfig:
    if world is None:
        missing = [k for k in ("train", "val") if not getattr(d, k)]
        if missing:
            raise ConfigError(f"real SNLI-VE data needs data.{', data.'.join(missing)} as well")
        return d
    return replace(d, **{k: getattr(d, k) or str(world / v) for k, v in SHAPES_FILES.items()})


def load_trained(folder: str | Path) -> tuple[VLModel, VEConfig, Any]:
    """(model, config, hypothesis tokenizer) of a `best/` folder, on CPU in eval mode."""
    folder = Path(folder)
    cfg = load_config(VEConfig, folder / "config.yaml")
    meta = json.loads((folder / "meta.json").read_text())
    tok = build_question_tokenizer(cfg.text, folder / "tokenizer")
    model = task_model(cfg, meta["visual_dim"], len(SNLI_VE_LABELS), tok.vocab_size)
    return load_best_model(folder, model, cfg.peft).eval(), cfg, tok


def main(argv: list[str] | None = None) -> dict:
    cfg, args, accelerator = start_run(VEConfig, argv, __doc__)
    tcfg, out = cfg.train, Path(cfg.train.out_dir)
    started, skip = time.monotonic(), cfg.data.skip_missing

    # ---- pairs: the Shapes world unless real SNLI-VE files are given
    world = None
    if not cfg.data.train:
        with accelerator.main_process_first():
            world = prepare_world(cfg.world)
    files = _data_files(cfg.data, world)
    splits: dict[str, VESplit] = {"val": load_snli_ve(files.val)}
    if not args.eval_only:
        splits["train"] = load_snli_ve(files.train)
        if files.test:
            splits["test"] = load_snli_ve(files.test)

    # ---- the image side: feature store (features mode) or pixels (end2end)
    paths: dict[str, Path] = {}
    if cfg.mode == "end2end" or (cfg.features.kind == "clip-grid" and not cfg.features.store):
        if not files.images:
            raise ConfigError("data.images (the flickr30k_images folder) is needed")
        for name, split in splits.items():
            where = {i: flickr_image_path(files.images, i) for i in split.image_ids()}
            splits[name] = check_available(
                split, lambda i, w=where: w[i].is_file(), f"image folder {files.images}", skip,
                "missing_image", describe=lambda i, w=where: f"expected {w[i]}",
            )  # fmt: skip
            paths.update({i: where[i] for i in splits[name].image_ids()})
    cache = cfg.features.cache_dir or (world / "features" if world else out / "features")
    needed = sorted({i for split in splits.values() for i in split.image_ids()})
    side = image_side(
        accelerator, cfg.features, cfg.mode, cfg.backbone, cfg.tuning, paths, cache, world,
        needed, shapes_splits=("flickr30k",),
    )  # fmt: skip
    for name, split in splits.items():
        splits[name] = check_available(split, side.available, side.where, skip, "missing_features")

    tok = build_question_tokenizer(cfg.text)
    datasets = {name: VEDataset(split, tok, side.inputs) for name, split in splits.items()}

    # ---- model: the head (+ the backbone in end2end mode)
    n_labels = len(SNLI_VE_LABELS)
    model = run_model(accelerator, cfg, side, n_labels, tok.vocab_size, args.eval_only)
    if accelerator.is_main_process and not args.eval_only:
        save_config(cfg, out / "config.yaml")

    def loader(name: str) -> DataLoader:
        return DataLoader(
            datasets[name],
            batch_size=tcfg.eval_batch_size,
            collate_fn=collate_ve,
            num_workers=cfg.data.num_workers,
        )

    def scorer(split: VESplit):
        def evaluate(model: torch.nn.Module, prepared: Any) -> tuple[list[dict], dict | None]:
            got = predict(
                accelerator, model, prepared,
                lambda m, b: {"index": b["index"], "label": m(b).argmax(-1)},
            )  # fmt: skip
            pairs = [split.examples[int(i)] for i in got["index"]]
            predicted = [SNLI_VE_LABELS[int(k)] for k in got["label"]]
            results = [{"pairID": e.pair_id, "label": p} for e, p in zip(pairs, predicted)]
            metrics = None
            if split.has_labels:  # every process scores the same gathered results
                metrics = snli_ve_accuracy([e.label for e in pairs], predicted)
            return results, metrics

        return evaluate

    report: dict[str, Any] = {
        "task": "snli-ve",
        "mode": cfg.mode,
        "model": cfg.model.arch,
        "features": side.info,
        "skipped": {name: s.skipped for name, s in splits.items()},
        "truncated_hypotheses": sum(d.truncated for d in datasets.values()),
    }
    if "train" in splits and splits["val"].has_labels:
        majority = label_prior(splits["train"].examples)
        report["prior_label"] = majority
        gold = [e.label for e in splits["val"].examples]
        report["prior"] = snli_ve_accuracy(gold, [majority] * len(gold))

    if args.eval_only:
        results, metrics = scorer(splits["val"])(*accelerator.prepare(model, loader("val")))
        report.update(evaluated=str(args.eval_only), val=metrics)
        if accelerator.is_main_process:
            write_json(out / "results_val.json", results)
            write_json(out / "metrics.json", report)
            _print_report(cfg, report, out)
        accelerator.end_training()
        return report

    # ---- training: cross-entropy, the best dev epoch kept
    def save_best(model: torch.nn.Module, best: dict, results: list[dict]) -> None:
        meta = {"visual_dim": side.dim, "labels": list(SNLI_VE_LABELS), "features": side.info}
        meta.update(epoch=best["epoch"], step=best["step"], val=best["val"])
        files_ = {
            "config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
            "tokenizer": tok.save,
            "meta.json": meta,
        }
        save_best_dir(out / "best", model, cfg.peft, files_)
        write_json(out / "results_val.json", results)

    hooks = TaskHooks(
        loss=lambda logits, batch: F.cross_entropy(logits, batch["label"]),
        evaluate=scorer(splits["val"]),
        score=lambda m: m["accuracy"],
        scalars=lambda m: {"accuracy": m["accuracy"], **_present(m["per_label"])},
        save_best=save_best,
    )
    result = fit(
        accelerator, model, datasets["train"], loader("val"), collate_ve, hooks, cfg.optim, tcfg,
        to_dict(cfg), lr_scales=lr_scales(cfg), num_workers=cfg.data.num_workers,
        tracker="snli_ve", name=f"snli-ve {cfg.model.arch}",
    )  # fmt: skip
    report.update(result.report())
    if "test" in splits:  # the best dev epoch, once on test
        accelerator.wait_for_everyone()  # best/ is written by the main process
        fresh = task_model(cfg, side.dim, n_labels, tok.vocab_size)
        best = load_best_model(out / "best", fresh, cfg.peft)
        results, metrics = scorer(splits["test"])(*accelerator.prepare(best, loader("test")))
        report["test"] = metrics
        if accelerator.is_main_process:
            write_json(out / "results_test.json", results)
    report.update(peak_memory=peak_memory(accelerator.device), seconds=time.monotonic() - started)
    if accelerator.is_main_process:
        write_json(out / "metrics.json", report)
        _print_report(cfg, report, out)
    accelerator.end_training()
    return report


def _present(per_label: dict) -> dict[str, float]:
    return {k: v for k, v in per_label.items() if v is not None}


def _row(name: str, m: dict) -> list:
    return [name, m["accuracy"], *(m["per_label"][k] for k in SNLI_VE_LABELS)]


def _print_report(cfg: VEConfig, report: dict, out: Path) -> None:
    if report.get("val") is None:
        print(f"no gold labels: predictions written to {out / 'results_val.json'}")
    else:
        name = f"{cfg.model.arch} ({cfg.mode}, {cfg.features.kind})"
        rows = [_row(f"{name}, dev", report["val"])]
        if report.get("test"):
            rows.append(_row(f"{name}, test", report["test"]))
        if report.get("prior"):
            rows.append(_row(f"majority label ({report['prior_label']}), dev", report["prior"]))
        print(markdown_table(["SNLI-VE accuracy", "overall", *SNLI_VE_LABELS], rows))
    print(f"skipped pairs: {report['skipped']}")
    if report.get("train_samples_per_s"):
        print(f"training: {report['train_samples_per_s']:.0f} samples/s, peak memory "
              f"{report['peak_memory']['mib']:.0f} MiB ({report['peak_memory']['kind']})")  # fmt: skip
    print(f"results: {out}/results_*.json, metrics: {out / 'metrics.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
