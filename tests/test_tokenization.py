"""Tokenizers: SentencePiece training/loading, CLIP BPE parity with open_clip, id convention."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from cliptransfer.tokenization import (
    CLIPBPETokenizer,
    SentencePieceTokenizer,
    attention_mask,
    load_tokenizer,
    train_sentencepiece,
)

COLOURS = ["red", "blue", "green", "yellow", "purple", "grey"]
SHAPES = ["cube", "sphere", "cone", "cylinder", "torus"]
RELATIONS = ["left of", "right of", "above", "below", "behind", "in front of"]
HINDI = ["लाल घन", "नीला गोला", "हरा शंकु"]  # red cube, blue sphere, green cone
TELUGU = ["ఎరుపు ఘనం", "నీలం గోళం", "ఆకుపచ్చ శంకువు"]
SP_VOCAB = 80  # below what the corpus supports (93), so no clamping


def corpus_lines(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a = f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        b = f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        rel = rng.choice(RELATIONS)
        if i % 6 == 4:
            lines.append(f"{rng.choice(HINDI)} {rng.choice(HINDI)} के पास है")
        elif i % 6 == 5:
            lines.append(f"{rng.choice(TELUGU)} {rng.choice(TELUGU)} దగ్గర ఉంది")
        elif i % 6 == 3:
            lines.append(f"There are {rng.randint(2, 9)} objects. The {a} is {rel} the {b}.")
        else:
            lines.append(f"A {a} {rel} a {b}")
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "captions.txt"
    path.write_text("\n".join(corpus_lines()) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sp_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sp") / "tok"
    train_sentencepiece(corpus, SP_VOCAB, out, context_length=48)
    return out


@pytest.fixture(scope="module")
def sp(sp_dir: Path) -> SentencePieceTokenizer:
    return load_tokenizer(sp_dir)


TEXT = "A red cube left of a blue sphere"


# ---- SentencePiece -------------------------------------------------------------------------------


def test_sp_special_id_layout(sp: SentencePieceTokenizer, sp_dir: Path) -> None:
    assert isinstance(sp, SentencePieceTokenizer)
    assert sp.sp_vocab_size == SP_VOCAB
    assert (sp.pad_id, sp.mask_id, sp.sot_id, sp.eot_id) == (0, 81, 82, 83)
    assert sp.vocab_size == 84 and sp.context_length == 48 and sp.lower is False
    config = json.loads((sp_dir / "tokenizer_config.json").read_text())
    assert config["type"] == "sentencepiece"
    assert (config["pad_id"], config["mask_id"], config["sot_id"], config["eot_id"]) == (
        0,
        81,
        82,
        83,
    )
    assert (
        config["vocab_size"] == 84 and config["context_length"] == 48 and config["lower"] is False
    )
    assert config["training"]["model_type"] == "unigram" and config["training"]["seed"] == 0
    # Every SentencePiece id is shifted by one, never colliding with pad or the specials.
    words = sp.tokenize_words(TEXT + " लाल घन ఎరుపు ఘనం")
    assert words == [i + 1 for i in sp.sp.encode(TEXT + " लाल घन ఎరుపు ఘనం")]
    assert all(1 <= i <= SP_VOCAB for i in words)
    assert sp.tokenize_words("Ω") == [sp.sp.piece_to_id("▁") + 1, 1]  # unseen char -> <unk> = 1


def test_sp_padding_eot_argmax_and_mask(sp: SentencePieceTokenizer) -> None:
    words = sp.tokenize_words(TEXT)
    short = sp.tokenize_words("a cone")
    ids = sp([TEXT, "a cone"])
    assert ids.dtype == torch.long and ids.shape == (2, 48)
    assert ids[0].tolist() == [82, *words, 83] + [0] * (48 - len(words) - 2)
    assert ids[1].tolist() == [82, *short, 83] + [0] * (48 - len(short) - 2)
    assert ids.argmax(-1).tolist() == [len(words) + 1, len(short) + 1]
    mask = attention_mask(ids)
    assert mask[0].tolist() == [True] * (len(words) + 2) + [False] * (48 - len(words) - 2)
    assert torch.equal(sp.attention_mask(ids), mask)
    assert torch.equal(sp(TEXT), ids[:1])  # a single string is a batch of one


def test_sp_truncation_keeps_eot_and_reports(sp: SentencePieceTokenizer) -> None:
    long_text = " ".join([TEXT] * 4)
    words = sp.tokenize_words(long_text)
    ids, truncated = sp.encode([long_text, "a cone"], context_length=12, return_truncated=True)
    assert ids[0].tolist() == [82, *words[:10], 83]
    assert truncated.tolist() == [True, False]
    # Boundary: exactly L - 2 words fit; one more is truncated.
    n = len(sp.tokenize_words(TEXT))
    _, fits = sp.encode(TEXT, context_length=n + 2, return_truncated=True)
    cut, over = sp.encode(TEXT, context_length=n + 1, return_truncated=True)
    assert fits.tolist() == [False] and over.tolist() == [True]
    assert cut[0, -1].item() == 83 and cut[0].argmax().item() == n


def test_sp_round_trip(sp: SentencePieceTokenizer) -> None:
    texts = [TEXT, "There are 7 objects. The grey torus is behind the red cone.", "लाल घन के पास है"]
    texts.append("నీలం గోళం దగ్గర ఉంది")
    ids = sp(texts)
    assert [sp.decode(row) for row in ids] == texts
    assert sp.batch_decode(ids) == texts
    # Mask ids, padding and everything after EOT are not text.
    words = sp.tokenize_words(TEXT)
    assert sp.decode([82, sp.mask_id, *words, 83, 0, 5, 0]) == TEXT
    with pytest.raises(ValueError, match=r"shape \(L,\)"):
        sp.decode(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sp.decode([82, 84])


def test_sp_training_is_deterministic(corpus: Path, sp_dir: Path, tmp_path: Path) -> None:
    # Same text at another path, trained again: byte-identical files.
    copy = tmp_path / "elsewhere.txt"
    shutil.copy(corpus, copy)
    again = tmp_path / "again"
    train_sentencepiece(copy, SP_VOCAB, again, context_length=48)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (sp_dir / name).read_bytes()


def test_sp_save_and_load_give_identical_ids(
    sp: SentencePieceTokenizer, sp_dir: Path, tmp_path: Path
) -> None:
    texts = [TEXT, "हरा शंकु", " ".join([TEXT] * 5)]
    expected = sp(texts)
    saved = load_tokenizer(sp.save(tmp_path / "saved"))
    from_model = load_tokenizer(sp_dir / "tokenizer.model")  # picks up the config beside it
    assert torch.equal(saved(texts), expected) and torch.equal(from_model(texts), expected)
    assert saved.context_length == from_model.context_length == 48
    bare = tmp_path / "bare" / "captions.model"
    bare.parent.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", bare)
    loose = load_tokenizer(bare, context_length=48)  # no config: defaults + the override
    assert torch.equal(loose(texts), expected) and loose.eot_id == 83
    assert load_tokenizer(sp_dir, context_length=8)(TEXT).shape == (1, 8)


def test_sp_lowercase_option(corpus: Path, sp: SentencePieceTokenizer, tmp_path: Path) -> None:
    tok = train_sentencepiece(corpus, SP_VOCAB, tmp_path / "lower", lower=True)
    assert tok.lower is True and tok.context_length == 77
    assert torch.equal(tok("A RED Cube"), tok("a red cube"))
    assert tok.decode(tok("A RED Cube")[0]) == "a red cube"
    reloaded = load_tokenizer(tmp_path / "lower")
    assert reloaded.lower is True and torch.equal(reloaded("A RED Cube"), tok("a red cube"))
    assert not torch.equal(sp("A red cube"), sp("a red cube"))  # default keeps case


def test_sp_vocab_too_large_is_clamped_with_warning(corpus: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="clamped from 5000"):
        tok = train_sentencepiece(corpus, 5000, tmp_path / "big", model_type="bpe")
    assert 80 < tok.sp_vocab_size < 5000 and tok.eot_id == tok.vocab_size - 1
    config = json.loads((tmp_path / "big" / "tokenizer_config.json").read_text())
    assert config["vocab_size"] == tok.sp_vocab_size + 4
    assert config["training"]["requested_vocab_size"] == 5000


def test_training_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece(tmp_path / "missing.txt", 50, tmp_path / "o")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n")
    with pytest.raises(ValueError, match=r"blank\.txt: no non-empty lines"):
        train_sentencepiece(blank, 50, tmp_path / "o")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"a red cube\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt, line 2: not valid UTF-8"):
        train_sentencepiece(bad, 50, tmp_path / "o")
    with pytest.raises(ValueError, match=r"could not train on .*captions\.txt.*vocab_size=5"):
        train_sentencepiece(corpus, 5, tmp_path / "o")
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(corpus, 50, tmp_path / "o", model_type="wordpiece")
    assert not (tmp_path / "o").exists()


def test_loading_errors(sp_dir: Path, sp: SentencePieceTokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*vocab\.json.*notes\.txt"):
        load_tokenizer(empty)
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    shutil.copy(sp_dir / "tokenizer_config.json", no_model)
    with pytest.raises(FileNotFoundError, match=r"no_model: missing tokenizer\.model"):
        load_tokenizer(no_model)
    swapped = tmp_path / "swapped"
    shutil.copytree(sp_dir, swapped)
    config = json.loads((swapped / "tokenizer_config.json").read_text())
    config["eot_id"] = 99
    (swapped / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eot_id=99 .*does not match"):
        load_tokenizer(swapped)
    (swapped / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"swapped/tokenizer\.model: not a valid SentencePiece"):
        load_tokenizer(swapped)
    with pytest.raises(ValueError, match=r"\.txt' file"):
        load_tokenizer(empty / "notes.txt")
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        sp("a cube", context_length=1)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        sp(["a cube", 3])  # type: ignore[list-item]


# ---- CLIP BPE ------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable unicode table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_folder(folder: Path, merges: list[str], specials: list[str]) -> Path:
    """An HF CLIPTokenizer folder built as OpenAI's SimpleTokenizer builds its encoder."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + specials
    folder.mkdir(parents=True)
    vocab_json = json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
    merges_text = "".join(f"{m}\n" for m in ["#version: 0.2", *merges])
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def test_clip_bpe_reads_ids_from_files(tmp_path: Path) -> None:
    # A toy vocabulary: 512 byte tokens, 4 merges, then SOT 516 / EOT 517 (not 49406/49407).
    folder = write_clip_folder(tmp_path / "toy", ["c a", "ca t</w>", "d o", "do g</w>"], SPECIALS)
    tok = load_tokenizer(folder)
    assert isinstance(tok, CLIPBPETokenizer)
    assert (tok.sot_id, tok.eot_id, tok.vocab_size, tok.mask_id) == (516, 517, 518, None)
    assert tok.context_length == 77
    # "!" is byte 33, the first table entry: 0 alone, 256 as a word end ("!</w>").
    ids, truncated = tok.encode(
        ["  Cat\tDOG!", "cat " * 10], context_length=8, return_truncated=True
    )
    assert ids[0].tolist() == [516, 513, 515, 256, 517, 0, 0, 0]
    assert ids[1].tolist() == [516, *[513] * 6, 517]
    assert truncated.tolist() == [False, True]
    assert tok.tokenize_words("dog!!") == [515, 0, 256]  # "!!" is one word: "!" + "!</w>"
    # Id 0 is the real token "!": decode stops at EOT instead of stripping zeros.
    assert tok.decode(ids[0]) == "cat dog !"
    assert tok.decode(tok("dog!!")[0]) == "dog !!"
    # save -> load keeps the ids and the context length.
    tok.context_length = 16
    again = load_tokenizer(tok.save(tmp_path / "saved"))
    assert isinstance(again, CLIPBPETokenizer) and again.context_length == 16
    assert torch.equal(again(["  Cat\tDOG!", "cat " * 10]), tok(["  Cat\tDOG!", "cat " * 10]))


