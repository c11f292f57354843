"""Per-pixel intrinsic scatter s² by maximum likelihood (numpy reference).

For residuals ``r_n`` and noise variances ``v_n`` of the valid training stars
at one pixel, the log likelihood in s² is

    g(s²) = -1/2 sum_n [ r_n² / (v_n + s²) + log(v_n + s²) ],

whose derivative ``g'(s²) = 1/2 sum_n (r_n² - v_n - s²) / (v_n + s²)²`` is
negative for every ``s² > max_n r_n²``: the maximum lies in ``[0, max r²]``.
A geometric grid over that bracket (plus s² = 0) locates the best cell, and a
bounded scalar search refines it.

The tolerance, the same for every backend (``tests/test_backends.py`` checks
each against the exact maximiser ``s²*`` of g), is

    |s² - s²*| <= max(S2_RTOL / 2 * s²*, S2_FLOOR * mean_n v_n)

(to first order in S2_RTOL): a relative 5e-5 on s² (so 5e-5 on ln s²), except
below ``S2_FLOOR`` (1e-4) of the mean noise variance of the pixel's valid
stars, where an intrinsic variance changes no weight by more than 0.01 % and
the tolerance is that absolute amount (such an s² may come out as 0). The grid
does not set the precision: with GRID_PER_DECADE points per factor of ten
(neighbours at most 10^(1/3) ~ 2.15 apart in s²) over ``[S2_FLOOR mean(v),
max r²]``, plus 0, it only brackets the maximum. The refinement sets it: the
numba and C kernels find the root of g' by regula falsi until the bracket is
narrower than S2_RTOL of its upper end, and return its midpoint; this
reference maximises g itself (Brent, to 1e-6 of the grid point), which the
flatness of g near its maximum limits to about 1e-5 relative, and to about
1e-4 just above the floor, where the absolute term takes over. Two local
maxima less than a grid step apart are not told apart: the result is then
the better of the maxima the grid separates.

``s2_update_warm`` is the same search started from a previous s² (training's
later passes start from the pass before, whose theta hardly differs): Newton
steps on g' from the start until a step is below S2_RTOL / 4 of the root, then
one evaluation just across it closes a bracket narrower than S2_RTOL of its
upper end, whose midpoint is returned (the same tolerance as above). About four
evaluations of g' instead of the grid's ~15. It finds the maximum the start
lies in the basin of; the cold search is used where the start is 0, or where a
step leaves the concave region around a maximum (g'' >= 0), heads for s² <= 0
or fails to settle in WARM_STEPS. The two differ only if g has two separate
maxima of which the start's is not the higher, which for training would need
them to trade places between passes (the start came from a full search).

References
----------
Ness et al. 2015, ApJ 808, 16, eq. 4 (the likelihood with s²).
"""
import numpy as np

#: the refined s² is within S2_RTOL / 2 of the maximiser, relative (see above)
S2_RTOL = 1e-4
#: the grid reaches down to this fraction of the mean noise variance: an intrinsic
#: variance that small changes the weights by < 0.01 %, i.e. it is zero for the fit
S2_FLOOR = 1e-4
#: grid points per factor of ten
GRID_PER_DECADE = 3
#: Newton steps of the warm-started search before it gives up for the cold one
WARM_STEPS = 8


def loglike_s2(s2, resid, var):
    """g(s²) above for one pixel (valid stars only)."""
    tot = var + s2
    return -0.5 * np.sum(resid ** 2 / tot + np.log(tot))


