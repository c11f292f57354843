"""Pseudo-continuum normalization of spectra (Ness et al. 2015, §2.3 and §5.3).

The pseudo-continuum of each detector segment (chip) is a Chebyshev polynomial (degree 3
by default) fitted by weighted least squares to the flux at *continuum pixels*
-- pixels whose normalized flux barely depends on the labels.  Dividing it out
removes the instrument response and the star's SED slope while leaving the
lines; the inverse variance is multiplied by the continuum squared.

Continuum pixels come from a user's file (:func:`load_continuum_pixels`) or are
found from the data with a trained model (:func:`continuum_pixels_from_model`,
:func:`find_continuum_pixels`); the package ships no list.

Chebyshev of degree 3 by default: degrees 2 and 3 are the only good choices on
APOGEE spectra, and degree >= 4 and splines overfit the sparse continuum pixels
near the chip ends (``benchmarks/bench_data.py``, "continuum choice";
docs/measurements.md has the table).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from .backends import kernels, resolve_backend
from ._apstar_grid import NPIX, to_apstar_grid, wavelength_grid
from ._common import fitted_pixels
from .grid import PixelGrid

__all__ = [
    "CONTINUUM_FLAGS", "NormalizedSpectra", "chebyshev_basis", "normalize",
    "load_continuum_pixels", "continuum_pixels_from_model", "find_continuum_pixels",
    "record_continuum", "model_continuum", "renormalize_to_model", "segment_ranges",
]

#: Chebyshev degree of the pseudo-continuum when nothing else says (see the table above).
DEFAULT_DEGREE = 3

#: Per-star flag bits returned by :func:`normalize`.  A flagged chip keeps
#: ``flux = 1`` and ``ivar = 0`` (it carries no weight); the other chips are usable.
CONTINUUM_FLAGS = {
    "MISSING_CHIP_BLUE": 1, "MISSING_CHIP_GREEN": 2, "MISSING_CHIP_RED": 4,
    "FEW_CONTINUUM_PIXELS": 8, "BAD_CONTINUUM_FIT": 16,
}


@dataclass
class NormalizedSpectra:
    """Result of :func:`normalize`.

    Attributes
    ----------
    flux, ivar : ndarray, shape (N, P)
        Normalized flux (1 where ivar is 0) and its inverse variance.
    continuum : ndarray, shape (N, P)
        The fitted pseudo-continuum (0 where not fitted), or None if not kept.
    flags : ndarray of int64, shape (N,)
        Bits of :data:`CONTINUUM_FLAGS`.
    chip_status : ndarray of int64, shape (N, C)
        0 ok, 1 no usable pixel, 2 too few continuum pixels, 3 bad fit.
    """

    flux: np.ndarray
    ivar: np.ndarray
    continuum: np.ndarray | None
    flags: np.ndarray
    chip_status: np.ndarray

    def flag_names(self, i):
        """Names of the flags set for star ``i``."""
        return [k for k, v in CONTINUUM_FLAGS.items() if self.flags[i] & v]


def segment_ranges(segments, n_pixels):
    """The half-open pixel ranges of the segments (chips) of spectra of ``n_pixels``.

    Parameters
    ----------
    segments : PixelGrid, sequence of (int, int) or None
        A grid (its segments), the ranges themselves, or None: the chips of the
        APOGEE grid with that many pixels (8575, 7514, 7214), else one segment.
    n_pixels : int

    Returns
    -------
    tuple of (int, int)
    """
    if segments is None:
        grid = PixelGrid.builtin(n_pixels)
        return grid.segments if grid is not None else ((0, int(n_pixels)),)
    if isinstance(segments, PixelGrid):
        if segments.n_pixels != n_pixels:
            raise ValueError(f"the spectra have {n_pixels} pixels but the grid {segments!r} "
                             f"has {segments.n_pixels}")
        return segments.segments
    return tuple((int(a), int(b)) for a, b in segments)


def chebyshev_basis(degree=2, segments=None, npix=NPIX):
    """Chebyshev polynomials T_0..T_degree of each pixel, on [-1, 1] across its segment.

    Parameters
    ----------
    degree : int
        Polynomial degree (0-7).
    segments : PixelGrid, sequence of (int, int) or None
        The segments (chips): see :func:`segment_ranges`.
    npix : int

    Returns
    -------
    basis : ndarray, shape (P, degree + 1)
        Zero in the gaps.
    chip : ndarray of int64, shape (P,)
        Chip of each pixel, -1 in the gaps.
    """
    degree = int(degree)
    if not 0 <= degree <= 7:
        raise ValueError(f"continuum degree must be 0-7, got {degree}")
    basis = np.zeros((npix, degree + 1))
    chip = np.full(npix, -1, np.int64)
    for c, (a, b) in enumerate(segment_ranges(segments, npix)):
        if not 0 <= a < b <= npix:
            raise ValueError(f"chip range {a}-{b} is not inside 0-{npix}")
        x = 2.0 * (np.arange(a, b) - a) / max(b - 1 - a, 1) - 1.0
        basis[a:b] = np.polynomial.chebyshev.chebvander(x, degree)
        chip[a:b] = c
    return basis, chip


def _as_mask(continuum_pixels, npix):
    m = np.asarray(continuum_pixels)
    if m.dtype == bool and m.shape == (npix,):
        return m
    if npix == NPIX:
        return to_apstar_grid(m, grid=None if m.dtype == bool else 8575)
    out = np.zeros(npix, bool)
    out[m.astype(np.int64)] = True
    return out


def normalize(flux, ivar, continuum_pixels, degree=DEFAULT_DEGREE, segments=None,
              min_pixels=None, backend="auto", batch=2048, dtype=np.float32, keep_continuum=False,
              bitmask=None, bad_bits=0, out=None):
    """Pseudo-continuum normalize spectra, segment (chip) by segment.

    Parameters
    ----------
    flux, ivar : array_like, shape (N, P) or (P,)
        Flux and inverse variance with bad pixels at ``ivar = 0`` (see
        :func:`cannon_fast.apogee.bitmask.mask_spectra`).
    continuum_pixels : array_like of bool, shape (P,), or indices
        The continuum pixels (see :func:`load_continuum_pixels`).
    degree : int
        Chebyshev degree per segment.
    segments : PixelGrid, sequence of (int, int) or None
        The segments (chips) fitted separately: see :func:`segment_ranges`
        (default: the APOGEE chips for 8575, 7514 or 7214 pixels, else one).
    min_pixels : int, optional
        Fewest usable continuum pixels for a chip to be fitted; default
        ``max(10, 4 * (degree + 1))``.
    backend : {"auto", "c", "numba", "numpy"}
        Which implementation of the kernel ``continuum_normalize`` runs (see
        :func:`cannon_fast.backends.resolve_backend`).
    batch : int
        Stars per kernel call (bounds the float64 temporaries).
    dtype : numpy dtype
        Output float type (float32 halves memory; the fit is in float64).
    keep_continuum : bool
        Also return the fitted continuum.
    bitmask : array_like of an integer dtype, shape (N, P) or (P,), optional
        Quality bits per pixel (e.g. APOGEE's PIXMASK): pixels with any of
        ``bad_bits`` set carry no weight, as if their ivar were 0. Raw spectra
        are masked as they are normalized (one pass, the inputs left untouched).
    bad_bits : int
        The bits of ``bitmask`` that mark a bad pixel.
    out : (ndarray, ndarray), optional
        C-contiguous (N, P) arrays of ``dtype`` to write the normalized flux and ivar
        into (e.g. buffers kept from one chunk of a survey to the next: fresh arrays
        cost their first-touch page faults every time).

    Returns
    -------
    NormalizedSpectra
    """
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    one = flux.ndim == 1
    flux = np.atleast_2d(flux)
    ivar = np.atleast_2d(ivar)
    if flux.shape != ivar.shape or flux.ndim != 2:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must have the same (N, P) shape")
    if bitmask is not None:
        bitmask = np.atleast_2d(np.asarray(bitmask))
        if bitmask.shape != flux.shape or bitmask.dtype.kind not in "biu":
            raise ValueError(f"bitmask {bitmask.dtype} {bitmask.shape} must be integers of the "
                             f"spectra's (N, P) shape {flux.shape}")
        if bitmask.dtype.kind == "b":
            bitmask = bitmask.view(np.uint8)
        elif not bitmask.dtype.isnative:  # the kernels read native integers
            bitmask = bitmask.astype(bitmask.dtype.newbyteorder("="))
    n, p = flux.shape
    chip_ranges = segment_ranges(segments, p)
    basis, chip = chebyshev_basis(degree, chip_ranges, p)
    is_cont = _as_mask(continuum_pixels, p)
    if is_cont.shape != (p,):
        raise ValueError(f"continuum pixel mask has shape {is_cont.shape}, spectra have {p} pixels")
    cont_u8 = np.ascontiguousarray(is_cont & (chip >= 0), dtype=np.uint8)
    if min_pixels is None:
        min_pixels = max(10, 4 * (degree + 1))
    n_chips = len(chip_ranges)
    for c in range(n_chips):
        if cont_u8[chip == c].sum() < min_pixels:
            raise ValueError(f"only {int(cont_u8[chip == c].sum())} continuum pixels on "
                             f"segment {c} (pixels {chip_ranges[c][0]}-"
                             f"{chip_ranges[c][1] - 1}); need >= {min_pixels}")
    dtype = np.dtype(dtype)
    if out is None:
        fo, io = np.empty((n, p), dtype), np.empty((n, p), dtype)
    else:
        fo, io = out
        for a in (fo, io):
            if a.shape != (n, p) or a.dtype != dtype or not a.flags.c_contiguous:
                raise ValueError(f"out arrays must be C-contiguous {dtype} of shape "
                                 f"{(n, p)}, got {a.dtype} {a.shape}")
    co = np.empty((n, p), dtype) if keep_continuum else None
    status = np.zeros((n, n_chips), np.int64)
    kern = kernels(resolve_backend(backend)).continuum_normalize
    # the kernel works in the input precision when it is float32 or float64
    kdt = np.float32 if (flux.dtype == np.float32 and dtype == np.float32) else np.float64
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        f = np.ascontiguousarray(flux[lo:hi], dtype=kdt)
        v = np.ascontiguousarray(ivar[lo:hi], dtype=kdt)
        direct = fo.dtype == kdt  # write straight into the output rows
        a = fo[lo:hi] if direct else np.empty((hi - lo, p), kdt)
        b = io[lo:hi] if direct else np.empty((hi - lo, p), kdt)
        if co is None:
            cc = np.empty((0, p), kdt)
        else:
            cc = co[lo:hi] if direct else np.empty((hi - lo, p), kdt)
        m = None if bitmask is None else np.ascontiguousarray(bitmask[lo:hi])
        kern(f, v, basis, chip, cont_u8, n_chips, int(min_pixels), a, b, cc, status[lo:hi],
             bitmask=m, bits=int(bad_bits))
        if not direct:
            fo[lo:hi] = a
            io[lo:hi] = b
            if co is not None:
                co[lo:hi] = cc
    flags = np.zeros(n, np.int64)
    for c in range(min(n_chips, 3)):
        flags |= np.where(status[:, c] == 1, 1 << c, 0)
    flags |= np.where((status == 2).any(axis=1), CONTINUUM_FLAGS["FEW_CONTINUUM_PIXELS"], 0)
    flags |= np.where((status == 3).any(axis=1), CONTINUUM_FLAGS["BAD_CONTINUUM_FIT"], 0)
    if one:
        return NormalizedSpectra(fo[0], io[0], None if co is None else co[0], flags, status)
    return NormalizedSpectra(fo, io, co, flags, status)


def renormalize_to_model(flux, ivar, model_flux, model_variance=0.0, degree=DEFAULT_DEGREE,
                         segments=None, min_model_flux=0.05, backend="auto"):
    """Refine normalized spectra's continuum against model spectra of the same stars.

    The pseudo-continuum from a few continuum pixels leaves a smooth error per
    chip (pixels that are not quite at the continuum, a response roll-off the
    polynomial follows poorly). With a model spectrum at the star's fitted
    labels every pixel carries continuum information: a per-segment Chebyshev of
    ``degree`` is fitted by weighted least squares to ``flux / model_flux`` at
    all pixels and divided out (as the simultaneous continuum of The Payne,
    Ting et al. 2019, done as one correction step after the label fit).

    Parameters
    ----------
    flux, ivar : array_like, shape (N, P)
        Normalized spectra; ``ivar = 0`` masks a pixel.
    model_flux : array_like, shape (N, P)
        Model spectra at each star's fitted labels (NaN for a star without a fit:
        its spectrum is returned unchanged).
    model_variance : float or array_like, shape (P,) or (N, P), optional
        Variance of the model itself (e.g. the Cannon's s²), added to the
        noise in the weights.
    degree : int, optional
        Chebyshev degree per segment.
    segments : PixelGrid, sequence of (int, int) or None
        The segments (chips), each corrected separately: see :func:`segment_ranges`.
    min_model_flux : float, optional
        Pixels where the model is below this (saturated line cores) carry no
        continuum information and get no weight.
    backend : str, optional
        Kernel backend of the fit (:func:`normalize`).

    Returns
    -------
    flux, ivar : ndarray, shape (N, P)
        The refined spectra and their inverse variance. A segment whose correction
        could not be fitted (no or too few usable pixels, or a non-positive
        correction) is left as it was.
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
    model_flux = np.atleast_2d(np.asarray(model_flux, dtype=np.float64))
    if not flux.shape == ivar.shape == model_flux.shape:
        raise ValueError(f"flux {flux.shape}, ivar {ivar.shape} and model_flux "
                         f"{model_flux.shape} must have the same (N, P) shape")
    with np.errstate(invalid="ignore"):  # NaN model flux: not usable
        usable = model_flux > min_model_flux
    usable &= ivar > 0
    usable &= np.isfinite(flux)
    # in place and only where usable: a (N, P) temporary costs as much as the arithmetic
    ratio = np.divide(flux, model_flux, out=np.ones_like(flux), where=usable)
    # the ratio's inverse variance, model² / (noise + model variance)
    weight = np.divide(1.0, ivar, out=np.zeros_like(flux), where=usable)
    weight += model_variance
    np.divide(np.square(model_flux, where=usable, out=np.zeros_like(flux)), weight,
              out=weight, where=usable)
    weight[~usable] = 0.0
    every_pixel = np.ones(flux.shape[1], dtype=bool)
    chip_ranges = segment_ranges(segments, flux.shape[1])
    res = normalize(ratio, weight, every_pixel, degree=degree, segments=chip_ranges,
                    dtype=np.float64, keep_continuum=True, backend=backend)
    _, chip = chebyshev_basis(degree, chip_ranges, flux.shape[1])
    fitted = (res.chip_status == 0)[:, np.maximum(chip, 0)] & (chip >= 0)[None, :]
    correction = np.where(fitted & (res.continuum > 0), res.continuum, 1.0)
    return flux / correction, ivar * correction ** 2


def _mask_from_wavelength_ranges(ranges, wave):
    ranges = np.atleast_2d(np.asarray(ranges, float))
    if ranges.shape[1] != 2:
        raise ValueError(f"wavelength ranges must be (start, end) pairs, got shape {ranges.shape}")
    m = np.zeros(wave.size, bool)
    for a, b in ranges:
        m |= (wave >= min(a, b)) & (wave <= max(a, b))
    return m


def _mask_from_wavelengths(mask, wavelengths, wave, source):
    """Map a mask given on a wavelength array onto the apStar grid (nearest pixel)."""
    wl = np.asarray(wavelengths, float)[np.asarray(mask, bool)]
    idx = np.clip(np.searchsorted(wave, wl), 1, wave.size - 1)
    left = wave[idx - 1]
    right = wave[idx]
    idx = np.where(np.abs(wl - left) < np.abs(wl - right), idx - 1, idx)
    dloglam = np.abs(np.log10(wl) - np.log10(wave[idx]))
    if np.any(dloglam > 0.5 * 6e-6):
        raise ValueError(f"{source}: {int((dloglam > 3e-6).sum())} continuum wavelengths are not "
                         "on the apStar log-lambda grid (more than half a pixel away)")
    out = np.zeros(wave.size, bool)
    out[idx] = True
    return out


def load_continuum_pixels(source, grid=None):
    """Read a continuum-pixel list and return it as a (8575,) mask of the apStar grid.

    Accepted sources:

    * ``.npz`` with a boolean mask (key ``trusted``, ``pixels``, ``mask`` or the
      only boolean array) on the 7214, 7514 or 8575 grid (its length says which),
      or integer ``indices``; a ``wavelengths`` array of the same length, when
      present, is used to place the pixels (the most robust mapping);
    * ``.npy`` with a boolean mask or integer indices;
    * text: one integer index per line, or two columns of (start, end) vacuum
      wavelength ranges in Angstrom;
    * an in-memory mask, index array or list of (start, end) wavelength ranges.

    Parameters
    ----------
    source : str, os.PathLike or array_like
    grid : {7214, 7514, 8575}, optional
        The grid of integer indices (needed when indices < 7514 are ambiguous).

    Returns
    -------
    ndarray of bool, shape (8575,)
    """
    wave = wavelength_grid()
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: continuum pixel file not found")
        low = path.lower()
        if low.endswith(".npz"):
            with np.load(path, allow_pickle=False) as d:
                keys = list(d.keys())
                arrays = {k: d[k] for k in keys}
            key = next((k for k in ("trusted", "pixels", "mask", "continuum", "contpix")
                        if k in arrays), None)
            if key is None:
                bools = [k for k in keys if arrays[k].dtype == bool]
                ints = [k for k in ("indices", "idx", "pixel_indices") if k in arrays]
                key = bools[0] if len(bools) == 1 else (ints[0] if ints else None)
            if key is None:
                raise ValueError(f"{path}: no continuum pixel array found (keys: {keys}); expected "
                                 "'trusted', 'pixels', 'mask' or 'indices'")
            m = arrays[key]
            wl = next((arrays[k] for k in ("wavelengths", "wavelength", "wave") if k in arrays),
                      None)
            if m.dtype == bool and wl is not None and wl.shape == m.shape:
                return _mask_from_wavelengths(m, wl, wave, path)
            try:
                return to_apstar_grid(m, grid)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        if low.endswith(".npy"):
            m = np.load(path, allow_pickle=False)
            try:
                return to_apstar_grid(m, grid)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        try:
            rows = np.loadtxt(path, ndmin=2)
        except ValueError as err:
            raise ValueError(f"{path}: cannot parse as numbers ({err})") from None
        if rows.shape[1] == 2 and rows.min() > 1000:
            return _mask_from_wavelength_ranges(rows, wave)
        if rows.shape[1] == 1:
            vals = rows[:, 0]
            if vals.min() > 1000 and not np.all(vals == np.round(vals)):
                return _mask_from_wavelengths(np.ones(vals.size, bool), vals, wave, path)
            try:
                return to_apstar_grid(vals.astype(np.int64), grid)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        raise ValueError(f"{path}: expected one column of pixel indices or two columns of "
                         f"wavelength ranges, got {rows.shape[1]} columns")
    arr = np.asarray(source)
    if arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] == 2:
        return _mask_from_wavelength_ranges(arr, wave)
    return to_apstar_grid(arr, grid)


