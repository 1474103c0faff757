"""Text tokenizers behind one interface, all with OpenAI CLIP's id convention.

- `SentencePieceTokenizer`: 0 = pad, SentencePiece ids shifted by one, then mask, SOT, EOT.
- `CLIPBPETokenizer`: OpenAI's byte-level BPE from a local Hugging Face `CLIPTokenizer` folder.
- `load_tokenizer(path)`: either of the above from a folder (or a `.model` file).
- `train_sentencepiece(...)`: deterministic training that writes a folder `load_tokenizer` reads.
"""

from __future__ import annotations

from pathlib import Path

from cliptransfer.tokenization.base import (
    CONFIG_FILE,
    DEFAULT_CONTEXT_LENGTH,
    Tokenizer,
    attention_mask,
    read_json_object,
)
from cliptransfer.tokenization.clip_bpe import HF_CLIP_FILES, HF_TOKENIZER_JSON, CLIPBPETokenizer
from cliptransfer.tokenization.spiece import (
    SP_MODEL_FILE,
    SentencePieceTokenizer,
    train_sentencepiece,
)

__all__ = [
    "CLIPBPETokenizer",
    "DEFAULT_CONTEXT_LENGTH",
    "SentencePieceTokenizer",
    "Tokenizer",
    "attention_mask",
    "load_tokenizer",
    "train_sentencepiece",
]


def load_tokenizer(path: str | Path, *, context_length: int | None = None) -> Tokenizer:
    """A tokenizer from a folder (ours or an HF CLIP one) or a SentencePiece `.model` file."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".model":
            raise ValueError(
                f"{path}: expected a folder or a SentencePiece .model file, got a "
                f"'{path.suffix}' file"
            )
        config = path.parent / CONFIG_FILE
        if path.name == SP_MODEL_FILE and config.is_file():
            if read_json_object(config).get("type") == "sentencepiece":
                return SentencePieceTokenizer.from_folder(
                    path.parent, context_length=context_length
                )
        return SentencePieceTokenizer.from_file(path, context_length=context_length)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer path {path} not found")
    config = read_json_object(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    if config.get("type") == "sentencepiece":
        return SentencePieceTokenizer.from_folder(path, context_length=context_length)
    if not config and (path / SP_MODEL_FILE).is_file():
        return SentencePieceTokenizer.from_file(path / SP_MODEL_FILE, context_length=context_length)
    hf_class = config.get("tokenizer_class")
    if hf_class is not None and "CLIP" not in hf_class:
        raise ValueError(
            f"{path / CONFIG_FILE}: tokenizer_class {hf_class!r} is not supported "
            "(only CLIP BPE and SentencePiece tokenizers)"
        )
    has_clip = (
        all((path / n).is_file() for n in HF_CLIP_FILES) or (path / HF_TOKENIZER_JSON).is_file()
    )
    if has_clip:
        return CLIPBPETokenizer.from_folder(path, context_length=context_length)
    raise FileNotFoundError(
        f"{path}: no tokenizer found; looked for {SP_MODEL_FILE} + {CONFIG_FILE} (SentencePiece) "
        f"or {' + '.join(HF_CLIP_FILES)} / {HF_TOKENIZER_JSON} (CLIP BPE); "
        f"found {sorted(p.name for p in path.iterdir())}"
    )
