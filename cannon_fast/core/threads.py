"""Thread counts of the kernels and BLAS: how many there are, limiting them, putting them back.

Two pools of threads do not share a core well: OpenBLAS's threads keep spinning
for a while after a product, and an OpenMP kernel started then runs on the cores
they hold as if it had one thread (numba's OpenMP layer alike). So work that
alternates products and kernels runs faster as independent single-threaded
streams, one per core: the survey's worker processes (single-threaded for their
whole life, :func:`limit_threads`), a chunk run in a caller's process with
``n_threads`` (:func:`limited_threads`, which leaves the caller's settings as it
found them), and within one call the batches of a fit, the pixel blocks of
training (:func:`map_in_streams`).
"""
from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["kernel_threads", "limit_threads", "limited_threads", "map_in_streams",
           "stream_count"]


def limit_threads(n, numba=True):
    """Use ``n`` threads in the numba, C/OpenMP and (with threadpoolctl) BLAS kernels.

    Parameters
    ----------
    n : int
        Threads (numba's count is also capped at ``NUMBA_NUM_THREADS``).
    numba : bool, optional
        Set numba's count too. ``False`` for work that runs no numba kernel:
        importing numba and starting its threading layer cost more than such a
        call's work.

    Returns
    -------
    callable
        ``restore()`` puts back the settings found: numba's thread count (of
        this thread: numba keeps one per thread), the C extension's thread cap
        and the threadpool limits (BLAS, OpenMP).
    """
    from . import backends

    undo = []

    def restore():
        while undo:
            undo.pop()()

    try:
        if numba:
            _limit_numba(n, undo)
        ext = getattr(backends, "_ccannon", None)
        if ext is not None and hasattr(ext, "set_num_threads"):
            cap = ext.set_num_threads(n)  # returns the cap it replaces (0: OpenMP's default)
            if cap is not None:
                undo.append(lambda: ext.set_num_threads(cap))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - a dependency
            return restore
        undo.append(threadpool_limits(n).restore_original_limits)
    except BaseException:
        restore()
        raise
    return restore


def _limit_numba(n, undo):
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    undo.append(lambda: numba.set_num_threads(before))


@contextlib.contextmanager
def limited_threads(n, numba=True):
    """Use ``n`` threads (see :func:`limit_threads`) inside the block, then restore them.

    Parameters
    ----------
    n : int
        Threads.
    numba : bool, optional
        As in :func:`limit_threads`.
    """
    restore = limit_threads(n, numba=numba)
    try:
        yield
    finally:
        restore()


def kernel_threads(backend):
    """How many threads a backend's kernels and the BLAS products would use here (at most).

    Parameters
    ----------
    backend : str
        A resolved backend name.

    Returns
    -------
    int
    """
    import os

    n = 1
    if backend == "c":
        from .backends import _ccannon
        n = _ccannon.max_threads()
    elif backend == "numba":
        import numba
        n = numba.get_num_threads()
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - a dependency: assume BLAS uses every core
        return max(n, os.cpu_count() or 1)
    blas = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return max([n] + blas)


def stream_count(backend, n_tasks):
    """How many single-threaded streams to run ``n_tasks`` independent tasks in: 1 or more.

    The kernels' and BLAS's threads (``kernel_threads``), at most one per task; 1
    for the numpy reference, for numba's workqueue threading layer (not safe for
    concurrent calls) and without threadpoolctl (BLAS could not be held to one
    thread).

    Parameters
    ----------
    backend : str
        A resolved backend name.
    n_tasks : int

    Returns
    -------
    int
    """
    if n_tasks < 2 or backend == "numpy":
        return 1
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency
        return 1
    if backend == "numba" and _numba_layer() not in ("omp", "tbb"):
        return 1
    return max(1, min(kernel_threads(backend), n_tasks))


def _numba_layer():
    import numba

    from .backends import kernels

    try:
        return numba.threading_layer()
    except ValueError:  # not chosen until a parallel kernel runs: run a tiny one
        out = np.empty(1)
        kernels("numba").weighted_square_sum(np.zeros((1, 1), np.float32), np.zeros((1, 1)), out)
        return numba.threading_layer()


#: One map_in_streams at a time changes the process's thread limits.
_STREAMS_LOCK = threading.Lock()


def map_in_streams(fn, items, n_streams, backend, scratch=None):
    """``fn(item)`` (or ``fn(item, scratch)``) for every item, results in order.

    With ``n_streams`` > 1, by that many concurrent threads, every kernel and BLAS
    held to one thread for the duration (the process's limits, put back afterwards);
    ``scratch``, one object per stream (work buffers), is lent to one task at a time.
    Otherwise, or while another map holds the limits (two maps changing them at
    once could not put them back), here, one item after another. A generator: the
    limits hold until it is exhausted or closed.

    Parameters
    ----------
    fn : callable
    items : sequence
    n_streams : int
        From ``stream_count``.
    backend : str
        The backend the tasks' kernels use.
    scratch : list, optional
        ``n_streams`` objects, one to each running task (only the first without streams).
    """
    if n_streams > 1 and _STREAMS_LOCK.acquire(blocking=False):
        try:
            yield from _threaded_map(fn, items, n_streams, backend, scratch)
        finally:
            _STREAMS_LOCK.release()
        return
    for item in items:
        yield fn(item) if scratch is None else fn(item, scratch[0])


def _threaded_map(fn, items, n_streams, backend, scratch):
    numba = backend == "numba"
    free = queue.SimpleQueue()
    for s in scratch if scratch is not None else [None] * n_streams:
        free.put(s)

    def task(item):
        if numba:
            import numba as nb
            nb.set_num_threads(1)  # numba's count is per thread: this pool thread's
        s = free.get()
        try:
            return fn(item) if scratch is None else fn(item, s)
        finally:
            free.put(s)

    with limited_threads(1, numba=numba):
        pool = ThreadPoolExecutor(n_streams)
        try:
            yield from pool.map(task, items)
        finally:  # after an error (or an abandoned map) the items not started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
