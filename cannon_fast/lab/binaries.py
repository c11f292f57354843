"""Unresolved binaries: a composite two-star model, single-vs-binary fits, and label bias.

Following El-Badry et al. (2018a), the normalized spectrum of an unresolved
binary is the light-weighted mean of two normalized single-star spectra,

    f(λ) = [f1(λ; ℓ1) + q_λ f2(λ (1 - Δv/c); ℓ2)] / (1 + q_λ),

where q_λ is the secondary-to-primary flux ratio at λ and Δv the velocity of
the secondary relative to the primary (the combined apStar spectrum is in the
rest frame of the brighter star, which dominates the cross-correlation). The
two stars share their abundances (same birth cloud): only ``TEFF`` and
``LOGG`` of the secondary are free by default. The light ratio is either a
free constant (``light_ratio="free"``) or follows from the two stars' labels
(``"physical"``: equal masses, so ``R² ∝ 1/g``, and black bodies:
``q_λ = 10**(logg1 - logg2) B_λ(T2) / B_λ(T1)``).

A Doppler shift is a shift in pixels on the log-lambda grid:
``Δpix = v / c / ln(10) / 6e-6`` (about 4.14 km/s per apStar pixel), applied
by linear interpolation.

Per star, :func:`fit_binaries` fits the single-star model (the chi² fit of
``model.fit``) and the binary model (bounded Levenberg-Marquardt with an
analytic Jacobian from the best points of a grid in Δv, light ratio and secondary labels), and
flags a likely binary by the improvement of the Bayesian information
criterion ``BIC = chi² + k ln n``. :func:`binary_bias_study` injects binaries
at known light ratios and measures the bias of single-star labels.

References
----------
El-Badry, Ting, Rix et al. 2018a, MNRAS 473, 5043 ("Signatures of unresolved
binaries in stellar spectra: implications for spectral fitting").
El-Badry, Rix, Ting et al. 2018b, MNRAS 476, 528 ("Discovery and
characterization of 3000+ main-sequence binaries from APOGEE spectra"; the
fractional improvement ``fimp``).
Schwarz 1978, Ann. Stat. 6, 461 (BIC).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .._util import progress
from ..core.grid import SPEED_OF_LIGHT
from ..core.model import fitted_pixels

__all__ = ["C_KMS", "DLOG10", "velocity_to_pixels", "doppler_shift", "pixel_grid",
           "planck_ratio", "composite_spectrum", "BinaryFit", "fit_binaries",
           "BiasStudy", "binary_bias_study", "secondary_for_light_ratio"]

#: km/s (the one constant, from the pixel grid's module)
C_KMS = SPEED_OF_LIGHT
#: log10 wavelength step of the apStar grid.
DLOG10 = 6e-6
_H_BAND = 16000.0  # Angstrom, where a scalar H-band light ratio is defined


def velocity_to_pixels(velocity, dlog10=DLOG10):
    """Pixel shift on a log10-lambda grid for a velocity (km/s): ``v / c / ln(10) / dlog10``."""
    return np.asarray(velocity, dtype=np.float64) / C_KMS / np.log(10.0) / dlog10


def pixel_grid(n_pixels):
    """Positions on the apStar grid and vacuum wavelengths (Å) of a model's pixels.

    Parameters
    ----------
    n_pixels : int
        8575 (the apStar grid), 7514 or 7214 (the gap-free ASPCAP grids);
        any other size is taken as contiguous apStar pixels from 0.

    Returns
    -------
    positions : ndarray, (P,)
        Pixel index on the 8575 grid.
    wavelength : ndarray, (P,)
    """
    from ..apogee.files import CDELT1, CRVAL1, GRID_SEGMENTS, grid_indices
    pos = grid_indices(n_pixels) if n_pixels in GRID_SEGMENTS else np.arange(n_pixels)
    pos = pos.astype(np.float64)
    return pos, 10.0 ** (CRVAL1 + CDELT1 * pos)


def doppler_shift(flux, velocity, positions=None, dlog10=DLOG10, fill=1.0):
    """Doppler-shift normalized spectra on a log-lambda grid by linear interpolation.

    Parameters
    ----------
    flux : array_like, (P,) or (N, P)
    velocity : float or array_like (N,)
        km/s; positive moves lines to longer wavelengths (redshift).
    positions : array_like, (P,), optional
        Pixel positions on the uniform log grid (``pixel_grid``); default
        ``arange(P)``. Gaps in the positions are bridged linearly.
    dlog10 : float, optional
    fill : float, optional
        Value for pixels shifted in from beyond the ends (the continuum).

    Returns
    -------
    ndarray, same shape as ``flux``
    """
    f = np.asarray(flux, dtype=np.float64)
    single = f.ndim == 1
    f2 = np.atleast_2d(f)
    pos = np.arange(f2.shape[1], dtype=np.float64) if positions is None \
        else np.asarray(positions, dtype=np.float64)
    shift = np.broadcast_to(velocity_to_pixels(velocity, dlog10), (f2.shape[0],))
    out = np.empty_like(f2)
    for i in range(f2.shape[0]):
        # the shifted spectrum at pixel x is the original at x - shift
        out[i] = f2[i] if shift[i] == 0 else np.interp(pos - shift[i], pos, f2[i],
                                                       left=fill, right=fill)
    return out[0] if single else out


def planck_ratio(t2, t1, wavelength):
    """``B_λ(t2) / B_λ(t1)`` at wavelengths in Å (black-body surface-brightness ratio)."""
    hc_k = 1.4387769e8  # h c / k in Å K
    lam = np.asarray(wavelength, dtype=np.float64)
    return np.expm1(hc_k / (lam * t1)) / np.expm1(hc_k / (lam * t2))


def composite_spectrum(f1, f2, light_ratio, velocity=0.0, positions=None):
    """``(f1 + q f2(shifted by velocity)) / (1 + q)`` for normalized spectra.

    Parameters
    ----------
    f1, f2 : array_like, (P,) or (N, P)
        Primary and secondary normalized spectra (rest frame).
    light_ratio : float or array_like
        Secondary / primary flux, scalar, (N,), (P,) or (N, P).
    velocity : float or array_like (N,), optional
        Secondary's velocity relative to the primary, km/s.
    positions : array_like, (P,), optional
        See ``doppler_shift``.

    Returns
    -------
    ndarray
    """
    q = np.asarray(light_ratio, dtype=np.float64)
    f1 = np.asarray(f1, dtype=np.float64)
    if q.ndim == 1 and f1.ndim == 2 and q.shape[0] == f1.shape[0] != f1.shape[1]:
        q = q[:, None]
    f2s = doppler_shift(f2, velocity, positions)
    return (f1 + q * f2s) / (1.0 + q)


# ----------------------------------------------------------------------------- fitting
@dataclasses.dataclass
class BinaryFit:
    """Single-star vs binary fits of N spectra.

    Attributes
    ----------
    label_names : list of str
    single_labels : ndarray, (N, L)
    single_chi2 : ndarray, (N,)
    primary_labels, secondary_labels : ndarray, (N, L)
        Best binary model (the secondary shares the labels not in ``free_secondary``).
    light_ratio : ndarray, (N,)
        Secondary/primary flux at 16,000 Å.
    velocity : ndarray, (N,)
        Secondary minus primary, km/s.
    binary_chi2 : ndarray, (N,)
    delta_chi2 : ndarray, (N,)
        ``single_chi2 - binary_chi2`` (>= 0: the binary model contains the single one).
    delta_bic : ndarray, (N,)
        ``BIC_single - BIC_binary``; positive favours the binary.
    fimp : ndarray, (N,)
        Fractional improvement (El-Badry et al. 2018b):
        ``sum(|f - m_single| - |f - m_binary|) / sigma`` over
        ``sum |m_single - m_binary| / sigma``.
    is_binary : ndarray of bool, (N,)
        ``delta_bic > bic_threshold`` and ``fimp > fimp_threshold``.
    n_pixels : ndarray of int, (N,)
    n_params_single, n_params_binary : int
    free_secondary : list of str
    light_ratio_mode : str
    bic_threshold : float
    """

    label_names: list
    single_labels: np.ndarray
    single_chi2: np.ndarray
    primary_labels: np.ndarray
    secondary_labels: np.ndarray
    light_ratio: np.ndarray
    velocity: np.ndarray
    binary_chi2: np.ndarray
    delta_chi2: np.ndarray
    delta_bic: np.ndarray
    fimp: np.ndarray
    is_binary: np.ndarray
    n_pixels: np.ndarray
    n_params_single: int
    n_params_binary: int
    free_secondary: list
    light_ratio_mode: str
    bic_threshold: float
    fimp_threshold: float

    def __len__(self):
        return len(self.single_chi2)

    def to_table(self, ids=None):
        """Return an astropy Table: single labels, both components, q, Δv, chi², ΔBIC, flag."""
        from astropy.table import Table
        t = Table()
        if ids is not None:
            t["ID"] = np.asarray(ids)
        for j, n in enumerate(self.label_names):
            t[n] = self.single_labels[:, j]
        for j, n in enumerate(self.label_names):
            t[n + "_1"] = self.primary_labels[:, j]
        for n in self.free_secondary:
            t[n + "_2"] = self.secondary_labels[:, self.label_names.index(n)]
        t["LIGHT_RATIO"] = self.light_ratio
        t["DV"] = self.velocity
        t["CHI2_SINGLE"] = self.single_chi2
        t["CHI2_BINARY"] = self.binary_chi2
        t["DELTA_CHI2"] = self.delta_chi2
        t["DELTA_BIC"] = self.delta_bic
        t["FIMP"] = self.fimp
        t["IS_BINARY"] = self.is_binary
        t["N_PIXELS"] = self.n_pixels
        return t


class _BinaryProblem:
    """Residuals of the binary model for one star, in scaled labels."""

    def __init__(self, model, flux, ivar, free_secondary, light_ratio, positions, wavelength):
        self.model = model
        names = list(model.label_names)
        self.n_labels = len(names)
        self.idx2 = [names.index(n) for n in free_secondary]
        self.free_q = light_ratio == "free"
        self.positions, self.wavelength = positions, wavelength
        s2 = np.asarray(getattr(model, "s2", None) if getattr(model, "s2", None) is not None
                        else np.zeros(flux.size))
        good = (ivar > 0) & np.isfinite(flux) & fitted_pixels(model, flux.size)
        self.good = good
        self.sw = np.sqrt(1.0 / (1.0 / ivar[good] + s2[good]))
        self.f = flux[good]
        self.i_h = int(np.argmin(np.abs(wavelength - _H_BAND)))
        self.it = names.index("TEFF") if "TEFF" in names else None
        self.ig = names.index("LOGG") if "LOGG" in names else None

    def labels(self, p):
        """(ℓ1, ℓ2, q-or-None, dv) in physical units from the parameter vector."""
        m = self.model
        x1 = p[:self.n_labels]
        k = self.n_labels + len(self.idx2)
        x2 = x1.copy()
        x2[self.idx2] = p[self.n_labels:k]
        q = p[k] if self.free_q else None
        dv = p[-1]
        return m.unscale_labels(x1), m.unscale_labels(x2), q, dv

    def light(self, l1, l2, q):
        if q is not None:
            return q
        return 10.0 ** (l1[self.ig] - l2[self.ig]) * planck_ratio(l2[self.it], l1[self.it],
                                                                  self.wavelength)

    def model_flux(self, p):
        l1, l2, q, dv = self.labels(p)
        f12 = self.model.predict(np.stack([l1, l2]))
        return composite_spectrum(f12[0], f12[1], self.light(l1, l2, q), dv, self.positions)

    def resid(self, p):
        return self.sw * (self.f - self.model_flux(p)[self.good])

    def jac(self, p):
        """Analytic Jacobian of ``resid`` for a free light ratio, (P_good, n_params)."""
        l1, l2, q, dv = self.labels(p)
        m = self.model
        f12 = m.predict(np.stack([l1, l2]))  # (2, P)
        if hasattr(m, "theta") and hasattr(m, "exponents"):
            from ..core import vectorizer as vz
            dvx = vz.label_vector_jacobian(m.scale_labels(np.stack([l1, l2])), m.exponents)
            g12 = np.swapaxes(np.matmul(m.theta, dvx), 1, 2)  # (2, L, P): d flux / d x
        else:
            g12 = m.gradient(np.stack([l1, l2])) * m.label_scales[None, :, None]
        f2s = doppler_shift(f12[1], dv, self.positions)
        g2s = doppler_shift(g12[1], np.full(self.n_labels, dv), self.positions, fill=0.0)
        # d/dx1: the primary, plus the secondary through the labels it shares
        d1 = g12[0].copy()
        shared = np.setdiff1d(np.arange(self.n_labels), self.idx2)
        d1[shared] += q * g2s[shared]
        cols = [d1 / (1.0 + q), q * g2s[self.idx2] / (1.0 + q),
                ((f2s - f12[0]) / (1.0 + q) ** 2)[None]]
        # d/ddv: the exact slope of the linear interpolation (a central difference far
        # smaller than a pixel stays inside one interpolation segment)
        h = 1e-3
        ds = (doppler_shift(f12[1], dv + h, self.positions)
              - doppler_shift(f12[1], dv - h, self.positions)) / (2 * h)
        cols.append((q / (1.0 + q) * ds)[None])
        dm = np.vstack(cols)[:, self.good]  # (n_params, P_good)
        return -(dm * self.sw).T

    def q_h(self, p):
        l1, l2, q, _ = self.labels(p)
        lam = self.light(l1, l2, q)
        return float(lam if np.ndim(lam) == 0 else lam[self.i_h])


def fit_binaries(model, flux, ivar, free_secondary=("TEFF", "LOGG"), light_ratio="free",
                 dv_max=150.0, dv_step=None, bic_threshold=10.0, fimp_threshold=0.1,
                 single=None, n_polish=2, max_iter=60, progress_bar=None):
    """Fit each spectrum with the single-star and the binary model; flag likely binaries.

    Parameters
    ----------
    model : CannonModel
    flux, ivar : array_like, (N, P) or (P,)
        Normalized spectra on the model's pixels.
    free_secondary : sequence of str, optional
        Labels of the secondary fitted freely; the others equal the primary's.
    light_ratio : {"free", "physical"}, optional
        A free constant light ratio in [0.01, 1], or one set by the labels
        (module docstring).
    dv_max : float, optional
        Largest |Δv| searched (km/s).
    dv_step : float, optional
        Grid step of the Δv search (default two apStar pixels, ~8.3 km/s).
    bic_threshold : float, optional
        Flag a binary when ``BIC_single - BIC_binary`` exceeds this (10 is
        "very strong" evidence on the Kass & Raftery 1995 scale) ...
    fimp_threshold : float, optional
        ... and the fractional improvement ``fimp`` exceeds this: with an
        imperfect model (real spectra, reduced chi² > 1) the extra freedom of
        the binary model buys a large Δchi² from model errors alone, spread
        over pixels where the two models hardly differ.
    single : FitResult, optional
        Single-star fits of these spectra (default ``model.fit(debias=False)``).
    n_polish : int, optional
        Levenberg-Marquardt runs from the best grid points.
    max_iter : int, optional
        Iterations of each run.
    progress_bar : bool, optional

    Returns
    -------
    BinaryFit
    """
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    ivar = np.atleast_2d(np.asarray(ivar, dtype=np.float64))
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar shapes differ: {flux.shape} vs {ivar.shape}")
    names = list(model.label_names)
    free_secondary = _checked_secondary(names, free_secondary, light_ratio)
    n, n_pix = flux.shape
    if n_pix != model.n_pixels:
        raise ValueError(f"the spectra have {n_pix} pixels but the model has {model.n_pixels}")
    positions, wavelength = pixel_grid(n_pix)
    if single is None:
        single = model.fit(flux, ivar, debias=False)
    n_labels = len(names)
    k_single = n_labels
    k_binary = n_labels + len(free_secondary) + (1 if light_ratio == "free" else 0) + 1
    bounds_x, lo, hi = _parameter_bounds(model, free_secondary, light_ratio, dv_max)
    search = dict(offsets=_secondary_offsets(names, free_secondary),
                  dv_grid=_velocity_grid(dv_max, dv_step), bounds_x=bounds_x,
                  light_ratio=light_ratio, positions=positions)
    out = {k: np.full(n, np.nan) for k in ("single_chi2", "light_ratio", "velocity",
                                           "binary_chi2", "fimp")}
    prim = np.full((n, n_labels), np.nan)
    sec = np.full((n, n_labels), np.nan)
    npix = np.zeros(n, dtype=np.int64)
    bar = progress(range(n), desc="binary fits", unit="star",
                   disable=None if progress_bar is None else not progress_bar)
    for i in bar:
        l_single = single.labels[i]
        prob = _BinaryProblem(model, flux[i], ivar[i], free_secondary, light_ratio, positions,
                              wavelength)
        npix[i] = prob.good.sum()
        if not np.all(np.isfinite(l_single)) or npix[i] < 10 * k_binary:
            continue
        m_single = model.predict(l_single)[prob.good]
        r1 = prob.sw * (prob.f - m_single)
        out["single_chi2"][i] = float(r1 @ r1)
        starts = _grid_starts(prob, l_single, **search)
        jac = prob.jac if light_ratio == "free" else _numeric_jac(prob.resid, hi - lo)
        best = None
        for _, p0 in starts[:n_polish]:
            p0 = np.clip(p0, lo, hi)
            x, c = _bounded_lm(prob.resid, jac, p0, lo, hi, max_iter=max_iter)
            if best is None or c < best[0]:
                best = (c, x)
        c, p = best
        l1, l2, q, dv = prob.labels(p)
        prim[i], sec[i] = l1, l2
        out["binary_chi2"][i] = c
        out["light_ratio"][i] = prob.q_h(p)
        out["velocity"][i] = dv
        out["fimp"][i] = _fractional_improvement(prob, m_single, prob.model_flux(p)[prob.good])
    dchi2 = out["single_chi2"] - out["binary_chi2"]
    dchi2 = np.where(np.isfinite(dchi2), np.maximum(dchi2, 0.0), np.nan)
    with np.errstate(divide="ignore"):
        ln_n = np.log(np.maximum(npix, 1))
    dbic = dchi2 - (k_binary - k_single) * ln_n
    return BinaryFit(label_names=names, single_labels=np.asarray(single.labels, float),
                     single_chi2=out["single_chi2"], primary_labels=prim, secondary_labels=sec,
                     light_ratio=out["light_ratio"], velocity=out["velocity"],
                     binary_chi2=out["binary_chi2"], delta_chi2=dchi2, delta_bic=dbic,
                     fimp=out["fimp"],
                     is_binary=(np.nan_to_num(dbic, nan=-np.inf) > bic_threshold)
                     & (np.nan_to_num(out["fimp"], nan=-np.inf) > fimp_threshold),
                     n_pixels=npix, n_params_single=k_single, n_params_binary=k_binary,
                     free_secondary=free_secondary, light_ratio_mode=light_ratio,
                     bic_threshold=float(bic_threshold), fimp_threshold=float(fimp_threshold))


def _checked_secondary(names, free_secondary, light_ratio):
    """``free_secondary`` as a list of label names, checked against the light-ratio mode."""
    free_secondary = [str(n) for n in free_secondary]
    unknown = [n for n in free_secondary if n not in names]
    if unknown:
        raise ValueError(f"free_secondary names unknown labels {unknown}; labels are {names}")
    if light_ratio not in ("free", "physical"):
        raise ValueError(f"light_ratio must be 'free' or 'physical', got {light_ratio!r}")
    if light_ratio == "physical" and not {"TEFF", "LOGG"} <= set(free_secondary):
        raise ValueError("light_ratio='physical' needs TEFF and LOGG among free_secondary")
    return free_secondary


def _parameter_bounds(model, free_secondary, light_ratio, dv_max):
    """Bounds of the binary model's parameters: the scaled labels' (2, L), and lo, hi.

    The parameters are the primary's scaled labels, the secondary's free ones, the
    light ratio when free, and the velocity.
    """
    names = list(model.label_names)
    # sorted: a reciprocal label (CannonModel(reciprocal_labels=)) reverses its bounds
    bounds_x = np.sort(model.scale_labels(np.asarray(model.label_bounds).T), axis=0)  # (2, L)
    lo = list(bounds_x[0]) + [bounds_x[0][names.index(s)] for s in free_secondary]
    hi = list(bounds_x[1]) + [bounds_x[1][names.index(s)] for s in free_secondary]
    if light_ratio == "free":
        lo.append(0.01)
        hi.append(1.0)
    lo.append(-dv_max)
    hi.append(dv_max)
    return bounds_x, np.array(lo), np.array(hi)


def _velocity_grid(dv_max, dv_step=None):
    """Velocities of the grid search (km/s): 0 first, then every ``dv_step`` to ±``dv_max``."""
    step = dv_step if dv_step is not None else 2 * C_KMS * np.log(10.0) * DLOG10
    dv_grid = np.arange(-dv_max, dv_max + 1e-9, step)
    dv_grid = dv_grid[np.abs(dv_grid) > 0.5 * step] if len(dv_grid) > 1 else dv_grid
    return np.concatenate([[0.0], dv_grid])


def _grid_starts(prob, l_single, offsets, dv_grid, bounds_x, light_ratio, positions):
    """Starting points of the binary fit from a grid search, best (lowest chi²) first.

    The primary is held at the single-star labels; the grid runs over candidate
    secondaries (``offsets`` in physical units of the free labels), light ratios
    (when free) and velocities. Returns a list of (chi², parameter vector).
    """
    model, names = prob.model, list(prob.model.label_names)
    x1 = model.scale_labels(l_single)
    f1 = model.predict(l_single)
    cands = []
    for off in offsets:
        l2 = l_single.copy()
        for name, d in off.items():
            l2[names.index(name)] += d
        x2 = model.scale_labels(l2)
        x2 = np.clip(x2, bounds_x[0], bounds_x[1])
        l2 = model.unscale_labels(x2)
        f2 = model.predict(l2)
        qs = (0.2, 0.5, 0.9) if light_ratio == "free" else (None,)
        shifted = doppler_shift(np.broadcast_to(f2, (len(dv_grid), f2.size)), dv_grid,
                                positions)[:, prob.good]
        for q in qs:
            qq = prob.light(l_single, l2, q)
            qq = qq if np.ndim(qq) == 0 else qq[prob.good]
            comp = (f1[prob.good] + qq * shifted) / (1.0 + qq)
            r = prob.sw * (prob.f - comp)
            chi = np.einsum("kp,kp->k", r, r)
            j = int(np.argmin(chi))
            p = list(x1) + list(x2[prob.idx2])
            if q is not None:
                p.append(q)
            p.append(dv_grid[j])
            cands.append((chi[j], np.array(p)))
    cands.sort(key=lambda c: c[0])
    return cands


def _fractional_improvement(prob, m_single, m_binary):
    """El-Badry et al.'s ``fimp`` of one star from its single and binary model spectra.

    ~1 when the binary model fits better wherever the two models differ, ~0 when
    its gain is spread over noise.
    """
    den = np.sum(np.abs(m_single - m_binary) * prob.sw)
    num = np.sum((np.abs(prob.f - m_single) - np.abs(prob.f - m_binary)) * prob.sw)
    return num / den if den > 0 else 0.0


def _numeric_jac(resid, span, rel=1e-5):
    """Forward-difference Jacobian of ``resid`` with steps ``rel * span``."""
    def jac(p):
        r0 = resid(p)
        out = np.empty((r0.size, p.size))
        for k in range(p.size):
            q = p.copy()
            q[k] += rel * span[k]
            out[:, k] = (resid(q) - r0) / (rel * span[k])
        return out
    return jac


def _bounded_lm(resid, jac, p0, lo, hi, max_iter=60, rtol=1e-8):
    """Levenberg-Marquardt with Marquardt scaling; steps are clipped to the bounds.

    The normal equations are (n, n) with n ~ 10, so each step costs one
    Jacobian and no decomposition of the (P, n) matrix (a threaded SVD of it, as
    ``scipy.optimize.least_squares`` does, costs far more on a busy machine:
    ``docs/measurements.md``).

    Returns
    -------
    x : ndarray, (n,)
    chi2 : float
    """
    x = np.array(p0, dtype=np.float64)
    r = resid(x)
    chi2 = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        j = jac(x)
        a = j.T @ j
        g = j.T @ r
        d = np.diag(a).copy()
        d[d <= 0] = 1.0
        improved = False
        for _ in range(12):
            try:
                step = -np.linalg.solve(a + lam * np.diag(d), g)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            x_new = np.clip(x + step, lo, hi)
            r_new = resid(x_new)
            chi2_new = float(r_new @ r_new)
            if chi2_new < chi2:
                improved = True
                break
            lam *= 10
        if not improved:
            break
        gain = chi2 - chi2_new
        x, r, chi2 = x_new, r_new, chi2_new
        lam = max(lam / 10, 1e-9)
        if gain < rtol * chi2 + 1e-12:
            break
    return x, chi2


def _secondary_offsets(names, free):
    """Return starting offsets of the secondary: a twin, a hotter fainter star, a cooler one."""
    base = {"TEFF": (0.0, 250.0, -250.0), "LOGG": (0.0, 0.6, -0.4)}
    out = []
    for k in range(3):
        off = {}
        for n in free:
            if n in base:
                off[n] = base[n][k]
        out.append(off)
    return out


# ----------------------------------------------------------------------------- bias study
def secondary_for_light_ratio(primary, light_ratio, branch, label_names, max_logg=None):
    """Labels of a giant-branch companion with a given H-band light ratio.

    Equal masses (so ``R² ∝ 1/g``) and black bodies: the companion sits on
    ``branch`` (a ``GiantBranch``, keeping the primary's Teff offset from it)
    at the log g where ``10**(logg1 - logg2) B(T2)/B(T1)`` at 16,000 Å equals
    ``light_ratio``; it shares the primary's abundances.

    Parameters
    ----------
    primary : array_like, (L,)
    light_ratio : float
        In (0, 1].
    branch : GiantBranch
    label_names : sequence of str
    max_logg : float, optional
        Return None if the companion would have a higher log g.

    Returns
    -------
    ndarray (L,) or None
    """
    names = list(label_names)
    it, ig = names.index("TEFF"), names.index("LOGG")
    feh = primary[names.index("FE_H")] if "FE_H" in names else branch.feh
    t1, g1 = primary[it], primary[ig]
    dt = t1 - branch.teff(g1, feh=feh)
    g2 = g1 + np.linspace(0.0, 3.0, 601)
    t2 = branch.teff(g2, feh=feh) + dt
    q = 10.0 ** (g1 - g2) * planck_ratio(t2, t1, _H_BAND)
    q = np.minimum.accumulate(q)  # monotone for the interpolation
    if light_ratio > q[0] or light_ratio < q[-1]:
        return None
    g = float(np.interp(light_ratio, q[::-1], g2[::-1]))
    if max_logg is not None and g > max_logg:
        return None
    out = np.array(primary, dtype=np.float64)
    out[ig] = g
    out[it] = float(branch.teff(g, feh=feh) + dt)
    return out


@dataclasses.dataclass
class BiasStudy:
    """Bias of single-star labels of injected binaries, per light ratio.

    Attributes
    ----------
    label_names : list of str
    light_ratios : ndarray, (Q,)
    bias, scatter : ndarray, (Q, L)
        Median and robust scatter of (single-star fit - primary's true labels).
    n_used : ndarray of int, (Q,)
        Binaries made at each light ratio (a companion off the training range is skipped).
    detected : ndarray, (Q,)
        Fraction flagged by ``fit_binaries`` (NaN when detection was not run).
    velocity : float
        |Δv| injected (km/s).
    snr : float
    source : str
    fits : list
        Per light ratio: (primary truths (n, L), fitted labels (n, L)).
    """

    label_names: list
    light_ratios: np.ndarray
    bias: np.ndarray
    scatter: np.ndarray
    n_used: np.ndarray
    detected: np.ndarray
    velocity: float
    snr: float
    source: str
    fits: list

    def to_table(self):
        """One row per light ratio: bias and scatter of each label, detection fraction."""
        from astropy.table import Table
        t = Table()
        t["LIGHT_RATIO"] = self.light_ratios
        t["N"] = self.n_used
        for j, n in enumerate(self.label_names):
            t[n + "_BIAS"] = self.bias[:, j]
            t[n + "_SCATTER"] = self.scatter[:, j]
        t["DETECTED"] = self.detected
        return t


def binary_bias_study(model, light_ratios=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
                      n_stars=30, velocity=0.0, snr=100.0, seed=0, source="model",
                      primaries=None, detect=False, branch=None, progress_bar=None):
    """Inject binaries at known light ratios and measure the bias of single-star labels.

    For each light ratio q, ``n_stars`` primaries (training stars with
    1.6 <= log g <= 2.8 unless given) get a companion on the giant branch with
    that H-band light ratio (``secondary_for_light_ratio``), the composite
    ``(f1 + q f2(Δv)) / (1 + q)`` gets Gaussian noise at ``snr`` and is fitted
    with the single-star model. ``q = 0`` is the single-star baseline.

    Parameters
    ----------
    model : CannonModel
        Labels must include TEFF, LOGG (and FE_H for the branch).
    light_ratios : sequence of float
    n_stars : int
    velocity : float
        |Δv| of the companion (km/s), random sign; 0 (a long-period binary,
        lines unresolved) is where single-star fits are most fooled.
    snr : float
    seed : int
    source : {"model", "synthetic"}
        Component spectra from ``model.predict`` or from the physical
        synthesis ``cannon_fast.demo.datasets.synthesize_spectra`` (5-label
        models on an APOGEE grid; tests the Cannon on spectra it did not make).
    primaries : array_like (n, L), optional
    detect : bool
        Also run ``fit_binaries`` and report the fraction flagged.
    branch : GiantBranch, optional
        Default ``giant_branch(model.training_labels)``.
    progress_bar : bool, optional

    Returns
    -------
    BiasStudy
    """
    from .isochrones import giant_branch

    names = list(model.label_names)
    for need in ("TEFF", "LOGG"):
        if need not in names:
            raise ValueError(f"the bias study needs a {need} label; the model has {names}")
    rng = np.random.default_rng(seed)
    train = np.asarray(model.training_labels, dtype=np.float64)
    if branch is None:
        if "FE_H" in names:
            cols = {n: train[:, names.index(n)] for n in ("TEFF", "LOGG", "FE_H")}
        else:
            cols = {"TEFF": train[:, names.index("TEFF")], "LOGG": train[:, names.index("LOGG")],
                    "FE_H": np.zeros(len(train))}
        branch = giant_branch(cols, feh_window=10.0)
    ig = names.index("LOGG")
    if primaries is None:
        pool = train[(train[:, ig] >= 1.6) & (train[:, ig] <= 2.8)]
        if len(pool) < n_stars:
            pool = train
        primaries = pool[rng.choice(len(pool), size=min(n_stars, len(pool)), replace=False)]
    primaries = np.atleast_2d(np.asarray(primaries, dtype=np.float64))
    tr_lo, tr_hi = train.min(axis=0), train.max(axis=0)
    n_pix = model.n_pixels
    positions, wavelength = pixel_grid(n_pix)
    if source == "synthetic":
        from ..demo.datasets import LABEL_NAMES as SYN_NAMES
        from ..demo.datasets import synthesize_spectra
        if tuple(names) != tuple(SYN_NAMES):
            raise ValueError(f"source='synthetic' needs the labels {SYN_NAMES}, model has {names}")

        def spectra(lab, vel=None):
            return synthesize_spectra(lab, wavelength, velocity=vel)
    elif source == "model":
        def spectra(lab, vel=None):
            f = model.predict(lab)
            return f if vel is None else doppler_shift(f, vel, positions)
    else:
        raise ValueError(f"source must be 'model' or 'synthetic', got {source!r}")
    q_arr = np.asarray(light_ratios, dtype=np.float64)
    n_l = len(names)
    bias = np.full((len(q_arr), n_l), np.nan)
    scat = np.full((len(q_arr), n_l), np.nan)
    n_used = np.zeros(len(q_arr), dtype=np.int64)
    detected = np.full(len(q_arr), np.nan)
    fits = []
    f1_all = spectra(primaries)
    for k, q in enumerate(progress(q_arr, desc="binary bias", unit="q",
                                   disable=None if progress_bar is None else not progress_bar)):
        if q <= 0:
            keep = np.arange(len(primaries))
            comp = f1_all
        else:
            sec, keep = [], []
            for i, p in enumerate(primaries):
                s = secondary_for_light_ratio(p, q, branch, names, max_logg=tr_hi[ig])
                if s is not None and np.all((s >= tr_lo) & (s <= tr_hi)):
                    sec.append(s)
                    keep.append(i)
            keep = np.array(keep, dtype=int)
            if len(keep) == 0:
                fits.append((np.empty((0, n_l)), np.empty((0, n_l))))
                continue
            vel = velocity * rng.choice([-1.0, 1.0], size=len(keep))
            f2 = spectra(np.array(sec), vel)
            comp = (f1_all[keep] + q * f2) / (1.0 + q)
        noise_sigma = 1.0 / snr
        flux = comp + noise_sigma * rng.standard_normal(comp.shape)
        ivar = np.full(comp.shape, 1.0 / noise_sigma ** 2)
        res = model.fit(flux, ivar)
        d = res.labels - primaries[keep]
        bias[k] = np.nanmedian(d, axis=0)
        scat[k] = 1.4826 * np.nanmedian(np.abs(d - bias[k]), axis=0)
        n_used[k] = len(keep)
        fits.append((primaries[keep], res.labels))
        if detect:
            bf = fit_binaries(model, flux, ivar, progress_bar=False)
            detected[k] = float(np.mean(bf.is_binary))
    return BiasStudy(label_names=names, light_ratios=q_arr, bias=bias, scatter=scat,
                     n_used=n_used, detected=detected, velocity=float(velocity), snr=float(snr),
                     source=source, fits=fits)
