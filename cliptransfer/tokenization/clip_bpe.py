"""OpenAI CLIP's byte-level BPE from a local Hugging Face tokenizer folder (never the hub)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from cliptransfer.tokenization.base import DEFAULT_CONTEXT_LENGTH, Tokenizer

HF_CLIP_FILES = ("vocab.json", "merges.txt")  # or a single tokenizer.json
HF_TOKENIZER_JSON = "tokenizer.json"


class CLIPBPETokenizer(Tokenizer):
    """OpenAI CLIP's byte-level BPE, read from a local Hugging Face tokenizer (never the hub).

    Ids equal `open_clip.tokenize` / OpenAI `clip.tokenize(truncate=True)`: the text is cleaned in
    Python exactly as there (the HF normalizer alone skips ftfy and html unescaping).
    """

    pad_is_token = True

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        source: str = "<memory>",
    ) -> None:
        try:
            from ftfy import fix_text
        except ImportError as e:
            raise ImportError(
                "CLIPBPETokenizer needs the 'ftfy' package to clean text exactly like OpenAI CLIP "
                "(pip install ftfy)"
            ) from e
        self._fix_text = fix_text
        self.hf = hf_tokenizer
        self.context_length = int(context_length)
        vocab = hf_tokenizer.get_vocab()
        for role, token in (("SOT", hf_tokenizer.bos_token), ("EOT", hf_tokenizer.eos_token)):
            if token not in vocab:
                raise ValueError(f"{source}: {role} token {token!r} is not in the vocabulary")
        self.sot_id = vocab[hf_tokenizer.bos_token]
        self.eot_id = vocab[hf_tokenizer.eos_token]
        self.vocab_size = len(hf_tokenizer)
        if self.eot_id != self.vocab_size - 1:
            raise ValueError(
                f"{source}: EOT {hf_tokenizer.eos_token!r} has id {self.eot_id}, but the text "
                f"encoder pools at argmax, which needs EOT to be the highest id "
                f"({self.vocab_size - 1})"
            )
        self._backend = hf_tokenizer.backend_tokenizer
        # A caption containing the literal text "<|endoftext|>" must not emit a second EOT
        # (pooling would pick the wrong position); open_clip also encodes it as plain text.
        self._backend.encode_special_tokens = True

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, context_length: int | None = None
    ) -> CLIPBPETokenizer:
        """Load vocab.json + merges.txt (or tokenizer.json) with `local_files_only=True`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer folder {folder} not found")
        has_pair = all((folder / name).is_file() for name in HF_CLIP_FILES)
        if not has_pair and not (folder / HF_TOKENIZER_JSON).is_file():
            raise FileNotFoundError(
                f"{folder}: no CLIP BPE files (looked for {' + '.join(HF_CLIP_FILES)} or "
                f"{HF_TOKENIZER_JSON}); found {sorted(p.name for p in folder.iterdir())}"
            )
        # The fast class exists in transformers 4.x (where CLIPTokenizer is the slow one) and 5.x.
        from transformers import CLIPTokenizerFast

        try:
            hf = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # the Rust backend raises bare Exception on malformed files
            raise ValueError(f"{folder}: could not load a CLIP tokenizer ({e})") from e
        if context_length is None:
            # HF stores a huge sentinel when no length was saved; CLIP's 77 is then the right one.
            max_len = getattr(hf, "model_max_length", None) or DEFAULT_CONTEXT_LENGTH
            context_length = int(max_len) if max_len < 100_000 else DEFAULT_CONTEXT_LENGTH
        return cls(hf, context_length=context_length, source=str(folder))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.model_max_length = self.context_length
        self.hf.save_pretrained(str(folder))
        return folder

    def clean(self, text: str) -> str:
        """OpenAI CLIP's cleaning: ftfy, html unescape (twice), whitespace collapse, lowercase."""
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def tokenize_words(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        # One `encode` per text, not `encode_batch`: no Rust thread pool competing with the
        # DataLoader workers that call this (captions are short, so batching gains little).
        return [self._backend.encode(self.clean(t), add_special_tokens=False).ids for t in texts]

    def _decode_words(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False).strip()