def test_clip_bpe_errors(tmp_path: Path) -> None:
    swapped = write_clip_folder(tmp_path / "swapped", [], SPECIALS[::-1])
    with pytest.raises(ValueError, match="EOT .* id 512.*highest id \\(513\\)"):
        CLIPBPETokenizer.from_folder(swapped)
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"half: no CLIP BPE files.*merges\.txt"):
        CLIPBPETokenizer.from_folder(half)
    with pytest.raises(FileNotFoundError, match="not found"):
        CLIPBPETokenizer.from_folder(tmp_path / "absent")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    with pytest.raises(ValueError, match="'BertTokenizer' is not supported"):
        load_tokenizer(other)


GOLDEN_TEXTS = [
    "a photo of a cat.",
    "A Photo Of A DOG!!",
    "it's a dog's life, isn't it? they're here; we'll see, I'd go, you've won, I'm in. IT'S LOUD",
    "There are 12 apples and 3.5 oranges (approx. 15%) -- $9.99 each #1 @home 2021-06-01",
    "Café naïve résumé Zoë façade São Paulo Ångström",
    "emoji 🙂🐱👍🏽 and ❤️ hearts",
    "fish &amp; chips &lt;b&gt; &amp;amp; html",
    "  lots   of\twhitespace\nand newlines  ",
    "odd\x1cspaces\u3000and\u00a0ΟΔΟΣ ΚΑΛΟΣ",  # Python's split()/lower() differ from Rust's
    "\u201ccurly quotes\u201d and \u2018single\u2019 \u2014 dashes\u2026 \ufb01ne ｆｕｌｌｗｉｄｔｈ",
    "<|endoftext|> literal special text <|startoftext|>",
    "中文 日本語 한국어 русский текст हिन्दी తెలుగు",
    "",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a very long caption " * 30,
]


