"""Per-pixel intrinsic scatter s² by maximum likelihood (numba).

Same contract and result as ``_reference.s2_grid.s2_update``, reached through
the derivative ``g'(s²) = 1/2 sum (r² - v - s²) / (v + s²)²`` (no logarithms
on the grid): every sign change from + to - on the grid brackets a local
maximum, regula falsi (Illinois) refines it until the bracket is narrower than
S2_RTOL of its upper end, and the logarithm is evaluated only at the
candidates to pick the global one. ``s2_update_warm`` starts from a previous
s² instead (Newton steps on g'). The tolerance both meet, and what the warm
start may miss, are stated in ``_reference.s2_grid``.
"""
import numba as nb
import numpy as np

from .._reference.s2_grid import GRID_PER_DECADE, S2_FLOOR, S2_RTOL, WARM_STEPS
from ._jit import JIT, JIT_FASTMATH, JIT_PARALLEL

_BLOCK = 32  # pixels gathered per block, so reads of (N, P) rows are contiguous


@nb.njit(**JIT_FASTMATH)
def _dg(s, r2, v, m):
    acc = 0.0
    for i in range(m):
        u = 1.0 / (v[i] + s)
        acc += (r2[i] * u - 1.0) * u
    return acc


@nb.njit(**JIT_FASTMATH)
def _dg_lip(s, r2, v, m):
    """``_dg`` and a bound on ``|d/ds _dg|`` over ``[s, inf)`` (see ``_one_pixel``)."""
    acc = 0.0
    bnd = 0.0
    for i in range(m):
        u = 1.0 / (v[i] + s)
        ru = r2[i] * u
        acc += (ru - 1.0) * u
        bnd += (1.0 + 2.0 * ru) * u * u
    return acc, bnd


@nb.njit(**JIT_FASTMATH)
def _dg_ub(s, r2, v, m, hi, k):
    """``_dg`` and a bound on it over all of [s, hi] (hi = max r2).

    Each term f(t) = (r2 - v - t) / (v + t)² falls, then rises (its one turning
    point is a minimum), so on [s, hi] it is at most the larger of f(s) and
    f(hi) <= (r2 - v - hi) k, k = 1 / (max v + hi)² (the numerator is < 0). A
    bound < 0: g' < 0 on [s, hi], and beyond hi every term is < 0.
    """
    acc = 0.0
    bnd = 0.0
    for i in range(m):
        u = 1.0 / (v[i] + s)
        t = (r2[i] * u - 1.0) * u
        h = (r2[i] - v[i] - hi) * k
        acc += t
        bnd += max(t, h)
    return acc, bnd


@nb.njit(**JIT_FASTMATH)
def _g(s, r2, v, m):
    acc = 0.0
    for i in range(m):
        t = v[i] + s
        acc -= r2[i] / t + np.log(t)
    return 0.5 * acc


@nb.njit(**JIT)
def _refine(a, b, fa, fb, r2, v, m):
    """Root of g' in (a, b) with ``fa = g'(a) > 0 >= g'(b) = fb`` (known from the scan).

    Regula falsi (Illinois), until ``b - a <= S2_RTOL b``; the midpoint is then within
    S2_RTOL / 2 of the root, relative.
    """
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
    vmax = 0.0
    for i in range(m):
        if r2[i] > hi:
            hi = r2[i]
        if v[i] > vmax:
            vmax = v[i]
    vmean = np.mean(v[:m])
    lo = S2_FLOOR * vmean
    if hi <= lo:
        return 0.0, 0
    n_grid = int(np.ceil(np.log10(hi / lo) * GRID_PER_DECADE)) + 1
    ratio = (hi / lo) ** (1.0 / (n_grid - 1)) if n_grid > 1 else 1.0
    # Candidates for the maximum: s² = 0 when g'(0) <= 0, and every root of g' where it
    # goes from + to -. g itself (a logarithm per star) is only needed to choose between
    # two or more of them, which is rare: best_g stays NaN until then.
    n_cand = 0
    best_s, best_g = 0.0, np.nan
    prev_s = 0.0
    prev_d, lip = _dg_lip(0.0, r2, v, m)
    if prev_d <= 0:
        n_cand = 1
    # d/ds of each term of g' is (v + s - 2 r2) / (v + s)^3, of modulus at most
    # u^2 + 2 r2 u^3 (u = 1 / (v + s)), which decreases with s: g' keeps its sign on
    # [0, |g'(0)| / lip). The scan starts there when that is above lo, which skips about
    # two of the five decades of the grid that lie below the noise variance. The last
    # point is hi, where g' < 0 for certain.
    s = max(lo, abs(prev_d) / lip)
    k = 1.0 / ((vmax + hi) * (vmax + hi))
    while True:
        if s > hi:
            s = hi
        # below half the mean noise variance the bound is never < 0 on data like the
        # benchmark's (the pixel's larger residuals keep it up): the plain g' there
        if s >= 0.5 * vmean:
            d, ub = _dg_ub(s, r2, v, m, hi, k)
        else:
            d, ub = _dg(s, r2, v, m), 1.0
        if prev_d > 0 and d <= 0:  # a local maximum in (prev_s, s)
            root = _refine(prev_s, s, prev_d, d, r2, v, m)
            if n_cand == 0:
                best_s = root
            else:
                if np.isnan(best_g):
                    best_g = _g(best_s, r2, v, m)
                gr = _g(root, r2, v, m)
                if gr > best_g:
                    best_s, best_g = root, gr
            n_cand += 1
        # the rest of the grid would find no maximum (``_dg_ub``): about a third of
        # the scan, the part above the noise variance, is skipped this way
        if s >= hi or ub < 0:
            break
        prev_s, prev_d = s, d
        s *= ratio
    return best_s, 0


