"""Calibrated label errors: the fit's formal errors plus a model-error term.

A fit's formal error counts only the pixel noise as the inverse variances state it.
Two things it misses dominate on real surveys: noise the ivar does not describe
(pixel-correlated noise of resampled, combined spectra; continuum errors), which
scales with the formal error, and the model's own misfit (its form, its training
labels' errors), which does not shrink with S/N. Cross-validation measures both: the
held-out stars' (fit - reference) against their formal errors. Per label, the
variance is modelled as

    var = s² σ₀² (σ / σ₀)^(2γ) + exp(2 (b₀ + clip(b · z + c · z², ±ln 4)))

with s >= 1 (the noise the ivar states is in every fit), σ the formal error, σ₀ its
median in the calibration set, and z the fitted labels standardized by the training
labels (clipped to ±3): the floor varies with the labels by at most a factor 4 either
way, so a star far outside the training set does not extrapolate it. The curvature c
(>= 0, one per label; optional, on for models of ideal spectra) lets the floor rise
towards both ends of a label: such a model misfits its coolest and its hottest stars
more than the bulk, and a floor log-linear in the labels, monotone in each, would
average the two ends with the middle and understate both; the stars of highest S/N,
whose error is nearly all floor, would show it first. The parameters are fitted by
maximum likelihood with the reference labels' own stated errors added to the variance,
and refitted once without stars beyond 5 sigma (binaries and failed fits should not
set everyone's errors).
"""

import numpy as np

__all__ = ["ErrorModel", "calibrate_forward_model", "fit_error_model", "model_error_part",
           "poor_fit_limit", "recalibrate_labels", "scale_by_reduced_chi2"]

#: z-scores of the fitted labels are clipped to this in the floor's label dependence
Z_CLIP = 3.0
#: stars beyond this many calibrated sigma leave the second pass of the fit
CLIP_SIGMA = 5.0
#: the floor's label dependence spans at most this factor either way of its centre value
#: (model errors differ across label space by a few, not by orders of magnitude; a small
#: calibration set must not extrapolate them to hundreds of K at its edges)
FLOOR_RANGE = 4.0
#: upper bound of the floor's curvature c per label (z² reaches 9 at the clip, so the
#: factor-4 range binds long before it)
CURVATURE_MAX = 3.0
#: lower bound of the noise part's scale s (the noise the ivar states is in every fit)
NOISE_SCALE_MIN = 1.0


