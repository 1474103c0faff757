"""V&L pretraining samples: one per sentence of the LXMERT corpus (as LXMERT iterates), with the
MLM / ITM / QA inputs and targets drawn from (seed, epoch, index) alone, and the image's cells
from the feature store (CLIP grid or BottomUp regions, the VQA heads' interface).

Item: `text_ids` (L,) masked, `text_mask` (L,), `mlm_labels` (L,) (IGNORE off the masked
positions), `itm` (1 = the image's own sentence), `qa` (answer index or IGNORE), `features`
(N, C), `spatial` (N, 4), `index`, `image` / `text_image` (the numbers, in this dataset, of the
item's image and of the image its sentence was written for: ITC and hard negatives use them),
`masked_cells` (N,) bool with `data.mask_cells` (train only: the cells whose feature is zeroed
and regressed, LXMERT's masked feature regression).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from cliptransfer.config import ConfigError, check, check_range
from cliptransfer.contrastive.augment import sample_generator
from cliptransfer.contrastive.losses.declip import mask_tokens
from cliptransfer.visual.inputs import collate_visual
from cliptransfer.vlp.corpus import VLPSentence
from cliptransfer.vlp.objectives import (
    IGNORE,
    itm_sentence,
    parse_word_groups,
    sample_answer,
    swap_word,
)

__all__ = ["MLMVocab", "VLPDataConfig", "VLPDataset", "VLPSplit", "collate_vlp", "image_key"]

_COCO = re.compile(r"^COCO_(?:train|val|test)\d{4}_0*(\d+)$")


def image_key(img_id: str) -> int | str:
    """The feature-store key of an LXMERT `img_id`: a COCO file stem gives its numeric image id
    (the key grid extraction and the VQA task use); anything else (VG ids) stays as it is."""
    m = _COCO.match(img_id)
    return int(m.group(1)) if m else img_id


@dataclass
class VLPSplit:
    """The sentences of one or more LXMERT files (the task's split interface: `source`,
    `image_ids()`, `without_images()`, `skipped`)."""

    source: str
    examples: list[VLPSentence]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def image_ids(self) -> list[int | str]:
        return sorted({image_key(s.img_id) for s in self.examples}, key=str)

    def without_images(self, image_ids: Container[int | str], reason: str) -> VLPSplit:
        keep = [s for s in self.examples if image_key(s.img_id) not in image_ids]
        skipped = dict(self.skipped)
        skipped[reason] = skipped.get(reason, 0) + len(self.examples) - len(keep)
        return replace(self, examples=keep, skipped=skipped)


@dataclass
class VLPDataConfig:
    # LXMERT JSON files (comma lists); both empty = the Shapes world's corpus (prepared once).
    train: str = ""
    val: str = ""  # held-out pairs for MLM / ITM accuracy (LXMERT's minival)
    sources: str = ""  # sentf sources to read (comma list, e.g. "mscoco,vqa"); empty = all
    # The Shapes world's corpus: the first N VQA questions of each image (0 = all; VQA v2 has
    # 5.4 per image, the question-dense `small` world 24-48).
    questions_per_image: int = 6
    mlm_prob: float = 0.15
    whole_word: bool = False
    itm_prob: float = 0.5  # probability that a sentence is swapped for another image's
    # Word-swap negatives: groups of interchangeable words ("red,blue,...;circle,square,...") and
    # the probability that an ITM negative is the image's own sentence with one of them swapped
    # (falls back to another image's sentence when the sentence has none).
    swap_words: str = ""
    swap_prob: float = 0.0
    grid_keep: int = 0  # train only: keep this many random cells per image (0 = all)
    mask_cells: float = 0.0  # train only: fraction of cells zeroed for feature regression (LXMERT)
    images: str = ""  # COCO root with train2014/, val2014/ (grid extraction, end2end)
    skip_missing: bool = False  # count and drop sentences whose image has no features
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_range("mlm_prob", self.mlm_prob, ge=0, le=1)
        check_range("questions_per_image", self.questions_per_image, ge=0)
        check_range("itm_prob", self.itm_prob, ge=0, lt=1)
        check_range("swap_prob", self.swap_prob, ge=0, le=1)
        check(
            not self.swap_prob or self.swap_words, "swap_prob", "needs swap_words", self.swap_prob
        )
        try:  # the dataset's own parser, so the config accepts exactly what it will read
            parse_word_groups(self.swap_words)
        except ValueError:
            check(False, "swap_words", "each ';'-separated group needs two or more words",
                  self.swap_words)  # fmt: skip
        check_range("grid_keep", self.grid_keep, ge=0)
        check_range("mask_cells", self.mask_cells, ge=0, lt=1)
        check_range("num_workers", self.num_workers, ge=0)


@dataclass(frozen=True)
class MLMVocab:
    """What masking needs from a question tokenizer: the mask id, the special ids, the vocab
    size and (whole-word masking) which ids start a word."""

    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int
    word_start: torch.Tensor | None  # (vocab,) bool

    @classmethod
    def of(cls, tokenizer: Any) -> MLMVocab:
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer.tokenizer, "mask_token_id"):
            hf = tokenizer.tokenizer  # a Hugging Face (BERT WordPiece) tokenizer
            pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
            start = torch.tensor([not p.startswith("##") for p in pieces])
            return cls(hf.mask_token_id, tuple(hf.all_special_ids), len(hf), start)
        tok = tokenizer.tokenizer  # the project tokenizer (SentencePiece / CLIP BPE)
        if tok.mask_id is None:
            raise ConfigError(f"text.tokenizer: {tok!r} has no mask token, MLM needs one")
        start = None
        if hasattr(tok, "sp"):  # SentencePiece: ids 1..n are pieces; "▁" starts a word
            start = torch.ones(tok.vocab_size, dtype=torch.bool)
            for i in range(tok.sp_vocab_size):
                start[i + 1] = tok.sp.id_to_piece(i).startswith("\u2581")
        return cls(tok.mask_id, (tok.pad_id, tok.sot_id, tok.eot_id), tok.vocab_size, start)


class VLPDataset(Dataset):
    def __init__(self, sentences: Sequence[VLPSentence], tokenizer: Callable, vocab: MLMVocab,
                 inputs: Callable[[int | str], Mapping[str, torch.Tensor]],
                 ans2label: Mapping[str, int] | None, cfg: VLPDataConfig, *, seed: int,
                 train: bool) -> None:  # fmt: skip
        if len({s.img_id for s in sentences}) < 2 and cfg.itm_prob > 0:
            raise ValueError("ITM needs sentences of at least two images")
        if cfg.whole_word and vocab.word_start is None:
            raise ConfigError("data.whole_word: the tokenizer does not mark word starts")
        self.sentences, self.tokenizer, self.vocab = list(sentences), tokenizer, vocab
        self.inputs, self.ans2label, self.cfg = inputs, ans2label, cfg
        self.image_of = [s.img_id for s in self.sentences]
        number = {img: k for k, img in enumerate(sorted(set(self.image_of)))}
        self.image_number = [number[img] for img in self.image_of]
        self.swap_groups = parse_word_groups(cfg.swap_words) if cfg.swap_words else ()
        self.seed, self.train, self.epoch = seed, train, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cfg, vocab = self.cfg, self.vocab
        g = sample_generator(self.seed, self.epoch if self.train else 0, index)
        rng = random.Random(int(torch.randint(2**62, (), generator=g)))
        own = self.sentences[index]
        j, matched = itm_sentence(self.image_of, index, rng, cfg.itm_prob)
        text = self.sentences[j].text
        if not matched and cfg.swap_prob and rng.random() < cfg.swap_prob:
            swapped = swap_word(own.text, self.swap_groups, rng)
            if swapped is not None:  # a negative written for this very image, one word off
                j, text = index, swapped
        ids, mask, _ = self.tokenizer([text])  # (1, L) each
        ids, mask = ids[0], mask[0].bool()
        start = vocab.word_start[ids] if cfg.whole_word else None
        masked, labels = mask_tokens(ids, vocab.mask_id, vocab.vocab_size, vocab.special_ids,
                                     cfg.mlm_prob, g, word_start=start)  # fmt: skip
        qa = IGNORE
        if matched and self.ans2label:  # QA only on the image's own question
            qa = sample_answer(own.label, self.ans2label, rng)
        visual = dict(self.inputs(image_key(own.img_id)))  # {features, spatial} or {pixels}
        if self.train and cfg.grid_keep and visual["features"].shape[0] > cfg.grid_keep:
            n = visual["features"].shape[0]
            keep = torch.randperm(n, generator=g)[: cfg.grid_keep].sort().values
            visual["features"], visual["spatial"] = (
                visual["features"][keep],
                visual["spatial"][keep],
            )
        if self.train and cfg.mask_cells:  # each cell zeroed with this probability (LXMERT 0.15)
            visual["masked_cells"] = (
                torch.rand(visual["features"].shape[0], generator=g) < cfg.mask_cells
            )
        return {"text_ids": masked, "text_mask": mask, "mlm_labels": labels, "itm": int(matched),
                "qa": qa, "index": index, "image": self.image_number[index],
                "text_image": self.image_number[j], **visual}  # fmt: skip


def collate_vlp(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate_visual(items)  # padded features + mask + spatial, or stacked pixels
    if "masked_cells" in items[0]:  # padded with False like the visual mask
        batch["masked_cells"] = torch.zeros_like(batch["visual_mask"])
        for i, it in enumerate(items):
            batch["masked_cells"][i, : len(it["masked_cells"])] = it["masked_cells"]
    for key in ("text_ids", "text_mask", "mlm_labels"):
        batch[key] = torch.stack([it[key] for it in items])
    for key in ("itm", "qa", "index", "image", "text_image"):
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
    return batch
