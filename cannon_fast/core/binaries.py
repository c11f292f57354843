"""A fast, batched single-versus-composite screen for unresolved binaries.

Following El-Badry et al. (2018), the normalized spectrum of an unresolved binary
is the light-weighted mean of two single-star spectra, the secondary shifted by the
velocity offset between the two. Here the primary is the star's single-star fit
``m₁`` and the composite is

    f ≈ (1 - w) m₁ + w s(ℓ₂, Δv)

with ``w`` the secondary's share of the light. For a fixed secondary template
``s`` the best ``w`` is linear least squares, so every star can be scored against
every template and velocity at once: the three sums the χ² improvement needs are
products of the spectra with the template matrix (BLAS), not a fit per star. The
templates are the model's own spectra on a grid of secondary TEFF/LOGG inside the
training set, with the star's other labels (stars are grouped by [Fe/H] so that a
group shares its templates).

A star is flagged when its χ² improvement, in units of the single fit's reduced χ²
where that exceeds 1, is above ``min_delta_chi2`` (default 100:
far beyond what pure noise gives for the ~500 templates and velocities tried,
~10-20, and above what the model's own misfit gives most single stars; the rates
measured on mock surveys are in docs/lab.md). Flagged stars get primary
labels from a fit of ``(f - w s) / (1 - w)``: the composite fit with the secondary
held at its best template.
"""

import dataclasses

import numpy as np

from ._common import fitted_pixels
from .grid import SPEED_OF_LIGHT as C_KMS

__all__ = ["BinaryScreen", "screen_binaries", "DEFAULT_MIN_DELTA_CHI2"]

#: χ² improvement above which a star is flagged as a likely binary
DEFAULT_MIN_DELTA_CHI2 = 100.0


@dataclasses.dataclass
class BinaryScreen:
    """The screen's result for N stars.

    Attributes
    ----------
    delta_chi2 : ndarray, (N,)
        χ² improvement of the best composite over the single-star fit, divided by
        the single fit's reduced χ² where that is above 1.
    weight : ndarray, (N,)
        The secondary's share of the light at the best composite (0-``max_weight``).
    velocity : ndarray, (N,)
        Secondary minus primary velocity, km/s.
    secondary : ndarray, (N, 2)
        The best template's TEFF and LOGG.
    flagged : ndarray of bool, (N,)
        Likely binaries: ``delta_chi2`` above ``min_delta_chi2``.
    min_delta_chi2 : float
    primary_labels : ndarray, (N, L)
        Labels of the composite fit's primary (NaN where not flagged).
    primary_errors : ndarray, (N, L)
    """

    delta_chi2: np.ndarray
    weight: np.ndarray
    velocity: np.ndarray
    secondary: np.ndarray
    flagged: np.ndarray
    min_delta_chi2: float
    primary_labels: np.ndarray
    primary_errors: np.ndarray

    def __len__(self):
        return len(self.delta_chi2)

    def columns(self, label_names):
        """Catalogue columns, all named with BINARY."""
        out = dict(BINARY_FLAG=self.flagged, BINARY_DELTA_CHI2=self.delta_chi2,
                   BINARY_LIGHT_WEIGHT=self.weight, BINARY_VELOCITY=self.velocity,
                   BINARY_TEFF2=self.secondary[:, 0], BINARY_LOGG2=self.secondary[:, 1])
        for j, n in enumerate(label_names):
            out[f"BINARY_PRIMARY_{n}"] = self.primary_labels[:, j]
            out[f"BINARY_PRIMARY_{n}_ERR"] = self.primary_errors[:, j]
        return out


def _secondary_grid(model, n_teff, n_logg, radius=0.35):
    """(K, 2) TEFF/LOGG pairs on a grid inside the training set (near training stars)."""
    names = model.label_names
    jt, jg = names.index("TEFF"), names.index("LOGG")
    tl = model.training_labels[:, [jt, jg]]
    t = np.linspace(*np.percentile(tl[:, 0], [1, 99]), n_teff)
    g = np.linspace(*np.percentile(tl[:, 1], [1, 99]), n_logg)
    pairs = np.array([(a, b) for a in t for b in g])
    scale = np.std(tl, axis=0)
    d = np.min(np.sum(((pairs[:, None, :] - tl[None]) / scale) ** 2, axis=2), axis=1)
    return pairs[np.sqrt(d) < radius]


def _shifted(templates, wavelength, velocities):
    """(V*K, P) templates Doppler-shifted by each velocity (linear interpolation)."""
    out = []
    for v in velocities:
        src = wavelength / (1.0 + v / C_KMS)   # the shifted spectrum at λ is the original at src
        out.append(np.stack([np.interp(src, wavelength, t) for t in templates]))
    return np.concatenate(out)