def record_continuum(model, continuum_pixels, degree=DEFAULT_DEGREE):
    """Keep with a model the continuum pixels and degree of its training spectra.

    They go into ``model.train_info`` (written with the model file), so that
    the spectra fitted later with it (``cannon-fast mcmc``, ``binaries``,
    ``label``) are normalized exactly as its training set was
    (:func:`model_continuum`).  Call it after ``train``, which resets
    ``train_info``.

    Parameters
    ----------
    model : CannonModel
        A trained model.
    continuum_pixels : str, os.PathLike or array_like
        For a model on an APOGEE grid anything :func:`load_continuum_pixels`
        reads (kept as apStar pixels); for any other grid a (P,) mask, pixel
        indices or (start, end) vacuum wavelength ranges on the model's grid
        (or an ``.npy`` of them), kept as the model's own pixels.
    degree : int
        The Chebyshev degree used in :func:`normalize`.

    Returns
    -------
    model : CannonModel
    """
    if not getattr(model, "is_trained", False):
        raise ValueError("record the continuum after training: train() resets train_info")
    on_apstar = _on_apogee_grid(model)
    mask = (load_continuum_pixels(continuum_pixels) if on_apstar
            else _model_grid_mask(model, continuum_pixels))
    model.train_info.update(continuum_pixels=np.flatnonzero(mask).tolist(),
                            continuum_degree=int(degree),
                            continuum_grid="apStar" if on_apstar else "model")
    return model


