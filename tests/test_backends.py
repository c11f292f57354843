"""Backends: every kernel against the numpy reference, on every other available backend.

Also hand-worked cases, the status paths, the full model per backend, backend
resolution, the C glue's validation and threads, and numba kernels in user @njit code.
"""
import ast
import inspect
import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.optimize import brentq

import cannon_fast.core.backends as backends
from cannon_fast import CannonModel
from cannon_fast.core import _kernels as nb_kernels
from cannon_fast.core import _reference as ref
from cannon_fast.core import vectorizer as vz
from cannon_fast.core._reference.model_eval import (HIT_BOUND, NOT_CONVERGED, STARTS_DISAGREE,
                                                    capped_step_matrices)
from cannon_fast.core._reference.s2_grid import GRID_PER_DECADE, S2_FLOOR, S2_RTOL, loglike_s2
from cannon_fast.core.backends import available_backends, kernels, resolve_backend
from cannon_fast.testing import make_synthetic

KERNELS = ("solve_normal_equations", "s2_update", "s2_update_warm", "lm_fit", "star_weights",
           "weighted_square_sum", "training_sums", "debias_steps", "sandwich_covariance", "design",
           "continuum_normalize")
needs_c = pytest.mark.skipif(backends._ccannon is None, reason="C extension not built")


# ------------------------------------------------------------------ helpers

def _normal_system(rng, n_pix=60, n_terms=10, n_stars=200):
    """Packed X^T W X and X^T W f from random designs and weights, as train() builds them."""
    x = rng.normal(size=(n_stars, n_terms))
    w = rng.uniform(0.2, 3.0, size=(n_stars, n_pix))
    a_packed = np.ascontiguousarray((vz.packed_outer(x).T @ w).T)  # (P, T2)
    b = np.ascontiguousarray((x.T @ (w * rng.normal(size=(n_stars, n_pix)))).T)  # (P, T)
    return a_packed, b


def _solve(k, a_packed, b, with_inverse=True):
    n_pix, n_terms = b.shape
    theta = np.full((n_pix, n_terms), np.nan)
    cinv = np.full((n_pix if with_inverse else 0, a_packed.shape[1]), np.nan)
    status = np.full(n_pix, -1, dtype=np.int8)
    k.solve_normal_equations(a_packed, b, theta, cinv, status)
    return theta, cinv, status


def _s2(k, resid, var):
    """s2_update on variances (inf or NaN: star not valid), passed as the kernels' ivar."""
    s2 = np.full(resid.shape[1], np.nan)
    status = np.full(resid.shape[1], -1, dtype=np.int8)
    with np.errstate(divide="ignore"):
        ivar = np.where(np.isfinite(var), 1.0 / var, 0.0)
    k.s2_update(np.ascontiguousarray(resid), ivar, s2, status)
    return s2, status


def _design(k, x, exponents):
    v = np.full((len(x), len(exponents)), np.nan)
    dv = np.full((len(x),) + exponents.shape, np.nan)
    k.design(x, exponents, v, dv)
    return v, dv


def _weights(k, flux, ivar, s2, good, theta0, t_pix):
    n, p = flux.shape
    out = (np.full((n, p), np.nan, np.float32), np.full((n, p), np.nan), np.full(n, np.nan),
           np.full(n, -1, np.int64), np.full((n, 3), np.nan), np.full(n, -1, np.int64))
    k.star_weights(flux, ivar, s2, good, theta0, t_pix, *out)
    return out


def _lm(k, g, h, c, exponents, starts, lo, hi, n_polish=2, max_iter=100, xtol=1e-8,
        disagree=9.0):
    n, n_labels = len(c), exponents.shape[1]
    x, phi = np.full((n, n_labels), np.nan), np.full(n, np.nan)
    it, st = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    first = ref.model_eval.start_objectives(g, h, c, exponents, starts, lo, hi)
    k.lm_fit(g, h, c, exponents, starts, first, lo, hi, n_polish, max_iter, xtol, disagree,
             x, phi, it, st)
    return x, phi, it, st


@pytest.fixture(scope="module")
def lm_problem():
    """Moments (G, h, c) of noisy spectra from a random quadratic model, with per-star starts."""
    rng = np.random.default_rng(7)
    n_stars, n_pix, n_labels, n_cand = 40, 300, 3, 8
    exponents = vz.polynomial_exponents(n_labels, 2)
    theta = rng.normal(scale=0.05, size=(n_pix, len(exponents)))
    theta[:, 0] = 0.0  # fits work with r = f - theta_0, so the constant term is gone
    x_true = rng.uniform(-0.8, 0.8, size=(n_stars, n_labels))
    w = rng.uniform(1e3, 1e4, size=(n_stars, n_pix))
    flux = vz.label_vector(x_true, exponents) @ theta.T + rng.normal(size=(n_stars, n_pix)) \
        / np.sqrt(w)
    g = np.ascontiguousarray(w @ vz.packed_outer(theta))  # (N, T2): packed Theta^T W Theta
    h = np.ascontiguousarray((w * flux) @ theta)  # (N, T)
    c = np.einsum("np,np->n", w, flux ** 2)
    starts = np.ascontiguousarray(rng.uniform(-1, 1, size=(n_stars, n_cand, n_labels)))
    lo, hi = np.full(n_labels, -1.5), np.full(n_labels, 1.5)
    return dict(g=g, h=h, c=c, exponents=exponents, starts=starts, lo=lo, hi=hi, x_true=x_true)


@pytest.fixture(scope="module")
def weights_problem():
    rng = np.random.default_rng(11)
    n, p = 30, 400
    flux = rng.normal(1.0, 0.1, size=(n, p))
    ivar = rng.uniform(100, 1e4, size=(n, p))
    ivar[rng.uniform(size=(n, p)) < 0.05] = 0.0
    ivar[-1] = 0.0  # a fully masked star
    good = rng.uniform(size=p) > 0.1
    good[-1] = False
    s2 = np.where(rng.uniform(size=p) < 0.3, rng.uniform(0, 1e-3, size=p), 0.0)
    theta0 = rng.normal(1.0, 0.05, size=p)
    t_pix = rng.uniform(0.5, 2.0, size=p)
    return flux, ivar, s2, good, theta0, t_pix


# ------------------------------------------------------------------ registry

def test_every_backend_exposes_every_kernel(backend):
    k = kernels(backend)
    for name in KERNELS:
        assert callable(getattr(k, name)), (backend, name)


def test_auto_prefers_c_then_numba_then_numpy(monkeypatch):
    monkeypatch.delenv("CANNON_FAST_BACKEND", raising=False)
    assert resolve_backend("auto") == available_backends()[0]
    assert available_backends()[-1] == "numpy"
    monkeypatch.setattr(backends, "_ccannon", object())
    monkeypatch.setattr(backends, "_HAVE_NUMBA", True)
    assert available_backends() == ["c", "numba", "numpy"]
    assert resolve_backend("auto") == "c"
    monkeypatch.setattr(backends, "_ccannon", None)
    assert resolve_backend("auto") == "numba"
    monkeypatch.setattr(backends, "_HAVE_NUMBA", False)
    assert resolve_backend("auto") == "numpy"
    assert resolve_backend() == "numpy"


def test_environment_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("CANNON_FAST_BACKEND", "numpy")
    assert resolve_backend("auto") == "numpy"
    if "numba" in available_backends():
        assert resolve_backend("numba") == "numba"  # an explicit request wins
    monkeypatch.setenv("CANNON_FAST_BACKEND", " NumPy ")
    assert resolve_backend("auto") == "numpy"
    monkeypatch.setenv("CANNON_FAST_BACKEND", "auto")
    assert resolve_backend("auto") == available_backends()[0]
    monkeypatch.setenv("CANNON_FAST_BACKEND", "fortran")
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        resolve_backend("auto")


def test_missing_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.delenv("CANNON_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_ccannon", None)
    assert "c" not in available_backends()
    with pytest.raises(ValueError, match="backend 'c' is not available.*C extension"):
        resolve_backend("c")
    with pytest.raises(ValueError, match="not available"):
        CannonModel(["TEFF", "LOGG"], backend="c")
    with pytest.raises(ValueError, match="not available"):
        kernels("c")
    monkeypatch.setenv("CANNON_FAST_BACKEND", "c")
    with pytest.raises(ValueError, match="backend 'c' is not available"):
        resolve_backend("auto")
    monkeypatch.setattr(backends, "_HAVE_NUMBA", False)
    with pytest.raises(ValueError, match="numba is not installed"):
        resolve_backend("numba")


