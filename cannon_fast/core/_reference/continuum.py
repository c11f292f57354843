"""Pseudo-continuum normalization, plain numpy: the ground truth for the numba kernel.

References
----------
Ness, M., Hogg, D. W., Rix, H.-W., Ho, A. Y. Q., Zasowski, G. 2015, ApJ 808, 16, §2.3:
the pseudo-continuum is a low-order function fitted, per detector chip, to the
flux at continuum pixels, weighted by the inverse variance; flux is divided by
it and the inverse variance multiplied by its square.
"""
from __future__ import annotations

import numpy as np

__all__ = ["normalize", "STATUS_OK", "STATUS_NO_PIXELS", "STATUS_FEW_PIXELS", "STATUS_BAD_FIT"]

STATUS_OK = 0          # chip normalized
STATUS_NO_PIXELS = 1   # no usable pixel at all on the chip (missing chip)
STATUS_FEW_PIXELS = 2  # fewer usable continuum pixels than min_pixels
STATUS_BAD_FIT = 3     # singular normal equations, or a continuum <= 0 on a good pixel


def normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels):
    """Fit and divide out a per-chip weighted least-squares pseudo-continuum.

    ``(n,p),(n,p),(p,k),(p),(p),(),() -> (n,p),(n,p),(n,p),(n,c)``

    Parameters
    ----------
    flux, ivar : ndarray, shape (N, P)
        Flux and inverse variance; ``ivar == 0`` (or a non-finite flux or
        ivar) marks a bad pixel.
    basis : ndarray, shape (P, K)
        Basis functions of each pixel's chip (e.g. Chebyshev T_0..T_{K-1}).
    chip : ndarray of int64, shape (P,)
        Chip of each pixel, -1 in the gaps.
    is_cont : ndarray of uint8, shape (P,)
        1 at continuum pixels.
    n_chips, min_pixels : int

    Returns
    -------
    flux_out, ivar_out, cont_out : ndarray, shape (N, P)
        Normalized flux (1 where ivar_out is 0), its inverse variance, and the
        continuum (0 where not fitted).
    status : ndarray of int64, shape (N, C)
        One of the ``STATUS_*`` codes per star and chip.
    """
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    n, p = flux.shape
    flux_out = np.ones((n, p))
    ivar_out = np.zeros((n, p))
    cont_out = np.zeros((n, p))
    status = np.zeros((n, n_chips), np.int64)
    cont_pix = is_cont.astype(bool)
    with np.errstate(invalid="ignore"):
        weighty = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    for s in range(n):
        for c in range(n_chips):
            on = chip == c
            good = on & weighty[s]
            use = good & cont_pix
            if not good.any():
                status[s, c] = STATUS_NO_PIXELS
                continue
            if use.sum() < max(min_pixels, basis.shape[1]):
                status[s, c] = STATUS_FEW_PIXELS
                continue
            B = basis[use]
            w = ivar[s, use]
            A = B.T @ (w[:, None] * B)
            b = B.T @ (w * flux[s, use])
            try:
                coef = np.linalg.solve(A, b)
            except np.linalg.LinAlgError:
                status[s, c] = STATUS_BAD_FIT
                continue
            cont = basis[on] @ coef
            if not np.all(cont[good[on]] > 0) or not np.all(np.isfinite(cont)):
                status[s, c] = STATUS_BAD_FIT
                continue
            g = good[on]
            fo = np.ones(on.sum())
            io = np.zeros(on.sum())
            fo[g] = flux[s, on][g] / cont[g]
            io[g] = ivar[s, on][g] * cont[g] ** 2
            flux_out[s, on] = fo
            ivar_out[s, on] = io
            cont_out[s, on] = cont
    return flux_out, ivar_out, cont_out, status