def _on_apogee_grid(model):
    """Whether a model's spectra are APOGEE's: its continuum pixels live on the apStar grid."""
    known = PixelGrid.builtin(model.n_pixels)
    grid = getattr(model, "grid", None)
    return known is not None and (grid is None or grid == known)


def _model_grid_mask(model, source):
    """Continuum pixels on a (non-APOGEE) model's own grid, as a (P,) mask."""
    p = model.n_pixels
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not path.lower().endswith(".npy"):
            raise ValueError(f"{path}: continuum pixels of a model on another grid than "
                             "APOGEE's are read from an .npy (mask, indices or wavelength ranges)")
        source = np.load(path, allow_pickle=False)
    arr = np.asarray(source)
    if arr.dtype == bool:
        if arr.shape != (p,):
            raise ValueError(f"a continuum mask for this model has {p} pixels, got {arr.shape}")
        return arr.copy()
    if arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] == 2:
        if getattr(model, "grid", None) is None:
            raise ValueError("wavelength ranges need the model's grid (it has none)")
        return _mask_from_wavelength_ranges(arr, model.grid.wavelength)
    idx = arr.astype(np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= p):
        raise ValueError(f"continuum pixel indices must lie in 0-{p - 1}, got "
                         f"{idx.min()}-{idx.max()}")
    out = np.zeros(p, bool)
    out[idx] = True
    return out


