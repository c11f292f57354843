"""Band-limiting a trained model's coefficients: smoothing theta within the LSF's band.

A spectrograph's line-spread function limits what a spectrum can vary along
wavelength: on a grid with several pixels per resolution element (JWST/NIRSpec-like
spectra at R ~ 2700 have 3-6 pixels per FWHM) the true coefficients ``theta_p`` of
every term are as smooth as the LSF makes them, while the training noise in the
per-pixel least-squares ``theta_p`` is independent from pixel to pixel and spread
over all frequencies up to Nyquist. A local polynomial (Savitzky-Golay) smoothing
along wavelength, a few FWHM wide, keeps the band the spectra can occupy and cuts
the rest of that noise: like training on several times as many stars. That noise,
not the model's form, is what holds a Cannon's label errors above the Cramér-Rao
bound of the spectra at S/N ~100 (docs/measurements.md, "JWST: the Cannon against
the Cramér-Rao bound").

It helps only where the grid oversamples the LSF (it needs the grid's resolving
power) and where neighbouring pixels' coefficients are estimated with comparable
noise (no pixel masked for most training stars in the middle of a window).
"""
from __future__ import annotations

import numpy as np

__all__ = ["BAND_LIMIT_ORDER", "BAND_LIMIT_WIDTH", "band_limit_windows", "band_limit_theta"]

#: Degree of the local polynomial: high enough to follow a line's core at ~2.5 FWHM
#: windows (a quartic there shifts line centres measurably).
BAND_LIMIT_ORDER = 6
#: Window length in units of the local FWHM of the LSF (rounded down to an odd number
#: of pixels, at least ``BAND_LIMIT_ORDER + 3``).
BAND_LIMIT_WIDTH = 2.5

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _min_window(order):
    """The shortest window that smooths at all: odd and two more than order + 1."""
    return order + 3 if order % 2 == 0 else order + 2


def band_limit_windows(grid, width=BAND_LIMIT_WIDTH, order=BAND_LIMIT_ORDER):
    """(P,) odd window lengths, in pixels, for ``band_limit_theta`` on a grid.

    ``width`` times the local FWHM of the LSF in pixels, rounded down to an odd
    number, at least ``order + 3`` (``order + 2`` for an odd order).

    Raises
    ------
    ValueError
        When the grid has no resolving power.
    """
    sigma_v = grid.lsf_sigma_velocity
    if sigma_v is None:
        raise ValueError(f"band-limiting theta needs the grid's resolving power, and {grid!r} "
                         "has none: give it (PixelGrid(..., resolution=R), or "
                         "read_spectra(..., resolution=R))")
    fwhm_px = _FWHM_PER_SIGMA * sigma_v / grid.pixel_velocity
    win = 2 * np.floor(width * fwhm_px / 2.0).astype(np.int64) + 1
    return np.maximum(win, _min_window(order))


def _runs(mask):
    """Half-open (start, stop) ranges of the True runs of a 1-D bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def band_limit_theta(theta, grid, usable, width=BAND_LIMIT_WIDTH, order=BAND_LIMIT_ORDER):
    """Smooth every column of theta along wavelength within the LSF's band.

    A Savitzky-Golay filter of degree ``order`` over ``band_limit_windows`` pixels,
    per run of ``usable`` pixels inside one grid segment (never across a chip gap
    or a flagged pixel); the ends of a run are fitted with the window moved inside
    it (``mode="interp"``), and a run shorter than a window keeps the longest odd
    window that fits, or stays as it is when that is below the minimum.

    Parameters
    ----------
    theta : ndarray, (P, T)
    grid : PixelGrid
        With its resolving power.
    usable : ndarray of bool, (P,)
        Pixels with a trained theta (the others stay as they are and are not used).
    width, order : float, int
        See ``band_limit_windows``.

    Returns
    -------
    theta : ndarray, (P, T)
        The smoothed coefficients (a new array).
    variance_factor : ndarray, (P,)
        The sum of the squared filter weights at each pixel (1 where nothing was
        smoothed): the factor by which independent per-pixel coefficient noise
        shrinks, to scale ``theta_cov`` by.
    """
    from scipy.signal import savgol_coeffs, savgol_filter

    theta = np.asarray(theta, dtype=np.float64)
    win = band_limit_windows(grid, width, order)
    out = theta.copy()
    factor = np.ones(len(theta))
    shortest = _min_window(order)
    for a, b in grid.segments:
        for s, e in _runs(np.asarray(usable[a:b], bool)):
            s, e = a + s, a + e
            n = e - s
            longest = n if n % 2 else n - 1
            w_run = np.minimum(win[s:e], longest)
            for w in np.unique(w_run):
                if w < shortest:
                    continue
                sel = np.flatnonzero(w_run == w)
                out[s + sel] = savgol_filter(theta[s:e], int(w), order, axis=0,
                                             mode="interp")[sel]
                half = w // 2
                # the window's position of each pixel: centred inside, shifted at the ends
                pos = np.clip(sel, None, half)
                pos = np.where(sel >= n - half, w - (n - sel), pos)
                for p in np.unique(pos):
                    factor[s + sel[pos == p]] = np.sum(
                        savgol_coeffs(int(w), order, pos=int(p), use="dot") ** 2)
    return out, factor
