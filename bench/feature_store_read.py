"""Random-read throughput of the feature store vs one `.npy` file per image (CLIP-ViL/MMF layout).

    python bench/feature_store_read.py                 # 5000 x (18*31) x 256 fp16, ~1.4 GB each
    python bench/feature_store_read.py --images 20000 --channels 2048 --dir /big/tmp

Both layouts hold the same records and are read in the same random order, each read returning a
float32 (N, C) tensor. A warm-up pass puts both in the page cache first (dropping it needs root),
so this measures the per-read cost (open/parse/close vs a slice of a mapped shard), not the disk.
Memory: private (anonymous) RSS after reading every record of a small and a large store shows
that the store's own memory is flat in dataset size; the mapped page-cache pages it touched
(RssFile) are shared with the kernel's cache and reclaimable, reported separately.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cliptransfer.visual.store import FeatureStore


def write_layouts(root: Path, n: int, tokens: int, channels: int, dtype: str) -> tuple[Path, Path]:
    """The same n records (tokens, channels) as a store and as one .npy per image."""
    store_dir, npy_dir = root / f"store-{n}", root / f"npy-{n}"
    npy_dir.mkdir(parents=True)
    base = np.random.default_rng(0).standard_normal((tokens, channels)).astype(dtype)
    meta = {"kind": "grid", "grid_size": [1, tokens], "channels": channels, "dtype": dtype}
    with FeatureStore.create(store_dir, meta, commit_every=1024) as w:
        for i in range(n):
            x = base + np.asarray(i % 97, dtype=dtype)  # cheap distinct records
            w.add(i, x)
            np.save(npy_dir / f"{i}.npy", x)
    return store_dir, npy_dir


def memory_kb() -> dict[str, int]:
    """RssAnon / RssFile of this process in kB (Linux); ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        out = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
        return out
    import resource

    return {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def read_all(read, order: np.ndarray) -> float:
    t = time.perf_counter()
    checksum = 0.0
    for i in order:
        checksum += float(read(int(i))[0, 0])  # touch the result so nothing is skipped
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--small", type=int, default=1000, help="second dataset size for memory")
    p.add_argument("--tokens", type=int, default=18 * 31, help="records are (tokens, channels)")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the temporary layouts")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fp16->fp32 casts)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        return run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> dict[str, float]:
    item_mb = args.tokens * args.channels * np.dtype(args.dtype).itemsize / 2**20
    print(f"records: ({args.tokens}, {args.channels}) {args.dtype} = {item_mb:.2f} MB each")
    results: dict[str, float] = {}
    for n in sorted({args.small, args.images}):
        t = time.perf_counter()
        store_dir, npy_dir = write_layouts(root, n, args.tokens, args.channels, args.dtype)
        print(f"wrote {n} images x 2 layouts ({2 * n * item_mb / 1024:.2f} GB) in "
              f"{time.perf_counter() - t:.1f} s")  # fmt: skip
        order = np.random.default_rng(1).permutation(n)
        before = memory_kb()
        store = FeatureStore.open(store_dir)

        def read_store(i: int, store: FeatureStore = store) -> torch.Tensor:
            return store[i]["features"]

        def read_npy(i: int, d: Path = npy_dir) -> torch.Tensor:
            return torch.from_numpy(np.load(d / f"{i}.npy")).float()

        read_all(read_store, order)  # warm-up pass: every record read once, page cache hot
        after = memory_kb()
        for key in before:
            results[f"{key}_delta_kb@{n}"] = after[key] - before[key]
        print(f"  memory after reading all {n} records from the store: "
              + ", ".join(f"{k} +{after[k] - before[k]} kB" for k in before))  # fmt: skip
        if n != args.images:
            del store
            shutil.rmtree(store_dir)
            shutil.rmtree(npy_dir)
            continue
        read_all(read_npy, order)
        times = {"store": 0.0, "npy": 0.0}
        for _ in range(args.passes):  # interleaved, so load changes hit both alike
            times["store"] += read_all(read_store, order)
            times["npy"] += read_all(read_npy, order)
        for name, sec in times.items():
            results[f"{name}_samples_per_s"] = n * args.passes / sec
        ratio = results["store_samples_per_s"] / results["npy_samples_per_s"]
        results["ratio"] = ratio
        print(f"random reads, {args.passes} passes of {n}: store "
              f"{results['store_samples_per_s']:.0f}/s, one .npy per image "
              f"{results['npy_samples_per_s']:.0f}/s -> {ratio:.1f}x (target >= 2x)")  # fmt: skip
    keys = [k for k in results if k.startswith("RssAnon")]
    if len(keys) == 2:
        print(f"private memory growth, {args.small} vs {args.images} images: "
              f"{results[keys[0]]} kB vs {results[keys[1]]} kB")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