def s2_update(resid, ivar, s2_out, status_out):
    """Maximise the likelihood in s² at every pixel given the residuals.

    Contract: ``(n),(n)->(),()`` over pixels.

    Parameters
    ----------
    resid : ndarray, (N, P)
        Residuals ``f - theta . v`` of the training stars.
    ivar : ndarray, (N, P)
        Inverse noise variances; 0 where a star is not valid at a pixel. (The
        inverse, not the variance, so that training needs no (N, P) array of
        variances: the kernels invert while they gather each pixel's stars.)
    s2_out : ndarray, (P,)
    status_out : ndarray of int8, (P,)
        0 (interior or zero maximum) or 1 (fewer than two valid stars: s² = 0).
    """
    from scipy.optimize import minimize_scalar  # here: importing scipy.optimize is slow

    for p in range(resid.shape[1]):
        ok = ivar[:, p] > 0
        r, v = resid[ok, p], 1.0 / ivar[ok, p]
        if len(r) < 2:
            s2_out[p], status_out[p] = 0.0, 1
            continue
        hi = float(np.max(r ** 2))
        lo = S2_FLOOR * float(np.mean(v))
        if hi <= lo:
            s2_out[p], status_out[p] = 0.0, 0
            continue
        n_grid = int(np.ceil(np.log10(hi / lo) * GRID_PER_DECADE)) + 1
        grid = np.concatenate([[0.0], np.geomspace(lo, hi, n_grid)])
        g = np.array([loglike_s2(s, r, v) for s in grid])
        k = int(np.argmax(g))
        if k == 0:
            s2_out[p], status_out[p] = 0.0, 0
            continue
        a = grid[k - 1]
        b = grid[min(k + 1, len(grid) - 1)]
        res = minimize_scalar(lambda s: -loglike_s2(s, r, v), bounds=(a, b), method="bounded",
                              options=dict(xatol=S2_RTOL * grid[k] * 1e-2))
        s2_out[p] = res.x if -res.fun >= g[k] else grid[k]
        status_out[p] = 0


def _dg_ddg(s2, r2, v):
    """2 g'(s²) and 2 g''(s²) for one pixel (valid stars only)."""
    u = 1.0 / (v + s2)
    return float(np.sum((r2 * u - 1.0) * u)), float(np.sum((1.0 - 2.0 * r2 * u) * u * u))


def _warm_one(s0, r2, v):
    """The warm-started search at one pixel (see the module's docstring); None: go cold."""
    s = s0
    d, dd = _dg_ddg(s, r2, v)
    for _ in range(WARM_STEPS):
        if not dd < 0:  # not concave here: outside the basin of a maximum
            return None
        t = min(max(s - d / dd, 0.25 * s), 4.0 * s)
        eps = 0.25 * S2_RTOL * t
        if abs(t - s) <= eps:
            # the root is within eps of t (Newton converges quadratically): the point eps
            # beyond t, across the root from s, closes a bracket of width <= 2 eps
            u = t + eps if d > 0 else t - eps
            du, ddu = _dg_ddg(u, r2, v)
            if (d > 0) != (du > 0):
                return 0.5 * (s + u)
            s, d, dd = u, du, ddu
            continue
        if not t > 0:
            return None
        s = t
        d, dd = _dg_ddg(s, r2, v)
    return None


def s2_update_warm(resid, ivar, s2_start, s2_out, status_out):
    """``s2_update`` started from ``s2_start`` (see the module's docstring).

    Contract: ``(n),(n),()->(),()`` over pixels.

    Parameters
    ----------
    resid, ivar : ndarray, (N, P)
        As ``s2_update``.
    s2_start : ndarray, (P,)
        Where to start; 0 (or anything not > 0) runs the cold search there.
    s2_out : ndarray, (P,)
    status_out : ndarray of int8, (P,)
        As ``s2_update``.
    """
    cold = []
    for p in range(resid.shape[1]):
        ok = ivar[:, p] > 0
        s = None
        if ok.sum() >= 2 and s2_start[p] > 0:
            s = _warm_one(float(s2_start[p]), resid[ok, p] ** 2, 1.0 / ivar[ok, p])
        if s is None:
            cold.append(p)
        else:
            s2_out[p], status_out[p] = s, 0
    if cold:
        s2_c, st_c = np.empty(len(cold)), np.empty(len(cold), np.int8)
        s2_update(resid[:, cold], ivar[:, cold], s2_c, st_c)
        s2_out[cold], status_out[cold] = s2_c, st_c
