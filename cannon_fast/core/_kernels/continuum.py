"""Pseudo-continuum normalization, numba: batched over stars with ``prange``.

Same contract as :func:`cannon_fast.core._reference.continuum.continuum_normalize`.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .._reference.continuum import (MAX_BASIS, STATUS_BAD_FIT, STATUS_FEW_PIXELS,
                                    STATUS_NO_PIXELS)
from ._jit import JIT_INLINE, JIT_PARALLEL
from .normal_equations import _cho_solve, _cholesky_inplace

__all__ = ["continuum_normalize"]


@nb.njit(**JIT_INLINE)
def _good(f, w):
    """Return whether a pixel is usable (finite flux, finite positive ivar)."""
    return (w > 0.0) & (w < np.inf) & (np.abs(f) < np.inf)


def _sig(ft):
    return nb.void(ft[:, ::1], ft[:, ::1], nb.float64[:, ::1], nb.int64[::1], nb.uint8[::1],
                   nb.int64, nb.int64, ft[:, ::1], ft[:, ::1], ft[:, ::1], nb.int64[:, ::1])


def continuum_normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels,
                        flux_out, ivar_out, cont_out, status_out, bitmask=None, bits=0):
    """Per-chip weighted least-squares continuum, divided out.

    ``(p),(p),(p,k),(p),(p),(),()->(p),(p),(p),(c)`` over stars.

    ``cont_out`` may have zero rows, in which case the continuum is not stored. A
    ``bitmask`` (N, P) of any integer dtype zeroes ivar where ``bits`` are set, here
    with numpy before the JIT kernel: a numba kernel per bitmask dtype would cost ~10 s
    of compilation each, and the masking pass fused into the normalization is the C
    kernel's (the backend ``auto`` picks).
    """
    if bitmask is not None:
        bitmask = np.asarray(bitmask)
        if bitmask.shape != flux.shape or bitmask.dtype.kind not in "iu":
            raise TypeError(f"continuum_normalize: bitmask must be an integer array of shape "
                            f"{flux.shape}, got {bitmask.dtype} {bitmask.shape}")
        ivar = np.where(_bit_set(bitmask, bits), ivar.dtype.type(0), ivar)
    _normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels, flux_out, ivar_out,
               cont_out, status_out)


def _bit_set(bitmask, bits):
    """``int64(bitmask) & bits != 0``, without an int64 copy when ``bits`` fits the dtype."""
    if 0 <= bits <= np.iinfo(bitmask.dtype).max:
        return (bitmask & bitmask.dtype.type(bits)) != 0
    return (bitmask.astype(np.int64) & np.int64(bits)) != 0


@nb.njit([_sig(nb.float64), _sig(nb.float32)], **JIT_PARALLEL)
def _normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels,
               flux_out, ivar_out, cont_out, status_out):
    """The JIT kernel (``continuum_normalize`` without a bitmask)."""
    n, p = flux.shape
    k = basis.shape[1]
    keep = cont_out.shape[0] == n
    if k < 1 or k > MAX_BASIS:
        flux_out[:, :] = 1.0
        ivar_out[:, :] = 0.0
        if keep:
            cont_out[:, :] = 0.0
        status_out[:, :] = STATUS_BAD_FIT
        return
    # runs of consecutive pixels on one chip (one run per chip for the apStar chips),
    # and the continuum pixels of each chip
    n_runs = 0
    for j in range(p):
        c = chip[j]
        if 0 <= c < n_chips and (j == 0 or chip[j - 1] != c):
            n_runs += 1
    run_lo = np.empty(n_runs, np.int64)
    run_hi = np.empty(n_runs, np.int64)
    run_chip = np.empty(n_runs, np.int64)
    ncont = np.zeros(n_chips + 1, np.int64)
    last = -1
    for j in range(p):
        c = chip[j]
        if 0 <= c < n_chips:
            if j == 0 or chip[j - 1] != c:
                last += 1
                run_lo[last] = j
                run_chip[last] = c
            run_hi[last] = j + 1
            if is_cont[j] != 0:
                ncont[c + 1] += 1
    for c in range(n_chips):
        ncont[c + 1] += ncont[c]
    cidx = np.empty(ncont[n_chips], np.int64)
    fill = ncont[:n_chips].copy()
    for j in range(p):
        c = chip[j]
        if 0 <= c < n_chips and is_cont[j] != 0:
            cidx[fill[c]] = j
            fill[c] += 1
    for s in nb.prange(n):
        A = np.empty((MAX_BASIS, MAX_BASIS))
        b = np.empty(MAX_BASIS)
        coef = np.empty(MAX_BASIS)
        # gaps and pixels of no chip: no data
        for j in range(p):
            if chip[j] < 0 or chip[j] >= n_chips:
                flux_out[s, j] = 1.0
                ivar_out[s, j] = 0.0
                if keep:
                    cont_out[s, j] = 0.0
        for c in range(n_chips):
            for q in range(k):
                b[q] = 0.0
                for q2 in range(k):
                    A[q, q2] = 0.0
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
                    for q2 in range(q, k):
                        A[q, q2] += wb * basis[j, q2]
            code = 0
            if nuse < min_pixels or nuse < k:
                code = STATUS_FEW_PIXELS
                if nuse == 0:  # a missing chip has no usable pixel at all
                    code = STATUS_NO_PIXELS
                    for r in range(n_runs):
                        if run_chip[r] == c:
                            for j in range(run_lo[r], run_hi[r]):
                                if _good(flux[s, j], ivar[s, j]):
                                    code = STATUS_FEW_PIXELS
                                    break
            if code == 0:
                for q in range(k):
                    for q2 in range(q):
                        A[q, q2] = A[q2, q]
                # the singular-matrix rule of solve_normal_equations
                if _cholesky_inplace(A, k):
                    _cho_solve(A, b, coef, k)
                else:
                    code = STATUS_BAD_FIT
            if code == 0:
                # one pass: evaluate, divide, count usable pixels without a positive continuum
                nonpos = 0
                for r in range(n_runs):
                    if run_chip[r] != c:
                        continue
                    if k == 4:  # the default degree 3, unrolled
                        c0, c1, c2, c3 = coef[0], coef[1], coef[2], coef[3]
                        for j in range(run_lo[r], run_hi[r]):
                            cont = (c0 * basis[j, 0] + c1 * basis[j, 1] + c2 * basis[j, 2]
                                    + c3 * basis[j, 3])
                            w = np.float64(ivar[s, j])
                            f = np.float64(flux[s, j])
                            g = _good(f, w)
                            ok = g and cont > 0.0 and cont < np.inf
                            nonpos += g and not ok
                            flux_out[s, j] = f / cont if ok else 1.0
                            ivar_out[s, j] = w * cont * cont if ok else 0.0
                            if keep:
                                cont_out[s, j] = cont
                    else:
                        for j in range(run_lo[r], run_hi[r]):
                            cont = 0.0
                            for q in range(k):
                                cont += coef[q] * basis[j, q]
                            w = np.float64(ivar[s, j])
                            f = np.float64(flux[s, j])
                            g = _good(f, w)
                            ok = g and cont > 0.0 and cont < np.inf
                            nonpos += g and not ok
                            flux_out[s, j] = f / cont if ok else 1.0
                            ivar_out[s, j] = w * cont * cont if ok else 0.0
                            if keep:
                                cont_out[s, j] = cont
                if nonpos > 0:
                    code = STATUS_BAD_FIT  # positive wherever data carry weight
            status_out[s, c] = code
            if code != 0:
                for r in range(n_runs):
                    if run_chip[r] == c:
                        for j in range(run_lo[r], run_hi[r]):
                            flux_out[s, j] = 1.0
                            ivar_out[s, j] = 0.0
                            if keep:
                                cont_out[s, j] = 0.0
