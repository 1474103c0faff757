"""The `cliptransfer` console script.

    cliptransfer prepare shapes --out world [--size small] [--seed 0]
    cliptransfer prepare houses --out houses [--size small] [--seed 0]
    cliptransfer prepare bottomup --world world --out world/bottomup [--boxes fixed36]
    cliptransfer prepare clip-corpus --shapes world --houses houses --out corpus
    cliptransfer prepare vlp-corpus --shapes world --out vlp-corpus
    cliptransfer tokenizer train --input world/captions.txt --vocab-size 1000 --out tok/
    cliptransfer extract grid --backbone CKPT --images DIR --size 600x1000 --out STORE
    cliptransfer extract import-regions trainval_36.tsv --out STORE
    cliptransfer evaluate vqa --questions Q.json --annotations A.json --results R.json [--legacy]
    cliptransfer evaluate snli-ve --data snli_ve_test.jsonl --results R.json
    cliptransfer compare --task vqa --features clip-grid,bottomup --backbones default,RN50 --out DIR
    cliptransfer compare --task vln --features clip,supervised
    cliptransfer benchmark --methods clip,slip,declip --archs RN-tiny,ViT-tiny --seeds 0,1,2 [--quick]
    cliptransfer show-episode --episodes R2R_val_unseen.json --connectivity DIR --instr-id 4332_0 --out ep.png
    cliptransfer info CHECKPOINT

Each subcommand imports its module only when it runs; `evaluate` and `compare` list the tasks of
the registry (`cliptransfer.engine.task.registered`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cliptransfer.benchmark import add_benchmark_command
from cliptransfer.visual.presence_probe import add_probe_command


def _prepare_shapes(args: argparse.Namespace) -> int:
    from cliptransfer.worlds.shapes import prepare_shapes

    out = prepare_shapes(args.out, size=args.size, seed=args.seed, overwrite=args.overwrite)
    from cliptransfer.fileio import read_json

    manifest = read_json(Path(out) / "manifest.json")
    print(json.dumps({"out": str(out), "counts": manifest.get("counts", {})}, indent=2))
    return 0


def _prepare_houses(args: argparse.Namespace) -> int:
    from cliptransfer.fileio import read_json
    from cliptransfer.worlds.houses import prepare_houses

    out = prepare_houses(args.out, size=args.size, seed=args.seed, overwrite=args.overwrite,
                         workers=args.workers)  # fmt: skip
    manifest = read_json(Path(out) / "manifest.json")
    print(json.dumps({"out": str(out), "counts": manifest.get("counts", {})}, indent=2))
    return 0


def _prepare_bottomup(args: argparse.Namespace) -> int:
    from cliptransfer.worlds.shapes.bottomup import build_bottomup_features
    from cliptransfer.worlds.shapes.region_model import RegionTrainConfig

    summary = build_bottomup_features(
        args.world,
        args.out,
        boxes=args.boxes,
        dim=args.dim,
        seed=args.seed,
        splits=tuple(args.splits),
        train=RegionTrainConfig(steps=args.steps),
        log=print,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _shapes_tokenizer(args: argparse.Namespace) -> int:
    import warnings

    from cliptransfer.defaults import build_shapes_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the expected "vocab clamped" note
        tok = build_shapes_tokenizer(args.world, args.out, houses=args.houses)
    print(f"wrote {args.out} (vocab_size={tok.vocab_size}, context_length={tok.context_length})")
    return 0


def _prepare_clip_corpus(args: argparse.Namespace) -> int:
    from cliptransfer.fileio import read_json
    from cliptransfer.worlds.clip_corpus import build_clip_corpus

    out = build_clip_corpus(args.shapes, args.houses, args.out, seed=args.seed,
                            house_repeats=args.house_repeats, overwrite=args.overwrite)  # fmt: skip
    counts = read_json(out / "manifest.json")["counts"]
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _prepare_vlp_corpus(args: argparse.Namespace) -> int:
    from cliptransfer.fileio import read_json
    from cliptransfer.vlp.corpus import build_shapes_vlp_corpus

    out = build_shapes_vlp_corpus(args.shapes, args.out, heldout_fraction=args.heldout,
                                  seed=args.seed, questions_per_image=args.questions_per_image,
                                  overwrite=args.overwrite)  # fmt: skip
    counts = read_json(out / "manifest.json")["counts"]
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from cliptransfer.tokenization import train_sentencepiece

    tok = train_sentencepiece(
        Path(args.input),
        args.vocab_size,
        Path(args.out),
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        lower=args.lower,
        context_length=args.context_length,
    )
    print(f"wrote {args.out} (vocab_size={tok.vocab_size}, context_length={tok.context_length})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    print(json.dumps(args.evaluate_command.run(args)))
    return 0


def _extract_grid(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from cliptransfer.visual.extract import extract_grids, parse_size

    accelerator = Accelerator(cpu=args.cpu)
    stats = extract_grids(
        args.backbone,
        args.images,
        args.out,
        size=parse_size(args.size),
        batch_size=args.batch_size,
        dtype=args.dtype,
        storage=args.storage,
        accelerator=accelerator,
        num_workers=args.num_workers,
        progress=True,
        fast=not args.plain,
    )
    if accelerator.is_main_process:
        print(json.dumps(stats, indent=2, default=str))
    accelerator.end_training()
    return 0


def _extract_views(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from cliptransfer.nav.extract_views import extract_views

    try:
        width, height = (int(v) for v in args.camera.lower().split("x"))
    except ValueError:
        raise ValueError(f"--camera {args.camera!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    accelerator = Accelerator(cpu=args.cpu)
    stats = extract_views(
        args.backbone, args.connectivity, args.out, skyboxes=args.skyboxes,
        views_dir=args.views, scans=args.scans.split(",") if args.scans else None,
        width=width, height=height, vfov_deg=args.vfov, accelerator=accelerator, progress=True,
        workers=args.workers,
    )  # fmt: skip
    if accelerator.is_main_process:
        print(json.dumps(stats, indent=2))
    accelerator.end_training()
    return 0


def _import_regions(args: argparse.Namespace) -> int:
    from cliptransfer.visual.region_import import import_regions

    stats = import_regions(
        args.paths, args.out, skip_bad=args.skip_bad, storage=args.storage, index=args.index
    )
    print(json.dumps(stats, indent=2, default=str))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from cliptransfer.compare import run_compare
    from cliptransfer.config import split_list
    from cliptransfer.engine.task import registered

    kinds = registered()[args.task].compare.feature_kinds
    run_compare(
        args.task,
        split_list(args.features) if args.features else list(kinds),
        split_list(args.backbones),
        args.out,
        args.overrides,
        launcher=args.launcher,
        script=args.script,
        config=args.config,
        rerun=args.rerun,
        inits=split_list(args.init) if args.init else (),
        seeds=_seeds(args.seeds),
    )
    return 0


def _seeds(text: str | None) -> list[int]:
    from cliptransfer.compare import CompareError
    from cliptransfer.config import split_list

    try:
        return [int(x) for x in split_list(text or "")]
    except ValueError:
        raise CompareError(f"--seeds {text!r}: expected integers, e.g. --seeds 0,1,2") from None


def _show_episode(args: argparse.Namespace) -> int:
    from cliptransfer.nav.show import show_episode

    out = show_episode(args.episodes, args.connectivity, args.instr_id, args.out,
                       results=args.results, skyboxes=args.skyboxes)  # fmt: skip
    print(f"wrote {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from cliptransfer.clip import load_clip
    from cliptransfer.config import to_dict

    model = load_clip(args.checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n_params, "config": to_dict(model.config)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliptransfer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="generate or convert datasets")
    prepare_sub = prepare.add_subparsers(dest="what", required=True)
    shapes = prepare_sub.add_parser("shapes", help="write the embedded Shapes world (real formats)")
    shapes.add_argument("--out", required=True, help="output folder")
    shapes.add_argument("--size", default="small", help="tiny | small | medium")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--overwrite", action="store_true", help="regenerate even if present")
    shapes.set_defaults(func=_prepare_shapes)

    houses = prepare_sub.add_parser(
        "houses", help="write the Shapes houses: navigation in the Matterport / R2R / RxR formats"
    )
    houses.add_argument("--out", required=True, help="output folder")
    houses.add_argument(
        "--size", default="small", help="tiny | small | medium | large (VLN default)"
    )
    houses.add_argument("--seed", type=int, default=0)
    houses.add_argument("--workers", type=int, default=None, help="skybox rendering processes")
    houses.add_argument("--overwrite", action="store_true", help="regenerate even if present")
    houses.set_defaults(func=_prepare_houses)

    bu = prepare_sub.add_parser(
        "bottomup", help="BUTD-style region features (TSV) for a Shapes world"
    )
    bu.add_argument("--world", required=True, help="a Shapes world folder")
    bu.add_argument("--out", required=True, help="output folder ({split}.tsv, model/, summary)")
    bu.add_argument("--boxes", default="adaptive", choices=["adaptive", "fixed36"])
    bu.add_argument("--dim", type=int, default=256, help="region feature size")
    bu.add_argument("--seed", type=int, default=0)
    bu.add_argument("--splits", nargs="+", default=["train2014", "val2014", "flickr30k"])
    bu.add_argument("--steps", type=int, default=300, help="detector-analogue training steps")
    bu.set_defaults(func=_prepare_bottomup)

    st = prepare_sub.add_parser("shapes-tokenizer", help="train the Shapes SentencePiece model")
    st.add_argument("--world", required=True, help="a Shapes world folder")
    st.add_argument("--out", required=True, help="output tokenizer folder")
    st.add_argument("--houses", help="a Shapes-houses folder: add its view captions")
    st.set_defaults(func=_shapes_tokenizer)

    cc = prepare_sub.add_parser(
        "clip-corpus", help="the packaged CLIP's pairs: Shapes scenes, object regions, house views"
    )
    cc.add_argument("--shapes", required=True, help="a Shapes world folder")
    cc.add_argument("--houses", help="a Shapes-houses folder (its captions/views_train.jsonl)")
    cc.add_argument("--out", required=True)
    cc.add_argument("--seed", type=int, default=0)
    cc.add_argument("--house-repeats", type=int, default=3)
    cc.add_argument("--overwrite", action="store_true")
    cc.set_defaults(func=_prepare_clip_corpus)

    vc = prepare_sub.add_parser(
        "vlp-corpus", help="V&L pretraining pairs in LXMERT's JSON (Shapes captions + VQA train)"
    )
    vc.add_argument("--shapes", required=True, help="a Shapes world folder")
    vc.add_argument("--out", required=True)
    vc.add_argument("--heldout", type=float, default=0.05, help="fraction of images held out")
    vc.add_argument("--seed", type=int, default=0)
    vc.add_argument("--questions-per-image", type=int, default=6,
                    help="the first N questions of each image (0: all)")  # fmt: skip
    vc.add_argument("--overwrite", action="store_true")
    vc.set_defaults(func=_prepare_vlp_corpus)

    tok = sub.add_parser("tokenizer", help="train SentencePiece tokenizers")
    tok_sub = tok.add_subparsers(dest="what", required=True)
    train = tok_sub.add_parser("train", help="train a SentencePiece model on a text file")
    train.add_argument("--input", required=True, help="text file, one sentence per line")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.add_argument("--lower", action="store_true", help="lowercase text before encoding")
    train.add_argument("--context-length", type=int, default=77)
    train.set_defaults(func=_tokenizer_train)

    ex = sub.add_parser("extract", help="offline features into a feature store")
    ex_sub = ex.add_subparsers(dest="what", required=True)
    grid = ex_sub.add_parser(
        "grid", help="CLIP grid features (resumable; accelerate launch shards)"
    )
    grid.add_argument("--backbone", default="default", help="checkpoint, arch name or 'default'")
    grid.add_argument("--images", required=True, help="image folder (or a file listing images)")
    grid.add_argument("--size", default="600x1000", help="input HxW, e.g. 600x1000")
    grid.add_argument("--out", required=True, help="feature store folder")
    grid.add_argument("--batch-size", type=int, default=8)
    grid.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    grid.add_argument("--storage", default="float32", choices=["float32", "float16"])
    grid.add_argument("--num-workers", type=int, default=0)
    grid.add_argument("--cpu", action="store_true", help="force CPU")
    grid.add_argument(
        "--plain",
        action="store_true",
        help="run the tower as trained (default: BatchNorm folded + channels_last, ~1e-6 apart)",
    )
    grid.set_defaults(func=_extract_grid)
    views = ex_sub.add_parser("views", help="36 CLIP view features per viewpoint (R2R camera)")
    views.add_argument("--backbone", default="default", help="checkpoint, arch name or 'default'")
    views.add_argument("--connectivity", required=True, help="Matterport connectivity/ folder")
    views.add_argument(
        "--skyboxes", help="folder of <scan>/matterport_skybox_images/*_skybox_small.jpg"
    )
    views.add_argument("--views", help="instead: pre-rendered views <scan>/<vp>_<ix>.png")
    views.add_argument("--scans", help="comma list (default: scans.txt)")
    views.add_argument("--out", required=True, help="views feature store folder")
    views.add_argument("--camera", default="640x480",
                       help="rendered view size WxH (R2R: 640x480; the houses: 128x96 is plenty)")  # fmt: skip
    views.add_argument("--vfov", type=float, default=60.0, help="vertical field of view, degrees")
    views.add_argument("--workers", type=int, default=0,
                       help="rendering processes per encoding process (0: render in it)")  # fmt: skip
    views.add_argument("--cpu", action="store_true", help="force CPU")
    views.set_defaults(func=_extract_views)
    reg = ex_sub.add_parser("import-regions", help="BUTD TSV / LXMERT TSV / HDF5 regions -> store")
    reg.add_argument("paths", nargs="+", help="region feature files (format auto-detected)")
    reg.add_argument("--out", required=True, help="feature store folder")
    reg.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines")
    reg.add_argument("--storage", default="float32", choices=["float32", "float16"])
    reg.add_argument("--index", help="HDF5 image-id index (.pkl read safely, or .json)")
    reg.set_defaults(func=_import_regions)

    from cliptransfer.engine.task import evaluate_commands, registered  # imports the tasks

    tasks = registered()
    ev = sub.add_parser("evaluate", help="official task metrics on a results file")
    ev_sub = ev.add_subparsers(dest="what", required=True)
    for name, command in evaluate_commands().items():
        p = ev_sub.add_parser(name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(func=_evaluate, evaluate_command=command)

    cmp = sub.add_parser(
        "compare", help="train + score feature settings of a task with one head and budget"
    )
    cmp.add_argument(
        "--task", required=True, choices=[n for n, s in tasks.items() if s.compare is not None]
    )
    cmp.add_argument(
        "--features",
        help="comma list of the task's feature kinds (default: all): clip-grid,bottomup for VQA "
        "and SNLI-VE; clip,supervised,symbolic for VLN",
    )
    cmp.add_argument(
        "--backbones",
        default="default",
        help="CLIP backbones: 'default', arch names, checkpoints or LABEL=PATH (comma list)",
    )
    cmp.add_argument(
        "--init",
        help="vlbert starts (comma list): 'none' (fresh) and/or pretrain/vl.py final/ folders "
        "(LABEL=PATH names them); each becomes model.init_from",
    )
    cmp.add_argument("--seeds", help="comma list of train.seed values: mean ± std per setting")
    cmp.add_argument("--out", help="output folder (default runs/compare-TASK)")
    cmp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task override passed to every setting (repeatable)",
    )
    cmp.add_argument("--config", help="task YAML config passed to every setting")
    cmp.add_argument("--launcher", help='e.g. "accelerate launch --num_processes 2"')
    cmp.add_argument("--script", help="the task script (default: tasks/ of this checkout)")
    cmp.add_argument("--rerun", action="store_true", help="rerun settings that finished earlier")
    cmp.set_defaults(func=_compare)

    add_benchmark_command(sub)
    add_probe_command(sub)

    show = sub.add_parser(
        "show-episode", help="picture of a navigation episode (map, paths, views)"
    )
    show.add_argument("--episodes", required=True, help="R2R JSON or RxR guide JSONL[.gz]")
    show.add_argument("--connectivity", required=True, help="Matterport connectivity/ folder")
    show.add_argument("--instr-id", required=True, help="e.g. 4332_0")
    show.add_argument("--results", help="a results file: draw its trajectory too")
    show.add_argument(
        "--skyboxes", help="folder of <scan>/matterport_skybox_images/: the start views"
    )
    show.add_argument("--out", required=True, help="PNG to write")
    show.set_defaults(func=_show_episode)

    info = sub.add_parser("info", help="load a CLIP checkpoint and print its config")
    info.add_argument("checkpoint", help="OpenAI/open_clip file, HF CLIPModel or project folder")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Our loaders raise these with messages that name the file and record: show just that.
        print(f"cliptransfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
