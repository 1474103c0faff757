"""SentencePiece tokenizers: deterministic training, loading, CLIP-style special ids.

Id layout: 0 = pad, SentencePiece ids shifted by one, then mask, SOT and EOT (the highest id).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

from cliptransfer.fileio import atomic_write_bytes, write_json
from cliptransfer.tokenization.base import (
    CONFIG_FILE,
    DEFAULT_CONTEXT_LENGTH,
    Tokenizer,
    read_json_object,
)

SP_MODEL_FILE = "tokenizer.model"
SP_MODEL_TYPES = ("unigram", "bpe", "char", "word")
_SP_FORMAT_VERSION = 1


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with ids 0 = pad, 1..n = pieces, n+1 = mask, n+2 = SOT, n+3 = EOT."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        lower: bool = False,
        metadata: dict[str, Any] | None = None,
        source: str = "<bytes>",
    ) -> None:
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from e
        self._model_proto = bytes(model_proto)
        self.context_length = int(context_length)
        self.lower = bool(lower)
        self.metadata = dict(metadata or {})  # training settings, kept when re-saved
        n = self.sp.get_piece_size()
        self.sp_vocab_size = n
        self.mask_id = n + 1
        self.sot_id = n + 2
        self.eot_id = n + 3
        self.vocab_size = n + 4

    @classmethod
    def from_file(
        cls, path: str | Path, *, context_length: int | None = None, lower: bool = False
    ) -> SentencePieceTokenizer:
        """A bare `.model` file (no config): options come from the arguments."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} not found")
        length = DEFAULT_CONTEXT_LENGTH if context_length is None else context_length
        return cls(path.read_bytes(), context_length=length, lower=lower, source=str(path))

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, context_length: int | None = None
    ) -> SentencePieceTokenizer:
        """A folder written by `save` / `train_sentencepiece` (tokenizer.model + config)."""
        folder = Path(folder)
        model_path, config_path = folder / SP_MODEL_FILE, folder / CONFIG_FILE
        missing = [p.name for p in (model_path, config_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: missing {', '.join(missing)} (a SentencePiece tokenizer folder holds "
                f"{SP_MODEL_FILE} and {CONFIG_FILE})"
            )
        config = read_json_object(config_path)
        if config.get("type") != "sentencepiece":
            raise ValueError(
                f"{config_path}: 'type' is {config.get('type')!r}, not 'sentencepiece'"
            )
        length = config.get("context_length", DEFAULT_CONTEXT_LENGTH)
        tok = cls(
            model_path.read_bytes(),
            context_length=length if context_length is None else context_length,
            lower=config.get("lower", False),
            metadata=config.get("training"),
            source=str(model_path),
        )
        # The config records the id layout the model was trained against: a swapped model file
        # would silently remap every embedding row, so refuse it.
        for key in ("vocab_size", "mask_id", "sot_id", "eot_id", "pad_id"):
            if key in config and config[key] != getattr(tok, key):
                raise ValueError(
                    f"{config_path}: {key}={config[key]} but {model_path.name} gives "
                    f"{getattr(tok, key)}; the model file does not match its config"
                )
        return tok

    def config(self) -> dict[str, Any]:
        return {
            "type": "sentencepiece",
            "format_version": _SP_FORMAT_VERSION,
            "model_file": SP_MODEL_FILE,
            "context_length": self.context_length,
            "lower": self.lower,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "sot_id": self.sot_id,
            "eot_id": self.eot_id,
            "vocab_size": self.vocab_size,
            "sentencepiece_vocab_size": self.sp_vocab_size,
            "training": self.metadata,
        }

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / SP_MODEL_FILE, self._model_proto)
        write_json(folder / CONFIG_FILE, self.config())
        return folder

    def _prepare(self, text: str) -> str:
        return text.lower() if self.lower else text

    def tokenize_words(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(self._prepare(text), out_type=int)]

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        pieces = self.sp.encode([self._prepare(t) for t in texts], out_type=int)
        return [[i + 1 for i in ids] for ids in pieces]

    def _decode_words(self, ids: list[int]) -> str:
        return self.sp.decode([i - 1 for i in ids])


def _count_lines(path: Path) -> int:
    """Non-blank lines, checking UTF-8 here so errors name the line (SentencePiece would not)."""
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid UTF-8 ({e})") from e
            count += bool(line.strip())
    return count


def _sentences(path: Path, lower: bool) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line.lower() if lower else line


def train_sentencepiece(
    input: Path,
    vocab_size: int,
    out: Path,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    lower: bool = False,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train on a text file (one sentence per line) and write `out/` for `load_tokenizer`.

    `vocab_size` counts SentencePiece pieces; the tokenizer adds pad/mask/SOT/EOT (+4). If the
    corpus cannot support that many pieces, the vocabulary is clamped with a warning.
    Deterministic: single thread, no sampling or shuffling, fixed seed -> identical model bytes.
    """
    input, out = Path(input), Path(out)
    if not input.is_file():
        raise FileNotFoundError(f"training text {input} not found")
    if model_type not in SP_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {SP_MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
    n_lines = _count_lines(input)
    if n_lines == 0:
        raise ValueError(f"{input}: no non-empty lines to train a SentencePiece model on")

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        # An iterator (not input=path) keeps the path out of the saved trainer spec, so the same
        # text gives the same bytes wherever it lives.
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(input, lower),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            hard_vocab_limit=False,  # too large a request gives a smaller vocab, not an error
            max_sentence_length=1 << 16,  # long multilingual instructions (RxR) in UTF-8 bytes
            unk_id=0,
            bos_id=-1,  # our own SOT/EOT/pad live outside SentencePiece's ids
            eos_id=-1,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece could not train on {input} (vocab_size={vocab_size}, "
            f"model_type={model_type}): {e}"
        ) from e
    metadata = {
        "model_type": model_type,
        "requested_vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "seed": seed,
        "num_sentences": n_lines,
    }
    tok = SentencePieceTokenizer(
        model.getvalue(),
        context_length=context_length,
        lower=lower,
        metadata=metadata,
        source=str(input),
    )
    if tok.sp_vocab_size < vocab_size:
        warnings.warn(
            f"{input} supports only {tok.sp_vocab_size} SentencePiece pieces; vocab_size clamped "
            f"from {vocab_size} to {tok.sp_vocab_size} (total ids with pad/mask/SOT/EOT: "
            f"{tok.vocab_size})",
            stacklevel=2,
        )
    tok.save(out)
    return tok