@nb.njit(**JIT_FASTMATH)
def _dg_ddg(s, r2, v, m):
    """``_dg`` and 2 g''(s): d/ds of each term (r2 u - 1) u is (1 - 2 r2 u) u²."""
    acc = 0.0
    acc2 = 0.0
    for i in range(m):
        u = 1.0 / (v[i] + s)
        ru = r2[i] * u
        acc += (ru - 1.0) * u
        acc2 += (1.0 - 2.0 * ru) * u * u
    return acc, acc2


@nb.njit(**JIT)
def _warm_one(s0, r2, v, m):
    """Newton steps on g' from s0 (``_reference.s2_grid._warm_one``); ok False: go cold."""
    s = s0
    d, dd = _dg_ddg(s, r2, v, m)
    for _ in range(WARM_STEPS):
        if not dd < 0:
            return 0.0, False
        t = min(max(s - d / dd, 0.25 * s), 4.0 * s)
        eps = 0.25 * S2_RTOL * t
        if abs(t - s) <= eps:
            u = t + eps if d > 0 else t - eps
            du, ddu = _dg_ddg(u, r2, v, m)
            if (d > 0) != (du > 0):
                return 0.5 * (s + u), True
            s, d, dd = u, du, ddu
            continue
        if not t > 0:
            return 0.0, False
        s = t
        d, dd = _dg_ddg(s, r2, v, m)
    return 0.0, False


@nb.njit(**JIT)
def _gather(resid, ivar, p0, width, r2, v, counts):
    """The valid stars' r² and variances of pixels p0.. p0 + width, pixel by pixel."""
    n_stars = resid.shape[0]
    counts[:] = 0
    for n in range(n_stars):
        for j in range(width):
            iv = ivar[n, p0 + j]
            if iv > 0:
                c = counts[j]
                rr = resid[n, p0 + j]
                r2[j, c] = rr * rr
                v[j, c] = 1.0 / iv
                counts[j] = c + 1


@nb.njit(**JIT_PARALLEL)
def s2_update(resid, ivar, s2_out, status_out):
    """Maximise the likelihood in s² at every pixel: ``(n),(n)->(),()``."""
    # a start of 0 takes the full search at every pixel: the warm kernel's cold path
    s2_update_warm(resid, ivar, np.zeros(resid.shape[1]), s2_out, status_out)


@nb.njit(**JIT_PARALLEL)
def s2_update_warm(resid, ivar, s2_start, s2_out, status_out):
    """``s2_update`` started from ``s2_start``: ``(n),(n),()->(),()``."""
    n_stars, n_pix = resid.shape
    n_blocks = (n_pix + _BLOCK - 1) // _BLOCK
    for blk in nb.prange(n_blocks):
        p0 = blk * _BLOCK
        width = min(p0 + _BLOCK, n_pix) - p0
        r2 = np.empty((width, n_stars))
        v = np.empty((width, n_stars))
        counts = np.zeros(width, dtype=np.int64)
        _gather(resid, ivar, p0, width, r2, v, counts)
        for j in range(width):
            m = counts[j]
            ok = False
            if m >= 2 and s2_start[p0 + j] > 0:
                s, ok = _warm_one(s2_start[p0 + j], r2[j], v[j], m)
                st = 0
            if not ok:
                s, st = _one_pixel(r2[j], v[j], m)
            s2_out[p0 + j] = s
            status_out[p0 + j] = st
