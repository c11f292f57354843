"""From apStar files and allStar to a normalized training set (steps 1-4 of the lab).

:func:`prepare_dataset` cross-matches the files with the catalogue, applies
the quality cuts (reporting each), reads and masks the survivors' spectra in
a process pool, normalizes them with the numba kernel and appends them in
chunks to a :class:`~cannon_fast.store.SpectraStore`.  A file that cannot be
read is listed, with the reason, and the batch goes on.

The store is built in a hidden temporary directory beside ``out``, marked
complete when the last chunk is in, and only then moved into place (an old
store at ``out`` is kept until the new one exists): an interrupted run leaves
the old store, or nothing, at ``out``, never a partial one.
"""
from __future__ import annotations

import glob
import multiprocessing as mp
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .._util import progress as _progress
from .catalog import select
from ..core.continuum import load_continuum_pixels, normalize
from .files import (AMBIGUOUS_MATCH, LAB_LABELS, NPIX, match_conflicts, match_ids,
                    parse_apstar_path, read_allstar, read_apstar)
from .files import wavelength_grid
from .bitmask import DEFAULT_BAD_BITS, bit_value, mask_spectra
from ..store import SpectraStore

__all__ = ["find_apstar_files", "load_spectra", "prepare_dataset", "PrepareResult",
           "corner_plot"]


def find_apstar_files(root):
    """All ``apStar-*.fits`` files below a directory (sorted), or the file itself.

    Parameters
    ----------
    root : str or os.PathLike

    Returns
    -------
    list of str
    """
    root = os.fspath(root)
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such file or directory")
    return sorted(glob.glob(os.path.join(root, "**", "apStar-*.fits"), recursive=True))


def _load_chunk(args):
    """Worker: read + mask a list of files -> float32 (flux, ivar), metadata, errors."""
    paths, bits, release = args
    n = len(paths)
    flux = np.zeros((n, NPIX))
    err = np.zeros((n, NPIX))     # error 0 marks an unread row bad
    pm = np.zeros((n, NPIX), np.int64)
    ok = np.zeros(n, bool)
    snr = np.full(n, np.nan)
    errors = []
    for i, p in enumerate(paths):
        try:
            s = read_apstar(p, release=release)
            if s.flux.shape != (NPIX,):
                raise ValueError(f"{p}: {s.flux.shape[-1]} pixels, expected the {NPIX}-pixel "
                                 "apStar grid")
            flux[i], err[i], pm[i] = s.flux, s.err, s.pixmask
            ok[i] = True
            snr[i] = float(s.meta.get("snr", np.nan) or np.nan)
        except (ValueError, OSError) as e:
            errors.append((p, str(e)))
    # one vectorized masking pass for the whole chunk
    f, v, _ = mask_spectra(flux, err, pm, bits, dtype=np.float32)
    return f, v, ok, snr, errors


