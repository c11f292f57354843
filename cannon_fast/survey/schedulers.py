"""Where a job's chunks run: in this process, in a pool of worker processes, or on Dask.

Every scheduler takes the chunks still to do as ``(k, reader)`` pairs and calls
``done(k, columns)`` in this process for each chunk it finishes, in whatever
order they finish. The driver commits the chunk there, whichever scheduler ran
it, so a job started with one scheduler can be resumed with another.
"""
from __future__ import annotations

import os
import time

from ..core.threads import limit_threads
from .chunk import _fit_chunk, keep_buffers, process_chunk, reused_buffers

__all__ = ["run_chunks"]


def run_chunks(model, chunks, options, done, scheduler=None, n_workers=None,
               name="cannon-fast-chunk"):
    """Fit every chunk with the chosen scheduler.

    Parameters
    ----------
    model : CannonModel
    chunks : iterable of (int, reader)
        Chunk number and its reader (``_Source.chunk``), in the order to start them.
    options : dict
        See :func:`cannon_fast.survey.process_chunk`.
    done : callable
        ``done(k, columns)``, called in this process for every finished chunk.
    scheduler : None, "processes", "dask", str or distributed.Client
        See :func:`cannon_fast.survey.label_survey`.
    n_workers : int, optional
        Processes of the pool or of the local Dask cluster (default: the CPU count).
    name : str
        Prefix of the Dask task keys (``{name}-{k:06d}``).
    """
    if scheduler is None:
        _run_here(model, chunks, options, done)
    elif scheduler == "processes":
        _run_pool(model, chunks, options, done, n_workers)
    else:
        _run_dask(model, chunks, options, done, scheduler, n_workers, name)


def _run_here(model, chunks, options, done):
    """Fit the chunks in this process, reading the next one in a thread meanwhile."""
    # the copies and the numba/BLAS kernels release the GIL, so the read overlaps the fit
    from concurrent.futures import ThreadPoolExecutor

    chunks = iter(chunks)
    with ThreadPoolExecutor(1) as pool, reused_buffers():
        item = next(chunks, None)
        reading = pool.submit(item[1].read) if item is not None else None
        while item is not None:
            k = item[0]
            data = reading.result()
            item = next(chunks, None)
            if item is not None:
                reading = pool.submit(item[1].read)
            done(k, _fit_chunk(model, data, options))
            del data


def _run_pool(model, chunks, options, done, n_workers):
    """Fit the chunks in a pool of single-threaded worker processes (spawned)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    n = int(n_workers or os.cpu_count() or 1)
    chunks = iter(chunks)
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"),
                             initializer=_pool_init, initargs=(model, 1, os.getpid())) as pool:
        running = {}

        def submit_next():
            item = next(chunks, None)
            if item is not None:
                running[pool.submit(_pool_chunk, item[1], options)] = item[0]

        for _ in range(2 * n):  # a bounded number of chunks in flight
            submit_next()
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    k = running.pop(fut)
                    done(k, fut.result())
                    submit_next()
        except BaseException:
            for fut in running:
                fut.cancel()
            raise


_WORKER_MODEL = None


#: Seconds between a pool worker's checks that the driver is still alive (without prctl).
_PARENT_CHECK_INTERVAL = 1.0


def _pool_init(model, n_threads, parent_pid=None):
    """Initialize a process-pool worker: receive the model once, limit its threads.

    The worker also ends when the driver does: a driver killed with SIGKILL runs
    no clean-up, and its workers (each holding a model and a chunk) would
    otherwise run on, orphaned.
    """
    global _WORKER_MODEL
    _WORKER_MODEL = model
    limit_threads(n_threads)  # for the worker's life: the process is the survey's own
    keep_buffers()  # likewise: its chunks normalize into the same two buffers
    if parent_pid is not None:
        _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid):
    """End this process when ``parent_pid`` dies (a signal on Linux, else a watchdog thread)."""
    import signal
    import sys
    import threading

    signalled = False
    if sys.platform.startswith("linux"):
        try:  # the kernel sends SIGKILL to this process when its parent exits
            import ctypes
            pr_set_pdeathsig = 1
            signalled = ctypes.CDLL(None, use_errno=True).prctl(
                pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the signal was set up
        os._exit(1)
    if signalled:
        return

    def watch():  # elsewhere: poll (a worker inside a long kernel call exits after it)
        while True:
            time.sleep(_PARENT_CHECK_INTERVAL)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="cannon-fast-parent-watch", daemon=True).start()


def _pool_chunk(reader, options):
    """Process one chunk in a process-pool worker with the model it received at start."""
    return _fit_chunk(_WORKER_MODEL, reader.read(), options)


def _run_dask(model, chunks, options, done, scheduler, n_workers, name):
    """Fit the chunks as Dask tasks; each worker reads its own chunk, retried twice."""
    client, owned, threads = _start_dask(scheduler, n_workers)
    try:
        from distributed import as_completed

        opts = dict(options, n_threads=threads)
        model_f = client.scatter(model, broadcast=True)
        chunks = list(chunks)
        futures = [client.submit(process_chunk, model_f, reader, opts, key=f"{name}-{k:06d}",
                                 retries=2) for k, reader in chunks]
        index = {f.key: k for f, (k, _) in zip(futures, chunks)}
        for fut, cols in as_completed(futures, with_results=True):
            done(index[fut.key], cols)
            fut.release()
    finally:
        for obj in owned:
            obj.close()


def _start_dask(scheduler, n_workers):
    """(client, owned objects, threads per worker) for a scheduler spec."""
    try:
        import distributed
    except ImportError:
        raise ValueError("the Dask backend needs dask[distributed] "
                         "(pip install 'cannon_fast[dask]')") from None
    if isinstance(scheduler, distributed.Client):
        return scheduler, [], None
    if scheduler == "dask":
        n = int(n_workers or os.cpu_count() or 1)
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        return client, [client, cluster], 1
    client = distributed.Client(scheduler)
    return client, [client], None
