"""Per-pixel weighted least squares from packed normal equations (numba)."""
import numba as nb
import numpy as np

from .._reference.normal_equations import CHOL_RTOL
from ._jit import JIT, JIT_PARALLEL


@nb.njit(**JIT)
def _cholesky_inplace(a, n):
    """Lower Cholesky factor of a[:n, :n] in place; False if singular.

    The rule of ``_reference.normal_equations.solve_normal_equations``: every
    squared pivot must exceed ``CHOL_RTOL`` times the largest diagonal entry.
    """
    dmax = 0.0
    for i in range(n):
        if a[i, i] > dmax:
            dmax = a[i, i]
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= a[j, k] * a[j, k]
        if not s > CHOL_RTOL * dmax:  # not "s <= ...": NaN is singular too
            return False
        d = np.sqrt(s)
        a[j, j] = d
        for i in range(j + 1, n):
            s = a[i, j]
            for k in range(j):
                s -= a[i, k] * a[j, k]
            a[i, j] = s / d
    return True


@nb.njit(**JIT)
def _cho_solve(chol, b, out, n):
    """Solve (L L^T) out = b with the lower factor L."""
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= chol[i, k] * out[k]
        out[i] = s / chol[i, i]
    for i in range(n - 1, -1, -1):
        s = out[i]
        for k in range(i + 1, n):
            s -= chol[k, i] * out[k]
        out[i] = s / chol[i, i]


@nb.njit(**JIT_PARALLEL)
def solve_normal_equations(a_packed, b, theta_out, cinv_out, status_out):
    """Solve ``A theta = b`` per pixel and return ``A^-1`` packed: ``(t2),(t)->(t),(t2),()``."""
    n_pix, n_terms = b.shape
    for p in nb.prange(n_pix):
        a = np.empty((n_terms, n_terms))
        k = 0
        for i in range(n_terms):
            for j in range(i, n_terms):
                a[i, j] = a_packed[p, k]
                a[j, i] = a_packed[p, k]
                k += 1
        if not _cholesky_inplace(a, n_terms):
            theta_out[p, :] = 0.0
            if cinv_out.shape[0] > 0:
                cinv_out[p, :] = 0.0
            status_out[p] = 1
            continue
        _cho_solve(a, b[p], theta_out[p], n_terms)
        if cinv_out.shape[0] == 0:  # caller does not want the inverse
            status_out[p] = 0
            continue
        # A^-1 = L^-T L^-1: invert the triangular factor, then one product (T³/3 flops)
        linv = np.zeros((n_terms, n_terms))
        for j in range(n_terms):
            linv[j, j] = 1.0 / a[j, j]
            for i in range(j + 1, n_terms):
                acc = 0.0
                for k2 in range(j, i):
                    acc -= a[i, k2] * linv[k2, j]
                linv[i, j] = acc / a[i, i]
        k = 0
        for i in range(n_terms):
            for j in range(i, n_terms):
                acc = 0.0
                for k2 in range(j, n_terms):
                    acc += linv[k2, i] * linv[k2, j]
                cinv_out[p, k] = acc
                k += 1
        status_out[p] = 0