@pytest.mark.parametrize("name", ["C", "cuda", "", None])
def test_unknown_backend_name(name):
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(name)


def test_model_records_the_resolved_backend(backend):
    assert CannonModel(["TEFF", "LOGG"], backend=backend).backend == backend


# ------------------------------------------------------------------ normal equations

def test_normal_equations_match_reference(fast_backend):
    rng = np.random.default_rng(0)
    a_packed, b = _normal_system(rng)
    theta, cinv, status = _solve(kernels(fast_backend), a_packed, b)
    theta_r, cinv_r, status_r = _solve(ref, a_packed, b)
    assert_array_equal(status, status_r)
    assert_allclose(theta, theta_r, rtol=1e-9, atol=1e-12)
    assert_allclose(cinv, cinv_r, rtol=1e-9, atol=1e-14)
    # skipping the inverse (an empty cinv_out) leaves theta unchanged
    theta2, cinv2, status2 = _solve(kernels(fast_backend), a_packed, b, with_inverse=False)
    assert cinv2.shape == (0, a_packed.shape[1])
    assert_array_equal(theta2, theta)
    assert_array_equal(status2, status)


def test_reference_normal_equations_match_dense_linalg():
    rng = np.random.default_rng(1)
    a_packed, b = _normal_system(rng, n_pix=5, n_terms=6)
    theta, cinv, status = _solve(ref, a_packed, b)
    a = vz.unpack_symmetric(a_packed, 6)
    assert_allclose(theta, np.linalg.solve(a, b[:, :, None])[:, :, 0], rtol=1e-10)
    iu = np.triu_indices(6)
    assert_allclose(cinv, np.linalg.inv(a)[:, iu[0], iu[1]], rtol=1e-10)
    assert not status.any()


def test_normal_equations_2x2_by_hand(backend):
    # A = [[4, 2], [2, 3]], det 8, A^-1 = [[3, -2], [-2, 4]] / 8; b = [2, 1] -> theta = [1/2, 0]
    a_packed = np.array([[4.0, 2.0, 3.0]])
    b = np.array([[2.0, 1.0]])
    theta, cinv, status = _solve(kernels(backend), a_packed, b)
    assert_allclose(theta, [[0.5, 0.0]], atol=1e-15)
    assert_allclose(cinv, [[3 / 8, -2 / 8, 4 / 8]], rtol=1e-14)
    assert_array_equal(status, [0])


