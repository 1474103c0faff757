"""What a VLN run reads: episodes, navigation graphs, 36-view features and the instruction
tokenizer — the Shapes houses (generated, features extracted and tokenizer trained once, cached)
by default, or real R2R / RxR files."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from cliptransfer.config import ConfigError, check, check_range
from cliptransfer.nav.episodes import Episode, check_episodes, load_r2r, load_rxr
from cliptransfer.nav.graph import NavGraph, load_graphs

__all__ = ["VLNData", "VLNDataConfig", "load_vln_data"]

SPLITS = ("train", "val_seen", "val_unseen")


# The houses preset the default run uses (`large`: 120 training houses, 20 unseen ones; on
# `small`'s 10 the follower memorised them instead of grounding the instructions, and
# `medium`'s 6 unseen houses made val_unseen SR a +-3 point lottery).
DEFAULT_HOUSES = {"size": "large", "seed": 0}


FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class VLNDataConfig:
    dataset: str = "r2r"  # r2r | rxr: the file format and the metric that picks the best epoch
    # Real data: R2R JSON / RxR guide JSONL(.gz) per split and the connectivity folder; all
    # empty = the Shapes houses (generated on first use).
    train: str = ""
    val_seen: str = ""
    val_unseen: str = ""
    connectivity: str = ""
    features: str = ""  # a "views" store; empty = extracted from the houses' skyboxes
    languages: str = ""  # RxR: comma list ("en,hi-IN"); empty = all
    tokenizer: str = ""  # a tokenizer folder; empty = SentencePiece trained on train
    vocab_size: int = 1000  # of that SentencePiece (clamped to what the text supports)
    skip_missing: bool = False  # count and drop bad episodes instead of failing
    max_eval: int = 0  # evaluate at most this many episodes per split (0 = all)
    # The Shapes houses: size, seed and optionally root (default: the cache folder).
    houses: dict = field(default_factory=lambda: dict(DEFAULT_HOUSES))
    camera: str = "128x96"  # views rendered for the houses' features (WIDTHxHEIGHT)
    # > 0: every view feature rescaled to this L2 norm at load (the store keeps the raw
    # embeddings). The packaged CLIP's view embeddings have norm ~156, EnvDrop's pool5 ~20;
    # the houses default (VLNConfig) is 20, the real-data configs keep raw features (0).
    feature_norm: float = 0.0
    # The in-memory view table's dtype: float16 halves it (R2R at 512-d: 0.6 -> 0.3 GB; at
    # 2048-d 3.1 -> 1.6 GB) for a relative rounding of at most 2^-11 per value; observations
    # are float32 either way. A value beyond float16's range is an error naming the view.
    feature_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dataset not in ("r2r", "rxr"):
            raise ConfigError(f"dataset: 'r2r' or 'rxr', got {self.dataset!r}")
        check(self.feature_dtype in FEATURE_DTYPES, "feature_dtype",
              f"one of {sorted(FEATURE_DTYPES)}", self.feature_dtype)  # fmt: skip
        check_range("vocab_size", self.vocab_size, gt=0)
        check_range("max_eval", self.max_eval, ge=0)
        check_range("feature_norm", self.feature_norm, ge=0)

    @property
    def real(self) -> bool:
        return bool(self.train or self.val_unseen)


@dataclass
class VLNData:
    episodes: dict[str, list[Episode]]
    graphs: dict[str, NavGraph]
    features: Path
    skipped: dict[str, dict[str, int]]
    houses: Path | None


def _load(path: str, dataset: str, languages: str) -> list[Episode]:
    if dataset == "r2r":
        return load_r2r(path)
    return load_rxr(path, languages=languages.split(",") if languages else None)


def houses_files(root: Path, dataset: str) -> dict[str, str]:
    if dataset == "r2r":
        return {s: str(root / "r2r" / f"R2R_{s}.json") for s in SPLITS}
    return {s: str(root / "rxr" / f"rxr_{s}_guide.jsonl.gz") for s in SPLITS}


def view_encoder(encoder: str, backbone: str):
    """The houses' view encoder: the CLIP `backbone`, or ("supervised") the detector analogue
    trained on the default Shapes world (prepared and trained once, cached)."""
    from cliptransfer.nav.extract_views import ClipViewEncoder, RegionViewEncoder

    if encoder == "clip":
        return ClipViewEncoder(backbone)
    from cliptransfer.worlds.shapes import default_world_dir, prepare_shapes
    from cliptransfer.worlds.shapes.bottomup import bottomup_dir, region_model

    world = prepare_shapes(default_world_dir("small", 0), size="small", seed=0)
    # VQA's default feature cache on that world (<world>/features): one shared detector.
    return RegionViewEncoder(region_model(world, bottomup_dir(world / "features")))


def views_store_name(encoder_meta: dict, camera: str) -> str:
    """Named by the encoder's weights, so a new packaged CLIP never reads an old cache."""
    kind = "supervised-" if encoder_meta["feature"].startswith("region") else ""
    return f"views-{kind}{encoder_meta['checkpoint_sha256'][:12]}-{camera}"