def open_clip_tokenizer_module():
    """open_clip's self-contained tokenizer.py, loaded alone: importing the package would also
    pull in timm and torchvision, seconds of import on a shared CPU for nothing used here."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip (open-clip-torch) is needed for the golden BPE test")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as e:  # ftfy / regex missing
        pytest.skip(f"open_clip's tokenizer cannot be imported: {e}")
    return module


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory: pytest.TempPathFactory):
    reference = open_clip_tokenizer_module()
    assert bytes_to_unicode() == reference.bytes_to_unicode()
    bpe = gzip.open(reference.default_bpe()).read().decode("utf-8").split("\n")
    merges = bpe[1 : 49152 - 256 - 2 + 1]  # exactly the slice SimpleTokenizer uses
    folder = write_clip_folder(tmp_path_factory.mktemp("clip") / "bpe", merges, SPECIALS)
    return CLIPBPETokenizer.from_folder(folder), reference


def test_clip_bpe_matches_open_clip(clip_pair) -> None:
    tok, reference = clip_pair
    assert (tok.sot_id, tok.eot_id, tok.vocab_size, tok.context_length) == (49406, 49407, 49408, 77)
    ours, truncated = tok.encode(GOLDEN_TEXTS, return_truncated=True)
    expected = reference.tokenize(GOLDEN_TEXTS)
    assert ours.shape == (len(GOLDEN_TEXTS), 77)
    assert ours.tolist() == expected.tolist()
    assert truncated.tolist() == [False] * 14 + [True]
    assert torch.equal(tok(GOLDEN_TEXTS, context_length=8), reference.tokenize(GOLDEN_TEXTS, 8))
    # EOT is unique per row (the literal "<|endoftext|>" is plain text), so argmax finds it.
    assert ((ours == 49407).sum(-1) == 1).all()
    simple = reference._tokenizer
    for text in GOLDEN_TEXTS[:8]:
        assert tok.tokenize_words(text) == simple.encode(text)
        assert tok.decode(tok(text)[0]) == simple.decode(simple.encode(text)).strip()