class _Scorer:
    """Δχ², best template and light share of composites, per [Fe/H] group of stars."""

    def __init__(self, model, flux, ivar, pairs, velocities, max_weight, feh_step):
        self.model, self.flux, self.ivar = model, flux, ivar
        self.pairs, self.velocities, self.max_weight = pairs, velocities, max_weight
        self.feh_step = feh_step
        self.use = fitted_pixels(model, flux.shape[1])
        self.wave = np.asarray(model.grid.wavelength, float)
        self.s2 = np.where(self.use, model.s2, 0.0)[self.use]
        self.inner = model.grid.inner_pixels()
        names = model.label_names
        self.j_teff, self.j_logg = names.index("TEFF"), names.index("LOGG")
        self.j_feh = names.index("FE_H") if "FE_H" in names else None

    def groups(self, labels):
        if self.j_feh is None:
            return np.zeros(len(labels), np.int64)
        return np.floor(np.nan_to_num(labels[:, self.j_feh]) / self.feh_step).astype(np.int64)

    def templates(self, base):
        """(V*K, P_use) secondary spectra at the group's labels ``base``, and m0 there."""
        lab2 = np.repeat(base[None], len(self.pairs), axis=0)
        lab2[:, self.j_teff], lab2[:, self.j_logg] = self.pairs[:, 0], self.pairs[:, 1]
        S = _shifted(self.model.predict(lab2), self.wave, self.velocities)[:, self.use]
        return S, self.model.predict(base[None])[0, self.use]

    def score(self, rows, labels, S, m0):
        """Best (Δχ², template index, light share) of stars ``rows`` with primaries ``labels``.

        The composite ``m1 + w d + β g`` (d = s - m1, g = the second difference of m1
        along pixels) is scored against the single star ``m1 + β g``: a velocity
        offset small against the line width reads as line broadening (macroturbulence,
        rotation), and a composite must do better than a broadened single star.
        d enters as (s - m0) - (m1 - m0), m0 the group's own spectrum, so the products
        are of small numbers and float32 (twice the BLAS rate) loses nothing to
        cancellation.
        """
        use = self.use
        Sc = (S - m0).astype(np.float32)
        Sc2 = Sc * Sc
        m1_all = self.model.predict(labels)
        g = np.zeros_like(m1_all)
        g[:, 1:-1] = m1_all[:, 2:] - 2.0 * m1_all[:, 1:-1] + m1_all[:, :-2]
        g = (g * self.inner)[:, use]
        m1 = m1_all[:, use]
        f, iv = self.flux[rows][:, use], self.ivar[rows][:, use]
        w_ = iv / (1.0 + iv * self.s2)          # the model's own scatter counts too
        res, m1c = f - m1, m1 - m0
        wr, wm, wg = w_ * res, w_ * m1c, w_ * g

        def prod(a, B):
            return (a.astype(np.float32) @ B.T).astype(np.float64)

        a_d = prod(wr, Sc) - np.sum(wr * m1c, axis=1)[:, None]             # d·W r
        b_dd = (prod(w_, Sc2) - 2.0 * prod(wm, Sc)
                + np.sum(wm * m1c, axis=1)[:, None])                        # d·W d
        b_dg = prod(wg, Sc) - np.sum(wg * m1c, axis=1)[:, None]             # d·W g
        a_g = np.sum(wg * res, axis=1)[:, None]                             # g·W r
        b_gg = np.sum(wg * g, axis=1)[:, None]                              # g·W g
        with np.errstate(invalid="ignore", divide="ignore"):
            # the broadening's part of d, removed: what the companion adds beyond it
            bgg = np.where(b_gg > 0, b_gg, np.inf)
            a_p = a_d - b_dg * a_g / bgg
            b_p = b_dd - b_dg * b_dg / bgg
            wt = np.clip(a_p / b_p, 0.0, self.max_weight)
        gain = np.where(b_p > 0, 2.0 * wt * a_p - wt * wt * b_p, 0.0)
        k = np.argmax(gain, axis=1)
        i = np.arange(len(rows))
        # in units of the single fit's reduced chi2 (at least 1): a spectrum the model
        # describes badly (a star unlike the training set) improves with any template
        dof = max(int(use.sum()) - self.model.n_labels - 1, 1)
        chi2_single = np.sum(wr * res, axis=1) - (a_g * a_g / bgg)[:, 0]
        rchi2 = np.maximum(chi2_single / dof, 1.0)
        return gain[i, k] / rchi2, k, wt[i, k]


