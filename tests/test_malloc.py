"""cliptransfer.malloc: the pinned mmap threshold gives freed rollout-sized blocks back to the OS
(glibc's sliding threshold keeps them in the heap), in a child process so that this test
session's allocator is left as it is."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cliptransfer import malloc

CHILD = r"""
import sys, torch
from cliptransfer import malloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "fixed":
    assert malloc.fix_mmap_threshold(1 << 20)
# Free one 16 MiB block (glibc then raises its threshold to 16 MiB), then free a rollout's
# worth of 4 MiB blocks interleaved with small tensors that stay (saved for backward): what
# stays resident is the heap's growth.
big = torch.ones(4 << 20); del big
base = rss()
blocks, kept = [], []
for _ in range(50):
    blocks.append(torch.ones(1 << 20))
    kept.append(torch.ones(1000))
del blocks
print(rss() - base)
"""


@pytest.mark.skipif(malloc._libc() is None, reason="not glibc: mallopt / malloc_trim absent")
def test_fixed_threshold_returns_freed_blocks_that_glibc_keeps():
    def kept(policy: str) -> float:
        out = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return float(out.stdout.split()[-1])

    assert kept("glibc") > 150  # 50 x 4 MiB held on to by the heap
    assert kept("fixed") < 20  # each block unmapped when freed
    assert isinstance(malloc.trim(), bool)