def load_vln_data(
    cfg: VLNDataConfig,
    backbone: str,
    accelerator,
    *,
    need_train: bool = True,
    encoder: str = "clip",
) -> VLNData:
    """Episodes of every split checked against the graphs, and the views store (extracted from
    the houses on the main process first when the data is the default)."""
    houses = None
    if cfg.real:
        missing = [k for k in ("val_unseen", "connectivity", "features") if not getattr(cfg, k)]
        if need_train and not cfg.train:
            missing.insert(0, "train")
        if missing:
            raise ConfigError(f"real VLN data needs data.{', data.'.join(missing)} as well")
        files = {s: getattr(cfg, s) for s in SPLITS if getattr(cfg, s)}
        connectivity, features = Path(cfg.connectivity), Path(cfg.features)
    else:
        from cliptransfer.nav.extract_views import extract_views
        from cliptransfer.worlds.houses import default_houses_dir, prepare_houses
        from cliptransfer.worlds.houses.symbolic import SYMBOLIC_VERSION, prepare_symbolic_views

        spec = {**DEFAULT_HOUSES, **cfg.houses}  # a config may give only some of the keys
        size, seed = spec["size"], int(spec["seed"])
        houses = Path(spec["root"]) if spec.get("root") else default_houses_dir(size, seed)
        width, height = (int(v) for v in cfg.camera.lower().split("x"))
        with accelerator.main_process_first():  # the main process trains/caches, others reuse
            fill = None  # writes `features` once the houses exist; None: the user's own store
            if cfg.features:
                features = Path(cfg.features)
            elif encoder == "symbolic":
                features = houses / f"views-symbolic-v{SYMBOLIC_VERSION}"
                fill = partial(prepare_symbolic_views, features, size, seed)
            else:
                views = view_encoder(encoder, backbone)
                features = houses / views_store_name(views.meta, cfg.camera)
                fill = partial(extract_views, views, houses / "r2r" / "connectivity", features,
                               skyboxes=houses / "scans", width=width, height=height,
                               progress=True)  # fmt: skip
            if accelerator.is_main_process:
                prepare_houses(houses, size, seed)
                if fill is not None:
                    fill()
        files, connectivity = houses_files(houses, cfg.dataset), houses / "r2r" / "connectivity"
    episodes, skipped = {}, {}
    for split, path in files.items():
        if split == "train" and not need_train:
            continue
        loaded = _load(path, cfg.dataset, cfg.languages)
        episodes[split] = loaded
    scans = sorted({e.scan for eps in episodes.values() for e in eps})
    graphs = load_graphs(connectivity, scans)
    for split in list(episodes):
        episodes[split], skipped[split] = check_episodes(episodes[split], graphs,
                                                         cfg.skip_missing)  # fmt: skip
    return VLNData(episodes, graphs, features, skipped, houses)


def train_tokenizer(texts: list[str], out: Path, vocab_size: int):
    """A SentencePiece BPE tokenizer of the training instructions (all languages), written to
    `out` (deterministic: the same text gives the same model). BPE, not unigram: on a small,
    repetitive corpus (the houses' ~75 English words) unigram with a soft vocabulary limit
    collapses to ~110 near-character pieces ("gr" "ay", "a" "nd"; 59 pieces per instruction),
    while BPE keeps every word whole (33), as EnvDrop's word vocabulary does."""
    from cliptransfer.tokenization.spiece import train_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "train_text.txt"
    corpus.write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")
    import warnings

    # Every character of every script gets a piece (character_coverage 1): with four scripts a
    # small vocabulary must at least hold them (plus SentencePiece's 3 meta pieces).
    chars = len({ch for t in texts for ch in t if not ch.isspace()})
    with warnings.catch_warnings():  # a small corpus clamps the vocabulary: expected here
        warnings.simplefilter("ignore", UserWarning)
        return train_sentencepiece(corpus, max(vocab_size, chars + 4), out, model_type="bpe",
                                  character_coverage=1.0)  # fmt: skip
