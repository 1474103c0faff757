"""RAM of V&L pretraining's data loading with `num_workers` 4: the memory-mapped feature store vs
LXMERT's layout (every image's features loaded into a dict in the dataset, copied into each worker;
lxmert issue #37: 207 GB).

    python bench/vlp_loader_memory.py                        # 1000 and 4000 images, 12x20 x 512 fp16
    python bench/vlp_loader_memory.py --images 2000,8000 --channels 2048 --dir /big/tmp

"inputs' own RAM" is the anonymous memory the feature source takes when it is built, before any
worker starts (the store: its index; the dict: every feature, as float32 like LXMERT's loader).
Both sides run the same `VLPDataset` (one item per sentence, MLM masking, ITM swaps) through a
`DataLoader(num_workers=4)` for the same number of items (`--items`, drawn at random over the
whole corpus), so the work done is equal and only the corpus size and the feature source differ:
a worker's heap grows with the batches it has built (allocator high-water, copy-on-write of the
parent's pages as Python touches them), whatever the layout. After the last batch
(workers still alive) it sums the proportional set size of the main process and its 4 workers
from /proc/<pid>/smaps_rollup: anonymous memory (Pss_Anon: heap and copy-on-write pages, each
shared page counted once over its sharers, so the sum is the physical memory used) and, apart,
mapped file pages (Pss_File: the store's shards in the kernel's page cache, shared and
reclaimable). Flat in dataset size = the store's Pss_Anon does not grow from the small to the
large corpus; the in-RAM peer's grows with the features' size (more when workers write to the
pages they share, as Python's reference counts do for small objects).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_features, load_average
from torch.utils.data import DataLoader, RandomSampler

from cliptransfer.heads.question import QuestionConfig, build_question_tokenizer
from cliptransfer.visual.inputs import StoreInputs, grid_boxes
from cliptransfer.visual.store import FeatureStore
from cliptransfer.vlp.corpus import VLPSentence
from cliptransfer.vlp.data import MLMVocab, VLPDataConfig, VLPDataset, collate_vlp

GRID = (12, 20)  # CLIP-ViL_p's RN50 grid at 384x640
CAPTIONS = ["a red circle left of a blue square", "two green stars on a gray background",
            "what color is the large cross?", "how many shapes are there?"]  # fmt: skip


def write_store(root: Path, n: int, channels: int) -> Path:
    cells = GRID[0] * GRID[1]
    meta = {"kind": "grid", "grid_size": list(GRID), "channels": channels, "dtype": "float16"}
    base = np.random.default_rng(0).standard_normal((cells, channels)).astype("float16")
    with FeatureStore.create(root, meta, commit_every=1024) as w:
        for i in range(n):
            w.add(i, base + np.float16(i % 97))
    return root


class InRAM:
    """LXMERT's layout: every image's features in a dict built before the workers fork."""

    def __init__(self, store: FeatureStore) -> None:
        self.features = {k: store[k]["features"] for k in store.ids()}  # fresh float32 copies
        self.spatial = grid_boxes(*GRID)

    def __call__(self, image_id: int | str) -> dict[str, torch.Tensor]:
        return {"features": self.features[str(image_id)], "spatial": self.spatial}


def rollup_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def run_items(inputs, n_images: int, workers: int, batch: int, items: int) -> dict[str, float]:
    tokenizer = build_question_tokenizer(QuestionConfig(max_length=24))
    sentences = [VLPSentence(f"COCO_train2014_{i:012d}", CAPTIONS[(i + j) % 4], "mscoco")
                 for i in range(n_images) for j in range(2)]  # fmt: skip
    ds = VLPDataset(sentences, tokenizer, MLMVocab.of(tokenizer), inputs, {}, VLPDataConfig(),
                    seed=0, train=True)  # fmt: skip
    sampler = RandomSampler(ds, replacement=True, num_samples=items,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    loader = DataLoader(ds, batch, sampler=sampler, num_workers=workers, collate_fn=collate_vlp,
                        persistent_workers=workers > 0)  # fmt: skip
    start = time.perf_counter()
    for _ in loader:
        pass
    seconds = time.perf_counter() - start
    pids = [os.getpid(), *children(os.getpid())]  # workers persist after the last batch
    out = {
        "processes": len(pids),
        "anon_mib": sum(rollup_kib(p, "Pss_Anon") for p in pids) / 1024,
        "file_mib": sum(rollup_kib(p, "Pss_File") for p in pids) / 1024,
        "items_per_s": items / seconds,
    }
    del loader  # stops the workers
    return out


LAYOUTS = {"memory-mapped store": StoreInputs, "in-RAM dict (LXMERT)": InRAM}


def measure_in_fresh_process(store: Path, n: int, layout: str, args: argparse.Namespace) -> dict:
    """One (corpus, layout) in its own interpreter, so no allocation of an earlier measurement
    (a freed dict glibc keeps, another loader's workers) is counted."""
    cmd = [sys.executable, __file__, "--one", f"{store}|{n}|{layout}",
           "--workers", str(args.workers), "--batch", str(args.batch), "--items", str(args.items)]  # fmt: skip
    # Allocations over 64 KiB go straight to mmap and back to the system when freed: without it
    # glibc keeps a worker's freed batch buffers in its heap, and that high-water (hundreds of
    # MiB, varying run to run) would drown what the layouts themselves cost.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "store|images|layout"
    ap.add_argument("--images", default="1000,4000", help="comma list of corpus sizes")
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--items", type=int, default=2048, help="items read per measurement")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a tmp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.one:
        store, n, layout = args.one.split("|")
        before = rollup_kib(os.getpid(), "Pss_Anon")
        inputs = LAYOUTS[layout](FeatureStore.open(store))
        built = (rollup_kib(os.getpid(), "Pss_Anon") - before) / 1024
        got = run_items(inputs, int(n), args.workers, args.batch, args.items)
        print(json.dumps({**got, "inputs_mib": built}))
        return
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="vlp-mem-"))
    cells = GRID[0] * GRID[1]
    print(
        f"{cpu_features()}; {os.cpu_count()} cpus; torch {torch.__version__}; load {load_average()}"
    )
    print(f"{cells} cells x {args.channels} fp16 per image, num_workers {args.workers}, "
          f"{args.items} items per measurement")  # fmt: skip
    rows = []
    try:
        for n in [int(x) for x in args.images.split(",")]:
            store = write_store(root / f"store-{n}", n, args.channels)
            size_mib = n * cells * args.channels * 2 / 2**20
            for name in LAYOUTS:
                rows.append((n, size_mib, name, measure_in_fresh_process(store, n, name, args)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| images | features (fp16) | loader | inputs' own RAM (MiB) | processes | Pss_Anon (MiB) "
          "| Pss_File (MiB) | items/s |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for n, size, name, got in rows:
        print(f"| {n} | {size:.0f} MiB | {name} | {got['inputs_mib']:.0f} | {got['processes']} | "
              f"{got['anon_mib']:.0f} | {got['file_mib']:.0f} | {got['items_per_s']:.0f} |")  # fmt: skip
    by = {(n, name): got["anon_mib"] for n, _, name, got in rows}
    sizes = sorted({n for n, *_ in rows})
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for name in LAYOUTS:
            print(
                f"{name}: Pss_Anon {lo} -> {hi} images: {by[(hi, name)] - by[(lo, name)]:+.0f} MiB"
            )


if __name__ == "__main__":
    main()
