"""core.threads: single-threaded streams and the thread limits they set and put back."""
import threading
import time

import pytest

from cannon_fast import available_backends
from cannon_fast.core import threads


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "numpy"])
def test_streams_keep_order_lend_each_scratch_once_and_put_limits_back(backend):
    before = threads.kernel_threads(backend)
    in_use, seen, lock = set(), [], threading.Lock()

    def task(item, scratch):
        with lock:
            assert scratch not in in_use  # lent to one running task at a time
            in_use.add(scratch)
            seen.append((item, threads.kernel_threads(backend)))
        time.sleep(0.002 * (item % 3))  # finish out of order
        with lock:
            in_use.discard(scratch)
        return item * item

    got = list(threads.map_in_streams(task, range(12), 2, backend, scratch=["a", "b"]))
    assert got == [i * i for i in range(12)]
    assert all(n == 1 for _, n in seen)  # kernels and BLAS held to one thread inside
    assert threads.kernel_threads(backend) == before
    # an error in a task reaches the caller, the items not started are dropped, and the
    # limits are still put back
    started = []

    def fails_at_5(i):
        started.append(i)
        time.sleep(0.01)
        return 1 // (i - 5)

    with pytest.raises(ZeroDivisionError):
        list(threads.map_in_streams(fails_at_5, range(200), 2, backend))
    assert len(started) < 50
    assert threads.kernel_threads(backend) == before


def test_a_map_while_another_holds_the_limits_runs_here_in_order():
    outer = threads.map_in_streams(lambda i: i, range(4), 2, "c")
    assert next(outer) == 0  # holds the streams' lock until exhausted
    here = threading.get_ident()
    inner = list(threads.map_in_streams(lambda i: (i, threading.get_ident()), range(3), 2, "c"))
    assert inner == [(i, here) for i in range(3)]
    assert list(outer) == [1, 2, 3]


def test_stream_count():
    assert threads.stream_count("numpy", 10) == 1  # the reference runs as it is
    for backend in available_backends():
        assert threads.stream_count(backend, 1) == 1
        assert 1 <= threads.stream_count(backend, 3) <= min(3, threads.kernel_threads(backend))
