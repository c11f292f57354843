"""Small helpers shared by every layer: atomic writes, progress bars, input checks."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import numpy as np

__all__ = ["atomic_path", "progress", "quiet", "as_float64", "describe_bad", "cache_root",
           "key_rows"]


def cache_root():
    """Root of cannon_fast's caches: ``$CANNON_FAST_CACHE`` or ``~/.cache/cannon_fast``."""
    env = os.environ.get("CANNON_FAST_CACHE")
    return env if env else os.path.join(os.path.expanduser("~"), ".cache", "cannon_fast")


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory, so the final ``os.replace``
    is atomic: a reader sees either the old file or the complete new one,
    never a half-written file, even if the writer is killed.

    Parameters
    ----------
    path : str or os.PathLike
        The final destination.
    suffix : str, optional
        Suffix for the temporary name (some writers choose a format from it);
        defaults to the destination's own suffix.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix + ".part"
                               if suffix else ".part", dir=directory)
    os.close(fd)
    os.unlink(tmp)  # writers (fitsio, np.savez) want to create the file themselves
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: Set by :func:`quiet`: progress bars off unless a caller asks for them explicitly.
_QUIET = False


@contextlib.contextmanager
def quiet():
    """Turn progress bars off inside the block (``cannon-fast -q``); restored on exit.

    Unlike setting ``CANNON_FAST_PROGRESS=0``, this changes nothing outside
    the block: not the environment, not child processes started after it.
    A caller that passes ``disable=False`` to :func:`progress` still gets its bar.
    """
    global _QUIET
    before, _QUIET = _QUIET, True
    try:
        yield
    finally:
        _QUIET = before


def progress(iterable=None, total=None, desc=None, unit="it", disable=None, **kwargs):
    """Return a tqdm progress bar that stays quiet when stderr is not a terminal.

    Set ``CANNON_FAST_PROGRESS=1`` to force bars on (e.g. in a log file),
    ``=0`` to force them off; inside :func:`quiet` they are off either way.
    """
    from tqdm.auto import tqdm

    if disable is None and _QUIET:
        disable = True
    if disable is None:
        env = os.environ.get("CANNON_FAST_PROGRESS")
        disable = (env == "0") if env is not None else not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                dynamic_ncols=True, **kwargs)


def as_float64(x, name, ndim=None):
    """Return ``x`` as a C-contiguous float64 array, checking its dimensionality."""
    arr = np.ascontiguousarray(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    return arr


def describe_bad(mask, row_name="star", col_name="pixel", limit=5):
    """Describe where a boolean (N, P) mask is True, e.g. ``star 3 pixels 10-12``."""
    rows = np.flatnonzero(mask.any(axis=1)) if mask.ndim == 2 else np.flatnonzero(mask)
    parts = []
    for r in rows[:limit]:
        if mask.ndim == 2:
            cols = np.flatnonzero(mask[r])
            parts.append(f"{row_name} {r} ({len(cols)} {col_name}s, {_ranges(cols)})")
        else:
            parts.append(f"{row_name} {r}")
    more = len(rows) - limit
    return "; ".join(parts) + (f"; and {more} more {row_name}s" if more > 0 else "")


def _ranges(idx, limit=3):
    """Compress sorted indices to 'a-b, c' ranges (at most ``limit`` of them)."""
    if len(idx) == 0:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            out.append((start, prev))
            start = i
        prev = i
    out.append((start, prev))
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out[:limit])
    return text + (", ..." if len(out) > limit else "")


def key_rows(keys, query):
    """Where each query value occurs among ``keys``: the one place identifiers are matched.

    Parameters
    ----------
    keys : array_like, (N,)
        Identifiers (strings or integers) of one set; may repeat.
    query : array_like, (M,)
        Identifiers to look up.

    Returns
    -------
    order : ndarray of int64, (N,)
        A stable sort of ``keys``.
    lo, hi : ndarray of int64, (M,)
        ``order[lo[i]:hi[i]]`` are the rows of ``keys`` equal to ``query[i]``
        (empty when absent; more than one when the key repeats).
    """
    keys = np.asarray(keys)
    query = np.asarray(query)
    if keys.dtype.kind in "US" or query.dtype.kind in "US":
        keys, query = keys.astype(str), query.astype(str)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    lo = np.searchsorted(sorted_keys, query, side="left")
    hi = np.searchsorted(sorted_keys, query, side="right")
    return order.astype(np.int64), lo.astype(np.int64), hi.astype(np.int64)