def model_continuum(model, continuum_pixels=None):
    """Continuum pixels and degree to normalize spectra fitted with ``model``.

    The user's ``continuum_pixels`` when given, else the record of
    :func:`record_continuum`, else pixels picked from the model itself
    (:func:`continuum_pixels_from_model`); the degree is the record's, else
    :data:`DEFAULT_DEGREE`.

    Parameters
    ----------
    model : CannonModel
    continuum_pixels : str, os.PathLike or array_like, optional
        Overrides the model's pixels: as for :func:`record_continuum`.

    Returns
    -------
    pixels : ndarray of bool, shape (8575,) or (P,)
        On the apStar grid for a model on an APOGEE grid (raw APOGEE spectra
        come on it), else on the model's own grid.
    degree : int
    source : str
        Where they came from, for logs and reports.
    """
    info = getattr(model, "train_info", None) or {}
    degree = int(info.get("continuum_degree", DEFAULT_DEGREE))
    if not _on_apogee_grid(model):
        if continuum_pixels is not None:
            mask = _model_grid_mask(model, continuum_pixels)
            where = "given"
        elif info.get("continuum_pixels") is not None:
            mask = _model_grid_mask(model, np.asarray(info["continuum_pixels"], np.int64))
            where = "the model's record"
        else:
            mask = continuum_pixels_from_model(model)
            return mask, degree, (f"picked from the model ({int(mask.sum())} pixels; it has no "
                                  "record of the ones used in training)")
        return mask, degree, f"{where} ({int(mask.sum())} pixels, degree {degree})"
    if continuum_pixels is not None:
        mask = load_continuum_pixels(continuum_pixels)
        where = continuum_pixels if isinstance(continuum_pixels, (str, os.PathLike)) else "given"
        return mask, degree, f"{where} ({int(mask.sum())} pixels, degree {degree})"
    if info.get("continuum_pixels") is not None:
        mask = to_apstar_grid(np.asarray(info["continuum_pixels"], dtype=np.int64), grid=NPIX)
        return mask, degree, (f"the model's record ({int(mask.sum())} pixels, "
                              f"degree {degree})")
    mask = continuum_pixels_from_model(model)
    mask = mask if mask.size == NPIX else to_apstar_grid(mask)  # a 7214/7514-pixel model
    return mask, degree, (f"picked from the model ({int(mask.sum())} pixels; it has no record "
                          "of the ones used in training)")


