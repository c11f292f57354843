"""Pseudo-continuum normalization, numba: batched over stars with ``prange``.

Same contract as :func:`cannon_fast._reference.continuum.normalize`.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ._jit import JIT_INLINE, JIT_PARALLEL
from ._linalg import gauss_solve_inplace

__all__ = ["_normalize"]

_MAXK = 8  # basis functions per chip (degree <= 7)


@nb.njit(**JIT_INLINE)
def _good(f, w):
    """Return whether a pixel carries weight (finite flux, finite positive ivar)."""
    return (w > 0.0) & (w < np.inf) & (np.abs(f) < np.inf)


def _sig(ft):
    return nb.void(ft[:, ::1], ft[:, ::1], nb.float64[:, ::1], nb.int64[::1], nb.uint8[::1],
                   nb.int64, nb.int64, ft[:, ::1], ft[:, ::1], ft[:, ::1], nb.int64[:, ::1])


@nb.njit([_sig(nb.float64), _sig(nb.float32)], **JIT_PARALLEL)
def _normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels,
               flux_out, ivar_out, cont_out, status_out):
    """Per-chip weighted least-squares continuum, divided out.

    ``(n,p),(n,p),(p,k),(p),(p),(),() -> (n,p),(n,p),(n,p),(n,c)``

    ``cont_out`` may have zero rows, in which case the continuum is not stored.
    """
    n, p = flux.shape
    k = basis.shape[1]
    keep = cont_out.shape[0] == n
    if k < 1 or k > _MAXK:  # status 3 everywhere: the caller turns it into an error
        flux_out[:, :] = 1.0
        ivar_out[:, :] = 0.0
        status_out[:, :] = 3
        return
    # pixel ranges of each chip (contiguous) and the continuum pixels of each chip
    lo = np.full(n_chips, p, np.int64)
    hi = np.zeros(n_chips, np.int64)
    ncont = np.zeros(n_chips + 1, np.int64)
    for j in range(p):
        c = chip[j]
        if c >= 0:
            lo[c] = min(lo[c], j)
            hi[c] = max(hi[c], j + 1)
            if is_cont[j] != 0:
                ncont[c + 1] += 1
    for c in range(n_chips):
        ncont[c + 1] += ncont[c]
    cidx = np.empty(ncont[n_chips], np.int64)
    fill = ncont[:n_chips].copy()
    for j in range(p):
        c = chip[j]
        if c >= 0 and is_cont[j] != 0:
            cidx[fill[c]] = j
            fill[c] += 1
    for s in nb.prange(n):
        A = np.empty((_MAXK, _MAXK))
        b = np.empty(_MAXK)
        coef = np.empty(_MAXK)
        # gaps: no data
        for j in range(p):
            if chip[j] < 0:
                flux_out[s, j] = 1.0
                ivar_out[s, j] = 0.0
                if keep:
                    cont_out[s, j] = 0.0
        for c in range(n_chips):
            for q in range(k):
                b[q] = 0.0
                for r in range(k):
                    A[q, r] = 0.0
            nuse = 0
            for m in range(ncont[c], ncont[c + 1]):
                j = cidx[m]
                w = np.float64(ivar[s, j])
                f = np.float64(flux[s, j])
                if not _good(f, w):
                    continue
                nuse += 1
                for q in range(k):
                    wb = w * basis[j, q]
                    b[q] += wb * f
                    for r in range(q, k):
                        A[q, r] += wb * basis[j, r]
            code = 0
            if nuse < min_pixels or nuse < k:
                code = 2
                if nuse == 0:  # a missing chip has no usable pixel at all
                    code = 1
                    for j in range(lo[c], hi[c]):
                        if chip[j] == c and _good(flux[s, j], ivar[s, j]):
                            code = 2
                            break
            if code == 0:
                for q in range(k):
                    for r in range(q):
                        A[q, r] = A[r, q]
                scale = 0.0
                for q in range(k):
                    scale = max(scale, abs(A[q, q]))
                if not (scale > 0.0 and gauss_solve_inplace(A, b, coef, k, 1e-13 * scale)):
                    code = 3
            if code == 0:
                # one branch-free pass (vectorizes): evaluate, divide, note non-positive values
                nonpos = 0
                if k == 4:  # the default degree 3, unrolled
                    c0, c1, c2, c3 = coef[0], coef[1], coef[2], coef[3]
                    for j in range(lo[c], hi[c]):
                        cont = (c0 * basis[j, 0] + c1 * basis[j, 1] + c2 * basis[j, 2]
                                + c3 * basis[j, 3])
                        w = np.float64(ivar[s, j])
                        f = np.float64(flux[s, j])
                        g = _good(f, w)
                        ok = g and cont > 0.0
                        nonpos += g and not ok
                        flux_out[s, j] = f / cont if ok else 1.0
                        ivar_out[s, j] = w * cont * cont if ok else 0.0
                else:
                    for j in range(lo[c], hi[c]):
                        cont = 0.0
                        for q in range(k):
                            cont += coef[q] * basis[j, q]
                        w = np.float64(ivar[s, j])
                        f = np.float64(flux[s, j])
                        g = _good(f, w)
                        ok = g and cont > 0.0
                        nonpos += g and not ok
                        flux_out[s, j] = f / cont if ok else 1.0
                        ivar_out[s, j] = w * cont * cont if ok else 0.0
                if nonpos > 0:
                    code = 3  # the continuum must be positive wherever data carry weight
                elif keep:
                    for j in range(lo[c], hi[c]):
                        cont = 0.0
                        for q in range(k):
                            cont += coef[q] * basis[j, q]
                        cont_out[s, j] = cont
            status_out[s, c] = code
            if code != 0:
                for j in range(lo[c], hi[c]):
                    flux_out[s, j] = 1.0
                    ivar_out[s, j] = 0.0
                    if keep:
                        cont_out[s, j] = 0.0