def load_spectra(paths, bits=DEFAULT_BAD_BITS, workers=1, chunk=64, release=None,
                 show_progress=None):
    """Read and mask many apStar files (combined spectra), in parallel.

    Parameters
    ----------
    paths : sequence of str
    bits : iterable of str or int, or int
        PIXMASK bits that make a pixel bad.
    workers : int
        Processes (1 reads in this process).
    chunk : int
        Files per task.
    release : str, optional
        Expected release layout (default: from each file name).
    show_progress : bool, optional

    Returns
    -------
    flux, ivar : ndarray of float32, shape (N, 8575)
        Bad pixels have ``ivar = 0``; unreadable files are all-zero rows.
    ok : ndarray of bool, shape (N,)
    errors : list of (str, str)
        (path, message) for each unreadable file.
    """
    paths = [os.fspath(p) for p in paths]
    bits = bit_value(bits)
    n = len(paths)
    flux = np.zeros((n, NPIX), np.float32)
    ivar = np.zeros((n, NPIX), np.float32)
    ok = np.zeros(n, bool)
    errors = []
    starts = list(range(0, n, chunk))
    tasks = [(paths[a:a + chunk], bits, release) for a in starts]
    bar = _progress(total=n, desc="read", unit="file",
                    disable=None if show_progress is None else not show_progress)
    try:
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context()) as ex:
                for a, res in zip(starts, ex.map(_load_chunk, tasks)):
                    m = len(res[0])
                    flux[a:a + m], ivar[a:a + m], ok[a:a + m] = res[0], res[1], res[2]
                    errors.extend(res[4])
                    bar.update(m)
        else:
            for a, t in zip(starts, tasks):
                res = _load_chunk(t)
                m = len(res[0])
                flux[a:a + m], ivar[a:a + m], ok[a:a + m] = res[0], res[1], res[2]
                errors.extend(res[4])
                bar.update(m)
    finally:
        bar.close()
    return flux, ivar, ok, errors


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` did.

    Attributes
    ----------
    store : SpectraStore
    report : CutReport
        Including the cross-match and the read/normalization losses.
    failures : list of (str, str)
        (file or star, reason) for every star that was dropped by an error.
    n_flagged : int
        Stars kept with a continuum flag (e.g. a missing chip).
    """

    store: SpectraStore
    report: object
    failures: list = field(default_factory=list)
    n_flagged: int = 0


def prepare_dataset(apstar, allstar, out, continuum_pixels, labels=LAB_LABELS, cuts=None,
                    bits=DEFAULT_BAD_BITS, degree=3, workers=1, chunk_size=4096,
                    min_remaining=1, release=None, overwrite=False, show_progress=None,
                    **cut_options):
    """Turn apStar files + allStar into a normalized SpectraStore (cuts, masks, continuum).

    Parameters
    ----------
    apstar : str, os.PathLike or sequence of them
        A directory searched recursively for ``apStar-*.fits``, or files.
    allstar : str, os.PathLike or astropy.table.Table
        The allStar catalogue (only the needed columns are read).
    out : str or os.PathLike
        The store to create.
    continuum_pixels : str, os.PathLike or array_like
        See :func:`cannon_fast.core.continuum.load_continuum_pixels`.
    labels : sequence of str
        Catalogue label columns stored with the spectra (and required by the
        missing-label cut).
    cuts : list of Cut, optional
        Default: the lab's cuts (:func:`cannon_fast.apogee.catalog.lab_cuts`) with
        ``cut_options`` (``snr_min=``, ``logg_max=``, ``teff_max=``, ``feh_min=``,
        ``keep_missing=`` to keep stars with some labels missing, ``flags=`` to
        cut on named ASPCAPFLAG/STARFLAG bits).
    bits : iterable of str or int, or int
        PIXMASK bits that make a pixel bad.
    degree : int
        Continuum Chebyshev degree.
    workers : int
        Reader processes.
    chunk_size : int
        Stars normalized and appended per chunk.
    min_remaining : int
        Fail (listing the per-cut counts) if fewer stars pass the cuts.
    release : str, optional
        Expected apStar layout.
    overwrite : bool
        Replace an existing store (only once the new one is complete).
    show_progress : bool, optional

    Returns
    -------
    PrepareResult
    """
    from astropy.table import Table

    out = os.fspath(out)
    _check_out(out, overwrite)
    if isinstance(apstar, (str, os.PathLike)):
        paths = find_apstar_files(apstar)
    else:
        paths = [os.fspath(p) for p in apstar]
    if not paths:
        raise FileNotFoundError(f"no apStar files found in {apstar}")
    cont = load_continuum_pixels(continuum_pixels)
    failures = []
    ids, tels, flds, keep_paths = [], [], [], []
    for p in paths:
        try:
            _, sid, tel, fld = parse_apstar_path(p)
        except ValueError as err:
            failures.append((p, str(err)))
            continue
        ids.append(sid)
        tels.append(tel)
        flds.append(fld)
        keep_paths.append(p)
    cat = allstar if isinstance(allstar, Table) else read_allstar(
        allstar, labels=labels, optional=("ASPCAPFLAG", "STARFLAG"))  # for flag cuts
    idx = match_ids(cat, ids, tels, flds, labels=labels)
    found = idx >= 0
    for i in np.flatnonzero(~found):
        failures.append((keep_paths[i], match_conflicts(cat, ids[i], labels)
                         if idx[i] == AMBIGUOUS_MATCH
                         else f"star {ids[i]} is not in the allStar catalogue"))
    rows = cat[idx[found]]
    if cuts is None:
        cut_options.setdefault("labels", labels)
    keep, report = select(rows, cuts=cuts, min_remaining=min_remaining, **cut_options)
    n_files = len(paths)
    n_ambiguous = int(np.sum(idx == AMBIGUOUS_MATCH))
    report.rows.insert(0, dict(name="no_catalog_match", description="not in allStar or bad name",
                               fails=n_files - n_ambiguous - int(found.sum()),
                               removed=n_files - n_ambiguous - int(found.sum()),
                               remaining=int(found.sum()) + n_ambiguous))
    if n_ambiguous:  # repeated IDs whose tied rows disagree: which labels are right is unknown
        report.rows.insert(1, dict(name="ambiguous_catalog_match",
                                   description="repeated APOGEE_ID, tied rows with other labels",
                                   fails=n_ambiguous, removed=n_ambiguous,
                                   remaining=int(found.sum())))
    report.n_input = n_files
    sel_paths = [p for p, f in zip(np.asarray(keep_paths, object)[found], keep) if f]
    sel_rows = rows[keep]
    sel_labels = np.column_stack([np.asarray(sel_rows[c], float) for c in labels]) \
        if len(labels) else np.zeros((len(sel_rows), 0))
    sel_errors = np.column_stack(
        [np.asarray(sel_rows[f"{c}_ERR"], float) if f"{c}_ERR" in sel_rows.colnames
         else np.full(len(sel_rows), np.nan) for c in labels]) \
        if len(labels) else np.zeros((len(sel_rows), 0))
    sel_ids = np.asarray(sel_rows["APOGEE_ID"]).astype(str)
    meta = dict(source="cannon_fast.prepare_dataset", n_files=n_files,
                allstar=getattr(cat, "meta", {}).get("path"), release=release,
                bad_bits=int(bit_value(bits)), continuum_degree=int(degree),
                n_continuum_pixels=int(cont.sum()), continuum_pixels=np.flatnonzero(cont).tolist())
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".prepare",
                            dir=parent)
    try:
        store = SpectraStore.create(os.path.join(work, "new"), wavelength_grid(), labels,
                                    id_width=max([40] + [len(s) for s in sel_ids]), meta=meta,
                                    complete=False)
        n_flagged = _fill_store(store, report, failures, sel_paths, sel_ids, sel_labels,
                                sel_errors, cont, bits, degree, workers, chunk_size, release,
                                show_progress)
        store.mark_complete()
        _check_out(out, overwrite)   # something may have appeared at out meanwhile
        _swap_into_place(store.path, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(SpectraStore(out), report, failures, n_flagged)


def _check_out(out, overwrite):
    """Refuse an existing ``out`` unless ``overwrite`` and it is a SpectraStore to replace."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out}: already exists (use --overwrite to replace it)")
    if not os.path.isfile(os.path.join(out, "index.json")):
        raise FileExistsError(f"{out}: exists and is not a SpectraStore; refusing to replace it")


def _swap_into_place(new, out, work):
    """Move the finished store ``new`` to ``out``; an old ``out`` goes only once ``new`` can."""
    old = os.path.join(work, "old")
    had_old = os.path.lexists(out)
    if had_old:
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if had_old:
            os.rename(old, out)
        raise


def _fill_store(store, report, failures, sel_paths, sel_ids, sel_labels, sel_errors, cont, bits,
                degree, workers, chunk_size, release, show_progress):
    """Read, normalize and append the selected stars in chunks; returns the flagged count."""
    n_unreadable = n_failed = n_flagged = 0
    for a in range(0, len(sel_paths), chunk_size):
        b = min(a + chunk_size, len(sel_paths))
        flux, ivar, ok, errors = load_spectra(sel_paths[a:b], bits, workers, release=release,
                                              show_progress=show_progress)
        failures.extend(errors)
        n_unreadable += int((~ok).sum())
        ns = normalize(flux, ivar, cont, degree=degree)
        dead = ok & ((ns.chip_status != 0).all(axis=1))
        for i in np.flatnonzero(dead):
            failures.append((sel_paths[a + i], f"star {sel_ids[a + i]}: continuum normalization "
                             f"failed on every chip ({', '.join(ns.flag_names(i))})"))
        n_failed += int(dead.sum())
        use = ok & ~dead
        n_flagged += int(np.sum(use & (ns.flags != 0)))
        store.append(ns.flux[use], ns.ivar[use], sel_labels[a:b][use], sel_ids[a:b][use],
                     ns.flags[use], label_errors=sel_errors[a:b][use])
    remaining = report.n_kept
    for name, desc, n in (("unreadable", "apStar file unreadable or wrong layout", n_unreadable),
                          ("normalization_failed", "no chip could be normalized", n_failed)):
        remaining -= n
        report.rows.append(dict(name=name, description=desc, fails=n, removed=n,
                                remaining=remaining))
    store.update_meta(cut_report=report.as_dict(), failures=[list(f) for f in failures],
                      n_continuum_flagged=n_flagged)
    return n_flagged


def corner_plot(labels, label_names, path, **kwargs):
    """Corner plot of the kept labels (``corner`` package), saved to ``path``.

    Parameters
    ----------
    labels : array_like, shape (N, L)
    label_names : sequence of str
    path : str or os.PathLike
    **kwargs
        Passed to ``corner.corner``.

    Returns
    -------
    str
        The path written.
    """
    try:
        import corner
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ValueError("the corner plot needs the 'corner' package (pip install corner)") from err
    import matplotlib.pyplot as plt

    lab = np.asarray(labels, float)
    fig = corner.corner(lab, labels=list(label_names), **kwargs)
    try:
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)
    return os.fspath(path)