def continuum_pixels_from_model(model, fraction=0.07, base_tol=0.02, segments=None):
    """Pick continuum pixels from a trained model (Ness et al. 2015, §2.3).

    A pixel is a continuum pixel when its model flux at the mean labels is
    close to 1 (``|theta[:, 0] - 1| < base_tol``) and its linear label
    coefficients ``theta[:, 1:L+1]`` (in scaled labels) are small: of those
    near 1, the ``fraction`` of each segment's pixels with the smallest largest
    linear coefficient are kept.

    Parameters
    ----------
    model : object
        With ``theta`` (P, T), ``n_labels`` (or ``label_names``) and optionally
        ``pixel_flags`` (P,); see docs/api.md. Or any forward model with
        ``predict_with_jacobian`` and ``training_labels`` (an emulator): its flux
        and Jacobian at the mean training labels take the place of ``theta``.
    fraction : float
        Fraction of each segment's pixels to keep.
    base_tol : float
        Tolerance on ``|theta[:, 0] - 1|``.
    segments : PixelGrid, sequence of (int, int) or None
        By default the segments of the model's grid (``model.grid``), else
        those of :func:`segment_ranges`.

    Returns
    -------
    ndarray of bool, shape (P,)
    """
    base, lin = _flux_and_slopes(model)
    p = base.size
    usable = np.isfinite(base) & np.isfinite(lin) & fitted_pixels(model, p)
    base = np.abs(base - 1.0)
    out = np.zeros(p, bool)
    if segments is None:
        segments = getattr(model, "grid", None)
    chip_ranges = segment_ranges(segments, p)
    _, chip = chebyshev_basis(0, chip_ranges, p)
    for c in range(len(chip_ranges)):
        on = np.flatnonzero((chip == c) & usable & (base < base_tol))
        k = int(round(fraction * np.sum(chip == c)))
        if len(on) == 0 or k == 0:
            continue
        out[on[np.argsort(lin[on], kind="stable")[:k]]] = True
    return out


