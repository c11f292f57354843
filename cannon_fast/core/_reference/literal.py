"""The modeling lab's training algorithm, literally: a grid in s², theta re-solved at each point.

Slow (a weighted least-squares solve per pixel per grid point) and used only to
check the fast alternating scheme of ``CannonModel.train`` on small problems.

References
----------
Ness et al. 2015, ApJ 808, 16, eqs. 4-5; the modeling lab, step 6(b).
"""
import numpy as np
from scipy.optimize import minimize_scalar

from .s2_grid import GRID_PER_DECADE, S2_FLOOR


def _profile(s2, design, f, v):
    """Profile log likelihood of one pixel at s² (theta re-solved), and theta."""
    w = 1.0 / (v + s2)
    a = design.T @ (w[:, None] * design)
    theta = np.linalg.solve(a, design.T @ (w * f))
    r = f - design @ theta
    return -0.5 * np.sum(r * r * w - np.log(w)), theta


def train_profile_grid(design, flux, ivar):
    """Maximise the profile likelihood in s² pixel by pixel on a widening grid.

    Parameters
    ----------
    design : ndarray, (N, T)
    flux, ivar : ndarray, (N, P)

    Returns
    -------
    theta : ndarray, (P, T)
    s2 : ndarray, (P,)
    """
    n_pix = flux.shape[1]
    theta = np.zeros((n_pix, design.shape[1]))
    s2 = np.zeros(n_pix)
    for p in range(n_pix):
        ok = ivar[:, p] > 0
        x, f, v = design[ok], flux[ok, p], 1.0 / ivar[ok, p]
        lo = S2_FLOOR * v.mean()
        hi = max(np.var(f), lo * 10)
        while True:  # widen the grid until its best point is not on the upper edge
            grid = np.concatenate([[0.0], np.geomspace(lo, hi, int(np.log10(hi / lo)
                                                                    * GRID_PER_DECADE) + 2)])
            g = np.array([_profile(s, x, f, v)[0] for s in grid])
            k = int(np.argmax(g))
            if k < len(grid) - 1:
                break
            hi *= 100.0
        if k == 0:
            s2[p], theta[p] = 0.0, _profile(0.0, x, f, v)[1]
            continue
        res = minimize_scalar(lambda s: -_profile(s, x, f, v)[0], bounds=(grid[k - 1], grid[k + 1]),
                              method="bounded", options=dict(xatol=1e-7 * grid[k]))
        s2[p] = res.x if -res.fun >= g[k] else grid[k]
        theta[p] = _profile(s2[p], x, f, v)[1]
    return theta, s2
