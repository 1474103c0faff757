"""Assets shipped in the package: the Shapes tokenizer, the default pretrained small CLIP and the
houses' VLN speaker (back-translation's default).

All were made by commands in this repository (see `cliptransfer/assets/README.md`), so a fresh
clone runs every script with no download and no extra step.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
SHAPES_TOKENIZER = ASSETS / "shapes_tokenizer"
DEFAULT_CLIP = ASSETS / "clip_rn_small_shapes"
# EnvDrop's speaker trained on the `large` houses' R2R paths over the packaged CLIP's views
# (configs/tasks/vln_speaker.yaml): a speaker-stage best/ folder, weights in fp16.
HOUSES_SPEAKER = ASSETS / "vln_speaker_houses"


def resolve_tokenizer(name: str | Path, context_length: int | None = None):
    """ "shapes" -> the packaged Shapes SentencePiece tokenizer; anything else is a path."""
    from cliptransfer.tokenization import load_tokenizer

    path = SHAPES_TOKENIZER if str(name) == "shapes" else Path(name)
    return load_tokenizer(path, context_length=context_length)


def shapes_text_corpus(world: str | Path, houses: str | Path | None = None) -> list[str]:
    """Every sentence a Shapes task feeds a text encoder (train splits only): the captions, then
    what each registered task declares (`text_corpus`: VQA questions and answers, SNLI-VE
    hypotheses, ...), then the house views' captions when `houses` is given."""
    from cliptransfer.engine.task import registered
    from cliptransfer.fileio import iter_jsonl

    world = Path(world)
    lines = (world / "captions.txt").read_text().splitlines()
    for spec in registered().values():
        if spec.text_corpus is not None:
            lines += spec.text_corpus(world)
    if houses is not None:
        lines += [
            row["caption"] for _, row in iter_jsonl(Path(houses) / "captions" / "views_train.jsonl")
        ]
    return lines


def build_shapes_tokenizer(
    world: str | Path, out: str | Path = SHAPES_TOKENIZER, houses: str | Path | None = None
):
    """Train the packaged Shapes tokenizer (context 48, as the tiny CLIP configs) on a world (and
    the Shapes houses' view captions)."""
    import tempfile

    from cliptransfer.tokenization import train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(shapes_text_corpus(world, houses)) + "\n")
        # 1000 requested: the small grammar supports fewer pieces; training clamps and says so.
        return train_sentencepiece(corpus, 1000, Path(out), context_length=48)


def resolve_clip(name: str | Path):
    """ "default" -> the packaged small CLIP (Shapes scenes, regions, houses); else `load_clip`."""
    from cliptransfer.clip import load_clip

    return load_clip(DEFAULT_CLIP if str(name) == "default" else Path(name))
