"""Thread limits for the survey's chunks, and putting back what was there before.

One single-threaded worker process per core beats threads inside one process:
much of a chunk's work (copies, masks, the LM fits) is serial. So the survey's
own worker processes run single-threaded for their whole life
(:func:`limit_threads`), while a chunk run in a caller's process
(``process_chunk`` with ``n_threads``) limits the threads only while it runs
(:func:`limited_threads`) and leaves the caller's settings as it found them.
"""
from __future__ import annotations

import contextlib

__all__ = ["limit_threads", "limited_threads"]


def limit_threads(n):
    """Use ``n`` threads in the numba, C/OpenMP and (with threadpoolctl) BLAS kernels.

    Parameters
    ----------
    n : int
        Threads (numba's count is also capped at ``NUMBA_NUM_THREADS``).

    Returns
    -------
    callable
        ``restore()`` puts back the settings found: numba's thread count (of
        this thread: numba keeps one per thread), the C extension's thread cap
        and the threadpool limits (BLAS, OpenMP).
    """
    import numba

    from ..core import backends

    undo = []

    def restore():
        while undo:
            undo.pop()()

    try:
        before = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        undo.append(lambda: numba.set_num_threads(before))
        ext = getattr(backends, "_ccannon", None)
        if ext is not None and hasattr(ext, "set_num_threads"):
            cap = ext.set_num_threads(n)  # returns the cap it replaces (0: OpenMP's default)
            if cap is not None:
                undo.append(lambda: ext.set_num_threads(cap))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - optional
            return restore
        undo.append(threadpool_limits(n).restore_original_limits)
    except BaseException:
        restore()
        raise
    return restore


@contextlib.contextmanager
def limited_threads(n):
    """Use ``n`` threads (see :func:`limit_threads`) inside the block, then restore them.

    Parameters
    ----------
    n : int
        Threads.
    """
    restore = limit_threads(n)
    try:
        yield
    finally:
        restore()