def test_normal_equations_singular_pixels_give_status_1_and_zeros(backend):
    rng = np.random.default_rng(2)
    a_packed, b = _normal_system(rng, n_pix=6, n_terms=3)
    a_packed[1] = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # rank one
    a_packed[3] = 0.0  # no data at all
    a_packed[4] = [-1.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # indefinite
    a_packed[5] = [1.0, 0.0, 0.0, 1.0, 0.0, 1e-14]  # pivot below 1e-12 of the largest
    theta, cinv, status = _solve(kernels(backend), a_packed, b)
    assert_array_equal(status, [0, 1, 0, 1, 1, 1])
    assert_array_equal(theta[[1, 3, 4, 5]], 0.0)
    assert_array_equal(cinv[[1, 3, 4, 5]], 0.0)
    assert np.all(np.isfinite(theta)) and np.all(theta[[0, 2]] != 0)


@pytest.mark.parametrize("a_packed, singular", [
    # the second pivot is 1 + 1e-13 - 1: cancellation, though it is 1e-7 of the first pivot
    ([1e-6, 1e-3, 1.0 + 1e-13], True),
    # 1e-11 of the largest diagonal entry: above CHOL_RTOL, a (badly conditioned) solution
    ([1e-6, 1e-3, 1.0 + 1e-11], False),
    ([1.0, np.nan, 1.0], True),   # NaN: singular, not a NaN theta with status 0
    ([np.inf, 0.0, 1.0], True),
    ([0.0, 0.0, 0.0], True),
    ([1e-300, 0.0, 1e-300], False),  # the rule is relative: tiny but well conditioned
])
def test_normal_equations_one_singular_rule(backend, a_packed, singular):
    """Every backend: singular iff a squared Cholesky pivot <= CHOL_RTOL max_i A_ii."""
    a_packed, b = np.array([a_packed]), np.array([[1.0, 1.0]])
    theta, cinv, status = _solve(kernels(backend), a_packed, b)
    assert_array_equal(status, [int(singular)])
    if singular:
        assert_array_equal(theta, 0.0)
        assert_array_equal(cinv, 0.0)
    else:
        a = vz.unpack_symmetric(a_packed, 2)[0]
        # (the second case has cond(A) ~ 1e17: Cholesky and LU agree to ~1e-6 only)
        assert_allclose(theta[0], np.linalg.solve(a, b[0]), rtol=1e-4)


def test_reference_cholesky_rule_is_the_numba_and_c_rule():
    from cannon_fast.core._reference.normal_equations import CHOL_RTOL, cholesky
    assert cholesky(np.array([[1e-6, 1e-3], [1e-3, 1 + 1e-13]])) is None
    if "numba" in available_backends():
        from cannon_fast.core._kernels.normal_equations import CHOL_RTOL as nb_rtol
        assert nb_rtol == CHOL_RTOL
    if backends._ccannon is not None:
        assert backends._ccannon.CHOL_RTOL == CHOL_RTOL


# ------------------------------------------------------------------ s2

def _s2_problem(rng, n_stars=150, n_pix=300):
    var = rng.uniform(0.5, 2.0, size=(n_stars, n_pix)) * 1e-4  # (N, P)
    s2_true = np.where(rng.uniform(size=n_pix) < 0.5, rng.uniform(0, 4e-4, size=n_pix), 0.0)
    resid = rng.normal(size=(n_stars, n_pix)) * np.sqrt(var + s2_true)
    var[rng.uniform(size=(n_stars, n_pix)) < 0.05] = np.inf
    var[:, 0] = np.inf  # no valid star
    var[1:, 1] = np.inf  # one valid star
    var[2:, 2] = np.inf  # two: the smallest pixel that gets an s²
    resid[:, 3] = 1e-9  # every residual far below the noise: hi <= lo
    return resid, var


def test_s2_matches_reference(fast_backend):
    rng = np.random.default_rng(3)
    resid, var = _s2_problem(rng)
    s2, status = _s2(kernels(fast_backend), resid, var)
    s2_r, status_r = _s2(ref, resid, var)
    assert_array_equal(status, status_r)
    assert_array_equal(status[:3], [1, 1, 0])
    assert s2[0] == s2[1] == s2[3] == 0.0
    # each is within the stated tolerance of the maximiser (test_s2_meets_the_stated_tolerance)
    assert_allclose(s2, s2_r, rtol=2 * S2_RTOL, atol=1e-3 * S2_FLOOR * 1e-4)
    assert (s2 > 0).sum() > 50
    # and the likelihood at the backend's s² is as high as at the reference's
    for p in range(2, resid.shape[1]):
        ok = np.isfinite(var[:, p])
        r, v = resid[ok, p], var[ok, p]
        assert loglike_s2(s2[p], r, v) >= loglike_s2(s2_r[p], r, v) - 1e-6, p


def _s2_exact(r, v, n_grid=3000):
    """The global maximiser of g at one pixel, independently of the kernels' grid and search.

    Every sign change of g' from + to - on a dense grid reaching far below the kernels'
    floor, refined by brentq to rounding; the best of those and s² = 0 (if g'(0) <= 0).
    """
    r2 = r * r
    grid = np.concatenate([[0.0], np.geomspace(1e-14 * v.mean(), 1.001 * r2.max(), n_grid)])
    d = ((r2[:, None] - v[:, None] - grid) / (v[:, None] + grid) ** 2).sum(axis=0)
    cands = [0.0] if d[0] <= 0 else []
    for i in np.flatnonzero((d[:-1] > 0) & (d[1:] <= 0)):
        cands.append(brentq(lambda s: np.sum((r2 - v - s) / (v + s) ** 2), grid[i],
                            grid[i + 1], xtol=1e-300, rtol=1e-15))
    return max(cands, key=lambda s: loglike_s2(s, r, v))


def _s2_bound(s2_star, v_mean):
    """The tolerance stated in _reference.s2_grid (S2_RTOL / 2 exactly: over 1 - S2_RTOL)."""
    return np.maximum(0.5 * S2_RTOL / (1 - S2_RTOL) * s2_star, S2_FLOOR * v_mean)


@pytest.fixture(scope="module")
def s2_tolerance_problem():
    """Pixels with 2-300 stars, noise over eight decades, s² from 0 to 10x the noise."""
    rng = np.random.default_rng(14)
    n_pix, n_max = 240, 300
    resid, ivar = np.zeros((n_max, n_pix)), np.zeros((n_max, n_pix))
    truth, v_mean = np.empty(n_pix), np.empty(n_pix)
    for p in range(n_pix):
        n = int(rng.integers(2, n_max + 1))
        scale = 10 ** rng.uniform(-6, 2)
        # equal variances (g unimodal) on even pixels, a factor 100 spread on odd ones
        v = scale * (10 ** rng.uniform(-1, 1, n) if p % 2 else np.ones(n))
        s2 = scale * 10 ** rng.uniform(-6, 1) if rng.uniform() < 0.8 else 0.0
        r = rng.normal(size=n) * np.sqrt(v + s2)
        rows = rng.choice(n_max, n, replace=False)  # valid stars anywhere in the column
        resid[rows, p], ivar[rows, p] = r, 1.0 / v
        truth[p], v_mean[p] = _s2_exact(r, v), v.mean()
    return resid, ivar, truth, v_mean


def test_s2_meets_the_stated_tolerance(backend, s2_tolerance_problem):
    """|s² - s²*| <= max(S2_RTOL / 2 s²*, S2_FLOOR mean(v)) on every backend."""
    resid, ivar, truth, v_mean = s2_tolerance_problem
    s2 = np.full(len(truth), np.nan)
    status = np.full(len(truth), -1, np.int8)
    kernels(backend).s2_update(resid, ivar, s2, status)
    assert_array_equal(status, 0)
    bad = np.flatnonzero(np.abs(s2 - truth) > _s2_bound(truth, v_mean))
    assert len(bad) == 0, list(zip(bad, s2[bad], truth[bad], v_mean[bad]))
    # both parts of the bound are exercised: well above the floor, and below it
    assert np.sum(truth > 100 * S2_FLOOR * v_mean) > 80
    assert np.sum(truth < S2_FLOOR * v_mean) > 40


def test_s2_warm_start_meets_the_stated_tolerance(backend, s2_tolerance_problem):
    """Started anywhere from half to twice the maximiser (0: the cold search), same bound."""
    resid, ivar, truth, v_mean = s2_tolerance_problem
    start = truth * np.random.default_rng(15).uniform(0.5, 2.0, len(truth))
    s2 = np.full(len(truth), np.nan)
    status = np.full(len(truth), -1, np.int8)
    kernels(backend).s2_update_warm(resid, ivar, start, s2, status)
    assert_array_equal(status, 0)
    bad = np.flatnonzero(np.abs(s2 - truth) > _s2_bound(truth, v_mean))
    assert len(bad) == 0, list(zip(bad, s2[bad], truth[bad], v_mean[bad]))


@pytest.mark.parametrize("warm_one", ["numpy", "numba"])
def test_s2_warm_search_settles_by_newton_steps(warm_one, s2_tolerance_problem):
    """The Newton path itself (not its cold fallback) ends within the bound where s² > 0."""
    if warm_one == "numba":
        pytest.importorskip("numba")
        from cannon_fast.core._kernels.s2_grid import _warm_one

        def run(s0, r2, v):
            s, ok = _warm_one(s0, r2, v, len(r2))
            return s if ok else None
    else:
        from cannon_fast.core._reference.s2_grid import _warm_one as run
    resid, ivar, truth, v_mean = s2_tolerance_problem
    rng = np.random.default_rng(16)
    settled = 0
    for p in np.flatnonzero(truth > 100 * S2_FLOOR * v_mean):
        ok = ivar[:, p] > 0
        s = run(truth[p] * rng.uniform(0.8, 1.25), resid[ok, p] ** 2, 1.0 / ivar[ok, p])
        if s is not None:
            settled += 1
            assert abs(s - truth[p]) <= _s2_bound(truth[p], v_mean[p]), p
    assert settled >= 75


def test_training_sums_match_reference_and_definition(backend):
    """chi², counts and neighbour-pair sums: every backend against the reference.

    And the reference against the sums written out pair by pair for one star.
    """
    rng = np.random.default_rng(17)
    n, p = 40, 90
    resid = rng.normal(size=(n, p)) * 0.01
    ivar = np.where(rng.uniform(size=(n, p)) < 0.1, 0.0, rng.uniform(5e3, 2e4, (n, p)))
    s2 = np.where(rng.uniform(size=p) < 0.4, rng.uniform(0, 1e-4, p), 0.0)
    use = rng.uniform(size=p) > 0.1
    same_seg = np.ones(p, bool)
    same_seg[[29, 59, p - 1]] = False  # three segments
    pairs = rng.uniform(size=n) < 0.5

    def run(k):
        out = (np.full(n, np.nan), np.full(n, -1, np.int64), np.full((n, 4), np.nan))
        k.training_sums(resid, ivar, s2, use, same_seg, pairs, *out)
        return out

    ref_out = run(ref)
    for got, want in zip(run(kernels(backend)), ref_out):
        assert_allclose(got, want, rtol=1e-12, atol=0)
    i = int(np.flatnonzero(pairs)[0])
    good = (ivar[i] > 0) & use
    w = np.where(good, 1.0 / (1.0 / np.where(good, ivar[i], 1.0) + s2), 0.0)
    assert_allclose(ref_out[0][i], np.sum(w * resid[i] ** 2), rtol=1e-12)
    assert ref_out[1][i] == good.sum()
    z = resid[i] * np.sqrt(w)
    pq = [(a, a + 1) for a in range(p - 1) if good[a] and good[a + 1] and same_seg[a]]
    want = [len(pq), sum(z[a] * z[b] for a, b in pq), sum(z[a] ** 2 for a, _ in pq),
            sum(z[b] ** 2 for _, b in pq)]
    assert_allclose(ref_out[2][i], want, rtol=1e-12)
    assert_array_equal(ref_out[2][~pairs], 0.0)


def test_s2_equal_variances_closed_form(backend):
    # with v_n = v, g'(s²) = 0 at s² = mean(r²) - v, clipped at 0
    rng = np.random.default_rng(4)
    n_stars, v = 80, 1e-4
    scale = np.array([0.5, 0.9, 1.2, 2.0, 3.0, 10.0])
    resid = rng.normal(size=(n_stars, len(scale))) * np.sqrt(v) * scale
    var = np.full_like(resid, v)
    expected = np.maximum((resid ** 2).mean(axis=0) - v, 0.0)
    s2, status = _s2(kernels(backend), resid, var)
    assert_array_equal(status, 0)
    assert_allclose(s2, expected, rtol=S2_RTOL, atol=0)
    assert s2[0] == 0.0 and s2[-1] > 0


def test_s2_two_stars_by_hand(backend):
    # r² = (9, 1) v, v = 1: g' = 0 at s² = 4 (mean r² - v), valid as a maximum
    resid = np.array([[3.0], [1.0]])
    var = np.ones((2, 1))
    s2, status = _s2(kernels(backend), resid, var)
    assert_allclose(s2, [4.0], rtol=S2_RTOL)
    assert_array_equal(status, [0])


def test_s2_fewer_than_two_valid_stars(backend):
    resid = np.ones((3, 2))
    var = np.array([[np.inf, 1.0], [np.inf, np.inf], [np.inf, np.nan]])
    s2, status = _s2(kernels(backend), resid, var)
    assert_array_equal(s2, [0.0, 0.0])
    assert_array_equal(status, [1, 1])


@needs_c
def test_c_s2_constants_are_the_reference_constants():
    c = backends._ccannon
    assert (c.S2_RTOL, c.S2_FLOOR, c.GRID_PER_DECADE) == (S2_RTOL, S2_FLOOR, GRID_PER_DECADE)
    assert (c.NOT_CONVERGED, c.HIT_BOUND, c.STARTS_DISAGREE) == (NOT_CONVERGED, HIT_BOUND,
                                                                 STARTS_DISAGREE)


# ------------------------------------------------------------------ design

@pytest.mark.parametrize("n_labels, order", [(3, 2), (5, 2), (2, 3)])
def test_design_matches_reference(fast_backend, n_labels, order):
    rng = np.random.default_rng(5)
    exponents = vz.polynomial_exponents(n_labels, order)
    x = rng.uniform(-1.5, 1.5, size=(17, n_labels))
    x[0] = 0.0  # 0**0 = 1 and the derivative of x at 0
    v, dv = _design(kernels(fast_backend), x, exponents)
    v_r, dv_r = _design(ref, x, exponents)
    assert_allclose(v, v_r, rtol=1e-14, atol=1e-15)
    assert_allclose(dv, dv_r, rtol=1e-14, atol=1e-15)


def test_design_by_hand(backend):
    # terms 1, a, b, a², ab, b² at (a, b) = (2, 3)
    exponents = np.array([[0, 0], [1, 0], [0, 1], [2, 0], [1, 1], [0, 2]], dtype=np.int64)
    v, dv = _design(kernels(backend), np.array([[2.0, 3.0]]), exponents)
    assert_array_equal(v, [[1, 2, 3, 4, 6, 9]])
    assert_array_equal(dv, [[[0, 0], [1, 0], [0, 1], [4, 0], [3, 2], [0, 6]]])


# ------------------------------------------------------------------ star weights

def test_star_weights_match_reference(fast_backend, weights_problem):
    out = _weights(kernels(fast_backend), *weights_problem)
    out_r = _weights(ref, *weights_problem)
    w, wr, c, npix, mom, bad = out
    assert_array_equal(bad, out_r[5])
    assert w.dtype == np.float32
    assert_array_equal(w, out_r[0])  # the same float64 formula, rounded once to float32
    assert_allclose(wr, out_r[1], rtol=1e-14, atol=0)
    assert_allclose(c, out_r[2], rtol=1e-12)
    assert_array_equal(npix, out_r[3])
    assert_allclose(mom, out_r[4], rtol=1e-12)
    flux, ivar, s2, good = weights_problem[:4]
    assert npix[-1] == 0 and c[-1] == 0 and np.all(mom[-1] == 0)
    masked = (ivar <= 0) | ~good[None, :]
    assert np.all(w[masked] == 0) and np.all(wr[masked] == 0) and np.all(w[~masked] > 0)


def test_star_weights_read_float32_spectra_as_their_float64_copy(backend, weights_problem):
    """float32 flux and ivar give exactly what their float64 copy gives (no copy made)."""
    flux, ivar = (a.astype(np.float32) for a in weights_problem[:2])
    rest = weights_problem[2:]
    single = _weights(kernels(backend), flux, ivar, *rest)
    double = _weights(kernels(backend), flux.astype(np.float64), ivar.astype(np.float64), *rest)
    for a, b in zip(single, double):
        assert_array_equal(a, b)


def test_star_weights_by_hand(backend):
    # ivar 4, s² 0.25: w = 1 / (0.25 + 0.25) = 2; r = 1.5 - 1 = 0.5
    flux, ivar = np.array([[1.5, 9.0, 1.5]]), np.array([[4.0, 0.0, 4.0]])
    s2, good = np.array([0.25, 0.0, 0.25]), np.array([True, True, False])
    theta0, t_pix = np.ones(3), np.array([3.0, 1.0, 1.0])
    w, wr, c, npix, mom, bad = _weights(kernels(backend), flux, ivar, s2, good, theta0, t_pix)
    assert_array_equal(bad, [0])
    assert_array_equal(w, [[2, 0, 0]])
    assert_array_equal(wr, [[1, 0, 0]])
    assert_array_equal(c, [0.5])
    assert_array_equal(npix, [1])
    assert_array_equal(mom, [[2, 6, 12]])


def test_star_weights_count_bad_values(backend):
    """check_spectra's fast test, per star in the weights pass."""
    # what check_spectra refuses, on any pixel (good or not): ivar NaN, inf or < 0, and
    # flux NaN or inf where ivar > 0; NaN flux where ivar = 0 is a masked pixel
    nan, inf = np.nan, np.inf
    flux = np.array([[1.0, nan, 1.0, 1.0], [nan, 1.0, inf, 1.0], [1.0, 1.0, 1.0, 1.0],
                     [1.0, 1.0, 1.0, -inf]])
    ivar = np.array([[1.0, 0.0, 1.0, 1.0], [1.0, nan, 1.0, -1.0], [inf, 1.0, -inf, 1.0],
                     [0.0, 0.0, 0.0, 2.0]])
    good = np.array([True, True, True, False])
    out = _weights(kernels(backend), flux, ivar, np.zeros(4), good, np.ones(4), np.ones(4))
    assert_array_equal(out[5], [0, 1, 1, 1])
    for star in range(1, 4):  # one bad value is enough
        for pix in np.flatnonzero(~np.isfinite(ivar[star]) | (ivar[star] < 0)
                                  | ((ivar[star] > 0) & ~np.isfinite(flux[star]))):
            f, iv = np.ones((1, 4)), np.ones((1, 4))
            f[0, pix], iv[0, pix] = flux[star, pix], ivar[star, pix]
            one = _weights(kernels(backend), f, iv, np.zeros(4), good, np.ones(4), np.ones(4))
            assert one[5][0] == 1, (star, pix)


def test_weighted_square_sum_matches_reference(backend):
    """sum_p w m² per star in float64, against the plain sum (float32 weights)."""
    rng = np.random.default_rng(3)
    w = rng.random((37, 301)).astype(np.float32)
    w[5] = 0.0
    m = rng.normal(size=(37, 301)) * 1e3
    out = np.full(37, np.nan)
    kernels(backend).weighted_square_sum(w, m, out)
    assert_allclose(out, np.sum(w.astype(np.float64) * m * m, axis=1), rtol=1e-13)
    assert out[5] == 0.0


@pytest.fixture(scope="module")
def debias_problem(lm_problem):
    """lm_problem's plain fits, with B = sum_p w_p C_p of another coefficient noise.

    Scaled so that the eigenvalue cap bites on some stars and not on others.
    """
    p = lm_problem
    rng = np.random.default_rng(5)
    n = len(p["c"])
    noise = rng.normal(scale=0.01, size=(300, len(p["exponents"])))
    w = rng.uniform(1e3, 1e4, size=(n, 300))
    b = (w @ vz.packed_outer(noise)) * np.geomspace(0.3, 300, n)[:, None]
    x = _lm(ref, p["g"], p["h"], p["c"], p["exponents"], p["starts"], p["lo"], p["hi"],
            xtol=1e-10)[0]
    return dict(p, b=np.ascontiguousarray(b), x=x)


def _debias_steps(k, p, n_steps=4):
    x, capped = p["x"].copy(), np.full(len(p["x"]), -1, np.int64)
    k.debias_steps(p["g"], p["h"], p["b"], p["exponents"], p["lo"], p["hi"], 0.3, n_steps,
                   1e-6, x, capped)
    return x, capped


def test_debias_steps_match_reference(backend, debias_problem):
    """The kernels' capped Newton steps against the reference's."""
    p = debias_problem
    x, capped = _debias_steps(kernels(backend), p)
    x_r, capped_r = _debias_steps(ref, p)
    assert_array_equal(capped, capped_r)
    assert 0 < capped.sum() < len(capped)  # both kinds of star in the problem
    # Jacobi rotations (C, numba) and LAPACK's eigh (reference) differ in rounding only
    assert_allclose(x, x_r, rtol=0, atol=1e-10)
    assert np.all(np.any(x != p["x"], axis=1))  # every star moved
    x0, _ = _debias_steps(kernels(backend), p, n_steps=0)  # no steps: nothing moves
    assert_array_equal(x0, p["x"])


def _sandwich(k, p, x, kappa, extra, cap=0.3):
    n, n_labels = x.shape
    cov = np.full((n, n_labels, n_labels), -1.0)
    capped, withheld = np.full(n, -1, np.int64), np.full(n, -1.0)
    cbar = np.ascontiguousarray(p["b"].mean(axis=0) / 1e3)
    k.sandwich_covariance(p["g"], p["b"], cbar, kappa, extra, x, p["exponents"], cap, cov,
                          capped, withheld)
    return cov, capped, withheld


def test_sandwich_covariance_matches_reference(backend, debias_problem):
    """The kernels' de-biased covariance and withheld correction against the reference's."""
    p = debias_problem
    x, _ = _debias_steps(ref, p)
    rng = np.random.default_rng(4)
    n, n_labels = x.shape
    kappa = rng.uniform(0, 2, n)
    a = rng.normal(size=(n, n_labels, n_labels))
    for extra in (np.zeros((n, n_labels, n_labels)), 1e3 * a @ np.swapaxes(a, 1, 2)):
        cov, capped, withheld = _sandwich(kernels(backend), p, x, kappa, extra)
        cov_r, capped_r, withheld_r = _sandwich(ref, p, x, kappa, extra)
        assert_array_equal(capped, capped_r)
        assert 0 < capped.sum() < n
        assert_allclose(cov, cov_r, rtol=1e-9, atol=0)
        assert_allclose(withheld, withheld_r, rtol=1e-8, atol=1e-12)
        assert np.all(withheld[capped == 0] < 1e-6) and np.all(withheld[capped == 1] > 0)


def test_sandwich_covariance_by_definition(backend, debias_problem):
    """Below the cap: (F - B_x)^-1 F (1 + kappa v^T Cbar v) (F - B_x)^-1, F and B_x at x."""
    p = debias_problem
    x, _ = _debias_steps(ref, p)
    n = len(x)
    kappa = np.full(n, 0.5)
    cov, capped, _ = _sandwich(kernels(backend), p, x, kappa, np.zeros(x.shape + x.shape[1:]))
    cbar = vz.unpack_symmetric(p["b"].mean(axis=0) / 1e3, len(p["exponents"]))
    v, dv = vz.label_vector(x, p["exponents"]), vz.label_vector_jacobian(x, p["exponents"])
    for i in np.flatnonzero(capped == 0):
        g = vz.unpack_symmetric(p["g"][i], len(v[i]))
        b = vz.unpack_symmetric(p["b"][i], len(v[i]))
        fisher, bmat = dv[i].T @ g @ dv[i], dv[i].T @ b @ dv[i]
        hinv = np.linalg.inv(fisher - bmat)
        expected = hinv @ fisher @ hinv * (1.0 + 0.5 * v[i] @ cbar @ v[i])
        assert_allclose(cov[i], expected, rtol=1e-9)


def test_sandwich_covariance_singular_hessian_gives_nan(backend):
    """G = 0: F and H are singular, the covariance NaN, nothing withheld."""
    ex = vz.polynomial_exponents(2, 2)
    n, l2 = 3, vz.n_packed(len(ex))
    cov = np.zeros((n, 2, 2))
    capped, withheld = np.full(n, -1, np.int64), np.full(n, -1.0)
    kernels(backend).sandwich_covariance(np.zeros((n, l2)), np.zeros((n, l2)), np.zeros(l2),
                                         np.zeros(n), np.zeros((n, 2, 2)), np.zeros((n, 2)), ex,
                                         0.3, cov, capped, withheld)
    assert np.all(np.isnan(cov))
    assert_array_equal(withheld, 0.0)
    assert_array_equal(capped, 0)


def test_capped_step_matrices_match_the_batched_form():
    """The reference's per-star capped Hessian and push against its batched form."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(60, 4, 4))
    fisher = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(4)
    c = rng.normal(size=(60, 4, 4))
    bmat = (c @ np.swapaxes(c, 1, 2)) * np.geomspace(0.01, 3, 60)[:, None, None]
    fisher[-1] = -np.eye(4)  # not positive definite: no correction
    hess, push, capped = ref.model_eval.capped_hessian(fisher, bmat, cap=0.3)
    assert 0 < capped.sum() < 59
    for i in range(60):
        h_i, p_i, c_i = capped_step_matrices(fisher[i], bmat[i], 0.3)
        assert_allclose(h_i, hess[i], rtol=1e-10, atol=1e-12 * np.abs(hess[i]).max())
        assert_allclose(p_i, push[i], rtol=1e-10, atol=1e-10)
        assert c_i == capped[i]


# ------------------------------------------------------------------ lm_fit

def test_lm_fit_matches_reference(fast_backend, lm_problem):
    p = {k: v for k, v in lm_problem.items() if k != "x_true"}
    args = [p[k] for k in ("g", "h", "c", "exponents", "starts", "lo", "hi")]
    x, phi, it, st = _lm(kernels(fast_backend), *args)
    x_r, phi_r, it_r, st_r = _lm(ref, *args)
    assert_array_equal(st, st_r)
    assert_allclose(x, x_r, rtol=0, atol=1e-6)
    assert_allclose(phi, phi_r, rtol=1e-10)
    assert np.all(it > 0)
    if fast_backend == "c" and "numba" in available_backends():
        # the C kernel mirrors the numba one step by step: the same LM paths
        _, _, it_nb, _ = _lm(nb_kernels, *args)
        assert np.mean(it == it_nb) >= 0.9
    assert_allclose(x, lm_problem["x_true"], atol=0.05)  # and the fits are right


def test_start_objectives_are_the_objective_at_each_clipped_start(lm_problem):
    """The batch product against c - 2 h.v + v^T G v star by star, shared and per-star starts."""
    p = lm_problem
    lo, hi = p["lo"] * 0.5, p["hi"] * 0.5  # some starts are clipped
    n_terms = len(p["exponents"])
    shared = p["starts"][0]
    for starts in (shared, p["starts"]):
        first = ref.model_eval.start_objectives(p["g"], p["h"], p["c"], p["exponents"], starts,
                                                lo, hi)
        for i in range(len(p["c"])):
            g = vz.unpack_symmetric(p["g"][i], n_terms)
            own = starts if starts.ndim == 2 else starts[i]
            v = vz.label_vector(np.clip(own, lo, hi), p["exponents"])
            direct = p["c"][i] - 2 * v @ p["h"][i] + np.einsum("kt,tu,ku->k", v, g, v)
            assert_allclose(first[i], direct, rtol=1e-12)


def test_lm_fit_status_bits(backend, lm_problem):
    p = lm_problem
    k = kernels(backend)
    args = [p["g"], p["h"], p["c"], p["exponents"], p["starts"]]
    # bounds that exclude the truth of every star on the first label
    lo, hi = p["lo"].copy(), p["hi"].copy()
    hi[0] = -0.9
    x, _, _, st = _lm(k, *args, lo, hi)
    assert np.all(st & HIT_BOUND)
    assert np.all(x[:, 0] <= -0.9)
    # one iteration cannot converge
    _, _, it, st = _lm(k, *args, p["lo"], p["hi"], n_polish=1, max_iter=1)
    assert np.all(st & NOT_CONVERGED) and np.all(it == 1)
    # more polish runs than candidates is fine
    x, _, _, st = _lm(k, *args, p["lo"], p["hi"], n_polish=100)
    assert np.all(st == 0)


def test_lm_fit_two_minima_set_starts_disagree(backend):
    # one label, v = (1, x, x²): c - 2 h.v + v G v = 1 - 2x² + x⁴ = (x² - 1)², minima at ±1
    exponents = np.array([[0], [1], [2]], dtype=np.int64)
    g = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # packed diag(0, 0, 1)
    h, c = np.array([[0.0, 0.0, 1.0]]), np.array([1.0])
    starts = np.array([[[-0.5], [0.7]]])
    lo, hi = np.array([-3.0]), np.array([3.0])
    # the Hessian at ±1 is |dv/dx|²_G = 4x² = 4, so the ends are 2² * 4 = 16 > 9 apart
    x, phi, _, st = _lm(kernels(backend), g, h, c, exponents, starts, lo, hi, n_polish=2)
    assert_allclose(np.abs(x), [[1.0]], atol=1e-6)
    assert_allclose(phi, [0.0], atol=1e-10)
    assert_array_equal(st, [STARTS_DISAGREE])
    # one run: nothing to disagree with, and the better start (0.7 -> phi 0.26) wins
    x, _, _, st = _lm(kernels(backend), g, h, c, exponents, starts, lo, hi, n_polish=1)
    assert_allclose(x, [[1.0]], atol=1e-6)
    assert_array_equal(st, [0])


# ------------------------------------------------------------------ continuum

def _continuum(k, flux, ivar, basis, chip, is_cont, n_chips, min_pixels, keep=True):
    n, p = flux.shape
    out = (np.full((n, p), np.nan, flux.dtype), np.full((n, p), np.nan, flux.dtype),
           np.full((n if keep else 0, p), np.nan, flux.dtype),
           np.full((n, n_chips), -1, np.int64))
    k.continuum_normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels, *out)
    return out


@pytest.fixture(scope="module")
def continuum_problem():
    """Three chips of a 300-pixel grid, one in two runs, and stars with every status."""
    from cannon_fast.core.continuum import chebyshev_basis

    rng = np.random.default_rng(12)
    n, p, degree = 12, 300, 3
    basis, chip = chebyshev_basis(degree, ((0, 90), (100, 200), (210, 300)), p)
    chip[250:260] = -1  # chip 2 in two runs, with a gap inside
    chip[95] = 7  # a pixel of no chip (>= n_chips): no data, like a gap
    is_cont = np.zeros(p, np.uint8)
    is_cont[(chip >= 0) & (np.arange(p) % 3 == 0)] = 1
    is_cont[95] = 1
    cont = np.zeros((n, p))
    for c in range(3):
        coef = rng.normal(0, 0.05, (n, degree + 1))
        coef[:, 0] = rng.uniform(300, 2000, n)
        coef[:, 1:] *= coef[:, :1]
        cont[:, chip == c] = coef @ basis[chip == c].T
    lines = np.where(is_cont > 0, 1.0, 1 - rng.uniform(0, 0.3, p))
    flux = cont * lines * (1 + 0.01 * rng.normal(size=(n, p)))
    flux[:, chip < 0] = rng.normal(size=(n, int((chip < 0).sum())))  # junk in the gaps
    ivar = np.where(chip >= 0, 1.0 / (0.01 * np.maximum(cont, 1.0)) ** 2, 0.0)
    ivar[1, chip == 1] = 0.0  # a masked chip: status 1
    few = np.flatnonzero((chip == 2) & (is_cont > 0))
    ivar[2, few[5:]] = 0.0  # 5 usable continuum pixels on chip 2: status 2
    flux[3, 20:30] = np.nan  # NaN flux where ivar > 0: not usable
    ivar[4, 110:130] = np.inf  # infinite ivar: not usable
    flux[5, chip == 0] *= -1  # a negative continuum: status 3
    ivar[6] = 0.0  # nothing at all: status 1 on every chip
    ivar[7, (chip == 1) & (is_cont == 0)] = 0.0  # only continuum pixels left: still fitted
    return dict(flux=flux, ivar=ivar, basis=basis, chip=chip, is_cont=is_cont, n_chips=3,
                min_pixels=16)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_continuum_matches_reference(backend, continuum_problem, dtype):
    cp = dict(continuum_problem)
    cp["flux"], cp["ivar"] = cp["flux"].astype(dtype), cp["ivar"].astype(dtype)
    fo, io, co, st = _continuum(kernels(backend), **cp)
    fo_r, io_r, co_r, st_r = _continuum(ref, **cp)
    assert_array_equal(st, st_r)
    assert_array_equal(st[[1, 2, 5, 6]], [[0, 1, 0], [0, 0, 2], [3, 0, 0], [1, 1, 1]])
    assert not st[[0, 3, 4, 7, 8]].any()
    # the same float64 arithmetic (the continuum is within rounding of the reference's),
    # rounded once to float32 for float32 spectra
    tol = dict(rtol=1e-10, atol=0) if dtype == np.float64 else dict(rtol=2e-7, atol=0)
    assert_allclose(fo, fo_r, **tol)
    assert_allclose(io, io_r, **tol)
    assert_allclose(co, co_r, **tol)
    chip, ivar = cp["chip"], cp["ivar"]
    nodata = (chip < 0) | (chip >= 3)
    assert np.all(fo[:, nodata] == 1) and np.all(io[:, nodata] == 0)
    assert np.all(co[:, nodata] == 0)
    failed = np.repeat(st, np.bincount(np.clip(chip, 0, 3)[~nodata], minlength=3)[:3], axis=1)
    on = ~nodata
    assert np.all((fo[:, on] == 1)[failed != 0]) and np.all((io[:, on] == 0)[failed != 0])
    assert np.all(io[3, 20:30] == 0) and np.all(io[4, 110:130] == 0)
    assert np.all(np.isfinite(fo)) and np.all(np.isfinite(io))
    usable = on & (ivar[0] > 0)
    assert np.all(io[0, usable] > 0) and abs(np.median(fo[0, usable]) - 0.9) < 0.1
    # without the continuum: the same flux and ivar
    fo2, io2, co2, st2 = _continuum(kernels(backend), **cp, keep=False)
    assert co2.shape == (0, cp["flux"].shape[1])
    assert_array_equal(fo2, fo)
    assert_array_equal(io2, io)
    assert_array_equal(st2, st)


def test_continuum_by_hand(backend):
    # K = 1: the continuum is the weighted mean of the continuum pixels, (1*2 + 3*4) / 4 = 3.5
    flux = np.array([[2.0, 4.0, 7.0, 5.0]])
    ivar = np.array([[1.0, 3.0, 2.0, 0.0]])
    basis, chip = np.ones((4, 1)), np.array([0, 0, 0, 0])
    is_cont = np.array([1, 1, 0, 0], np.uint8)
    fo, io, co, st = _continuum(kernels(backend), flux, ivar, basis, chip, is_cont, 1, 2)
    assert_array_equal(st, [[0]])
    assert_allclose(co, [[3.5, 3.5, 3.5, 3.5]], rtol=1e-15)
    assert_allclose(fo, [[2 / 3.5, 4 / 3.5, 2.0, 1.0]], rtol=1e-15)
    assert_allclose(io, [[3.5 ** 2, 3 * 3.5 ** 2, 2 * 3.5 ** 2, 0.0]], rtol=1e-15)
    # min_pixels 3 > 2 usable continuum pixels; and no usable pixel at all
    _, _, _, st = _continuum(kernels(backend), flux, ivar, basis, chip, is_cont, 1, 3)
    assert_array_equal(st, [[2]])
    _, _, _, st = _continuum(kernels(backend), flux, 0 * ivar, basis, chip, is_cont, 1, 1)
    assert_array_equal(st, [[1]])


def test_continuum_bad_fits(backend, continuum_problem):
    cp = dict(continuum_problem)
    k = kernels(backend)
    # a basis with two equal columns: singular normal equations on every fitted chip
    basis = cp["basis"].copy()
    basis[:, 3] = basis[:, 2]
    fo, io, co, st = _continuum(k, **{**cp, "basis": basis})
    _, _, _, st_r = _continuum(ref, **{**cp, "basis": basis})
    assert_array_equal(st, st_r)
    assert np.all(st[[0, 3, 4, 7]] == 3)
    assert np.all(fo == 1) and np.all(io == 0) and np.all(co == 0)
    # K outside 1..MAX_BASIS: every chip a bad fit
    from cannon_fast.core._reference.continuum import MAX_BASIS
    for basis in (np.ones((cp["basis"].shape[0], MAX_BASIS + 1)),
                  np.ones((cp["basis"].shape[0], 0))):
        fo, io, co, st = _continuum(k, **{**cp, "basis": basis})
        assert np.all(st == 3) and np.all(fo == 1) and np.all(io == 0) and np.all(co == 0)


@pytest.mark.parametrize("mask_dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64])
def test_continuum_bitmask_is_a_zero_ivar(backend, continuum_problem, mask_dtype):
    """A pixel with a bad bit set is normalized as if its ivar were 0, for every bitmask type.

    The same bits (to the last one) as zeroing ivar first, in both precisions, and the
    reference's rule for bits beyond the dtype: a signed value widens as numpy's
    astype(int64) does (-1 of int16 has every bit of an int64 set).
    """
    cp = dict(continuum_problem)
    rng = np.random.default_rng(5)
    n, p = cp["flux"].shape
    info = np.iinfo(mask_dtype)
    bitmask = rng.integers(0, 8, (n, p)).astype(mask_dtype)  # bits 0-2; bit 2 = "bad"
    bitmask[8, :40] = 4  # most of chip 0's continuum pixels of star 8: too few
    if info.min < 0:
        bitmask[9, 150:160] = -1  # sign bits: bad for bits beyond the dtype too
    k = kernels(backend)
    for dtype in (np.float64, np.float32):
        flux, ivar = cp["flux"].astype(dtype), cp["ivar"].astype(dtype)
        for bits in (4, 1 << 40):
            bad = (bitmask.astype(np.int64) & bits) != 0
            assert bad.any() == (bits == 4 or info.min < 0)
            want = _continuum(k, **{**cp, "flux": flux, "ivar": np.where(bad, 0, ivar)})
            out = (np.full((n, p), np.nan, dtype), np.full((n, p), np.nan, dtype),
                   np.full((n, p), np.nan, dtype), np.full((n, 3), -1, np.int64))
            k.continuum_normalize(flux, ivar, cp["basis"], cp["chip"], cp["is_cont"], 3,
                                  cp["min_pixels"], *out, bitmask=bitmask, bits=bits)
            for a, b in zip(out, want):
                assert_array_equal(a, b)
            if bits == 4:
                assert out[3][8, 0] == 2 and want[3][8, 0] == 2
                assert np.all(out[1][bad] == 0) and np.all(out[0][bad] == 1)


@needs_c
def test_c_continuum_constants_are_the_reference_constants():
    from cannon_fast.core._reference.continuum import MAX_BASIS
    assert backends._ccannon.CONTINUUM_MAX_BASIS == MAX_BASIS


# ------------------------------------------------------------------ full model

@pytest.fixture(scope="module")
def synthetic():
    train = make_synthetic(n_stars=64, n_pix=200, n_labels=3, seed=0)
    test = make_synthetic(n_stars=24, n_pix=200, n_labels=3, seed=1, coeffs=train.coeffs,
                          s2_true=train.s2_true)
    return train, test


@pytest.fixture(scope="module")
def numpy_model(synthetic):
    train, test = synthetic
    model = CannonModel(train.label_names, backend="numpy").train(train.flux, train.ivar,
                                                                   train.labels)
    return model, model.fit(test.flux, test.ivar)


def test_train_and_fit_match_numpy(fast_backend, synthetic, numpy_model):
    train, test = synthetic
    m0, r0 = numpy_model
    m = CannonModel(train.label_names, backend=fast_backend).train(train.flux, train.ivar,
                                                                    train.labels)
    assert_array_equal(m.pixel_flags, m0.pixel_flags)
    assert_allclose(m.theta, m0.theta, rtol=1e-6, atol=1e-8)
    assert_allclose(m.s2, m0.s2, rtol=1e-3, atol=1e-9)
    scale = np.abs(m0.theta_cov).max(axis=1, keepdims=True) + 1e-300  # per pixel
    assert_allclose(m.theta_cov / scale, m0.theta_cov / scale, rtol=0, atol=1e-6)
    r = m.fit(test.flux, test.ivar)
    assert_array_equal(r.flags, r0.flags)
    assert_allclose(r.labels, r0.labels, rtol=0, atol=1e-4 * np.nanmax(r0.errors))
    assert_allclose(r.errors, r0.errors, rtol=1e-5)


def test_train_returns_the_s2_of_its_theta(backend, synthetic):
    """The statement of train: the returned s² maximises the likelihood at its theta."""
    train, _ = synthetic
    m = CannonModel(train.label_names, backend=backend).train(train.flux, train.ivar,
                                                               train.labels)
    resid = train.flux - vz.label_vector(m.scale_labels(train.labels), m.exponents) @ m.theta.T
    solved = np.flatnonzero((m.pixel_flags & 3) == 0)  # not TOO_FEW_STARS or SINGULAR
    assert len(solved) > 150
    for p in solved:
        ok = train.ivar[:, p] > 0
        r, v = resid[ok, p], 1.0 / train.ivar[ok, p]
        assert abs(m.s2[p] - _s2_exact(r, v)) <= _s2_bound(_s2_exact(r, v), v.mean()), p


# ------------------------------------------------------------------ the C glue

def _c_ok_args():
    """Return valid arguments of every C kernel, to be spoiled one at a time."""
    rng = np.random.default_rng(0)
    a_packed, b = _normal_system(rng, n_pix=4, n_terms=3)
    ex = vz.polynomial_exponents(2, 2)
    n, t, l2 = 3, len(ex), vz.n_packed(len(ex))
    return {
        "solve_normal_equations": [a_packed, b, np.empty((4, 3)), np.empty((4, 6)),
                                   np.empty(4, np.int8)],
        "s2_update": [np.ones((5, 4)), np.ones((5, 4)), np.empty(4), np.empty(4, np.int8)],
        "s2_update_warm": [np.ones((5, 4)), np.ones((5, 4)), np.ones(4), np.empty(4),
                           np.empty(4, np.int8)],
        "lm_fit": [np.ones((n, l2)), np.ones((n, t)), np.ones(n), ex, np.zeros((n, 2, 2)),
                   np.zeros((n, 2)), -np.ones(2), np.ones(2), 1, 10, 1e-6, 9.0,
                   np.empty((n, 2)), np.empty(n),
                   np.empty(n, np.int64), np.empty(n, np.int64)],
        "star_weights": [np.ones((n, 4)), np.ones((n, 4)), np.zeros(4), np.ones(4, bool),
                         np.ones(4), np.ones(4), np.empty((n, 4), np.float32),
                         np.empty((n, 4)), np.empty(n), np.empty(n, np.int64),
                         np.empty((n, 3)), np.empty(n, np.int64)],
        "design": [np.zeros((n, 2)), ex, np.empty((n, t)), np.empty((n, t, 2))],
        "weighted_square_sum": [np.ones((n, 4), np.float32), np.ones((n, 4)), np.empty(n)],
        "training_sums": [np.ones((n, 4)), np.ones((n, 4)), np.zeros(4), np.ones(4, bool),
                          np.ones(4, bool), np.ones(n, bool), np.empty(n),
                          np.empty(n, np.int64), np.empty((n, 4))],
        "debias_steps": [np.ones((n, l2)), np.ones((n, t)), np.zeros((n, l2)), ex, -np.ones(2),
                         np.ones(2), 0.3, 4, 1e-6, np.zeros((n, 2)), np.empty(n, np.int64)],
        "sandwich_covariance": [np.ones((n, l2)), np.zeros((n, l2)), np.zeros(l2), np.zeros(n),
                                np.zeros((n, 2, 2)), np.zeros((n, 2)), ex, 0.3,
                                np.empty((n, 2, 2)), np.empty(n, np.int64), np.empty(n)],
        "continuum_normalize": [np.ones((n, 6)), np.ones((n, 6)), np.ones((6, 2)),
                                np.zeros(6, np.int64), np.ones(6, np.uint8), 1, 2,
                                np.empty((n, 6)), np.empty((n, 6)), np.empty((0, 6)),
                                np.empty((n, 1), np.int64)],
    }


@needs_c
@pytest.mark.parametrize("name", KERNELS)
def test_c_valid_arguments_run(name):
    assert getattr(backends._ccannon, name)(*_c_ok_args()[name]) is None


@needs_c
@pytest.mark.parametrize("name, pos, bad, exc, match", [
    ("solve_normal_equations", 0, [[1.0, 2.0, 3.0]], TypeError, "a_packed must be a numpy"),
    ("solve_normal_equations", 1, np.ones((4, 3), np.float32), TypeError, "b must have dtype"),
    ("solve_normal_equations", 4, np.empty(4, np.int64), TypeError, "status_out .*int8"),
    ("solve_normal_equations", 0, np.ones((4, 5)), ValueError, r"a_packed has shape \(4, 5\)"),
    ("solve_normal_equations", 3, np.empty((2, 6)), ValueError, "cinv_out has shape"),
    ("solve_normal_equations", 2, np.empty((3, 4)).T, ValueError, "theta_out must be C-contig"),
    ("s2_update", 1, np.ones((5, 3)), ValueError, r"ivar has shape \(5, 3\)"),
    ("s2_update", 0, np.ones(20), ValueError, "resid must be 2-dimensional"),
    ("s2_update", 0, np.ones((5, 8))[:, ::2], ValueError, "C-contiguous"),
    ("s2_update_warm", 2, np.ones(3), ValueError, r"s2_start has shape \(3,\)"),
    ("lm_fit", 3, vz.polynomial_exponents(2, 2).astype(np.int32), TypeError, "exponents"),
    ("lm_fit", 4, np.zeros((2, 2)), ValueError, "starts must be 3-dimensional"),
    ("lm_fit", 4, np.zeros((3, 0, 2)), ValueError, "at least one point"),
    ("lm_fit", 5, np.zeros((3, 3)), ValueError, r"first has shape \(3, 3\)"),
    ("lm_fit", 8, 0, ValueError, "n_polish must be >= 1"),
    ("lm_fit", 9, -1, ValueError, "max_iter must be >= 0"),
    ("lm_fit", 10, "tight", TypeError, "must be real number"),
    ("lm_fit", 15, np.empty(2, np.int64), ValueError, "status_out has shape"),
    ("star_weights", 3, np.ones(4), TypeError, "good_pix must have dtype bool"),
    ("star_weights", 1, np.ones((3, 4), np.float32), TypeError,
     r"ivar must have dtype float64 \(as flux\)"),
    ("star_weights", 0, np.ones((3, 4), np.int64), TypeError,
     "flux must have dtype float64 or float32"),
    ("star_weights", 6, np.empty((3, 4)), TypeError, "w_out must have dtype float32"),
    ("star_weights", 10, np.empty((3, 2)), ValueError, "moments_out has shape"),
    ("star_weights", 11, np.empty(2, np.int64), ValueError, "bad_out has shape"),
    ("design", 3, np.empty((3, 6, 3)), ValueError, "dv_out has shape"),
    ("weighted_square_sum", 0, np.ones((3, 4)), TypeError, "w must have dtype float32"),
    ("debias_steps", 2, np.ones((3, 5)), ValueError, r"b_packed has shape \(3, 5\)"),
    ("debias_steps", 7, -1, ValueError, "n_steps must be >= 0"),
    ("sandwich_covariance", 2, np.zeros(5), ValueError, r"cbar_packed has shape \(5,\)"),
    ("sandwich_covariance", 4, np.zeros((3, 2, 3)), ValueError, "extra has shape"),
    ("sandwich_covariance", 9, np.empty(3), TypeError, "capped_out must have dtype int64"),
    ("weighted_square_sum", 1, np.ones((3, 5)), ValueError, r"m has shape \(3, 5\)"),
    ("design", 1, np.zeros((6, 2)), TypeError, "exponents must have dtype int64"),
    ("continuum_normalize", 0, np.ones((3, 6), np.int64), TypeError,
     "flux must have dtype float64 or float32"),
    ("continuum_normalize", 1, np.ones((3, 6), np.float32), TypeError,
     r"ivar must have dtype float64 \(as flux\)"),
    ("continuum_normalize", 2, np.ones((5, 2)), ValueError, r"basis has shape \(5, 2\)"),
    ("continuum_normalize", 4, np.ones(6, bool), TypeError, "is_cont must have dtype uint8"),
    ("continuum_normalize", 5, -1, ValueError, "n_chips must be >= 0"),
    ("continuum_normalize", 9, np.empty((2, 6)), ValueError, "cont_out has shape"),
    ("continuum_normalize", 10, np.empty((3, 2), np.int64), ValueError,
     "status_out has shape"),
])
def test_c_rejects_bad_arguments(name, pos, bad, exc, match):
    args = _c_ok_args()[name]
    args[pos] = bad
    with pytest.raises(exc, match=match):
        getattr(backends._ccannon, name)(*args)


@needs_c
@pytest.mark.skipif("numba" not in available_backends(), reason="numba not installed")
@pytest.mark.parametrize("name", KERNELS)
def test_c_signatures_are_the_numba_signatures(name):
    c_sig = inspect.signature(getattr(backends._ccannon, name))
    nb_fn = getattr(nb_kernels, name)
    nb_sig = inspect.signature(getattr(nb_fn, "py_func", nb_fn))  # plain with NUMBA_DISABLE_JIT
    assert list(c_sig.parameters) == list(nb_sig.parameters)


@needs_c
def test_c_rejects_read_only_output_and_accepts_keywords():
    args = _c_ok_args()["design"]
    args[2].flags.writeable = False
    with pytest.raises(ValueError, match="output v_out is read-only"):
        backends._ccannon.design(*args)
    args[2] = np.empty_like(args[2])
    backends._ccannon.design(x=args[0], exponents=args[1], v_out=args[2], dv_out=args[3])
    with pytest.raises(TypeError):
        backends._ccannon.design(*args[:3])


@needs_c
@pytest.mark.parametrize("name", KERNELS)
def test_c_docstrings_register_the_gufunc_contract(name):
    contract = re.search(r"``(\([^`]*->[^`]*)``", getattr(nb_kernels, name).__doc__).group(1)
    assert contract in getattr(backends._ccannon, name).__doc__


def _c_s2_in_child(seed):
    rng = np.random.default_rng(seed)
    resid, var = _s2_problem(rng, n_stars=20, n_pix=1000)
    return float(np.sum(_s2(backends._ccannon, resid, var)[0]))


@needs_c
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_c_kernels_work_in_forked_workers():
    """GNU OpenMP hangs in a forked child; the extension runs children single-threaded."""
    expected = [_c_s2_in_child(s) for s in range(2)]  # parent: the thread pool is up
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(_c_s2_in_child, range(2)).get(timeout=60)
    assert_allclose(got, expected, rtol=1e-12)


@needs_c
def test_c_thread_cap_does_not_change_results():
    c = backends._ccannon
    rng = np.random.default_rng(9)
    resid, var = _s2_problem(rng, n_stars=40, n_pix=2000)
    s2_many, _ = _s2(c, resid, var)
    old = c.set_num_threads(1)
    try:
        assert c.max_threads() == 1
        s2_one, _ = _s2(c, resid, var)
    finally:
        c.set_num_threads(old)
    assert_array_equal(s2_one, s2_many)
    with pytest.raises(ValueError):
        c.set_num_threads(-1)


def test_kernels_from_concurrent_python_threads(backend):
    """The C and numba kernels release the GIL; concurrent calls must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    k = kernels(backend)
    problems = [_s2_problem(np.random.default_rng(20 + i), n_stars=30, n_pix=400)
                for i in range(4)]
    expected = [_s2(k, *p)[0] for p in problems]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda p: _s2(k, *p)[0], problems))
    for g, e in zip(got, expected):
        assert_array_equal(g, e)


