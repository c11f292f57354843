"""Pseudo-continuum normalization, plain numpy: the ground truth for the numba and C kernels.

References
----------
Ness, M., Hogg, D. W., Rix, H.-W., Ho, A. Y. Q., Zasowski, G. 2015, ApJ 808, 16, §2.3:
the pseudo-continuum is a low-order function fitted, per detector chip, to the
flux at continuum pixels, weighted by the inverse variance; flux is divided by
it and the inverse variance multiplied by its square.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import cho_solve

from .normal_equations import cholesky

__all__ = ["continuum_normalize", "MAX_BASIS", "STATUS_OK", "STATUS_NO_PIXELS",
           "STATUS_FEW_PIXELS", "STATUS_BAD_FIT"]

STATUS_OK = 0          # chip normalized
STATUS_NO_PIXELS = 1   # no usable pixel at all on the chip (missing chip)
STATUS_FEW_PIXELS = 2  # fewer usable continuum pixels than max(min_pixels, K)
STATUS_BAD_FIT = 3     # singular normal equations, or a continuum <= 0 on a usable pixel

#: most basis functions per chip (Chebyshev degree <= 7); the kernels keep the
#: normal equations on the stack
MAX_BASIS = 8


def continuum_normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels,
                        flux_out, ivar_out, cont_out, status_out, bitmask=None, bits=0):
    """Fit and divide out a per-chip weighted least-squares pseudo-continuum.

    Contract: ``(p),(p),(p,k),(p),(p),(),()->(p),(p),(p),(c)`` over stars
    (``bitmask`` another ``(p)``).

    For each star and chip ``c``, the pixels with ``chip == c`` that are
    *usable* (finite flux, finite ``ivar > 0`` and, with a ``bitmask``, none
    of ``bits`` set) and continuum pixels give the
    weighted normal equations ``B^T W B coef = B^T W f``. The chip is fitted
    when there are at least ``max(min_pixels, K)`` of them and the normal
    matrix is not singular by the rule of
    :func:`~cannon_fast._reference.normal_equations.solve_normal_equations`;
    the continuum ``B coef`` must then be finite and positive at every usable
    pixel of the chip. A fitted chip gets ``flux / cont`` and ``ivar cont²`` at
    its usable pixels and ``(1, 0)`` elsewhere; a chip that is not fitted, a
    gap (``chip < 0``) and a pixel of no chip (``chip >= n_chips``) get flux
    1, ivar 0 and continuum 0. The fit is in float64 whatever the precision
    of the arrays.

    Parameters
    ----------
    flux, ivar : ndarray of float32 or float64, (N, P)
        Flux and inverse variance; ``ivar == 0`` (or a non-finite flux or
        ivar) marks a pixel that is not usable.
    basis : ndarray of float64, (P, K)
        Basis functions of each pixel's chip (e.g. Chebyshev T_0..T_{K-1});
        ``1 <= K <= MAX_BASIS``, else every chip gets ``STATUS_BAD_FIT``.
    chip : ndarray of int64, (P,)
        Chip of each pixel, -1 in the gaps.
    is_cont : ndarray of uint8, (P,)
        1 at continuum pixels.
    n_chips, min_pixels : int
        Number of chips ``C``; fewest usable continuum pixels to fit a chip.
    flux_out, ivar_out : ndarray, (N, P)
        Normalized flux and its inverse variance, of the dtype of ``flux``.
    cont_out : ndarray, (N, P) or (0, P)
        The continuum (0 where not fitted); an empty array skips it.
    status_out : ndarray of int64, (N, C)
        One of the ``STATUS_*`` codes per star and chip.
    bitmask : ndarray of an integer dtype (8 to 64 bits), (N, P), optional
        Quality bits of each pixel (e.g. APOGEE's PIXMASK): a pixel with
        ``int64(bitmask) & bits != 0`` is not usable, as if its ivar were 0.
        This masks raw spectra as they are normalized, without a masked copy.
    bits : int
        The bad bits (an int64 bit pattern).
    """
    n, p = flux.shape
    k = basis.shape[1]
    keep = len(cont_out) > 0
    flux_out[...] = 1.0
    ivar_out[...] = 0.0
    if keep:
        cont_out[...] = 0.0
    if not 1 <= k <= MAX_BASIS:
        status_out[...] = STATUS_BAD_FIT
        return
    status_out[...] = STATUS_OK
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    cont_pix = np.asarray(is_cont) != 0
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)  # (N, P)
    if bitmask is not None:
        usable &= (np.asarray(bitmask).astype(np.int64) & np.int64(bits)) == 0
    for s in range(n):
        for c in range(n_chips):
            on = chip == c
            good = on & usable[s]
            use = good & cont_pix
            if not good.any():
                status_out[s, c] = STATUS_NO_PIXELS
                continue
            if use.sum() < max(min_pixels, k):
                status_out[s, c] = STATUS_FEW_PIXELS
                continue
            B = basis[use]  # (M, K)
            w = ivar[s, use]
            chol = cholesky(B.T @ (w[:, None] * B))
            if chol is None:
                status_out[s, c] = STATUS_BAD_FIT
                continue
            coef = cho_solve((chol, True), B.T @ (w * flux[s, use]))
            cont = basis[on] @ coef
            g = good[on]
            with np.errstate(invalid="ignore"):
                if not np.all(np.isfinite(cont[g]) & (cont[g] > 0)):
                    status_out[s, c] = STATUS_BAD_FIT
                    continue
            fo = np.ones(on.sum())
            io = np.zeros(on.sum())
            fo[g] = flux[s, on][g] / cont[g]
            io[g] = ivar[s, on][g] * cont[g] ** 2
            flux_out[s, on] = fo
            ivar_out[s, on] = io
            if keep:
                cont_out[s, on] = cont
