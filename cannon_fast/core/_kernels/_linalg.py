"""Small dense solves shared by the numba kernels (K <= ~25: cheaper inline than LAPACK)."""
import numba as nb
import numpy as np

from ._jit import JIT


@nb.njit(**JIT)
def gauss_solve_inplace(m, r, out, n, tol):
    """Solve ``m[:n, :n] out = r[:n]`` by Gaussian elimination with partial pivoting.

    ``m`` and ``r`` are overwritten. Returns False (``out`` untouched) when a pivot
    is not finite or not larger than ``tol`` in absolute value.
    """
    for col in range(n):
        piv = col
        for i in range(col + 1, n):
            if abs(m[i, col]) > abs(m[piv, col]):
                piv = i
        p = abs(m[piv, col])
        if not (p > tol and p < np.inf):
            return False
        if piv != col:
            for j in range(n):
                tmp = m[col, j]
                m[col, j] = m[piv, j]
                m[piv, j] = tmp
            tmp = r[col]
            r[col] = r[piv]
            r[piv] = tmp
        for i in range(col + 1, n):
            f = m[i, col] / m[col, col]
            for j in range(col, n):
                m[i, j] -= f * m[col, j]
            r[i] -= f * r[col]
    for i in range(n - 1, -1, -1):
        s = r[i]
        for j in range(i + 1, n):
            s -= m[i, j] * out[j]
        out[i] = s / m[i, i]
    return True
