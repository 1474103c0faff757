"""The contrastive-pretraining dataset: augmentation, EDA, tokenization and MLM masking in workers.

A sample is a pure function of (seed, epoch, index) (see `augment.py`), and a sampler that only
depends on (seed, epoch) orders the data, so resumed and multi-process runs see the same batches.
A corrupt or missing image is replaced by the next readable record and counted, which keeps batch
sizes equal across ranks (cross-rank gathers need that); the trainer stops the run when more than
`max_bad_fraction` of the records fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from cliptransfer.config import check_range
from cliptransfer.contrastive.augment import ImageAugConfig, augment_image, eda, sample_generator
from cliptransfer.contrastive.pairs import PairRecord, open_image


@dataclass
class PairDataConfig:
    train: str = ""  # .jsonl/.csv/.tar/folder of shards; "" = the Shapes world's train pairs
    val: str = ""  # "" = the Shapes world's val pairs
    image_root: str | None = None  # base folder of relative image paths (default: the file's)
    # Zero-shot set (a folder with classes.json + val.jsonl, as a Shapes world's classify/);
    # "" = the Shapes world's when its pairs are used, else none.
    classify: str = ""
    image: ImageAugConfig = field(default_factory=ImageAugConfig)
    second_view: bool = False  # SLIP/DeCLIP: a second, strongly augmented view
    # SLIP under loss.recipe=reference: a third view (`image_view2`, augmented like the second);
    # CLIP then sees the base view and SimCLR the two others.
    third_view: bool = False
    view: ImageAugConfig = field(
        default_factory=lambda: ImageAugConfig(scale=(0.5, 1.0), color_jitter=0.4, blur_prob=0.5)
    )
    text_aug: bool = False  # DeCLIP: an EDA-augmented caption
    eda_alpha: float = 0.1
    mlm_prob: float = 0.0  # DeCLIP: BERT masking probability (0 = no MLM inputs)
    # Data quality (the CLIP-benchmark's first axis): this fraction of the training pairs gets a
    # mismatched or corrupted caption, drawn by train.seed (`pairs.add_caption_noise`); the
    # evaluation pairs stay clean.
    caption_noise: float = 0.0
    max_bad_fraction: float = 0.01  # stop when more records than this fail to decode
    max_retries: int = 16  # consecutive unreadable records before giving up on a sample
    num_workers: int = 2  # decoding + augmentation off the training process

    def __post_init__(self) -> None:
        check_range("eda_alpha", self.eda_alpha, ge=0, le=1)  # a deletion probability
        check_range("mlm_prob", self.mlm_prob, ge=0, le=1)
        check_range("max_bad_fraction", self.max_bad_fraction, ge=0, le=1)
        check_range("caption_noise", self.caption_noise, ge=0, le=1)
        check_range("max_retries", self.max_retries, ge=0)
        check_range("num_workers", self.num_workers, ge=0)


class EpochSampler(Sampler[int]):
    """A permutation of range(n) that depends only on (seed, epoch): resumable, worker-agnostic."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class PairDataset(Dataset):
    def __init__(
        self,
        records: list[PairRecord],
        tokenizer: Any,
        cfg: PairDataConfig,
        seed: int = 0,
        train: bool = True,
    ) -> None:
        if not records:
            raise ValueError("no image-text pairs to train on (the pairs source is empty)")
        self.records, self.tokenizer, self.cfg = records, tokenizer, cfg
        self.seed, self.train, self.epoch = seed, train, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> tuple[int, Any, list[str]]:
        """First decodable record at or after `index` (wrapping), and the sources skipped."""
        skipped: list[str] = []
        for k in range(self.cfg.max_retries + 1):
            j = (index + k) % len(self.records)
            rec = self.records[j]
            if not rec.caption.strip():
                skipped.append(f"{rec.source}: empty caption")
                continue
            try:
                return j, open_image(rec.image), skipped
            except (OSError, ValueError, SyntaxError) as e:
                skipped.append(f"{rec.source}: {type(e).__name__}: {e}")
        raise ValueError(
            f"{self.cfg.max_retries + 1} consecutive unreadable records from index {index}: "
            + "; ".join(skipped[:3])
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        j, img, skipped = self._load(index)
        caption = self.records[j].caption
        g = sample_generator(self.seed, self.epoch if self.train else 0, index)
        cfg = self.cfg
        if self.train:
            image = augment_image(img, cfg.image, g)
        else:
            image = augment_image(img, ImageAugConfig(**{**cfg.image.__dict__, "scale": (1, 1)}), g)
        ids, truncated = self.tokenizer.encode([caption], return_truncated=True)
        item: dict[str, Any] = {
            "index": index,
            "image": image,  # (3, S, S)
            "text": ids[0],  # (L,)
            "truncated": bool(truncated[0]),
            "skipped": skipped,
        }
        if cfg.second_view:
            item["image_view"] = augment_image(img, cfg.view, g)
        if cfg.text_aug:
            words = eda(caption.split(), g, cfg.eda_alpha)
            item["text_aug"] = self.tokenizer.encode([" ".join(words)])[0]
        if cfg.mlm_prob > 0:
            from cliptransfer.contrastive.losses.declip import mask_tokens

            tok = self.tokenizer
            masked, labels = mask_tokens(
                ids[0],
                tok.mask_id,
                tok.vocab_size,
                special_ids=(tok.pad_id, tok.sot_id, tok.eot_id),
                prob=cfg.mlm_prob,
                generator=g,
            )
            item["mlm_input"], item["mlm_labels"] = masked, labels
        if cfg.third_view:  # drawn last, so every other field is the same with or without it
            item["image_view2"] = augment_image(img, cfg.view, g)
        return item


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep the per-batch counts of truncated captions and skipped records."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif key == "skipped":
            batch[key] = [s for v in values for s in v]
        else:
            batch[key] = torch.tensor(values)
    return batch