def screen_binaries(model, flux, ivar, labels, *, min_delta_chi2=DEFAULT_MIN_DELTA_CHI2,
                    velocities=np.arange(-40.0, 41.0, 4.0), n_teff=8, n_logg=6,
                    max_weight=0.6, feh_step=0.1, n_refine=4, batch_size=256,
                    progress_bar=False):
    """Score every star as single or composite; flag and correct the likely binaries.

    Parameters
    ----------
    model : CannonModel
        Trained, with TEFF and LOGG among its labels and a pixel grid (for the
        wavelengths the velocity shifts need).
    flux, ivar : ndarray, (N, P)
        Normalized spectra on the model's pixels.
    labels : ndarray, (N, L)
        Single-star fits of them (rows with NaN are skipped).
    min_delta_chi2 : float
        The flag's threshold on the χ² improvement.
    velocities : array_like
        Secondary-minus-primary velocities tried, km/s.
    n_teff, n_logg : int
        Secondary template grid (only points near training stars are used).
    max_weight : float
        Largest secondary light share considered (above 0.5 the "secondary" is the
        brighter star).
    feh_step : float
        Width of the [Fe/H] groups that share templates (when FE_H is a label).
    n_refine : int
        Rounds of (fit the primary with the secondary held, re-choose the secondary)
        for the flagged stars; 0 skips the composite fit.
    batch_size : int
    progress_bar : bool

    Returns
    -------
    BinaryScreen
    """
    from .._util import progress

    names = model.label_names
    if "TEFF" not in names or "LOGG" not in names:
        raise ValueError(f"the binary screen needs TEFF and LOGG among the labels, has {names}")
    if model.grid is None:
        raise ValueError("the binary screen needs the model's pixel grid (wavelengths) to "
                         "shift the secondary; give the model a grid")
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    n, P = flux.shape
    if ivar.shape != flux.shape or labels.shape != (n, len(names)) or P != model.n_pixels:
        raise ValueError(f"flux {flux.shape}, ivar {ivar.shape} and labels {labels.shape} do "
                         f"not match {n} stars on the model's {model.n_pixels} pixels")
    pairs = _secondary_grid(model, n_teff, n_logg)
    velocities = np.asarray(velocities, float)
    sc = _Scorer(model, flux, ivar, pairs, velocities, max_weight, feh_step)
    good = np.all(np.isfinite(labels), axis=1)
    dchi2, weight = np.full(n, np.nan), np.full(n, np.nan)
    best = np.zeros(n, np.int64)
    group = sc.groups(labels)
    tmpl = {}
    with progress(total=int(good.sum()), desc="binary screen", unit="star",
                  disable=not progress_bar) as bar:
        for gkey in np.unique(group[good]):
            rows = np.flatnonzero(good & (group == gkey))
            tmpl[gkey] = sc.templates(np.median(labels[rows], axis=0))
            for a in range(0, len(rows), batch_size):
                r_ = rows[a:a + batch_size]
                dchi2[r_], best[r_], weight[r_] = sc.score(r_, labels[r_], *tmpl[gkey])
                bar.update(len(r_))
    with np.errstate(invalid="ignore"):
        flagged = good & (dchi2 > min_delta_chi2)
    prim, prim_err = _composite_primaries(sc, flagged, labels, best, weight, tmpl, group,
                                          n_refine)
    K = len(pairs)
    velocity = np.where(good, velocities[best // K], np.nan)
    secondary = np.where(good[:, None], pairs[best % K], np.nan)
    return BinaryScreen(dchi2, weight, velocity, secondary, flagged, float(min_delta_chi2),
                        prim, prim_err)


def _composite_primaries(sc, flagged, labels, best, weight, tmpl, group, n_refine):
    """Primary labels of the flagged stars: fit with the secondary held, then re-choose it.

    The secondary is chosen among its [Fe/H] group's templates (made at the group's
    median labels); templates at each star's own labels were tried and changed the
    primaries by < 1 % at 20x the cost. ``best`` and ``weight`` of the flagged stars
    are updated in place.
    """
    prim = np.full(labels.shape, np.nan)
    prim_err = np.full(labels.shape, np.nan)
    idx = np.flatnonzero(flagged)
    if not len(idx) or n_refine < 1:
        return prim, prim_err
    use, cur = sc.use, labels[idx].copy()
    for it in range(n_refine):
        sec = np.stack([tmpl[group[i]][0][best[i]] for i in idx])
        w = weight[idx, None]
        f_p, iv_p = sc.flux[idx].copy(), sc.ivar[idx].copy()
        f_p[:, use] = (f_p[:, use] - w * sec) / (1.0 - w)
        iv_p[:, use] = iv_p[:, use] * (1.0 - w) ** 2
        r = sc.model.fit(f_p, iv_p, debias=False, calibrated_errors=False)
        ok = r.ok & np.all(np.isfinite(r.labels), axis=1)
        cur[ok] = r.labels[ok]
        prim[idx] = np.where(ok[:, None], r.labels, np.nan)
        prim_err[idx] = r.errors
        if it + 1 < n_refine:   # the secondary that best fits beside the new primary
            for gkey in np.unique(group[idx]):
                sel = group[idx] == gkey
                _, best[idx[sel]], weight[idx[sel]] = sc.score(idx[sel], cur[sel], *tmpl[gkey])
    return prim, prim_err
