"""Per-pixel intrinsic scatter s² by maximum likelihood (numba).

Same contract and result as ``_reference.s2_grid.s2_update``, reached through
the derivative ``g'(s²) = 1/2 sum (r² - v - s²) / (v + s²)²`` (no logarithms
on the grid): every sign change from + to - on the grid brackets a local
maximum, bisection refines it, and the logarithm is evaluated only at the
candidates to pick the global one.
"""
import numba as nb
import numpy as np

from .._reference.s2_grid import GRID_PER_DECADE, S2_FLOOR, S2_RTOL
from ._jit import JIT

_BLOCK = 32  # pixels gathered per block, so reads of (N, P) rows are contiguous


@nb.njit(fastmath=True, **JIT)
def _dg(s, r2, v, m):
    acc = 0.0
    for i in range(m):
        u = 1.0 / (v[i] + s)
        acc += (r2[i] * u - 1.0) * u
    return acc


@nb.njit(fastmath=True, **JIT)
def _g(s, r2, v, m):
    acc = 0.0
    for i in range(m):
        t = v[i] + s
        acc -= r2[i] / t + np.log(t)
    return 0.5 * acc


@nb.njit(**JIT)
def _refine(a, b, r2, v, m):
    """Root of g' in (a, b) with g'(a) > 0 >= g'(b): regula falsi (Illinois), to S2_RTOL."""
    fa = _dg(a, r2, v, m)
    fb = _dg(b, r2, v, m)
    side = 0
    for _ in range(100):
        if b - a <= S2_RTOL * b:
            break
        mid = (a * fb - b * fa) / (fb - fa)
        if not (a < mid < b):
            mid = 0.5 * (a + b)
        fm = _dg(mid, r2, v, m)
        if fm > 0:
            a, fa = mid, fm
            if side == 1:
                fb *= 0.5
            side = 1
        else:
            b, fb = mid, fm
            if side == -1:
                fa *= 0.5
            side = -1
    return 0.5 * (a + b)


@nb.njit(**JIT)
def _one_pixel(r2, v, m):
    if m < 2:
        return 0.0, 1
    hi = 0.0
    for i in range(m):
        if r2[i] > hi:
            hi = r2[i]
    lo = S2_FLOOR * np.mean(v[:m])
    if hi <= lo:
        return 0.0, 0
    n_grid = int(np.ceil(np.log10(hi / lo) * GRID_PER_DECADE)) + 1
    ratio = (hi / lo) ** (1.0 / (n_grid - 1)) if n_grid > 1 else 1.0
    best_s, best_g = 0.0, -np.inf
    prev_s = 0.0
    prev_d = _dg(0.0, r2, v, m)
    if prev_d <= 0:
        best_g = _g(0.0, r2, v, m)
    s = lo
    for k in range(n_grid):
        d = _dg(s, r2, v, m)
        if prev_d > 0 and d <= 0:  # a local maximum in (prev_s, s)
            root = _refine(prev_s, s, r2, v, m)
            gr = _g(root, r2, v, m)
            if gr > best_g:
                best_s, best_g = root, gr
        prev_s, prev_d = s, d
        s *= ratio
    return best_s, 0


@nb.njit(parallel=True, **JIT)
def s2_update(resid, var, s2_out, status_out):
    """Maximise the likelihood in s² at every pixel: ``(n),(n)->(),()``."""
    n_stars, n_pix = resid.shape
    n_blocks = (n_pix + _BLOCK - 1) // _BLOCK
    for blk in nb.prange(n_blocks):
        p0 = blk * _BLOCK
        p1 = min(p0 + _BLOCK, n_pix)
        width = p1 - p0
        r2 = np.empty((width, n_stars))
        v = np.empty((width, n_stars))
        counts = np.zeros(width, dtype=np.int64)
        for n in range(n_stars):
            for j in range(width):
                vv = var[n, p0 + j]
                if np.isfinite(vv):
                    c = counts[j]
                    rr = resid[n, p0 + j]
                    r2[j, c] = rr * rr
                    v[j, c] = vv
                    counts[j] = c + 1
        for j in range(width):
            s, st = _one_pixel(r2[j], v[j], counts[j])
            s2_out[p0 + j] = s
            status_out[p0 + j] = st
