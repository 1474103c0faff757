"""glibc malloc policies for CPU processes (no-ops returning False elsewhere).

PyTorch's CPU allocator is the C library's malloc. glibc serves blocks of 128 KiB and more as
fresh mmaps at first, but raises that threshold (up to 32 MiB) each time such a block is freed,
so after one training step the per-step tensors of a few MiB come from the heap, which keeps
what it once held. `fix_mmap_threshold` pins the threshold (blocks above it go back to the OS
when freed, and are zero-filled by the kernel again when reallocated), `trim` returns the heap's
free pages after a large one-off build, and `keep_freed_memory` is the opposite policy for speed
benchmarks: nothing is ever given back, so no page is zero-filled twice.

Measured on navigation training (bench/vln_train.py, R2R-EnvDrop's setting, two threads, 2-core
Zen 3 VM, stop 31): with glibc's sliding threshold the rollouts' blocks of 2-10 MiB (the
(B, 36, D) views, the stashed step inputs, the gradient products) come from the heap and leave
holes there: peak RSS 1,477-1,492 MiB. Pinned at 2 MiB (`--malloc fixed`): 1,389-1,403 MiB
(1.46-1.47 GB), but each such block is then fresh pages to fault in and zero, ~600 MB per
iteration: 29-34 ms per decision step where the sliding threshold took 24-28 in the same
minutes (1 MiB costs more; session 21, older code: 98 -> 220 ms per step at 1 MiB).
tasks/vln.py therefore keeps glibc's default.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["fix_mmap_threshold", "keep_freed_memory", "single_arena", "trim"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold(nbytes: int = 2 << 20) -> bool:
    """Serve every block of `nbytes` or more by mmap and unmap it when freed (mallopt
    M_MMAP_THRESHOLD, which also stops glibc from raising it)."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def single_arena() -> bool:
    """Serve every thread from the main heap (mallopt M_ARENA_MAX = 1, as MALLOC_ARENA_MAX=1):
    glibc otherwise gives each new thread that allocates its own heap, which keeps its own
    freed memory (the follower's rollout threads: +150 MB peak RSS, bench/vln_train.py)."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_ARENA_MAX, 1))


def trim() -> bool:
    """Give the heap's free pages back to the OS (malloc_trim(0)); True if any were."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never give freed memory back (mallopt
    M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = SIZE_MAX, as MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=18446744073709551615): no page is zero-filled twice. Call before any
    large allocation."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1))