class ErrorModel:
    """Per-label calibration of formal errors: ``total² = noise part + model floor²``.

    Build with ``fit_error_model`` (or ``CannonModel.calibrate_errors``); a model
    keeps it as ``model.error_model``, writes it into its file and applies it in
    ``model.fit`` (``FitResult.errors`` then holds the calibrated errors and
    ``formal_errors`` the fit's own).

    Parameters
    ----------
    label_names : sequence of str
    center, spread : array_like, (L,)
        Standardization of the labels for the floor's label dependence.
    params : dict of str -> dict
        Per label: ``scale`` (s), ``power`` (γ), ``sigma0`` (σ₀), ``floor`` (b₀
        followed by the L coefficients b) and, optionally, ``curvature`` (the L
        coefficients c; without it, as in records written before it, the floor is
        log-linear in the labels).
    info : dict, optional
        How it was calibrated (reference, number of stars, fit options, ...).
    """

    def __init__(self, label_names, center, spread, params, info=None):
        self.label_names = list(label_names)
        self.center = np.asarray(center, float)
        self.spread = np.asarray(spread, float)
        self.params = {n: dict(params[n]) for n in self.label_names}
        self.info = dict(info or {})

    def __repr__(self):
        return (f"<ErrorModel {', '.join(self.label_names)}: "
                f"{self.info.get('n_stars', '?')} calibration stars, reference "
                f"{self.info.get('reference', '?')}>")

    def _z(self, labels):
        z = (np.asarray(labels, float) - self.center) / self.spread
        return np.clip(np.nan_to_num(z), -Z_CLIP, Z_CLIP)

    def parts(self, labels, formal):
        """The noise part's sigma and the model floor, each (N, L), at ``labels``."""
        formal = np.atleast_2d(np.asarray(formal, float))
        z = self._z(np.atleast_2d(labels))
        noise, floor = np.empty_like(formal), np.empty_like(formal)
        for j, name in enumerate(self.label_names):
            p = self.params[name]
            noise[:, j] = _noise_sigma(formal[:, j], p["scale"], p["power"], p["sigma0"])
            floor[:, j] = _floor(np.asarray(p["floor"], float), z, p.get("curvature"))
        return noise, floor

    def total(self, labels, formal):
        """(N, L) calibrated errors at the fitted ``labels`` and ``formal`` errors.

        Never below the formal error: what a fit cannot know from its pixels is
        added; the calibration does not claim more precision than the noise allows.
        """
        noise, floor = self.parts(labels, formal)
        return np.fmax(np.hypot(noise, floor), np.asarray(formal, float))

    def apply(self, result):
        """A copy of a ``FitResult`` with calibrated errors and covariances.

        The covariance is rescaled so its diagonal holds the calibrated variances
        and its correlations stay those of the fit.
        """
        import dataclasses

        if list(result.label_names) != self.label_names:
            raise ValueError(f"error model for labels {self.label_names}, fit result has "
                             f"{list(result.label_names)}")
        formal = result.errors
        with np.errstate(invalid="ignore", divide="ignore"):
            total = self.total(result.labels, formal)
            ratio = np.where(formal > 0, total / formal, np.nan)
        cov = result.covariance * ratio[:, :, None] * ratio[:, None, :]
        return dataclasses.replace(result, errors=total, covariance=cov, formal_errors=formal)

    def to_dict(self):
        """A JSON-ready record (written into model files)."""
        return dict(label_names=self.label_names, center=self.center.tolist(),
                    spread=self.spread.tolist(),
                    params={n: {k: (np.asarray(v).tolist()) for k, v in p.items()}
                            for n, p in self.params.items()},
                    info=self.info)

    @classmethod
    def from_dict(cls, d):
        """The inverse of ``to_dict``; ValueError for a record that is not one."""
        try:
            em = cls(d["label_names"], d["center"], d["spread"], d["params"], d.get("info"))
            L = len(em.label_names)
            if em.center.shape != (L,) or em.spread.shape != (L,) or np.any(em.spread <= 0):
                raise ValueError("center/spread do not match the labels")
            for n in em.label_names:
                p = em.params[n]
                if np.asarray(p["floor"]).shape != (L + 1,) or not p["sigma0"] > 0 or (
                        "curvature" in p and np.asarray(p["curvature"]).shape != (L,)):
                    raise ValueError(f"bad parameters for {n}")
        except (KeyError, TypeError) as err:
            raise ValueError(f"not an error-model record: {err}") from None
        return em


