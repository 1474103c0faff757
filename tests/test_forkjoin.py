"""cliptransfer.forkjoin: tasks on threads that take each other's forked jobs; the encoder's two
directions forked in backward give the same gradients wherever they run."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from cliptransfer import forkjoin
from cliptransfer.forkjoin import fork, run_tasks
from cliptransfer.tasks.vln import encoder as encoder_module
from cliptransfer.tasks.vln.encoder import packed_bilstm


def test_every_task_runs_once_and_an_idle_thread_takes_a_forked_job():
    # Task 0 forks a job and waits until another thread has taken it (thread 1 ends its own
    # short task and then lends itself); task 1 runs on that other thread.
    ran, where = [], {}
    taken = threading.Event()

    def job() -> int:
        where["job"] = threading.get_ident()
        taken.set()
        return 7

    def work(task: int, k: int) -> None:
        ran.append(task)
        where[task] = threading.get_ident()
        if task == 0:
            forked = fork(job)
            assert taken.wait(10)  # not taken back: the idle thread ran it
            assert forked.join() == 7

    run_tasks([0, 1], 2, work)
    assert sorted(ran) == [0, 1]
    assert where["job"] != where[0] and where["job"] == where[1]


def test_a_forked_job_nobody_takes_runs_at_join_and_its_error_reaches_the_caller():
    out = []
    assert fork(lambda: out.append(1) or 5).join() == 5 and out == [1]  # no pool: inline

    def work(task: int, k: int) -> None:
        out.append(fork(lambda: threading.get_ident()).join() == threading.get_ident())
        fork(lambda: 1 / 0).join()

    out.clear()
    with pytest.raises(ZeroDivisionError):
        run_tasks([0], 1, work)  # one thread: nobody else can take the job
    assert out == [True]
    # can_fork: only beside other threads of a pool.
    seen = []
    run_tasks([0], 1, lambda task, k: seen.append(forkjoin.can_fork()))
    run_tasks([0, 1], 2, lambda task, k: seen.append(forkjoin.can_fork()))
    assert seen == [False, True, True] and not forkjoin.can_fork()


def test_a_failing_task_stops_the_others_from_starting_and_is_raised():
    started, setups = [], []

    def work(task: int, k: int) -> None:
        started.append(task)
        if task == 0:
            raise ValueError("task 0 failed on purpose")

    with pytest.raises(ValueError, match="on purpose"):
        run_tasks([0, 1, 2, 3], 1, work, setup=setups.append)
    assert started == [0] and setups == [0]


def test_encoder_directions_forked_to_another_thread_give_the_same_gradients(monkeypatch):
    # Beside another thread the bi-LSTM's directions are autograd islands and the reverse one
    # (its forward and its backward) runs on whichever thread takes it (the idle second thread
    # here: each fork waits until the job is taken); alone (one thread) they are one graph.
    # Outputs and gradients are bit-identical.
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, batch_first=True, bidirectional=True)
    x = torch.randn(4, 7, 6, requires_grad=True)
    lengths = torch.tensor([7, 3, 5, 1])
    ran_on: list[int] = []

    def fork_taken(fn):
        job = forkjoin.fork(lambda: ran_on.append(threading.get_ident()) or fn())
        deadline = time.monotonic() + 10
        while job.pool is not None and job in job.pool.jobs and time.monotonic() < deadline:
            time.sleep(0.001)
        return job

    previous, results, callers = torch.get_num_threads(), [], []
    torch.set_num_threads(1)
    try:
        for threads in (1, 2):
            got: dict = {}
            if threads == 2:
                monkeypatch.setattr(encoder_module, "fork", fork_taken)

            def work(task: int, k: int, got=got) -> None:
                if task == 1:
                    return  # the second thread is idle: it lends itself to task 0's jobs
                callers.append(threading.get_ident())
                packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                           enforce_sorted=False)  # fmt: skip
                out, (h, c) = packed_bilstm(lstm, packed)
                loss = (out.data.sin() * 3).sum() + h.sum() + (c * 0.5).sum()
                got["values"] = (out.data, h, c)
                got["grads"] = torch.autograd.grad(loss, [x, *lstm.parameters()])

            run_tasks([0, 1], threads, work, setup=lambda k: torch.set_num_threads(1))
            results.append(got)
    finally:
        torch.set_num_threads(previous)
    assert len(ran_on) == 2 and callers[1] not in ran_on  # forward and backward, elsewhere
    one, two = results
    for a, b in zip((*one["values"], *one["grads"]), (*two["values"], *two["grads"])):
        assert torch.equal(a, b)
