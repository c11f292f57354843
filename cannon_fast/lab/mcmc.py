"""Posterior sampling of one star's labels with emcee (lab step 12).

The likelihood is the one the chi² fit uses: Gaussian in the normalized flux
with variance ``1/ivar + s²`` per pixel; pixels with ``ivar = 0``, non-finite
flux or no usable model (:func:`cannon_fast.core.model.fitted_pixels`) are dropped.
For a polynomial ``CannonModel`` the chi² is an exact quadratic form in the label vector
``v(x)`` (``theta`` is fixed), so after one pass over the pixels every
likelihood evaluation costs O(T²) instead of O(P T), whatever P is (timings:
``docs/measurements.md``). Any other forward model (one with
``predict`` or ``predict_with_jacobian``) is evaluated pixel by pixel, with
all walkers in one batched call.

Priors are stated and stored with the result (``PosteriorResult.prior``):
uniform within the training-label range by default, or per label a uniform
box or a Gaussian (always truncated to the model's fitting bounds
``label_bounds``, where the polynomial is still defined).

Walkers start in a small ball around the chi² fit, drawn from its
covariance. The chain runs in blocks until it is longer than
``tau_factor`` (50) integrated autocorrelation times of every label and the
estimate of tau changed by less than ``tau_rtol`` in the last block, or
until ``n_steps``; burn-in is ``2 max(tau)`` and thinning ``min(tau) / 2``
(Foreman-Mackey et al. 2013; the emcee documentation). A chain that did not
converge is returned with ``converged=False``, and its ``summary`` and
``check`` refuse to report it as final.

References
----------
Foreman-Mackey, Hogg, Lang & Goodman 2013, PASP 125, 306 (emcee).
Ness et al. 2015, ApJ 808, 16, eq. 2 (the per-pixel likelihood).
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np

from ..core import vectorizer as vz
from .._util import progress
from ..core.model import fitted_pixels

__all__ = ["Prior", "PosteriorResult", "TrainingRangeWarning", "make_prior", "sample_posterior",
           "log_likelihood_function", "usable_pixels"]


class TrainingRangeWarning(UserWarning):
    """A label of the target lies outside the range of the training set."""


# ----------------------------------------------------------------------------- priors
class Prior:
    """Independent per-label prior: a uniform box or a truncated Gaussian per label.

    Parameters
    ----------
    label_names : sequence of str
    kinds : sequence of {"uniform", "gaussian"}
    params : array_like, (L, 2)
        ``(low, high)`` for a uniform label, ``(mean, sigma)`` for a Gaussian one.
    support : array_like, (L, 2)
        Hard limits of every label (the prior is zero outside); uniform
        labels use ``params`` intersected with it.

    Attributes
    ----------
    low, high : ndarray, (L,)
        Where the prior is nonzero.
    """

    def __init__(self, label_names, kinds, params, support):
        self.label_names = [str(n) for n in label_names]
        self.kinds = [str(k) for k in kinds]
        self.params = np.asarray(params, dtype=np.float64).reshape(len(self.label_names), 2)
        support = np.asarray(support, dtype=np.float64).reshape(len(self.label_names), 2)
        low, high = support[:, 0].copy(), support[:, 1].copy()
        for j, kind in enumerate(self.kinds):
            a, b = self.params[j]
            if kind == "uniform":
                if not b > a:
                    raise ValueError(f"uniform prior on {self.label_names[j]} needs low < high, "
                                     f"got ({a}, {b})")
                low[j], high[j] = max(a, low[j]), min(b, high[j])
            elif kind == "gaussian":
                if not b > 0:
                    raise ValueError(f"Gaussian prior on {self.label_names[j]} needs sigma > 0, "
                                     f"got {b}")
            else:
                raise ValueError(f"unknown prior kind {kind!r} for {self.label_names[j]}; "
                                 "use 'uniform' or 'gaussian'")
            if not high[j] > low[j]:
                raise ValueError(f"the prior on {self.label_names[j]} is empty inside the model's "
                                 f"label bounds [{support[j, 0]:g}, {support[j, 1]:g}]")
        self.low, self.high = low, high
        self._gauss = np.array([k == "gaussian" for k in self.kinds])

    def log_prob(self, labels):
        """Log prior density (up to a constant).

        Parameters
        ----------
        labels : array_like, (W, L)

        Returns
        -------
        ndarray, (W,)
            ``-inf`` outside the support.
        """
        x = np.atleast_2d(labels)
        inside = np.all((x >= self.low) & (x <= self.high), axis=1)
        lp = np.zeros(len(x))
        if self._gauss.any():
            mu, sig = self.params[self._gauss, 0], self.params[self._gauss, 1]
            lp -= 0.5 * np.sum(((x[:, self._gauss] - mu) / sig) ** 2, axis=1)
        return np.where(inside, lp, -np.inf)

    def describe(self):
        """One line per label stating its prior, e.g. ``TEFF ~ U(3900, 5300)``."""
        out = []
        for j, name in enumerate(self.label_names):
            if self.kinds[j] == "uniform":
                out.append(f"{name} ~ Uniform({self.low[j]:.4g}, {self.high[j]:.4g})")
            else:
                out.append(f"{name} ~ Normal({self.params[j, 0]:.4g}, {self.params[j, 1]:.4g}) "
                           f"truncated to [{self.low[j]:.4g}, {self.high[j]:.4g}]")
        return out

    def to_dict(self):
        """JSON-friendly description: ``{label: {"kind", "params", "support"}}``."""
        return {n: dict(kind=self.kinds[j], params=[float(v) for v in self.params[j]],
                        support=[float(self.low[j]), float(self.high[j])])
                for j, n in enumerate(self.label_names)}

    def __repr__(self):
        return "Prior(" + "; ".join(self.describe()) + ")"


def make_prior(model, spec=None):
    """Build the prior of ``sample_posterior``.

    Parameters
    ----------
    model : CannonModel or forward model
        Needs ``label_names``, ``training_labels`` and ``label_bounds``.
    spec : None, Prior or dict, optional
        ``None``: uniform within the training range (min..max of
        ``model.training_labels``) for every label. A dict maps label names to
        ``("uniform", low, high)`` or ``("gaussian", mean, sigma)`` (also
        ``"normal"``); labels it does not name keep the default. Every prior is
        truncated to ``model.label_bounds`` (the training range + 25 %).

    Returns
    -------
    Prior
    """
    if isinstance(spec, Prior):
        return spec
    names = list(model.label_names)
    train = np.asarray(model.training_labels, dtype=np.float64)
    kinds = ["uniform"] * len(names)
    params = np.stack([np.nanmin(train, axis=0), np.nanmax(train, axis=0)], axis=1)
    support = np.asarray(model.label_bounds, dtype=np.float64)
    if spec is not None:
        if not isinstance(spec, dict):
            raise ValueError(f"prior must be None, a Prior or a dict, got {type(spec).__name__}")
        for name, item in spec.items():
            if name not in names:
                raise ValueError(f"prior given for unknown label {name!r}; labels are {names}")
            j = names.index(name)
            try:
                kind, a, b = item
            except (TypeError, ValueError):
                raise ValueError(f"prior for {name} must be (kind, a, b), got {item!r}") from None
            kind = {"normal": "gaussian", "gauss": "gaussian", "flat": "uniform"}.get(
                str(kind).lower(), str(kind).lower())
            kinds[j] = kind
            params[j] = (float(a), float(b))
    return Prior(names, kinds, params, support)


def parse_prior_args(items):
    """Parse command-line prior specs like ``TEFF=uniform:4000:5000`` or ``FE_H=gaussian:0:0.1``.

    Parameters
    ----------
    items : sequence of str

    Returns
    -------
    dict
        Suitable for ``make_prior``.
    """
    out = {}
    for item in items or ():
        try:
            name, rest = item.split("=", 1)
            kind, a, b = rest.split(":")
            out[name.strip()] = (kind, float(a), float(b))
        except ValueError:
            raise ValueError(f"cannot parse prior {item!r}: use LABEL=uniform:LOW:HIGH or "
                             "LABEL=gaussian:MEAN:SIGMA") from None
    return out


# ----------------------------------------------------------------------------- likelihood
def _good_pixels(model, flux, ivar):
    return (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar) & fitted_pixels(model, len(ivar))


def _min_pixels(model):
    """Fewest usable pixels a posterior is sampled from: ten per label."""
    return 10 * len(model.label_names)


def usable_pixels(model, flux, ivar):
    """How many pixels of one spectrum the posterior can use, and how many it needs.

    Parameters
    ----------
    model : CannonModel or forward model
    flux, ivar : array_like, (P,)
        Normalized flux and inverse variance on the model's pixels.

    Returns
    -------
    n_usable, n_needed : int
        Pixels with ``ivar > 0``, finite values and a fitted model pixel; below
        ``n_needed`` :func:`sample_posterior` refuses the spectrum.
    """
    flux, ivar = _one_spectrum(flux, ivar)
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar shapes differ: {flux.shape} vs {ivar.shape}")
    return int(_good_pixels(model, flux, ivar).sum()), _min_pixels(model)


def log_likelihood_function(model, flux, ivar, method="auto"):
    """Return ``loglike(labels (W, L)) -> (W,)`` for one spectrum.

    Parameters
    ----------
    model : CannonModel or forward model
    flux, ivar : array_like, (P,)
        Normalized flux and inverse variance on the model's pixels.
    method : {"auto", "quadratic", "predict"}
        ``"quadratic"``: exact quadratic form of a polynomial ``CannonModel``,
        expanded around the training-set centre (O(T²) per walker);
        ``"predict"``: batched model spectra (any forward model). ``"auto"``
        takes the first that applies.

    Returns
    -------
    loglike : callable
        ``-chi²/2`` with variance ``1/ivar + s²`` (the constant normalisation
        term is dropped; it does not depend on the labels).
    n_good : int
        Pixels used.
    """
    flux = np.asarray(flux, dtype=np.float64).ravel()
    ivar = np.asarray(ivar, dtype=np.float64).ravel()
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar shapes differ: {flux.shape} vs {ivar.shape}")
    s2 = getattr(model, "s2", None)
    s2 = np.zeros(flux.size) if s2 is None else np.asarray(s2, dtype=np.float64)
    if s2.shape != flux.shape:
        raise ValueError(f"the spectrum has {flux.size} pixels but the model has {s2.size}: "
                         "it must be on the model's pixel grid")
    good = _good_pixels(model, flux, ivar)
    n_good = int(good.sum())
    if n_good < _min_pixels(model):
        raise ValueError(f"only {n_good} usable pixels (ivar > 0, finite, model pixel not "
                         "flagged): too few to constrain the labels")
    w = 1.0 / (1.0 / ivar[good] + s2[good])  # (P_good,)
    f = flux[good]
    is_poly = hasattr(model, "theta") and hasattr(model, "exponents") \
        and hasattr(model, "scale_labels")
    if method == "auto":
        method = "quadratic" if is_poly else "predict"
    if method == "quadratic":
        if not is_poly:
            raise ValueError("method='quadratic' needs a polynomial CannonModel")
        theta = model.theta[good]  # (P_good, T)
        exps = model.exponents
        # chi²(v) = sum_p w_p (r0_p - theta_p . dv)² with dv = v - v0 and r0 = f - theta v0,
        # expanded around the training centre v0 = v(0): no catastrophic cancellation.
        v0 = vz.label_vector(np.zeros((1, len(model.label_names))), exps)[0]  # (T,)
        r0 = f - theta @ v0
        c0 = float(np.sum(w * r0 * r0))
        h = theta.T @ (w * r0)  # (T,)
        g = (theta * w[:, None]).T @ theta  # (T, T)

        def loglike(labels):
            dv = vz.label_vector(model.scale_labels(np.atleast_2d(labels)), exps) - v0  # (W, T)
            chi2 = c0 - 2.0 * dv @ h + np.einsum("wt,tu,wu->w", dv, g, dv)
            return -0.5 * chi2
    elif method == "predict":
        predict = getattr(model, "predict", None)

        def loglike(labels):
            lab = np.atleast_2d(labels)
            mf = predict(lab) if predict is not None else model.predict_with_jacobian(lab)[0]
            r = np.asarray(mf)[:, good] - f
            return -0.5 * (r * r) @ w
    else:
        raise ValueError(f"unknown likelihood method {method!r}")
    return loglike, n_good


# ----------------------------------------------------------------------------- result
@dataclasses.dataclass
class PosteriorResult:
    """Posterior samples of one star's labels and their summary.

    Attributes
    ----------
    label_names : list of str
    samples : ndarray, (S, L)
        Burn-in removed, thinned, walkers flattened.
    log_prob : ndarray, (S,)
    median, p16, p84 : ndarray, (L,)
        Posterior percentiles.
    sigma : ndarray, (L,)
        ``(p84 - p16) / 2``.
    autocorr_time : ndarray, (L,)
        Integrated autocorrelation time of each label (steps).
    n_walkers, n_steps, burn, thin : int
    acceptance_fraction : float
        Mean over walkers.
    converged : bool
        ``n_steps > tau_factor * max(tau)`` and tau stable.
    prior : dict
        ``Prior.to_dict()``; ``prior_text`` states it in words.
    prior_text : list of str
    fit_labels, fit_errors : ndarray, (L,)
        The chi² fit (no de-biasing: the same likelihood) the walkers started from.
    fit_errors_debiased : ndarray, (L,)
        Errors of the default (de-biased, sandwich) fit, for comparison.
    fit_flags : int
    chi2, reduced_chi2 : float
        At the chi² fit.
    n_pixels : int
    warnings : list of str
        E.g. a target outside the training range.
    runtime : float
        Seconds.
    seed : int
    """

    label_names: list
    samples: np.ndarray
    log_prob: np.ndarray
    median: np.ndarray
    p16: np.ndarray
    p84: np.ndarray
    sigma: np.ndarray
    autocorr_time: np.ndarray
    n_walkers: int
    n_steps: int
    burn: int
    thin: int
    acceptance_fraction: float
    converged: bool
    prior: dict
    prior_text: list
    fit_labels: np.ndarray
    fit_errors: np.ndarray
    fit_errors_debiased: np.ndarray
    fit_flags: int
    chi2: float
    reduced_chi2: float
    n_pixels: int
    warnings: list
    runtime: float
    seed: int
    tau_factor: float = 50.0

    def check(self):
        """Raise RuntimeError if the chain did not converge (refuse to report it)."""
        if not self.converged:
            raise RuntimeError(
                f"the MCMC chain did not converge: {self.n_steps} steps < {self.tau_factor:g} x "
                f"max autocorrelation time {np.nanmax(self.autocorr_time):.1f} (or tau still "
                "changing); run longer (n_steps / --max-steps) before reporting these labels")
        return self

    def comparison_table(self, cv_scatter=None):
        """Posterior widths vs the formal chi² errors (and the cross-validation scatter).

        Parameters
        ----------
        cv_scatter : array_like (L,) or dict, optional
            Cross-validation scatter per label.

        Returns
        -------
        astropy.table.Table
            One row per label: median, 16/84 percentiles, posterior sigma,
            chi² sigma (plain and de-biased), their ratio, CV scatter, tau.
        """
        from astropy.table import Table
        cv = _per_label(cv_scatter, self.label_names)
        t = Table()
        t["LABEL"] = self.label_names
        t["MEDIAN"] = self.median
        t["P16"] = self.p16
        t["P84"] = self.p84
        t["SIGMA_POST"] = self.sigma
        t["SIGMA_CHI2"] = self.fit_errors
        t["SIGMA_CHI2_DEBIASED"] = self.fit_errors_debiased
        t["RATIO_POST_CHI2"] = self.sigma / self.fit_errors
        t["CV_SCATTER"] = cv
        t["TAU"] = self.autocorr_time
        return t

    def summary(self, cv_scatter=None, allow_unconverged=False):
        """Return a printable report: priors, convergence, the comparison table, warnings.

        Parameters
        ----------
        cv_scatter : array_like (L,) or dict, optional
        allow_unconverged : bool, optional
            Print the numbers of an unconverged chain (marked NOT CONVERGED)
            instead of raising.

        Returns
        -------
        str
        """
        if not allow_unconverged:
            self.check()
        lines = []
        if not self.converged:
            lines.append("*** NOT CONVERGED: these numbers are not a result ***")
        lines.append("priors (independent):")
        lines += ["  " + s for s in self.prior_text]
        lines.append(f"sampler: emcee, {self.n_walkers} walkers x {self.n_steps} steps, "
                     f"burn-in {self.burn}, thin {self.thin}, {len(self.samples)} samples, "
                     f"acceptance {self.acceptance_fraction:.2f}, "
                     f"max tau {np.nanmax(self.autocorr_time):.1f} "
                     f"(steps/tau = {self.n_steps / np.nanmax(self.autocorr_time):.0f}), "
                     f"{self.runtime:.1f} s")
        lines.append(f"chi2 fit: chi2 = {self.chi2:.1f} over {self.n_pixels} pixels "
                     f"(reduced {self.reduced_chi2:.3f})")
        cv = _per_label(cv_scatter, self.label_names)
        head = f"{'label':>8} {'median':>10} {'-1sig':>9} {'+1sig':>9} {'sig_post':>9} " \
               f"{'sig_chi2':>9} {'post/chi2':>9} {'sig_debias':>10}"
        if cv_scatter is not None:
            head += f" {'cv_scatter':>10}"
        lines.append(head)
        for j, name in enumerate(self.label_names):
            row = (f"{name:>8} {_fmt(self.median[j]):>10} {_fmt(self.median[j] - self.p16[j]):>9} "
                   f"{_fmt(self.p84[j] - self.median[j]):>9} {_fmt(self.sigma[j]):>9} "
                   f"{_fmt(self.fit_errors[j]):>9} {self.sigma[j] / self.fit_errors[j]:>9.2f} "
                   f"{_fmt(self.fit_errors_debiased[j]):>10}")
            if cv_scatter is not None:
                row += f" {_fmt(cv[j]):>10}"
            lines.append(row)
        for w in self.warnings:
            lines.append("WARNING: " + w)
        return "\n".join(lines)

    def to_dict(self):
        """JSON-friendly summary (no samples)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("samples", "log_prob"):
                continue
            v = getattr(self, f.name)
            out[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        out["n_samples"] = int(len(self.samples))
        return out

    def corner(self, path=None, truths=None, **kwargs):
        """Corner plot of the posterior (``cannon_fast.lab.plots.science.posterior_corner``)."""
        from .plots.science import posterior_corner
        return posterior_corner(self, path=path, truths=truths, **kwargs)


def _fmt(v):
    if not np.isfinite(v):
        return "nan"
    a = abs(v)
    return f"{v:.1f}" if a >= 100 else (f"{v:.3f}" if a >= 0.01 or a == 0 else f"{v:.2e}")


def _per_label(values, names):
    if values is None:
        return np.full(len(names), np.nan)
    if isinstance(values, dict):
        return np.array([float(values.get(n, np.nan)) for n in names])
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size != len(names):
        raise ValueError(f"cv_scatter has {arr.size} values for {len(names)} labels")
    return arr


def range_warnings(model, labels, what="target"):
    """Messages for labels outside the training range (min..max of ``training_labels``).

    Parameters
    ----------
    model : CannonModel or forward model
    labels : array_like, (L,)
    what : str
        How to name the labels in the message.

    Returns
    -------
    list of str
    """
    train = np.asarray(model.training_labels, dtype=np.float64)
    lo, hi = np.nanmin(train, axis=0), np.nanmax(train, axis=0)
    out = []
    for j, name in enumerate(model.label_names):
        v = float(labels[j])
        if v < lo[j] or v > hi[j]:
            out.append(f"{what} {name} = {v:.4g} is outside the training range "
                       f"[{lo[j]:.4g}, {hi[j]:.4g}]: the model extrapolates there")
    return out


# ----------------------------------------------------------------------------- sampler
def sample_posterior(model, flux, ivar, prior=None, n_walkers=32, n_steps=20000, seed=0,
                     init=None, min_steps=1000, check_every=500, tau_factor=50.0, tau_rtol=0.05,
                     ball=0.1, method="auto", require_converged=False, warn=True,
                     progress_bar=None):
    """Sample the posterior of one spectrum's labels with emcee.

    Parameters
    ----------
    model : CannonModel or forward model
        A trained model (``label_names``, ``training_labels``, ``label_bounds``,
        ``s2``, ``pixel_flags`` when it has them).
    flux, ivar : array_like, (P,)
        Normalized spectrum and inverse variance on the model's pixels.
    prior : None, dict or Prior, optional
        See ``make_prior``; default uniform within the training range.
    n_walkers : int, optional
        At least ``2 L``.
    n_steps : int, optional
        Maximum chain length; sampling stops earlier once converged.
    seed : int, optional
        Seeds the walker ball and the sampler's moves.
    init : FitResult, optional
        A chi² fit of this spectrum (row 0 is used); by default ``model.fit``
        with ``debias=False`` (the same likelihood) is run.
    min_steps : int, optional
        Never stop before this many steps.
    check_every : int, optional
        Steps between autocorrelation checks.
    tau_factor : float, optional
        Converged when the chain is longer than ``tau_factor`` x max tau ...
    tau_rtol : float, optional
        ... and every tau changed by less than this (relative) since the last check.
    ball : float, optional
        Walkers start at ``fit + ball * N(0, covariance)``.
    method : {"auto", "quadratic", "predict"}
        Likelihood evaluation (``log_likelihood_function``).
    require_converged : bool, optional
        Raise RuntimeError instead of returning an unconverged chain.
    warn : bool, optional
        Also issue a ``TrainingRangeWarning`` when the target is outside the
        training range (the message is always stored in ``warnings``).
    progress_bar : bool, optional
        tqdm bar over steps (default: on a terminal).

    Returns
    -------
    PosteriorResult
    """
    try:
        import emcee
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("sample_posterior needs emcee: pip install 'cannon_fast[mcmc]'") from err
    t0 = time.perf_counter()
    names = list(model.label_names)
    n_labels = len(names)
    flux, ivar = _one_spectrum(flux, ivar)
    n_walkers = int(n_walkers)
    if n_walkers < 2 * n_labels:
        raise ValueError(f"n_walkers must be >= 2 x {n_labels} labels = {2 * n_labels}, "
                         f"got {n_walkers}")
    if n_walkers % 2:
        raise ValueError(f"n_walkers must be even (emcee's stretch move), got {n_walkers}")
    pri = make_prior(model, prior)
    loglike, n_good = log_likelihood_function(model, flux, ivar, method=method)
    start = _start_fit(model, flux, ivar, init)
    notes = list(start.notes)
    p0 = _initial_walkers(pri, start, n_walkers, ball, np.random.default_rng(seed), names,
                          notes)

    def log_prob(x):
        lp = pri.log_prob(x)
        ok = np.isfinite(lp)
        out = np.full(len(x), -np.inf)
        if ok.any():
            out[ok] = lp[ok] + loglike(x[ok])
        return out

    sampler = emcee.EnsembleSampler(n_walkers, n_labels, log_prob, vectorize=True)
    sampler.random_state = np.random.RandomState(int(seed) % (2 ** 32)).get_state()
    done, tau, converged = _run_until_converged(sampler, p0, int(n_steps), min_steps,
                                                max(50, int(check_every)), tau_factor,
                                                tau_rtol, progress_bar)

    tau_max = float(np.nanmax(tau)) if np.any(np.isfinite(tau)) else float(done)
    tau_min = float(np.nanmin(tau)) if np.any(np.isfinite(tau)) else 1.0
    burn = min(int(np.ceil(2 * tau_max)), done // 2)
    thin = max(1, int(0.5 * tau_min))
    samples = sampler.get_chain(discard=burn, thin=thin, flat=True)
    lp = sampler.get_log_prob(discard=burn, thin=thin, flat=True)
    p16, med, p84 = np.percentile(samples, [16, 50, 84], axis=0)
    # the posterior median can leave the range where the fit did not (or vice versa)
    fit_out = {n.split(" = ")[0].split()[-1] for n in notes if "training range" in n}
    notes += [n for n in range_warnings(model, med, "posterior median")
              if n.split(" = ")[0].split()[-1] not in fit_out]
    at_edge = _piled_at_prior_edge(samples, pri, names, start.errors)
    notes += at_edge
    if not converged:
        notes.append(f"not converged after {done} steps (max tau {tau_max:.1f}; need "
                     f"{tau_factor:g} tau and a stable estimate)")
    limit = (getattr(model, "train_info", None) or {}).get("poor_fit_reduced_chi2")
    if limit is not None and start.reduced_chi2 > limit:
        notes.append(f"the model does not describe this spectrum (POOR_FIT): reduced chi2 "
                     f"{start.reduced_chi2:.1f} at the fit, above the {limit:.2f} of its own "
                     "training stars; the posterior widths assume it does")
    if warn:
        for n in notes:
            if "training range" in n:
                warnings.warn(n, TrainingRangeWarning, stacklevel=2)
    res = PosteriorResult(
        label_names=names, samples=samples, log_prob=lp, median=med, p16=p16, p84=p84,
        sigma=0.5 * (p84 - p16), autocorr_time=np.asarray(tau, dtype=np.float64),
        n_walkers=n_walkers, n_steps=done, burn=burn, thin=thin,
        acceptance_fraction=float(np.mean(sampler.acceptance_fraction)),
        converged=converged and not at_edge,
        prior=pri.to_dict(), prior_text=pri.describe(), fit_labels=start.labels,
        fit_errors=start.errors, fit_errors_debiased=start.errors_debiased,
        fit_flags=start.flags, chi2=start.chi2, reduced_chi2=start.reduced_chi2,
        n_pixels=n_good, warnings=notes, runtime=time.perf_counter() - t0, seed=int(seed),
        tau_factor=float(tau_factor))
    if require_converged:
        res.check()
    return res


#: A label is piled against a prior edge when this share of its samples lies within a
#: quarter of its chi² error of the edge (half of them there means the data want it ~2.5
#: sigma beyond; a star whose true label is on the edge puts ~20 % there).
EDGE_SHARE = 0.5


def _piled_at_prior_edge(samples, prior, names, errors):
    """Notes for labels whose posterior is piled against a bound of the prior.

    There the likelihood wants a value the prior (or the model's label bounds)
    excludes: the median and width are the prior's wall, not the data's, and the
    chain's "convergence" means nothing. ``errors`` (L,) are the chi² fit's.
    """
    notes = []
    for j, name in enumerate(names):
        band = 0.25 * errors[j]
        if not band > 0:
            continue
        for edge in (prior.low[j], prior.high[j]):
            share = np.mean(np.abs(samples[:, j] - edge) < band) if np.isfinite(edge) else 0.0
            if share >= EDGE_SHARE:
                notes.append(f"{name}'s posterior is piled against the prior's edge {edge:g} "
                             f"({100 * share:.0f} % of samples within a quarter of the chi² "
                             "error): the data want a value beyond it, so its median and "
                             "width are the prior's; not a result")
    return notes


def _one_spectrum(flux, ivar):
    """``flux, ivar`` as float64 (P,) arrays; one row of an (1, P) pair is accepted."""
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if flux.ndim == 2 and flux.shape[0] == 1:
        flux, ivar = flux[0], ivar[0]
    if flux.ndim != 1:
        raise ValueError(f"sample_posterior takes one spectrum (P,), got shape {flux.shape}")
    return flux, ivar


@dataclasses.dataclass
class _StartFit:
    """The chi² fit the walkers start from, and what it warns about."""

    labels: np.ndarray  # (L,)
    covariance: np.ndarray  # (L, L)
    errors: np.ndarray  # (L,)
    errors_debiased: np.ndarray  # (L,)
    chi2: float
    reduced_chi2: float
    flags: int
    notes: list


def _start_fit(model, flux, ivar, init=None):
    """The chi² fit of one spectrum (``init``'s row 0, or a new fit) and its de-biased errors.

    The result reports the de-biased fit's errors next to the posterior's.
    """
    from ..core.fitting import fit_spectra

    n_labels = len(model.label_names)
    if init is None:
        init = fit_spectra(model, flux[None], ivar[None], debias=False) \
            if hasattr(model, "theta") else fit_spectra(model, flux[None], ivar[None])
    fit_labels = np.asarray(init.labels, dtype=np.float64).reshape(-1, n_labels)[0]
    fit_cov = np.asarray(init.covariance, dtype=np.float64).reshape(-1, n_labels, n_labels)[0]
    fit_errors = np.sqrt(np.clip(np.diagonal(fit_cov), 0, None))
    if getattr(init, "debiased", False) or not hasattr(model, "theta"):
        deb_errors = fit_errors.copy()
    else:
        deb = fit_spectra(model, flux[None], ivar[None], debias=True)
        deb_errors = deb.errors[0]  # its errors only: its flags are not the chain's
    flags = int(np.ravel(init.flags)[0])
    if not np.all(np.isfinite(fit_labels)):
        raise ValueError("the chi² fit failed for this spectrum (flags "
                         f"{init.flag_names(0) if hasattr(init, 'flag_names') else flags}); "
                         "cannot start the walkers")
    notes = range_warnings(model, fit_labels, "chi² fit")
    if flags & getattr(init, "FLAGS", {}).get("SPARSE_TRAINING", 0):
        notes.append("the chi² fit lies where the training set is thin (SPARSE_TRAINING): the "
                     "model is least constrained there, so trust these labels less than the "
                     "validation scatter suggests")
    return _StartFit(labels=fit_labels, covariance=fit_cov, errors=fit_errors,
                     errors_debiased=np.asarray(deb_errors, dtype=np.float64),
                     chi2=float(np.ravel(init.chi2)[0]),
                     reduced_chi2=float(np.ravel(init.reduced_chi2)[0]), flags=flags,
                     notes=notes)


def _initial_walkers(pri, start, n_walkers, ball, rng, names, notes):
    """Walkers in a ball around the chi² fit drawn from its covariance, inside the prior.

    A fit outside the prior starts the ball at the nearest point inside it (said in
    ``notes``). Returns (n_walkers, L).
    """
    fit_labels, fit_errors = start.labels, start.errors
    n_labels = len(fit_labels)
    centre = np.clip(fit_labels, pri.low, pri.high)
    span = pri.high - pri.low
    eps = 1e-6 * span
    centre = np.clip(centre, pri.low + eps, pri.high - eps)
    if np.any(centre != fit_labels):
        moved = [n for n, a, b in zip(names, centre, fit_labels) if a != b]
        notes.append(f"the chi² fit lies outside the prior for {', '.join(moved)}: walkers start "
                     "at the nearest point inside it")
    try:
        chol = np.linalg.cholesky(start.covariance)
        if not np.all(np.isfinite(chol)):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        chol = np.diag(np.where(fit_errors > 0, fit_errors, 1e-3 * span))
    p0 = centre + ball * rng.standard_normal((n_walkers, n_labels)) @ chol.T
    for _ in range(100):  # redraw walkers that fell outside the prior
        bad = ~np.isfinite(pri.log_prob(p0))
        if not bad.any():
            break
        p0[bad] = centre + ball * rng.standard_normal((bad.sum(), n_labels)) @ chol.T
        ball *= 0.7
    p0[~np.isfinite(pri.log_prob(p0))] = centre
    return p0


def _run_until_converged(sampler, p0, n_steps, min_steps, check_every, tau_factor, tau_rtol,
                         progress_bar):
    """Run the sampler in blocks of ``check_every`` until converged or ``n_steps``.

    Returns (steps done, the last autocorrelation times (L,), converged).
    """
    state = p0
    tau_old = None
    tau = np.full(p0.shape[1], np.nan)
    converged = False
    bar = progress(total=n_steps, desc="MCMC", unit="step",
                   disable=None if progress_bar is None else not progress_bar)
    done = 0
    while done < n_steps:
        block = min(check_every, n_steps - done)
        state = sampler.run_mcmc(state, block, progress=False)
        done += block
        bar.update(block)
        tau = sampler.get_autocorr_time(tol=0, quiet=True)
        if done >= min_steps and np.all(np.isfinite(tau)):
            stable = tau_old is not None and np.all(np.abs(tau - tau_old) < tau_rtol * tau)
            if done > tau_factor * np.max(tau) and stable:
                converged = True
                break
        tau_old = tau
    bar.close()
    return done, tau, converged