def model_error_part(total, formal):
    """What a calibration adds to ``formal`` errors, in quadrature: sqrt(total² - formal²)."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.clip(np.asarray(total) ** 2 - np.asarray(formal) ** 2, 0, None))


def _noise_sigma(formal, scale, power, sigma0):
    with np.errstate(invalid="ignore", divide="ignore"):
        return scale * sigma0 * (formal / sigma0) ** power


def fit_error_model(fitted, formal, reference, label_names, reference_errors=None,
                    training_labels=None, info=None, curvature=False):
    """Fit an ``ErrorModel`` to held-out fits and reference labels.

    Parameters
    ----------
    fitted, formal : ndarray, (N, L)
        Labels fitted to stars the model was not trained on, and their formal
        errors (NaN rows are skipped).
    reference : ndarray, (N, L)
        The labels they are judged against (true labels in a simulation, a
        reference catalogue otherwise).
    label_names : sequence of str
    reference_errors : ndarray, (N, L), optional
        The reference labels' own errors, added to the variance. Where they are
        understated, the model floor absorbs the excess and the calibrated errors
        come out too large, not too small.
    training_labels : ndarray, (M, L), optional
        The model's training labels, for the floor's label standardization
        (default: ``reference``).
    info : dict, optional
        Recorded with the model (e.g. the reference's name).
    curvature : bool
        Let the floor rise towards both ends of each label (c · z², c >= 0): for a
        model of ideal spectra, whose misfit grows towards the ends of its label
        range (``calibrate_forward_model`` sets it). Off, the floor is log-linear in
        the labels: a data-driven model cross-validated on the survey's own stars
        misfits its edges mostly in catastrophic fits, and the curvature spent on
        them overstated the errors of its other high-S/N stars (docs/lab.md).

    Returns
    -------
    ErrorModel
    """
    from scipy.optimize import minimize

    fitted, formal, reference = (np.atleast_2d(np.asarray(a, float))
                                 for a in (fitted, formal, reference))
    L = fitted.shape[1]
    if formal.shape != fitted.shape or reference.shape != fitted.shape or len(label_names) != L:
        raise ValueError(f"fitted {fitted.shape}, formal {formal.shape}, reference "
                         f"{reference.shape} and {len(label_names)} label names disagree")
    ref_var = (np.zeros_like(fitted) if reference_errors is None
               else np.nan_to_num(np.asarray(reference_errors, float)) ** 2)
    base = reference if training_labels is None else np.asarray(training_labels, float)
    center = np.nanmedian(base, axis=0)
    spread = np.nanstd(base, axis=0)
    spread = np.where(spread > 0, spread, 1.0)
    model = ErrorModel(label_names, center, spread, {n: {} for n in label_names})
    z = model._z(fitted)
    params, n_used = {}, []
    for j, name in enumerate(label_names):
        r = fitted[:, j] - reference[:, j]
        ok = np.isfinite(r) & np.isfinite(formal[:, j]) & (formal[:, j] > 0)
        n_min = 4 * (3 + L + (L if curvature else 0))  # four stars a parameter
        if ok.sum() < n_min:
            raise ValueError(f"{name}: only {int(ok.sum())} usable held-out fits to calibrate "
                             f"errors on (need >= {n_min})")
        sigma0 = float(np.median(formal[ok, j]))
        p = None
        for _ in range(2):
            p = _fit_one(r[ok], formal[ok, j], z[ok], ref_var[ok, j], sigma0, minimize, p,
                         curvature)
            var = _variance(p, formal[:, j], z, sigma0) + ref_var[:, j]
            with np.errstate(invalid="ignore"):
                keep = ok & (np.abs(r) <= CLIP_SIGMA * np.sqrt(var))
            if keep.sum() == ok.sum():
                break
            ok = keep
        n_used.append(int(ok.sum()))
        params[name] = dict(scale=float(np.exp(p[0])), power=float(p[1]), sigma0=sigma0,
                            floor=[float(x) for x in p[2:L + 3]])
        if curvature:
            params[name]["curvature"] = [float(x) for x in p[L + 3:]]
    info = dict(info or {}, n_stars=int(len(fitted)), n_used=dict(zip(label_names, n_used)))
    return ErrorModel(label_names, center, spread, params, info)


def _floor(coef, z, curvature=None):
    lim = np.log(FLOOR_RANGE)
    shape = z @ coef[1:]
    if curvature is not None:
        shape = shape + (z * z) @ np.asarray(curvature, float)
    return np.exp(coef[0] + np.clip(shape, -lim, lim))


def _variance(p, formal, z, sigma0):
    L = z.shape[1]
    return (_noise_sigma(formal, np.exp(p[0]), p[1], sigma0) ** 2
            + _floor(p[2:L + 3], z, p[L + 3:] if len(p) > L + 3 else None) ** 2)


def _fit_one(r, formal, z, ref_var, sigma0, minimize, start, curvature):
    """Maximum-likelihood parameters (log s, γ, b₀, b[, c]) of one label."""
    L = z.shape[1]

    def nll(p):
        v = _variance(p, formal, z, sigma0) + ref_var
        return 0.5 * np.sum(r * r / v + np.log(v))

    if start is None:
        start = np.zeros(3 + L + (L if curvature else 0))
        start[1] = 1.0
        start[2] = np.log(max(np.std(r), 1e-12) / 2)
    # the noise part scales with the formal error (power 1 for noise the ivar understates
    # by a constant factor); the bounds keep it physical where it extrapolates (S/N far
    # below or above the calibration stars'), the floor takes what does not scale. Its
    # scale s is at least 1: the noise the ivar states is in every fit. Over the
    # calibration stars' S/N range a floor shaped by the labels can otherwise stand in for
    # it (s near 0), and below that range the errors then stop growing as the noise does.
    # The curvature is not negative: a floor dipping at a label's ends would be a small
    # calibration set's accident, not a model that fits its edge stars better
    bounds = ([(np.log(NOISE_SCALE_MIN), 5), (0.5, 1.5), (None, None)] + [(-3, 3)] * L
              + [(0, CURVATURE_MAX)] * (L if curvature else 0))
    return minimize(nll, start, method="L-BFGS-B", bounds=bounds).x


def poor_fit_limit(chi2, dof):
    """The reduced chi² above which a fit is POOR_FIT: the model does not describe it.

    Twice the 99th percentile of the reduced chi² of stars the model describes
    (a Cannon's training stars at their labels, an emulator's reference stars at
    their fits; at least 2): a spectrum unlike all of them, or one the
    normalization or the masks spoiled, lies far above it.
    """
    return float(max(2.0, 2.0 * np.nanpercentile(np.asarray(chi2) / np.asarray(dof), 99)))


def scale_by_reduced_chi2(result):
    """A copy of a ``FitResult`` with errors times sqrt(max(1, reduced chi²)), formal ones kept.

    For a forward model that knows nothing of its own misfit (an emulator of
    noise-free model spectra: no s², no error model), the reduced chi² is the
    only measure of it a fit has. Scaling by it (the Birge ratio) treats the
    misfit as noise the ivar understates; a systematic offset of the labels it
    does not see — that needs ``calibrate_forward_model`` on stars of known labels.
    """
    import dataclasses

    with np.errstate(invalid="ignore"):
        ratio = np.sqrt(np.fmax(np.nan_to_num(result.reduced_chi2, nan=1.0), 1.0))
    return dataclasses.replace(result, errors=result.errors * ratio[:, None],
                               covariance=result.covariance * (ratio ** 2)[:, None, None],
                               formal_errors=result.errors)


def calibrate_forward_model(model, flux, ivar, reference, fit, reference_errors=None,
                            n_rounds=2, linear=True, backend=None):
    """Teach a forward model its misfit to real spectra from stars of known labels.

    A model of ideal spectra (The Payne trained on ab initio model spectra) fits
    observed stars with a reduced chi² of many and formal errors of a few K,
    and nothing in its fits says so. On reference stars (spectra with known
    labels, normalized as the stars it will fit), this sets what a Cannon learns
    in training:

    1. ``model.s2``, the per-pixel model variance: the residuals at the fitted
       labels, s² maximizing their likelihood at every pixel (the Cannon's own
       s² kernel), fit and s² alternated ``n_rounds`` times;
    2. ``model.train_info["poor_fit_reduced_chi2"]``, POOR_FIT's limit, from the
       reference stars' reduced chi² with that s² (``poor_fit_limit``);
    3. with ``linear`` (default), ``model.train_info["recalibration"]``: the
       reference labels regressed linearly on all fitted labels (the offsets and
       scale errors of a model of ideal spectra, as ASPCAP calibrates its labels),
       applied by ``recalibrate_labels``;
    4. ``model.error_model``, the (recalibrated) fits' calibrated errors against
       the reference labels (``fit_error_model`` with the floor's curvature: a
       model of ideal spectra misfits most at both ends of its labels).

    Parameters
    ----------
    model : object
        A forward model with ``label_names``, ``predict``, ``pixel_flags`` and a
        settable ``s2`` and ``train_info`` (a Payne emulator).
    flux, ivar : ndarray, (N, P)
    reference : ndarray, (N, L)
        The stars' labels; ``reference_errors`` their errors, optional.
    fit : callable
        ``fit(flux, ivar) -> FitResult``, the model's fit without calibrated errors.
    n_rounds : int
    linear : bool
    backend : str, optional
        Kernel backend of the s² search.

    Returns
    -------
    ErrorModel
    """
    from ._common import fitted_pixels
    from .backends import kernels, resolve_backend

    flux = np.ascontiguousarray(flux, dtype=np.float64)
    ivar = np.ascontiguousarray(ivar, dtype=np.float64)
    reference = np.atleast_2d(np.asarray(reference, float))
    if reference.shape != (len(flux), len(model.label_names)):
        raise ValueError(f"reference labels of shape {reference.shape} for {len(flux)} spectra "
                         f"and labels {list(model.label_names)}")
    usable = fitted_pixels(model, flux.shape[1])
    k = kernels(resolve_backend(backend or "auto"))
    before = None
    for _ in range(int(n_rounds)):
        res = fit(flux, ivar)
        ok = res.ok & np.all(np.isfinite(res.labels), axis=1)
        if ok.sum() < 10:
            raise ValueError(f"only {int(ok.sum())} of {len(flux)} reference stars could be "
                             "fitted; need >= 10 to learn the model's misfit")
        if before is None:
            before = float(np.median(res.reduced_chi2[ok]))
        resid = np.ascontiguousarray(flux[ok] - model.predict(res.labels[ok]))
        iv = np.ascontiguousarray(np.where(usable & np.isfinite(resid), ivar[ok], 0.0))
        resid = np.nan_to_num(resid)
        s2 = np.empty(flux.shape[1])
        k.s2_update(resid, iv, s2, np.empty(flux.shape[1], dtype=np.int8))
        model.s2 = s2
    res = fit(flux, ivar)
    ok = res.ok & np.all(np.isfinite(res.labels), axis=1)
    if before is None:
        before = float(np.median(res.reduced_chi2[ok]))
    limit = poor_fit_limit(res.chi2[ok], np.maximum(res.n_pixels[ok] - len(model.label_names), 1))
    use = ok & (res.reduced_chi2 <= limit)
    info = dict(getattr(model, "train_info", None) or {}, poor_fit_reduced_chi2=limit)
    info.pop("recalibration", None)
    if linear:
        design = np.column_stack([np.ones(use.sum()), res.labels[use]])
        coef = np.linalg.lstsq(design, reference[use], rcond=None)[0]  # (L + 1, L)
        info["recalibration"] = coef.tolist()
        res = recalibrate_labels(res, coef)
    model.error_model = fit_error_model(
        np.where(use[:, None], res.labels, np.nan), res.errors, reference, model.label_names,
        reference_errors=reference_errors, training_labels=reference,
        info=dict(reference="reference stars", n_rounds=int(n_rounds)), curvature=True)
    model.train_info = dict(info, calibration=dict(n_stars=int(len(flux)), n_fitted=int(ok.sum()),
                                             n_used=int(use.sum()),
                                             median_reduced_chi2_before=before,
                                             median_reduced_chi2_after=float(
                                                 np.median(res.reduced_chi2[ok]))))
    return model.error_model


def recalibrate_labels(result, coef):
    """A copy of a ``FitResult`` with labels ``[1, labels] @ coef`` and the covariance carried.

    ``coef`` (L + 1, L) is ``calibrate_forward_model``'s linear recalibration; the
    covariance goes as ``B^T C B`` with ``B = coef[1:]``.
    """
    import dataclasses

    coef = np.asarray(coef, float)
    b = coef[1:]
    cov = np.einsum("il,nij,jm->nlm", b, result.covariance, b)
    return dataclasses.replace(result, labels=coef[0] + result.labels @ b, covariance=cov,
                               errors=np.sqrt(np.diagonal(cov, axis1=1, axis2=2)))
