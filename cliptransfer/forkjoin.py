"""Threads that run a list of tasks and lend themselves to each other's independent sub-jobs
(fork / join), with a result that does not depend on which thread ran what.

Why: a training step's rollouts run side by side, one per thread (tasks.vln.lanes), and they
are unequal: the A2C rollout walks longer than the imitation one, so one thread idles at the
end while the other finishes alone. Near its end that rollout does work that splits into
independent halves (the two directions of the instruction encoder's backward): `fork` offers
one half to an idle thread while the caller does the other, and `Forked.join` takes it back
and runs it on the caller when no thread took it. Each job computes the same thing wherever it
runs (one intra-op thread per thread), so the numbers never depend on the timing.

Outside `run_tasks` (one thread, or no pool) a forked job simply runs at `join`.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Forked", "can_fork", "fork", "run_tasks"]

_local = threading.local()  # .pool: the calling thread's `_Pool`, while it runs tasks


class Forked:
    """A job offered to the pool's idle threads; `join()` returns its result (running it on
    the calling thread when no other thread took it)."""

    def __init__(self, fn: Callable[[], Any], pool: _Pool | None) -> None:
        self.fn, self.pool = fn, pool
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # re-raised by join, on the thread that forked it
            self.error = e
        finally:
            self.done.set()

    def join(self) -> Any:
        if self.pool is None or self.pool.take_back(self):
            self.run()
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


def fork(fn: Callable[[], Any]) -> Forked:
    """Offer fn() to the calling thread's pool (an idle thread may run it); `join` it. fn runs
    in that thread's state: it sets what it needs (grad mode, autocast) itself."""
    pool = getattr(_local, "pool", None)
    job = Forked(fn, pool)
    if pool is not None:
        pool.offer(job)
    return job


def can_fork() -> bool:
    """Whether the calling thread runs in `run_tasks` beside other threads (that may take a
    forked job): work that costs something to split can run whole when not."""
    pool = getattr(_local, "pool", None)
    return pool is not None and pool.threads > 1


class _Pool:
    """Tasks not started, forked jobs not taken, and the tasks running, under one condition."""

    def __init__(self, order: Sequence[int], threads: int) -> None:
        self.threads = threads
        self.cond = threading.Condition()
        self.pending = collections.deque(order)
        self.jobs: collections.deque[Forked] = collections.deque()
        self.running = 0
        self.errors: list[BaseException] = []

    def next(self) -> Forked | int | None:
        """A forked job (first: it unblocks a running task), else a task, else None once every
        task has ended (or one failed); waits while others run and nothing is offered."""
        with self.cond:
            while True:
                if self.jobs:
                    return self.jobs.popleft()
                if self.errors:
                    return None
                if self.pending:
                    self.running += 1
                    return self.pending.popleft()
                if not self.running:
                    return None
                self.cond.wait()

    def ended(self, error: BaseException | None) -> None:
        with self.cond:
            self.running -= 1
            if error is not None:
                self.errors.append(error)
            self.cond.notify_all()

    def offer(self, job: Forked) -> None:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify()

    def take_back(self, job: Forked) -> bool:
        """True when no thread took `job` (it is withdrawn: the caller runs it)."""
        with self.cond:
            if job in self.jobs:
                self.jobs.remove(job)
                return True
            return False


def run_tasks(order: Sequence[int], threads: int, work: Callable[[int, int], None],
              setup: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """work(task, k) for every task in `order` (started in that order) on `threads` threads,
    k the thread's index (0: the calling thread), after setup(k) on each; each thread also runs
    jobs forked by the others. The first error is re-raised here after every thread stopped."""
    pool = _Pool(order, threads)

    def thread(k: int) -> None:
        _local.pool = pool
        try:
            if setup is not None:
                setup(k)
            while (item := pool.next()) is not None:
                if isinstance(item, Forked):
                    item.run()
                    continue
                error = None
                try:
                    work(item, k)
                except BaseException as e:
                    error = e
                pool.ended(error)
        finally:
            _local.pool = None

    helpers = [threading.Thread(target=thread, args=(k,), daemon=True) for k in range(1, threads)]
    try:
        for t in helpers:
            t.start()
        thread(0)
    finally:
        for t in helpers:
            t.join()
    if pool.errors:
        raise pool.errors[0]
