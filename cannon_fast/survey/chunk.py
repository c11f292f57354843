"""One chunk of the survey: mask, normalize and fit its spectra into catalogue columns.

:func:`process_chunk` is the whole step for a reader of :mod:`.inputs`; it is
what a Dask worker runs. Every spectrum gives one row, also when it cannot be
used: a flag bit of :data:`SURVEY_FLAGS` and a ``REASON`` say why.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from ..core.errors import model_error_part
from ..core.fitting import BAD_FLAGS, WARNING_FLAGS
from ..core.grid import segment_index
from ..core.fitting import FLAGS as _FIT_FLAG_BITS
from ..core.threads import limited_threads

__all__ = ["SURVEY_FLAGS", "ALL_FLAGS", "process_chunk", "reused_buffers"]

#: Flag bits the survey runner adds to the fit's (``FitResult.FLAGS``, bits below 2**16) in
#: the catalogue's ``FLAGS`` column.
SURVEY_FLAGS = {"READ_FAILED": 1 << 16, "NORMALIZATION_FAILED": 1 << 17,
                "CONTINUUM_WARNING": 1 << 18}
#: Stars per call to the fit inside a chunk: a multiple of the fit's own batch (512), so
#: the batches and hence the results do not depend on this number.
_FIT_SLICE = 1024
#: Every bit of the catalogue's ``FLAGS`` column: the fit's, then the survey runner's.
ALL_FLAGS = {**_FIT_FLAG_BITS, **SURVEY_FLAGS}


#: This thread's normalized-spectra buffers while ``reused_buffers`` is on (None: off).
_KEPT = threading.local()


@contextmanager
def reused_buffers():
    """Within: this thread's chunks normalize into two buffers kept from chunk to chunk.

    Fresh (chunk, P) arrays cost their first-touch page faults in every chunk (~0.1 s
    per 8192 stars of 8575 pixels, a twentieth of the job); the buffers are released at
    the end. For a job's own loops (in-process, a pool worker), where each chunk's
    normalized spectra are done with before the next chunk starts.
    """
    _KEPT.arrays = ()
    try:
        yield
    finally:
        _KEPT.arrays = None


def keep_buffers():
    """``reused_buffers`` for the rest of this thread's life (a pool worker's)."""
    _KEPT.arrays = ()


def _out_buffers(n, p):
    """(flux, ivar) float32 (n, P) buffers of this thread, or None if not reusing."""
    kept = getattr(_KEPT, "arrays", None)
    if kept is None:
        return None
    if not kept or kept[0].shape[0] < n or kept[0].shape[1] != p:
        kept = (np.empty((n, p), np.float32), np.empty((n, p), np.float32))
        _KEPT.arrays = kept
    return kept[0][:n], kept[1][:n]


def _mask_raw(flux, ivar, bitmask, bits, segments=None):
    """Zero the weight (in place) of bad pixels of raw (flux, ivar) with PIXMASK bits.

    The same pixels as :func:`cannon_fast.apogee.bitmask.quality_mask` (flagged
    bits, non-finite flux or ivar, ivar <= 0, off-chip), from ivar instead
    of the error. ``segments`` (another grid's pixel ranges) marks the pixels
    outside them as off-chip. A label job does not call this: its normalization
    (``normalize(..., bitmask=)``) leaves out the same pixels as it reads them.
    """
    from ..apogee.files import NPIX, on_chip_mask

    with np.errstate(invalid="ignore"):
        bad = ~(ivar > 0) | ~np.isfinite(ivar) | ~np.isfinite(flux)
    if bitmask is not None:
        if bitmask.dtype.kind in "iu" and 0 <= bits <= np.iinfo(bitmask.dtype).max:
            bad |= (bitmask & bitmask.dtype.type(bits)) != 0  # no int64 copy of the chunk
        else:
            bad |= (np.asarray(bitmask).astype(np.int64) & bits) != 0
    if segments is not None:
        bad |= (segment_index(segments, flux.shape[1]) < 0)[None, :]
    elif flux.shape[1] == NPIX:
        bad |= ~on_chip_mask()[None, :]
    flux[bad] = 0.0
    ivar[bad] = 0.0
    return bad


def _grid_columns(n_in, n_model):
    """Columns of input spectra that make the model's pixel grid (None = all)."""
    from ..apogee.files import GRID_SEGMENTS, NPIX, grid_indices

    if n_in == n_model:
        return None
    if n_in == NPIX and n_model in GRID_SEGMENTS:
        return grid_indices(n_model)
    raise ValueError(f"the model was trained on {n_model} pixels but the input spectra have "
                     f"{n_in}: they must be on the model's pixel grid (or on the 8575-pixel "
                     "apStar grid for a 7214/7514-pixel model)")


def process_chunk(model, reader, options):
    """Read, mask, normalize and fit one chunk; return its catalogue columns.

    Parameters
    ----------
    model : CannonModel
    reader : object
        ``reader.read()`` returns the chunk's spectra (from ``_Source.chunk``).
    options : dict
        ``continuum_pixels`` ((8575,) bool, for raw spectra), ``degree``,
        ``bad_bits``, ``backend``, ``fit`` (keyword arguments of ``model.fit``),
        ``model_hash``, ``n_threads`` (threads of the numba, C and BLAS kernels
        while this chunk runs, e.g. 1 on a Dask worker; the settings found are
        restored afterwards).

    Returns
    -------
    dict of str -> ndarray
        One entry per catalogue column, all of the chunk's length.
    """
    if not options.get("n_threads"):
        return _fit_chunk(model, reader.read(), options)
    with limited_threads(int(options["n_threads"])):
        return _fit_chunk(model, reader.read(), options)


def _fit_chunk(model, d, options):
    """Mask, normalize and fit the spectra ``reader.read()`` gave (see process_chunk)."""
    reason = d["reason"]  # (N,) object: why a row has no labels ("" while it may get them)
    flags = np.zeros(len(reason), np.int64)
    flags[reason != ""] |= SURVEY_FLAGS["READ_FAILED"]
    flux, ivar, cflags = _normalized(d, options, flags, reuse=True)
    usable = (flags & (SURVEY_FLAGS["READ_FAILED"] | SURVEY_FLAGS["NORMALIZATION_FAILED"])) == 0
    fit = _fit_rows(model, flux, ivar, usable, reason, options, normalized_here=not d["normalized"])
    binary_cols = (_binary_columns(model, flux, ivar, fit, options.get("secondary_model"))
                   if options.get("binaries") else {})
    del flux, ivar
    flags |= fit["flags"]
    out = _columns(model, d, fit, flags, cflags, reason, options["model_hash"])
    out.update(binary_cols)
    return out


def _binary_columns(model, flux, ivar, fit, secondary_model=None):
    """The binary screen's BINARY_* columns for the fitted rows (core.binaries)."""
    from ..core.binaries import screen_binaries

    cols = _grid_columns(flux.shape[1], model.n_pixels)
    f = flux if cols is None else flux[:, cols]
    v = ivar if cols is None else ivar[:, cols]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(f) & np.isfinite(v) & (v > 0)
    scr = screen_binaries(model, np.where(ok, f, 1.0), np.where(ok, v, 0.0), fit["labels"],
                          secondary_model=secondary_model)
    return scr.columns(model.label_names)


def _normalized(d, options, flags, reuse=False):
    """Take the spectra out of ``d``; mask and continuum-normalize them if they are raw.

    ``reuse``: normalize into this thread's buffers if ``reused_buffers`` is on (the
    arrays returned are then overwritten by the next chunk's).

    Rows whose continuum fails on every chip get NORMALIZATION_FAILED in
    ``flags`` and a reason in ``d["reason"]``, other rows with continuum flags
    CONTINUUM_WARNING.

    Returns
    -------
    flux, ivar : ndarray (N, P)
        Normalized.
    continuum_flags : ndarray (N,) int64
        :func:`cannon_fast.core.continuum.normalize`'s flags (0 for normalized inputs).
    """
    # popped, so that the raw arrays are freed once normalized (``d`` lives on in the caller)
    flux, ivar, bitmask = d.pop("flux"), d.pop("ivar"), d.pop("bitmask")
    if d["normalized"]:
        return flux, ivar, np.zeros(flux.shape[0], np.int64)
    from ..core.continuum import normalize

    reason = d["reason"]
    # the pixels _mask_raw would zero (bad bits, non-finite, ivar <= 0, off the segments)
    # carry no weight in the normalization kernel, which reads the bitmask itself: no
    # masking passes, and the raw arrays (often views of a memory-mapped file) are not written
    if not d.get("needs_mask", True):  # apStar files are masked as they are read
        bitmask = None
    out = _out_buffers(*flux.shape) if reuse else None
    ns = normalize(flux, ivar, options["continuum_pixels"], degree=options["degree"],
                   segments=options.get("segments"), backend=options.get("backend", "auto"),
                   bitmask=bitmask, bad_bits=options["bad_bits"], out=out)
    del flux, ivar, bitmask
    cflags = ns.flags.astype(np.int64)
    dead = (ns.chip_status != 0).all(axis=1) & (reason == "")
    for i in np.flatnonzero(dead):
        reason[i] = "continuum normalization failed on every chip"
    flags[dead] |= SURVEY_FLAGS["NORMALIZATION_FAILED"]
    flags[(cflags != 0) & ~dead & (reason == "")] |= SURVEY_FLAGS["CONTINUUM_WARNING"]
    return ns.flux, ns.ivar, cflags


def _fit_rows(model, flux, ivar, usable, reason, options, normalized_here=False):
    """Fit the ``usable`` rows of normalized (flux, ivar); say in ``reason`` why a fit failed.

    ``normalized_here``: the spectra come from :func:`normalize` (no NaN, flux 1 and
    ivar 0 where a pixel is unusable), so the fit takes them as they are and only a
    slice the fit refuses (a float32 overflow to inf) is cleaned by ``_fittable``.

    Returns
    -------
    dict of str -> ndarray
        ``labels`` (N, L), ``cov`` (N, L, L), ``chi2``, ``rchi2``, ``npix``,
        ``iters``, ``flags`` (N,) and ``broad`` (N, 2: BROADENING and its
        error; None without ``broadening=True``); NaN (0 for the integers) in
        rows that were not fitted.
    """
    n, L = flux.shape[0], model.n_labels
    cols = _grid_columns(flux.shape[1], model.n_pixels)
    fit_kw = dict(options.get("fit") or {})
    fit_kw.setdefault("progress_bar", False)
    if options.get("backend") and options["backend"] != model.backend:
        fit_kw.setdefault("backend", options["backend"])  # the job's kernels, not the model's
    with_broadening = bool(fit_kw.get("broadening"))
    r = dict(labels=np.full((n, L), np.nan), cov=np.full((n, L, L), np.nan),
             chi2=np.full(n, np.nan), rchi2=np.full(n, np.nan), npix=np.zeros(n, np.int64),
             iters=np.zeros(n, np.int64), flags=np.zeros(n, np.int64),
             broad=np.full((n, 2), np.nan), formal=np.full((n, L), np.nan))
    # fit the whole chunk in slices that are multiples of the fit's own batches, so the
    # float64 copies it makes stay small and the results do not depend on the slicing
    for a in range(0, n, _FIT_SLICE):
        b = min(a + _FIT_SLICE, n)
        f = flux[a:b] if cols is None else flux[a:b][:, cols]
        v = ivar[a:b] if cols is None else ivar[a:b][:, cols]
        if normalized_here and usable[a:b].all():
            # the fit checks its input in its own pass: nothing to clean unless it refuses
            done = _fit_whole(model, f, v, a, fit_kw)
        else:
            done = None
        if done is None:
            f, v = _fittable(f, v, usable[a:b])
            done = _fit_slice(model, f, v, a, fit_kw, r["flags"], reason)
        for lo, hi, res in done:
            r["labels"][lo:hi], r["cov"][lo:hi] = res.labels, res.covariance
            r["formal"][lo:hi] = res.errors if res.formal_errors is None else res.formal_errors
            r["chi2"][lo:hi], r["rchi2"][lo:hi] = res.chi2, res.reduced_chi2
            r["npix"][lo:hi], r["iters"][lo:hi], r["flags"][lo:hi] = \
                res.n_pixels, res.iterations, res.flags
            if with_broadening:
                r["broad"][lo:hi] = np.column_stack([res.broadening, res.broadening_error])
    r["flags"][~usable] = 0
    for key in ("labels", "cov", "broad", "chi2", "rchi2", "formal"):
        r[key][~usable] = np.nan
    nolab = usable & ~np.all(np.isfinite(r["labels"]), axis=1) & (reason == "")
    for i in np.flatnonzero(nolab):
        names = [k for k, bit in _FIT_FLAG_BITS.items() if r["flags"][i] & bit]
        reason[i] = "fit failed (" + (", ".join(names) or "no finite labels") + \
            f"; {int(r['npix'][i])} usable pixels)"
    if not with_broadening:
        r["broad"] = None
    return r


def _fittable(f, v, usable):
    """(flux, ivar) the fit accepts: no weight on non-finite values or unusable rows.

    A pixel with non-finite values carries no weight (instead of failing the chunk).
    Spectra with none, all rows usable and no negative ivar (normalized survey spectra,
    nearly always) are returned as they are: three reductions instead of the copies,
    ~40 us/star of a survey's 8575-pixel spectra (the fit reads no flux where ivar = 0).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        if (usable.all() and np.isfinite(f.sum(dtype=np.float64))
                and np.isfinite(v.sum(dtype=np.float64)) and v.min(initial=0.0) >= 0):
            return f, v
        ok = usable[:, None] & np.isfinite(f) & np.isfinite(v) & (v > 0)
    return np.where(ok, f, 1.0), np.where(ok, v, 0.0)


_FIT_ERRORS = (ValueError, FloatingPointError, np.linalg.LinAlgError)


def _fit_whole(model, f, v, a, fit_kw):
    """``[(a, a + len(f), FitResult)]`` of one fit of all rows, or None if it raises."""
    try:
        return [(a, a + len(f), model.fit(f, v, **fit_kw))]
    except _FIT_ERRORS:
        return None


def _fit_slice(model, f, v, a, fit_kw, fitflags, reason):
    """Fit rows ``a:a + len(f)``; if that raises, star by star, keeping the ones that fit.

    Returns a list of (lo, hi, FitResult); a star whose fit raises gets the
    FAILED bit in ``fitflags`` and the error in ``reason``.
    """
    whole = _fit_whole(model, f, v, a, fit_kw)
    if whole is not None:
        return whole
    results = []  # isolate the star(s) that break the fit; keep the others
    for i in range(len(f)):
        try:
            results.append((a + i, a + i + 1, model.fit(f[i:i + 1], v[i:i + 1], **fit_kw)))
        except _FIT_ERRORS as err:
            fitflags[a + i] = _FIT_FLAG_BITS["FAILED"]
            reason[a + i] = f"fit raised {type(err).__name__}: {err}"
    return results


def _columns(model, d, fit, flags, cflags, reason, model_hash):
    """The chunk's catalogue columns, in catalogue order (see process_chunk)."""
    n, names = len(flags), model.label_names
    bad = (flags & (BAD_FLAGS | SURVEY_FLAGS["READ_FAILED"]
                    | SURVEY_FLAGS["NORMALIZATION_FAILED"])) != 0
    out = {"ID": np.asarray(d["ids"]).astype(str), "INDEX": d["index"], "VISIT": d["visit"]}
    out.update(d["extra"])
    for i, name in enumerate(names):
        out[name] = fit["labels"][:, i]
    for i, name in enumerate(names):
        with np.errstate(invalid="ignore"):
            dg = fit["cov"][:, i, i]
            out[name + "_ERR"] = np.sqrt(np.where(dg > 0, dg, np.nan))
        if model.error_model is not None:   # the calibrated error's two parts
            out[name + "_ERR_FORMAL"] = fit["formal"][:, i]
            out[name + "_ERR_MODEL"] = model_error_part(out[name + "_ERR"], fit["formal"][:, i])
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out[f"COV_{names[i]}_{names[j]}"] = fit["cov"][:, i, j]
    if fit["broad"] is not None:
        out.update(BROADENING=fit["broad"][:, 0], BROADENING_ERR=fit["broad"][:, 1])
    out.update(CHI2=fit["chi2"], REDUCED_CHI2=fit["rchi2"],
               N_PIXELS=fit["npix"].astype(np.int32), ITERATIONS=fit["iters"].astype(np.int32),
               FLAGS=flags.astype(np.int32),
               FLAG_BAD=bad, FLAG_WARN=~bad & ((flags & (WARNING_FLAGS | SURVEY_FLAGS[
                   "CONTINUUM_WARNING"])) != 0),
               CONTINUUM_FLAGS=cflags.astype(np.int32),
               REASON=np.array([str(x) for x in reason], dtype=str),
               MODEL_HASH=np.full(n, model_hash))
    for k, a in out.items():
        if a.dtype.kind == "U" and a.dtype.itemsize == 0:
            out[k] = a.astype("<U1")
    return out