# ------------------------------------------------------------------ numba in user code

@pytest.mark.skipif("numba" not in available_backends(), reason="numba not installed")
def test_numba_kernels_work_inside_user_njit():
    import numba as nb

    from cannon_fast.core._kernels.model_eval import label_vector_and_jacobian

    @nb.njit
    def user_design(x, exponents):
        n_terms, n_labels = exponents.shape
        v = np.empty((x.shape[0], n_terms))
        dv = np.empty((x.shape[0], n_terms, n_labels))
        for i in range(x.shape[0]):
            label_vector_and_jacobian(x[i], exponents, v[i], dv[i])
        return v, dv

    exponents = vz.polynomial_exponents(3, 2)
    x = np.random.default_rng(6).uniform(-1, 1, size=(9, 3))
    v, dv = user_design(x, exponents)
    assert_allclose(v, vz.label_vector(x, exponents), rtol=1e-14)
    assert_allclose(dv, vz.label_vector_jacobian(x, exponents), rtol=1e-14, atol=1e-15)


def test_every_numba_option_comes_from_jit_module():
    """``@nb.njit`` takes signatures and one ``**JIT*`` dict of ``_kernels/_jit.py``, no more."""
    from cannon_fast.core._kernels import _jit

    found = 0
    for path in sorted(Path(nb_kernels.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("njit", "jit", "vectorize", "guvectorize",
                                           "prange", "stencil", "cfunc")):
                continue
            if node.func.attr == "prange":  # no options to set, but nothing hidden either
                assert not node.keywords, (path.name, node.lineno)
                continue
            found += 1
            where = f"{path.name}:{node.lineno}"
            assert len(node.keywords) == 1 and node.keywords[0].arg is None, where
            name = node.keywords[0].value
            assert isinstance(name, ast.Name) and isinstance(getattr(_jit, name.id), dict), where
        bare = [d for f in ast.walk(ast.parse(path.read_text()))
                if isinstance(f, ast.FunctionDef) for d in f.decorator_list
                if isinstance(d, (ast.Attribute, ast.Name))]
        assert not bare, (path.name, [d.lineno for d in bare])  # a bare @nb.njit: defaults
    assert found >= 20