def _flux_and_slopes(model):
    """(P,) model flux at the mean labels and each pixel's largest linear response.

    A Cannon model holds both in ``theta`` (its first and linear coefficients, in
    scaled labels). Any other forward model (an emulator) is evaluated at the mean
    of its training labels, its Jacobian times the labels' spread standing in for
    the linear coefficients.
    """
    n_labels = int(getattr(model, "n_labels", len(getattr(model, "label_names", ()))))
    theta = getattr(model, "theta", None)
    if theta is not None:
        theta = np.asarray(theta, float)
        if theta.ndim != 2 or theta.shape[1] < n_labels + 1:
            raise ValueError(f"model.theta has shape {theta.shape}; expected (P, T) with T > "
                             f"{n_labels}")
        return theta[:, 0], np.max(np.abs(theta[:, 1:n_labels + 1]), axis=1)
    labels = getattr(model, "training_labels", None)
    if labels is None or not hasattr(model, "predict_with_jacobian"):
        raise ValueError("picking continuum pixels needs a Cannon model (theta) or a forward "
                         "model with predict_with_jacobian and its training labels; give the "
                         "continuum pixels instead")
    labels = np.asarray(labels, float)
    labels = labels[np.all(np.isfinite(labels), axis=1)]
    flux, jac = model.predict_with_jacobian(labels.mean(axis=0)[None, :])
    return flux[0], np.max(np.abs(jac[0] * labels.std(axis=0)), axis=1)


def _initial_continuum_pixels(flux, ivar, chip_ranges, fraction):
    """Pixels that are high in most spectra: the upper envelope, for a first normalization."""
    p = flux.shape[1]
    _, chip = chebyshev_basis(0, chip_ranges, p)
    rel = np.full(flux.shape, np.nan)
    with warnings.catch_warnings():  # all-NaN columns (gaps, dead stars) are expected here
        warnings.simplefilter("ignore", RuntimeWarning)
        for c in range(len(chip_ranges)):
            on = chip == c
            f = np.where(ivar[:, on] > 0, flux[:, on], np.nan)
            med = np.nanmedian(f, axis=1, keepdims=True)
            rel[:, on] = f / med
        score = np.nanmedian(rel, axis=0)
    out = np.zeros(p, bool)
    for c in range(len(chip_ranges)):
        on = np.flatnonzero((chip == c) & np.isfinite(score))
        k = int(round(fraction * np.sum(chip == c)))
        # the highest-flux pixels, spread over the chip: best k in each of 10 blocks
        for blk in np.array_split(on, 10):
            kk = max(1, k // 10)
            out[blk[np.argsort(-score[blk])[:kk]]] = True
    return out


def find_continuum_pixels(flux, ivar, labels, model_factory, n_iter=3, fraction=0.07,
                          base_tol=0.02, degree=DEFAULT_DEGREE, segments=None,
                          initial=None, backend="auto"):
    """Find continuum pixels from the data by iterating normalize -> train -> select.

    Ness et al. (2015, §5.3): start from a rough normalization, train a model,
    take the pixels whose model flux is near 1 and insensitive to the labels,
    renormalize with them and repeat until the set stops changing.

    Parameters
    ----------
    flux, ivar : array_like, shape (N, P)
        Un-normalized flux and inverse variance (bad pixels at ivar = 0).
    labels : array_like, shape (N, L)
        Training labels.
    model_factory : callable
        ``model_factory()`` returns an untrained model with ``train(flux, ivar,
        labels)`` and ``theta`` (e.g. ``lambda: CannonModel(names, order=2)``).
    n_iter : int
        Maximum number of train/select rounds.
    fraction, base_tol : float
        See :func:`continuum_pixels_from_model`.
    degree : int
        Continuum degree used while iterating.
    segments : PixelGrid, sequence of (int, int) or None
        The segments (chips) normalized and searched separately: see
        :func:`segment_ranges`.
    initial : array_like of bool, shape (P,), optional
        Starting pixels; by default the upper envelope of the spectra.
    backend : str

    Returns
    -------
    pixels : ndarray of bool, shape (P,)
    history : list of int
        Number of pixels that changed in each round (the last is 0 when converged).
    """
    flux = np.asarray(flux, float)
    ivar = np.asarray(ivar, float)
    chip_ranges = segment_ranges(segments, flux.shape[1])
    cur = (_initial_continuum_pixels(flux, ivar, chip_ranges, fraction) if initial is None
           else np.asarray(initial, bool))
    history = []
    for _ in range(int(n_iter)):
        ns = normalize(flux, ivar, cur, degree=degree, segments=chip_ranges, backend=backend,
                       dtype=np.float64)
        model = model_factory()
        model.train(ns.flux, ns.ivar, labels)
        new = continuum_pixels_from_model(model, fraction, base_tol, chip_ranges)
        changed = int(np.sum(new != cur))
        history.append(changed)
        cur = new
        if changed == 0:
            break
    return cur, history

