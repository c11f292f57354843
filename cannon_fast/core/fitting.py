"""The test step: fit labels to spectra with a trained model.

Two paths share one result type:

* ``fit_cannon`` (the default for a ``CannonModel``): per star, the chi² of a
  polynomial model is a polynomial in the label vector, fixed by three moments
  over pixels (see ``_reference.model_eval``). They are computed for a batch
  of stars with a few BLAS matrix products, after which Levenberg-Marquardt
  iterations from several starting points cost O(T² L) each.
* ``fit_trf``: the reference, ``scipy.optimize.least_squares(method="trf")``
  with the analytic Jacobian and label bounds, one star at a time.

De-biasing. theta is estimated from a finite training set: ``Cov(theta_p) = C_p
= (X^T W_p X)^-1``. For a test star at true labels x*, the expected chi² at x is
``sum_p w_p [theta_p.(v* - v(x))]² + const + v(x)^T B v(x)`` with
``B = sum_p w_p C_p``: the last term grows away from the centre of the
training set and pulls every fit toward it, coherently over thousands of
pixels. With ``debias=True`` the fit minimises ``chi² - v^T B v`` instead,
whose expectation is minimised at x*, and the reported covariance is the
sandwich ``H^-1 (F + S) H^-1`` with ``F = J^T W J``, ``H = F - dv^T B dv`` and
``S = J^T W Q W J``, ``Q_p = v^T C_p v`` (the training error of the model
flux, which acts as extra per-pixel noise for one star).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import threading

import numpy as np

from . import vectorizer as vz
from ._reference.model_eval import HIT_BOUND, NOT_CONVERGED, STARTS_DISAGREE
from ._reference.model_eval import batched_inverse as _inverse
from ._reference.model_eval import batched_solve as _solve_batched
from ._reference.model_eval import start_objectives
from .._util import as_float64, progress
from .backends import kernels, resolve_backend
from .continuum import renormalize_to_model
from .threads import map_in_streams, stream_count
from ._common import check_spectra, fitted_pixels, label_scaling

__all__ = ["FitResult", "FLAGS", "fit_cannon", "fit_spectra", "fit_trf", "fitted_spectra",
           "mark_poor_fit", "sparse_training"]

#: Bits of ``FitResult.flags``.
FLAGS = {"NOT_CONVERGED": NOT_CONVERGED, "HIT_BOUND": HIT_BOUND,
         "STARTS_DISAGREE": STARTS_DISAGREE, "TOO_FEW_PIXELS": 8, "FAILED": 16,
         "DEBIAS_CAPPED": 32, "SPARSE_TRAINING": 64, "OUTSIDE_TRAINING": 128,
         "POOR_FIT": 256}
#: Flags that describe where a fit was done rather than a problem with it.
INFORMATIONAL_FLAGS = FLAGS["SPARSE_TRAINING"]
#: Flags of a fit that is unusable: ``FitResult.ok`` is False and ``FLAG_BAD`` set.
BAD_FLAGS = FLAGS["TOO_FEW_PIXELS"] | FLAGS["FAILED"] | FLAGS["NOT_CONVERGED"]
#: Flags that say "use with care" (``FLAG_WARN``): a label on a bound or outside the training
#: labels, two minima, a thin training set there, a spectrum the model does not describe, or
#: a de-biasing correction the cap held back by more than DEBIAS_CAPPED_SIGMA errors.
WARNING_FLAGS = (FLAGS["HIT_BOUND"] | FLAGS["STARTS_DISAGREE"] | FLAGS["SPARSE_TRAINING"]
                 | FLAGS["OUTSIDE_TRAINING"] | FLAGS["POOR_FIT"] | FLAGS["DEBIAS_CAPPED"])
#: SPARSE_TRAINING marks fitted labels where the training set is thin: their
#: SPARSE_NEIGHBOURS-th nearest training star (in labels scaled by their training ranges)
#: is farther than it is for SPARSE_QUANTILE % of the training stars themselves. A polynomial model
#: is least constrained there, inside the training range as well as at its edges
#: (docs/measurements.md: how many stars it marks and how much error they carry).
SPARSE_NEIGHBOURS = 10
SPARSE_QUANTILE = 95.0
#: De-biasing divides by (1 - lambda), lambda the generalized eigenvalues of the model-error
#: curvature against the Fisher matrix: lambda -> 1 where the training set's noise, summed
#: over all pixels, is as large as a label's signal, and removing all of the shrinkage
#: would cost more variance than it removes bias. Capping lambda bounds the amplification
#: at 1 / (1 - cap) = 1.4 (DEBIAS_CAPPED_SIGMA says which capped stars are flagged).
#: Chosen by a scan
#: over benchmark, demo and mock data (docs/measurements.md).
DEBIAS_LAMBDA_CAP = 0.3
#: DEBIAS_CAPPED marks a star only where the correction the cap withholds (one Newton
#: step, ``_reference.model_eval.withheld_correction``) exceeds this many standard errors
#: in some label: the cap bites on every star of a small training set (the demo's), and a
#: flag on every star says nothing. On the demo's validation stars that step predicts part
#: of the error against the truth, and the flagged stars' errors are ~3x the others'
#: (docs/measurements.md).
DEBIAS_CAPPED_SIGMA = 2.0
#: Newton steps on the corrected objective, from the plain minimum (at most) ...
DEBIAS_STEPS = 4
#: ... until the step is below this (scaled labels, as ``xtol`` of the LM).
DEBIAS_XTOL = 1e-6



def _check_broadening(debias, broadening):
    """Refuse the broadened fit with de-biasing (it refines the plain chi² fit)."""
    if broadening and debias:
        raise ValueError("broadening=True refines the plain chi² fit: pass debias=False too")


def sparse_training(model, labels):
    """Where labels lie in a thin part of a model's training set (SPARSE_TRAINING).

    Parameters
    ----------
    model : CannonModel
        A trained model (its ``training_labels`` are used).
    labels : array_like, (N, L)
        Labels in the model's units; rows with a non-finite label are not flagged.

    Returns
    -------
    ndarray of bool, (N,)
        True where the ``SPARSE_NEIGHBOURS``-th nearest training star is farther
        than for ``SPARSE_QUANTILE`` % of the training stars (each from the others).

    Notes
    -----
    Distances are in the labels themselves, each divided by half its training
    2.5-97.5 % range: the model's own scaled labels for a plain model, but not
    for one in 1/TEFF, whose theta squeezes the hot end of the Teff range
    together (and there the flag in theta missed the hot dwarfs).
    """
    tree, k, threshold, scales = _sparse_training_tree(model.training_labels)
    labels = np.atleast_2d(np.asarray(labels, dtype=float))
    out = np.zeros(len(labels), dtype=bool)
    finite = np.all(np.isfinite(labels), axis=1)
    if k > 0 and finite.any():
        dist = tree.query(labels[finite] / scales, k)[0]
        out[finite] = (dist if dist.ndim == 1 else dist[:, -1]) > threshold
    return out


#: KD-trees of recent training sets, by a digest of their labels (a few models at a time).
_SPARSE_TREES = collections.OrderedDict()
_SPARSE_TREES_KEPT = 4
_SPARSE_TREES_LOCK = threading.Lock()  # fits may run in threads (survey chunks)


def _sparse_training_tree(training_labels):
    """The KD-tree of a training set's labels, its k, distance threshold and label scales.

    Cached by the labels' content, not on the model: a model whose training labels
    change (or two models with the same ones) can never see a stale tree.
    """
    from scipy.spatial import cKDTree

    labels = np.ascontiguousarray(training_labels, dtype=np.float64)
    key = hashlib.sha256(np.asarray(labels.shape).tobytes() + labels.tobytes()).hexdigest()
    with _SPARSE_TREES_LOCK:
        if key in _SPARSE_TREES:
            _SPARSE_TREES.move_to_end(key)
            return _SPARSE_TREES[key]
    _, scales = label_scaling(labels)  # a plain model's own scaling
    scales = np.where(scales > 0, scales, 1.0)
    z = labels / scales
    tree = cKDTree(z)
    k = min(SPARSE_NEIGHBOURS, len(z) - 1)
    # k + 1: a training star's nearest neighbour is itself
    own = tree.query(z, k + 1)[0][:, -1] if k > 0 else np.zeros(len(z))
    entry = (tree, k, float(np.percentile(own, SPARSE_QUANTILE)), scales)
    with _SPARSE_TREES_LOCK:
        _SPARSE_TREES[key] = entry
        while len(_SPARSE_TREES) > _SPARSE_TREES_KEPT:
            _SPARSE_TREES.popitem(last=False)
    return entry


def _mark_label_flags(model, result):
    """Set the flags that compare a fit with the model's training set (clearing stale ones).

    SPARSE_TRAINING (``sparse_training``); OUTSIDE_TRAINING, a label outside the
    training labels' range; POOR_FIT, reduced chi² above the model's
    ``train_info["poor_fit_reduced_chi2"]`` (none for a model without it).
    """
    bits = FLAGS["SPARSE_TRAINING"] | FLAGS["OUTSIDE_TRAINING"]
    flags = result.flags & ~bits
    flags |= np.where(sparse_training(model, result.labels), FLAGS["SPARSE_TRAINING"], 0)
    lo, hi = model.training_labels.min(axis=0), model.training_labels.max(axis=0)
    with np.errstate(invalid="ignore"):
        outside = np.any((result.labels < lo) | (result.labels > hi), axis=1)
    flags |= np.where(outside, FLAGS["OUTSIDE_TRAINING"], 0)
    result.flags = flags
    return mark_poor_fit(model, result)


def mark_poor_fit(model, result):
    """Set POOR_FIT (clearing a stale one) above the model's ``poor_fit_reduced_chi2``.

    The limit is in ``model.train_info`` (``core.errors.poor_fit_limit``): a Cannon's
    from its training stars, an emulator's from its reference stars
    (``core.errors.calibrate_forward_model``);
    a model without one flags nothing.
    """
    limit = (getattr(model, "train_info", None) or {}).get("poor_fit_reduced_chi2")
    flags = result.flags & ~FLAGS["POOR_FIT"]
    if limit is not None:
        with np.errstate(invalid="ignore"):
            flags |= np.where(result.reduced_chi2 > limit, FLAGS["POOR_FIT"], 0)
    result.flags = flags
    return result


def _batch_weights(flux, ivar, s2, usable):
    """A batch's flux and chi² weights ``1 / (1/ivar + s²)``, both 0 where not fitted.

    Not fitted: ``ivar = 0`` or a pixel ``usable`` (P,) rules out. Returns flux,
    weights and the fitted-pixel mask, each (N, P).
    """
    valid = (ivar > 0) & usable
    w = np.where(valid, 1.0 / (1.0 / np.where(valid, ivar, 1.0) + s2), 0.0)
    return np.where(valid, flux, 0.0), w, valid


def min_good_pixels(n_labels, n_model_pixels):
    """Fewest good pixels a star needs to be fitted: 3 per label, and 10 % of the model's."""
    return max(3 * n_labels, int(0.1 * n_model_pixels))


@dataclasses.dataclass
class FitResult:
    """Labels fitted to N spectra.

    Attributes
    ----------
    labels : ndarray, (N, L)
        Best-fit labels (NaN where the star could not be fitted: see ``flags``).
    errors : ndarray, (N, L)
        1-sigma uncertainties, physical units.
    covariance : ndarray, (N, L, L)
    chi2, reduced_chi2 : ndarray, (N,)
        Plain chi² at the best fit (noise + s²), and divided by ``n_pixels - L``.
    n_pixels : ndarray of int, (N,)
        Pixels used per star.
    iterations : ndarray of int, (N,)
        LM iterations summed over starting points.
    flags : ndarray of int, (N,)
        Bits of ``FLAGS``.
    label_names : list of str
    debiased : bool
    broadening, broadening_error : ndarray, (N,), or None
        Extra line broadening and its error, (km/s)², from ``fit_broadened``;
        None from the other fits.
    formal_errors : ndarray, (N, L), or None
        The fit's own errors when ``errors`` are calibrated by the model's
        ``error_model`` (``CannonModel.fit``); None otherwise.
    """

    labels: np.ndarray
    errors: np.ndarray
    covariance: np.ndarray
    chi2: np.ndarray
    reduced_chi2: np.ndarray
    n_pixels: np.ndarray
    iterations: np.ndarray
    flags: np.ndarray
    label_names: list
    debiased: bool = True
    broadening: np.ndarray = None
    broadening_error: np.ndarray = None
    formal_errors: np.ndarray = None

    FLAGS = FLAGS

    def __len__(self):
        return len(self.labels)

    def flag_names(self, i):
        """Names of the flags set for star ``i``."""
        return [name for name, bit in FLAGS.items() if self.flags[i] & bit]

    @property
    def ok(self):
        """(N,) True where the fit is usable (no TOO_FEW_PIXELS, FAILED or NOT_CONVERGED)."""
        return (self.flags & BAD_FLAGS) == 0

    @property
    def model_errors(self):
        """(N, L) what the calibration adds to the formal errors, in quadrature (or None)."""
        from .errors import model_error_part
        return None if self.formal_errors is None else model_error_part(self.errors,
                                                                         self.formal_errors)

    @property
    def warn(self):
        """(N,) True where a usable fit carries a warning (``WARNING_FLAGS``)."""
        return self.ok & ((self.flags & WARNING_FLAGS) != 0)

    def to_table(self, ids=None):
        """The result as an astropy Table: labels, ``<NAME>_ERR``, chi², flags.

        With calibrated errors, ``<NAME>_ERR`` is the calibrated error and
        ``<NAME>_ERR_FORMAL`` / ``<NAME>_ERR_MODEL`` its two parts (in quadrature).
        """
        from astropy.table import Table
        t = Table()
        if ids is not None:
            t["ID"] = np.asarray(ids)
        model_errors = self.model_errors
        for i, name in enumerate(self.label_names):
            t[name] = self.labels[:, i]
            t[name + "_ERR"] = self.errors[:, i]
            if model_errors is not None:
                t[name + "_ERR_FORMAL"] = self.formal_errors[:, i]
                t[name + "_ERR_MODEL"] = model_errors[:, i]
        t["CHI2"] = self.chi2
        t["REDUCED_CHI2"] = self.reduced_chi2
        t["N_PIXELS"] = self.n_pixels
        t["ITERATIONS"] = self.iterations
        t["FLAGS"] = self.flags
        t["FLAG_BAD"] = ~self.ok
        t["FLAG_WARN"] = self.warn
        if self.broadening is not None:
            t["BROADENING"] = self.broadening
            t["BROADENING_ERR"] = self.broadening_error
        return t

    @classmethod
    def concatenate(cls, parts):
        """Join results of consecutive batches."""
        fields = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(cls) if f.name not in ("label_names", "debiased")
                  and getattr(parts[0], f.name) is not None}
        return cls(label_names=parts[0].label_names, debiased=parts[0].debiased, **fields)


def _check_fit_input(flux, ivar, n_pixels, check_values=True, keep_float32=False):
    """Float64 (N, P) spectra on the model's grid; their values checked unless told not to.

    ``check_values=False``: the caller checks them itself (``fit_cannon``'s weights
    kernel runs ``check_spectra``'s fast test in the pass it makes anyway).
    ``keep_float32``: C-contiguous float32 flux and ivar stay float32 (the weights
    kernel reads them as they are; a float64 copy of a survey's float32 spectra costs
    as much as that whole pass).
    """
    if keep_float32 and all(isinstance(a, np.ndarray) and a.dtype == np.float32
                            and a.ndim in (1, 2) for a in (flux, ivar)):
        flux = np.ascontiguousarray(np.atleast_2d(flux))
        ivar = np.ascontiguousarray(np.atleast_2d(ivar))
    else:
        flux = as_float64(np.atleast_2d(flux), "flux", ndim=2)
        ivar = as_float64(np.atleast_2d(ivar), "ivar", ndim=2)
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar shapes differ: {flux.shape} vs {ivar.shape}")
    if n_pixels is not None and flux.shape[1] != n_pixels:
        raise ValueError(f"the spectra have {flux.shape[1]} pixels but the model has {n_pixels}: "
                         "they must be on the model's pixel grid")
    if check_values:
        check_spectra(flux, ivar)
    return flux, ivar


def _precompute(model):
    """Per-model arrays the fast path needs, cached on the model until theta changes.

    ``theta_cov`` factorises well as ``C_p ~ t_p Cbar`` (docs/measurements.md): the
    training noise has a common shape over pixels. That turns ``B = sum_p w_p C_p``
    into ``(w . t) Cbar``, a matrix-vector product instead of a (N, P) x (P, T²/2) one.
    """
    # the cache holds the arrays themselves: an id() alone could be reused by a new array
    key = (model.theta, model.theta_cov)
    cache = getattr(model, "_fit_cache", None)
    if cache is not None and all(a is b for a, b in zip(cache["key"], key)):
        return cache
    cov = model.theta_cov  # (P, T2)
    iu, ju = np.triu_indices(model.n_terms)
    twice = np.where(iu == ju, 1.0, 2.0)  # off-diagonal entries count twice in <A, B>
    cbar = cov.mean(axis=0)
    norm = np.sum(twice * cbar * cbar)
    t_pix = (cov * twice) @ cbar / norm if norm > 0 else np.zeros(len(cov))
    # Products of the non-constant terms only (the constant term is folded into the
    # residual r = f - theta_0, see star_weights); zero columns keep the packed layout.
    theta_rest = model.theta.copy()
    theta_rest[:, 0] = 0.0
    # packed columns that involve the constant term are zero: the product skips them
    nonzero = np.flatnonzero((iu > 0) & (ju > 0))
    cache = dict(key=key, g_columns=nonzero,
                 theta_outer32=np.ascontiguousarray(
                     vz.packed_outer(theta_rest)[:, nonzero].astype(np.float32)),
                 theta_rest=theta_rest, theta0=np.ascontiguousarray(model.theta[:, 0]),
                 cbar=cbar, t_pix=t_pix, twice=twice,
                 good_pix=fitted_pixels(model, model.n_pixels))
    model._fit_cache = cache
    return cache


def fit_cannon(model, flux, ivar, debias=True, exact_debias=False, n_starts=32, n_polish=2,
               batch_size=512, max_iter=100, xtol=1e-6, disagree_dchi2=9.0, backend=None,
               progress_bar=None, broadening=False, refine_continuum=False):
    """Fit labels to spectra with a trained ``CannonModel`` (fast batched path).

    Parameters
    ----------
    model : CannonModel
    flux, ivar : array_like, (N, P) or (P,)
        Normalised spectra on the model's pixel grid; ``ivar = 0`` masks a pixel.
    debias : bool, optional
        Remove the expected pull of the model's training errors and fold them
        into the covariance (module docstring). ``False`` gives the plain
        chi² fit with ``(J^T W J)^-1`` errors, as other Cannon codes report.
    exact_debias : bool, optional
        Use every pixel's ``Cov(theta_p)`` (two more (N, P) x (P, T²/2) products)
        instead of the factorisation ``C_p ~ t_p Cbar`` (``_precompute``).
    n_starts : int, optional
        Candidate starting points (``model.starting_points``), spread over the
        training labels; chi² is evaluated at each (O(T²), nearly free).
    n_polish : int, optional
        LM runs from this many of the best candidates; the best end point wins,
        and distinct end points with similar chi² set STARTS_DISAGREE.
    batch_size : int, optional
        Stars per batch; memory is about ``batch_size * P * 20`` bytes.
    max_iter : int, optional
        LM iterations per run.
    xtol : float, optional
        Convergence on the step in scaled labels.
    disagree_dchi2 : float, optional
        Threshold for the STARTS_DISAGREE flag (see ``_reference.model_eval.lm_fit``).
    backend : str, optional
        Kernel backend; the model's by default.
    progress_bar : bool, optional
        Show a progress bar (default: when stderr is a terminal and N > batch_size).
    broadening : bool, optional
        Then fit extra line broadening with the labels, from this fit
        (``fit_broadened``); needs ``debias=False``.
    refine_continuum : bool, optional
        Fit, refine each spectrum's continuum against the model at its fitted
        labels (``continuum.renormalize_to_model``: a cubic in ``flux / model``
        per segment of the model's pixel grid), and fit again: twice the
        fitting time (docs/measurements.md has what it gains on the mock survey).

    Returns
    -------
    FitResult
        Of the fit after the refinement when ``refine_continuum``.
    """
    model._require_trained()
    _check_broadening(debias, broadening)
    # the values are checked by the weights kernel, in its pass over the spectra
    flux, ivar = _check_fit_input(flux, ivar, model.n_pixels, check_values=False,
                                  keep_float32=True)
    backend = resolve_backend(backend or model.backend)
    settings = _FitSettings(debias=debias, exact_debias=exact_debias, n_starts=n_starts,
                            n_polish=n_polish, batch_size=batch_size, max_iter=max_iter,
                            xtol=xtol, disagree_dchi2=disagree_dchi2, backend=backend,
                            progress_bar=progress_bar, broadening=broadening)
    result = _fit_once(model, flux, ivar, settings)
    if refine_continuum:
        flux, ivar = _refine_continuum(model, flux, ivar, result, batch_size, backend)
        result = _fit_once(model, flux, ivar, settings, check_values=False)
    return result


@dataclasses.dataclass(frozen=True)
class _FitSettings:
    """The options of one pass of ``fit_cannon`` (everything but ``refine_continuum``).

    Both passes of a refined fit read them from here, so an option cannot be
    dropped between them.
    """

    debias: bool
    exact_debias: bool
    n_starts: int
    n_polish: int
    batch_size: int
    max_iter: int
    xtol: float
    disagree_dchi2: float
    backend: str
    progress_bar: object
    broadening: bool


def _refine_continuum(model, flux, ivar, result, batch_size, backend):
    """Spectra with their continuum refined against the model at ``result``'s labels.

    One correction per segment of the model's grid (``model.segments``).
    """
    refined_flux, refined_ivar = np.empty(flux.shape), np.empty(ivar.shape)  # float64
    for a in range(0, len(flux), batch_size):  # bounds the (batch, P) temporaries
        rows = slice(a, a + batch_size)
        refined_flux[rows], refined_ivar[rows] = renormalize_to_model(
            flux[rows], ivar[rows], fitted_spectra(model, result, rows),
            model_variance=model.s2, segments=model.segments, backend=backend)
    return refined_flux, refined_ivar


def _fit_once(model, flux, ivar, settings, check_values=True):
    """One batched fit of spectra (and the broadening fit from it when asked).

    ``check_values``: refuse the values ``check_spectra`` refuses (the caller has not
    checked them); not for spectra this module made itself (the refined continuum's).
    """
    result = _fit_batches(model, flux, ivar, settings, check_values)
    if settings.broadening:
        return fit_broadened(model, flux, ivar, start=result,
                             progress_bar=settings.progress_bar)
    return _mark_label_flags(model, result)


def _fit_batches(model, flux, ivar, settings, check_values=True):
    """The fast batched fit (the body of ``fit_cannon``), before ``_mark_label_flags``.

    Batches run one after another, or in concurrent single-threaded streams when
    the kernels and BLAS have several threads (``threads.map_in_streams``): the
    same result to the last bit either way.
    """
    n_stars, batch_size = flux.shape[0], settings.batch_size
    pre = _precompute(model)
    job = dict(model=model, flux=flux, ivar=ivar, settings=settings, pre=pre,
               k=kernels(settings.backend), check_values=check_values,
               starts=model.starting_points(max(1, int(settings.n_starts))),
               bounds=np.ascontiguousarray(model.scaled_label_bounds))  # (2, L)
    if settings.debias and settings.exact_debias:
        job["cov32"] = np.ascontiguousarray(model.theta_cov.astype(np.float32))
    slices = [slice(a, min(a + batch_size, n_stars)) for a in range(0, n_stars, batch_size)]
    bar = progress(total=n_stars, desc="fitting labels", unit="star",
                   disable=None if settings.progress_bar is None and n_stars > batch_size
                   else not settings.progress_bar)
    parts = []
    shape = (min(batch_size, n_stars), model.n_pixels)
    # Batches alternate BLAS products with kernels: with threads inside each, cores
    # idle (``threads`` says why), so several threads run batches side by side instead
    streams = stream_count(settings.backend, len(slices))
    for part in map_in_streams(lambda sl: _fit_batch_buffered(job, sl, shape), slices,
                               streams, settings.backend):
        parts.append(part)
        bar.update(len(part))
    bar.close()
    return FitResult.concatenate(parts)


def _fit_batch_buffered(job, sl, shape):
    with _BUFFERS.take(*shape) as buffers:
        return _fit_batch(job, sl, buffers)


def _fit_batch(job, sl, buffers):
    """Fit the spectra ``sl`` of a job (``_fit_batches``) with (batch, P) work ``buffers``."""
    model, settings, pre, k = job["model"], job["settings"], job["pre"], job["k"]
    flux, ivar = job["flux"][sl], job["ivar"][sl]
    n, n_terms, n_labels = len(flux), model.n_terms, model.n_labels
    debias, exact_debias = settings.debias, settings.exact_debias
    w, wr = buffers[0][:n], buffers[1][:n]
    c, n_pix, mom = np.empty(n), np.empty(n, dtype=np.int64), np.empty((n, 3))
    bad = np.empty(n, dtype=np.int64)
    k.star_weights(flux, ivar, model.s2, pre["good_pix"], pre["theta0"], pre["t_pix"], w,
                   wr, c, n_pix, mom, bad)
    if job["check_values"] and bad.any():
        _refuse_values(job["flux"], job["ivar"], sl)
    # chi²(x) = c - 2 h.v + v^T G v with r = f - theta_0 (the constant term's row of
    # G and entry of h are zero); G in float32 costs half, and its rounding moves
    # the labels by ~1e-6 of their errors.
    g = np.zeros((n, vz.n_packed(n_terms)))  # (n, T2)
    g[:, pre["g_columns"]] = w @ pre["theta_outer32"]
    h = wr @ pre["theta_rest"]  # (n, T)
    if debias:
        if exact_debias:
            b = (w @ job["cov32"]).astype(np.float64)
        else:
            b = np.outer(mom[:, 1], pre["cbar"])
    x = np.zeros((n, n_labels))
    iters = np.zeros(n, dtype=np.int64)
    status = np.zeros(n, dtype=np.int64)
    fittable = n_pix >= min_good_pixels(n_labels, pre["good_pix"].sum())
    idx = np.flatnonzero(fittable)
    lo, hi = job["bounds"]
    if len(idx):
        x[idx], iters[idx], status[idx] = _run_lm(
            k, g[idx], h[idx], c[idx], model.exponents, job["starts"], lo, hi,
            settings.n_polish, settings.max_iter, settings.xtol, settings.disagree_dchi2)
        if debias:
            at_bound = _debias(k, x, idx, g, h, b, model.exponents, lo, hi)
            status[idx[at_bound]] |= FLAGS["HIT_BOUND"]
    status[~fittable] = FLAGS["TOO_FEW_PIXELS"]
    # chi², Fisher matrix and covariance at the solution
    v, dv = np.empty((n, n_terms)), np.empty((n, n_terms, n_labels))
    k.design(x, model.exponents, v, dv)
    # chi² from the residuals themselves (G, accumulated in float32, is not used here):
    # c - 2 sum w r m + sum w m², and sum w r m = h.v exactly (h is float64)
    # the model minus its constant term, in wr's buffer (wr is done with once h is made)
    m = np.matmul(v, pre["theta_rest"].T, out=buffers[1][:n])
    chi2 = np.empty(n)
    k.weighted_square_sum(w, m, chi2)
    chi2 += c - 2.0 * np.einsum("nt,nt->n", h, v)
    if debias:
        cov_x, capped = _debiased_covariance(job, w, g, b, mom, v, dv, x)
        status[capped & fittable] |= FLAGS["DEBIAS_CAPPED"]
    else:
        g_full = vz.unpack_symmetric(g, n_terms)
        cov_x = _inverse(np.swapaxes(dv, 1, 2) @ g_full @ dv)
    # a non-positive-definite covariance means the fit is not trustworthy
    diag = np.diagonal(cov_x, axis1=1, axis2=2)
    failed = ~np.all(np.isfinite(diag) & (diag > 0), axis=1) & fittable
    status[failed] |= FLAGS["FAILED"]
    d = model.label_derivatives(x)  # d label / d x
    cov_phys = cov_x * d[:, :, None] * d[:, None, :]
    labels = model.unscale_labels(x)
    labels[~fittable] = np.nan
    cov_phys[~fittable] = np.nan
    diag = np.diagonal(cov_phys, axis1=1, axis2=2)
    errors = np.sqrt(np.where(diag > 0, diag, np.nan))
    dof = np.maximum(n_pix - n_labels, 1)
    return FitResult(labels=labels, errors=errors, covariance=cov_phys,
                     chi2=np.where(fittable, chi2, np.nan),
                     reduced_chi2=np.where(fittable, chi2 / dof, np.nan),
                     n_pixels=n_pix, iterations=iters, flags=status,
                     label_names=list(model.label_names), debiased=bool(debias))


def _debiased_covariance(job, w, g, b, mom, v, dv, x):
    """The sandwich covariance of de-biased fits and where the eigenvalue cap withheld much.

    Per star in the kernel; returns (n, L, L) and a bool mask (DEBIAS_CAPPED).
    """
    model, pre, k = job["model"], job["pre"], job["k"]
    n, n_terms, n_labels = len(x), model.n_terms, model.n_labels
    if job["settings"].exact_debias:
        cov32 = job["cov32"]
        q = (vz.packed_outer(v) * pre["twice"]).astype(np.float32) @ cov32.T  # v^T C_p v
        q *= w
        q *= w
        s_t = np.zeros_like(g)  # sum_p w² q_p theta theta^T
        s_t[:, pre["g_columns"]] = q @ pre["theta_outer32"]
        dvt = np.swapaxes(dv, 1, 2)
        extra = dvt @ vz.unpack_symmetric(s_t, n_terms) @ dv
        kappa = np.zeros(n)
    else:
        # q_p ~ t_p (v^T Cbar v) and w_p² t_p ~ kappa w_p: S ~ (v^T Cbar v) kappa F
        extra = np.zeros((n, n_labels, n_labels))
        kappa = mom[:, 2] / np.maximum(mom[:, 0], 1e-300)
    cov_x, capped, withheld = (np.empty((n, n_labels, n_labels)), np.empty(n, np.int64),
                               np.empty(n))
    k.sandwich_covariance(g, np.ascontiguousarray(b), pre["cbar"], kappa, extra, x,
                          model.exponents, float(DEBIAS_LAMBDA_CAP), cov_x, capped, withheld)
    return cov_x, (capped == 1) & (withheld > DEBIAS_CAPPED_SIGMA)


class _BufferPool:
    """(batch, P) work buffers of the weights (float32) and weighted residuals (float64).

    Kept from one fit to the next (~50 MB for 512 stars of 8575 pixels): fresh ones
    cost their first-touch page faults in every call, as much as a fifth of a
    1024-star call's fit (a survey chunk fits 1024 stars at a time). A pool, not one
    set per thread, so that a fit's short-lived stream threads reuse them too. A set
    that fits no request is dropped when a new one is made in its place, so the pool
    never holds more sets than were ever in use at once.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._spare = []

    @contextlib.contextmanager
    def take(self, batch, n_pix):
        with self._lock:
            fits = [i for i, (w, _) in enumerate(self._spare)
                    if w.shape[0] >= batch and w.shape[1] == n_pix]
            if fits:
                buffers = self._spare.pop(fits[-1])
            else:
                if self._spare:  # too small, or for another grid: this request replaces it
                    self._spare.pop(0)
                buffers = None
        if buffers is None:
            buffers = (np.empty((batch, n_pix), np.float32), np.empty((batch, n_pix)))
        try:
            yield buffers
        finally:
            with self._lock:
                self._spare.append(buffers)


#: The fits' work buffers (see _BufferPool).
_BUFFERS = _BufferPool()


def _refuse_values(flux, ivar, rows):
    """``check_spectra`` on the spectra up to ``rows``, where the weights kernel's test failed.

    The spectra before ``rows`` are checked too (they passed), so the message's
    star numbers count from the first spectrum of the input. The kernel's test is
    check_spectra's fast path (finite sums): an overflowing sum passes here.
    """
    check_spectra(flux[:rows.stop], ivar[:rows.stop])


def fitted_spectra(model, result, rows=slice(None)):
    """Model spectra at fitted labels (broadened when the fit fitted broadening).

    Parameters
    ----------
    model : CannonModel
    result : FitResult
        A fit with ``model`` (``fit_cannon``, ``fit_trf``, ``fit_broadened``).
    rows : slice or array of int, optional
        The stars of ``result`` to evaluate (all by default; a batch bounds the
        (N, P) output).

    Returns
    -------
    ndarray, (N, P)
        NaN for stars without labels and at pixels the fits do not use
        (``model.fitted_pixels``).
    """
    labels = np.asarray(result.labels, dtype=np.float64)[rows]
    out = np.full((len(labels), model.n_pixels), np.nan)
    have = np.all(np.isfinite(labels), axis=1)
    if result.broadening is None:
        out[have] = model.predict(labels[have])
    else:
        # a star the broadened fit could not use kept its plain fit: no broadening
        b = np.asarray(result.broadening)[rows][have]
        b = np.where(np.isfinite(b), b, 0.0)
        out[have] = BroadenedModel(model).predict(np.column_stack([labels[have], b]))
    out[:, ~fitted_pixels(model, model.n_pixels)] = np.nan
    return out


def _debias(k, x, idx, g, h, b, exponents, lo, hi):
    """Newton steps on the (capped) corrected objective ``chi² - v^T B v``, in place on x[idx].

    Each step recomputes the capped Hessian (``_reference.model_eval.capped_hessian``;
    reusing the first one can diverge); a star stops where a step is no smaller than the one before
    it, so a correction can only converge, never run away. Per star in the
    backend's ``debias_steps`` (``_reference.model_eval.debias_steps``).
    Returns where a label ends on a bound (the steps are clipped to them, as LM's
    are: HIT_BOUND).
    """
    xs = np.ascontiguousarray(x[idx])
    k.debias_steps(np.ascontiguousarray(g[idx]), np.ascontiguousarray(h[idx]),
                   np.ascontiguousarray(b[idx]), exponents, lo, hi, float(DEBIAS_LAMBDA_CAP),
                   int(DEBIAS_STEPS), float(DEBIAS_XTOL), xs, np.empty(len(idx), np.int64))
    x[idx] = xs
    return np.any(np.isclose(xs, lo, rtol=0, atol=1e-9) | np.isclose(xs, hi, rtol=0, atol=1e-9),
                  axis=1)


def _run_lm(k, g, h, c, exponents, starts, lo, hi, n_polish, max_iter, xtol, disagree_dchi2):
    """Call the backend's ``lm_fit`` from starts (K, L) shared by all stars; (x, iters, status).

    The objective at every start is one BLAS product for the batch
    (``start_objectives``); the kernel polishes the best ``n_polish`` of them.
    """
    n, n_labels = len(c), exponents.shape[1]
    g, h, c = np.ascontiguousarray(g), np.ascontiguousarray(h), np.ascontiguousarray(c)
    first = np.ascontiguousarray(start_objectives(g, h, c, exponents, starts, lo, hi))
    x, phi = np.empty((n, n_labels)), np.empty(n)
    it, st = np.zeros(n, np.int64), np.zeros(n, np.int64)
    k.lm_fit(g, h, c, exponents, np.ascontiguousarray(np.broadcast_to(starts, (n,) + starts.shape)),
             first, lo, hi, int(n_polish), int(max_iter), float(xtol), float(disagree_dchi2),
             x, phi, it, st)
    return x, it, st


def fit_trf(model, flux, ivar, n_starts=8, debias=False, progress_bar=None):
    """Reference test step: ``scipy.optimize.least_squares(method="trf")`` per star.

    Uses the analytic Jacobian, the model's label bounds and its starting
    points; the best end point over starts wins. With ``debias=True`` the
    de-biased objective (module docstring) is minimised with
    ``scipy.optimize.minimize(method="L-BFGS-B")`` instead, since it is not a
    sum of squares.

    Parameters
    ----------
    model : CannonModel
    flux, ivar : array_like, (N, P)
    n_starts : int, optional
    debias : bool, optional
    progress_bar : bool, optional

    Returns
    -------
    FitResult
        Errors are ``(J^T W J)^-1`` (no sandwich) in both modes.
    """
    from scipy.optimize import least_squares, minimize

    model._require_trained()
    flux, ivar = _check_fit_input(flux, ivar, model.n_pixels)
    good_pix = fitted_pixels(model, model.n_pixels)
    starts = model.starting_points(max(1, int(n_starts)))
    bounds = model.scaled_label_bounds
    exps, theta = model.exponents, model.theta
    n_stars, n_labels = flux.shape[0], model.n_labels
    out = dict(labels=np.full((n_stars, n_labels), np.nan),
               covariance=np.full((n_stars, n_labels, n_labels), np.nan),
               chi2=np.full(n_stars, np.nan), n_pixels=np.zeros(n_stars, int),
               iterations=np.zeros(n_stars, int), flags=np.zeros(n_stars, int))
    cov_p = vz.unpack_symmetric(model.theta_cov, model.n_terms) if debias else None
    for i in progress(range(n_stars), desc="fitting (trf)", unit="star",
                      disable=None if progress_bar is None else not progress_bar):
        ok = (ivar[i] > 0) & good_pix
        out["n_pixels"][i] = ok.sum()
        if ok.sum() < min_good_pixels(n_labels, good_pix.sum()):
            out["flags"][i] = FLAGS["TOO_FEW_PIXELS"]
            continue
        w = 1.0 / (1.0 / ivar[i, ok] + model.s2[ok])
        sw, f, th = np.sqrt(w), flux[i, ok], theta[ok]

        def resid(x):
            return sw * (f - th @ vz.label_vector(x[None], exps)[0])

        def jac(x):
            return -sw[:, None] * (th @ vz.label_vector_jacobian(x[None], exps)[0])

        best = None
        for x0 in starts:
            x0 = np.clip(x0, bounds[0], bounds[1])
            if debias:
                cp = cov_p[ok]

                def obj(x):
                    v = vz.label_vector(x[None], exps)[0]
                    dv = vz.label_vector_jacobian(x[None], exps)[0]
                    r = resid(x)
                    cv = cp @ v  # (P, T)
                    val = r @ r - np.sum(w * (cv @ v))
                    grad = 2 * (r @ jac(x)) - 2 * ((w[:, None] * cv).sum(0) @ dv)
                    return val, grad
                res = minimize(obj, x0, jac=True, method="L-BFGS-B", bounds=list(zip(*bounds)),
                               options=dict(ftol=1e-15, gtol=1e-10, maxiter=1000))
                cost, nit = res.fun, res.nit
            else:
                res = least_squares(resid, x0, jac=jac, bounds=bounds, method="trf",
                                    x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12)
                cost, nit = 2 * res.cost, res.nfev
            out["iterations"][i] += nit
            if best is None or cost < best[0]:
                best = (cost, res.x)
        x = best[1]
        r, j = resid(x), jac(x)
        out["chi2"][i] = r @ r
        out["labels"][i] = model.unscale_labels(x)
        try:
            c = np.linalg.inv(j.T @ j)
        except np.linalg.LinAlgError:
            out["flags"][i] |= FLAGS["FAILED"]
            continue
        d = model.label_derivatives(x)[0]
        out["covariance"][i] = c * np.outer(d, d)
        if np.any(np.isclose(x, bounds[0]) | np.isclose(x, bounds[1])):
            out["flags"][i] |= FLAGS["HIT_BOUND"]
    errors = np.sqrt(np.diagonal(out["covariance"], axis1=1, axis2=2))
    dof = np.maximum(out["n_pixels"] - n_labels, 1)
    return _mark_label_flags(model, FitResult(
        errors=errors, reduced_chi2=out["chi2"] / dof, label_names=list(model.label_names),
        debiased=bool(debias), **out))


def fit_spectra(forward_model, flux, ivar, method="fast", **kwargs):
    """Fit labels with any forward model.

    Parameters
    ----------
    forward_model : CannonModel or object
        A ``CannonModel`` (any object with its polynomial: ``exponents`` and ``theta``)
        uses ``fit_cannon`` (``method="fast"``) or ``fit_trf``
        (``method="trf"``). Any other object needs ``label_names``, ``label_bounds``
        (L, 2), ``training_labels`` (N, L), ``s2`` ((P,) or None) and
        ``predict_with_jacobian(labels) -> (flux (N, P), jac (N, P, L))``; it is
        fitted by a batched Levenberg-Marquardt (``fit_generic``). With
        ``pixel_flags`` (P,) as well, the pixels :func:`cannon_fast.core.model.fitted_pixels`
        rules out are left out, as for a ``CannonModel``.
    flux, ivar : array_like, (N, P)
    method : {"fast", "trf"}
    **kwargs
        Passed to the fitting function.

    Returns
    -------
    FitResult
    """
    # Known by its polynomial rather than its class: model imports this module, so
    # this module does not import model.
    if hasattr(forward_model, "exponents") and hasattr(forward_model, "theta"):
        if method == "trf":
            return fit_trf(forward_model, flux, ivar, **kwargs)
        if method != "fast":
            raise ValueError(f"unknown method {method!r}; choose 'fast' or 'trf'")
        return fit_cannon(forward_model, flux, ivar, **kwargs)
    return fit_generic(forward_model, flux, ivar, **kwargs)


def fit_generic(forward_model, flux, ivar, n_starts=4, max_iter=100, xtol=1e-7, ftol=1e-8,
                batch_size=256, progress_bar=None, initial=None):
    """Batched Levenberg-Marquardt for any forward model with a Jacobian.

    Labels are scaled by the training set's median and spread internally.
    The best end point over ``n_starts`` starting points (the training
    median, then training stars spread out in label space) is kept.

    Parameters
    ----------
    forward_model : object
        See ``fit_spectra``.
    flux, ivar : array_like, (N, P)
    n_starts, max_iter, batch_size : int, optional
    xtol : float, optional
        Converged when an accepted step moves no scaled label by more than this ...
    ftol : float, optional
        ... or lowers chi² by less than ``ftol * chi²`` (as scipy's
        ``least_squares``): far from a good fit, where the Gauss-Newton model is
        poor, LM can creep on with ever smaller gains.
    progress_bar : bool, optional
    initial : array_like, (N, L), optional
        One starting point per star (e.g. a previous fit); when given it is the
        only start and ``n_starts`` is ignored.

    Returns
    -------
    FitResult
        Errors are ``(J^T W J)^-1``.
    """
    names = list(forward_model.label_names)
    n_labels = len(names)
    train = np.asarray(forward_model.training_labels, dtype=float)
    lo_q, med, hi_q = np.percentile(train, [2.5, 50, 97.5], axis=0)
    scale = np.where(hi_q > lo_q, (hi_q - lo_q) / 2, 1.0)
    bounds = (np.asarray(forward_model.label_bounds, float).T - med) / scale  # (2, L)
    s2 = getattr(forward_model, "s2", None)
    probe, _ = forward_model.predict_with_jacobian(med[None])
    flux, ivar = _check_fit_input(flux, ivar, probe.shape[1])
    s2 = np.zeros(probe.shape[1]) if s2 is None else np.asarray(s2, float)
    usable = fitted_pixels(forward_model, probe.shape[1])
    xtr = (train - med) / scale
    starts = [np.zeros(n_labels)]
    dist = np.sum(xtr ** 2, axis=1)
    while len(starts) < n_starts:
        j = int(np.argmax(dist))
        starts.append(xtr[j])
        dist = np.minimum(dist, np.sum((xtr - xtr[j]) ** 2, axis=1))
    starts = np.clip(np.array(starts), bounds[0], bounds[1])[:, None, :]  # (S, 1, L)
    if initial is not None:
        initial = np.asarray(initial, dtype=float)
        if initial.shape != (flux.shape[0], n_labels) or not np.isfinite(initial).all():
            raise ValueError(f"initial must be finite, of shape {(flux.shape[0], n_labels)}; "
                             f"got shape {initial.shape}")
        starts = np.clip((initial - med) / scale, bounds[0], bounds[1])[None]  # (1, N, L)

    def normal_equations(x, f, w):
        """chi², J^T W J and J^T W r at scaled labels x."""
        model_f, jac = forward_model.predict_with_jacobian(x * scale + med)
        # (N, L, P), contiguous along pixels: the sums over pixels are then BLAS products
        # (einsum over a strided (N, P, L) array was most of the time)
        jac_t = np.swapaxes(jac, 1, 2) * scale[None, :, None]
        r = f - model_f
        jtw = jac_t * w[:, None, :]
        return (np.einsum("np,np,np->n", r, w, r), np.matmul(jtw, np.swapaxes(jac_t, 1, 2)),
                np.matmul(jtw, r[:, :, None])[:, :, 0])

    parts = []
    n_stars = flux.shape[0]
    for b0 in progress(range(0, n_stars, batch_size), desc="fitting labels", unit="batch",
                       disable=None if progress_bar is None else not progress_bar):
        f, w, valid = _batch_weights(flux[b0:b0 + batch_size], ivar[b0:b0 + batch_size], s2,
                                     usable)
        n = len(f)
        n_pix = valid.sum(axis=1)
        best_x = np.zeros((n, n_labels))
        best_chi = np.full(n, np.inf)
        best_norm = np.zeros((n, n_labels, n_labels))
        iters = np.zeros(n, dtype=int)
        conv_best = np.zeros(n, bool)
        for x0 in starts:
            x = np.array(np.broadcast_to(x0 if len(x0) == 1 else x0[b0:b0 + n], (n, n_labels)))
            x, chi, norm, it, done = _lm_batched(
                x, lambda rows, xr: normal_equations(xr, f[rows], w[rows]), bounds[0],
                bounds[1], max_iter, xtol, ftol)
            iters += it
            better = chi < best_chi
            best_x[better], best_chi[better], best_norm[better] = x[better], chi[better], \
                norm[better]
            conv_best[better] = done[better]
        cov = _inverse(best_norm) * scale[None, :, None] * scale[None, None, :]
        flags = np.where(conv_best, 0, FLAGS["NOT_CONVERGED"])
        at_bound = np.any(np.isclose(best_x, bounds[0]) | np.isclose(best_x, bounds[1]), axis=1)
        flags[at_bound] |= FLAGS["HIT_BOUND"]
        few = n_pix < min_good_pixels(n_labels, len(s2))
        flags[few] |= FLAGS["TOO_FEW_PIXELS"]
        labels = best_x * scale + med
        labels[few] = np.nan
        # a forward model that knows its training box (an emulator) flags labels at or
        # beyond its edge: there it extrapolates, or the fit was stopped by the box
        outside = getattr(forward_model, "outside_training", None)
        if outside is not None and (~few).any():
            flags[~few] |= np.where(outside(labels[~few]), FLAGS["OUTSIDE_TRAINING"], 0)
        parts.append(FitResult(labels=labels, errors=np.sqrt(np.diagonal(cov, axis1=1, axis2=2)),
                               covariance=cov, chi2=best_chi,
                               reduced_chi2=best_chi / np.maximum(n_pix - n_labels, 1),
                               n_pixels=n_pix, iterations=iters, flags=flags, label_names=names,
                               debiased=False))
    return mark_poor_fit(forward_model, FitResult.concatenate(parts))


#: Bound on |BROADENING| in units of the grid's (median) pixel velocity width squared.
#: The model is the first order of a Gaussian convolution, good while the added
#: variance is below that of the instrumental profile (for APOGEE, R = 22,500:
#: sigma ~ 1.4 pixels; at R ~ 2000-3000 on grids sampled at ~2 pixels per FWHM, alike).
BROADENING_BOUND_PIXELS = 2.0


class BroadenedModel:
    """A Cannon model with one more parameter: extra line broadening.

    A star whose lines are broader or narrower than those of the training
    stars of the same labels (macroturbulence, rotation, a different line-spread
    function) otherwise pulls the labels that deepen or weaken lines, [Fe/H]
    first. Convolving a spectrum with a Gaussian of velocity variance ``b`` is,
    to first order, ``f + b / (2 dv²) D² f`` with ``D²`` the second difference
    along pixels and ``dv`` each pixel's velocity width (from the model's
    ``grid``: constant on a grid uniform in log lambda, ``c dlambda / lambda``
    on one uniform in lambda); the model is that, so it stays linear in
    ``theta``: ``(theta + b D²theta / (2 dv²)) . v(x)``. ``b`` (label
    ``BROADENING``, (km/s)²) is signed: negative means narrower lines than the
    model's. ``D²`` is zero where a pixel or a neighbour is flagged, and at the
    ends of the grid's segments: a second difference never crosses a chip join
    or a gap. The first order reads a broadening slightly low and a narrowing
    slightly high; docs/lab.md has the calibration.

    Parameters
    ----------
    model : CannonModel
        Trained, with a pixel grid (``model.grid``) to give pixel velocities.

    Attributes
    ----------
    velocity_unit : float
        The grid's median pixel velocity width squared, (km/s)²: the fits' unit of b.
    broadening_bound : float
        Largest |b|, (km/s)² (``BROADENING_BOUND_PIXELS`` pixel widths squared).

    Notes
    -----
    A forward model for ``fit_generic``: it has ``label_names``,
    ``label_bounds``, ``training_labels``, ``s2``, ``pixel_flags`` and
    ``predict_with_jacobian``.
    """

    def __init__(self, model):
        model._require_trained()
        if model.grid is None:
            raise ValueError(f"line broadening needs the wavelengths of the model's pixels (its "
                             f"pixel velocities), and this {model.n_pixels}-pixel model has no "
                             "grid: train it as CannonModel(..., grid=PixelGrid(wavelengths))")
        self.model = model
        self.label_names = list(model.label_names) + ["BROADENING"]
        self.pixel_flags = model.pixel_flags
        self.good_pixels = fitted_pixels(model, model.n_pixels)
        inner = model.grid.inner_pixels()
        inner[1:-1] &= self.good_pixels[2:] & self.good_pixels[1:-1] & self.good_pixels[:-2]
        d2 = np.zeros_like(model.theta)
        d2[1:-1] = model.theta[2:] - 2.0 * model.theta[1:-1] + model.theta[:-2]
        d2[~inner] = 0.0
        velocity = model.grid.pixel_velocity  # (P,) km/s
        self.inner_pixels = inner
        self.d2_scale = np.where(inner, 1.0 / (2.0 * velocity ** 2), 0.0)  # (P,) 1 / (2 dv²)
        self.d2_theta = d2 * self.d2_scale[:, None]
        self.velocity_unit = float(np.median(velocity[model.grid.in_segment])) ** 2
        self.broadening_bound = BROADENING_BOUND_PIXELS * self.velocity_unit
        self.s2 = model.s2
        self.label_bounds = np.vstack([model.label_bounds,
                                       [-self.broadening_bound, self.broadening_bound]])
        # zero spread in the extra column: fit_generic scales it by 1 (km/s)²
        self.training_labels = np.column_stack([model.training_labels,
                                                np.zeros(len(model.training_labels))])

    def predict(self, labels):
        """Model spectra, labels (N, L + 1) with BROADENING last."""
        labels = np.atleast_2d(np.asarray(labels, dtype=float))
        v = vz.label_vector(self.model.scale_labels(labels[:, :-1]), self.model.exponents)
        return v @ self.model.theta.T + labels[:, -1:] * (v @ self.d2_theta.T)

    def predict_with_jacobian(self, labels):
        """Model spectra and Jacobian, labels (N, L + 1) with BROADENING last."""
        labels = np.atleast_2d(np.asarray(labels, dtype=float))
        m = self.model
        b = labels[:, -1:]
        x = m.scale_labels(labels[:, :-1])
        v = vz.label_vector(x, m.exponents)  # (N, T)
        dv = vz.label_vector_jacobian(x, m.exponents)  # (N, T, L)
        n, t, n_lab = dv.shape
        dv_rows = np.ascontiguousarray(dv.transpose(0, 2, 1)).reshape(n * n_lab, t)
        d2_flux = v @ self.d2_theta.T  # (N, P): d model / d b
        flux = v @ m.theta.T + b * d2_flux
        jac_x = (dv_rows @ m.theta.T + np.repeat(b, n_lab, axis=0) * (dv_rows @ self.d2_theta.T))
        jac_x = jac_x.reshape(n, n_lab, -1) / m.label_derivatives(x)[:, :, None]
        jac = np.concatenate([jac_x, d2_flux[:, None, :]], axis=1)  # (N, L + 1, P)
        return flux, np.swapaxes(jac, 1, 2)


def fit_broadened(model, flux, ivar, start=None, batch_size=256, max_iter=100, xtol=1e-6,
                  ftol=1e-8, progress_bar=None, correct_training_noise=True):
    """Fit labels and extra line broadening together (``BroadenedModel``).

    As for the labels alone (``fit_cannon``), chi² of the broadened model is a
    polynomial in the label vector ``v`` once a few sums over pixels are known,
    now with ``b``: ``chi² = c - 2 v.(h + b k) + v^T (G + b S + b² K) v`` with
    ``h = sum w f theta``, ``k = sum w f D``, ``G = sum w theta theta^T``,
    ``S = sum w (theta D^T + D theta^T)``, ``K = sum w D D^T`` (``D`` the model's
    ``D² theta / 2 dv²``). They cost three (N, P) x (P, T²) products per batch;
    Levenberg-Marquardt on (x, b) from the plain fit then costs O(T² L) per
    iteration. ``fit_generic(BroadenedModel(model), ...)`` evaluates the model
    itself and is the reference this path is tested against.

    The model's coefficients carry the training set's noise ``e_p`` (covariance
    ``C_p = model.theta_cov``), and the second difference of that noise
    correlates with the residual it leaves: ``E[-e_p.v (D²e)_p.v] = 2 v^T C_p v``.
    Unchecked this reads every star as broader than it is. With
    ``correct_training_noise`` the expected excess of chi² in b,
    ``-4 b sum_p w_p beta_p q_p + b² sum_p w_p beta_p² (4 q_p + q_(p-1) + q_(p+1))``
    (``q_p = v^T C_p v``, ``beta_p = 1 / (2 dv_p²)``), is removed from the
    objective, as de-biasing does for the labels (``fit_cannon(debias=True)``):
    two more (N, P) x (P, T²/2) products per batch.

    Parameters
    ----------
    model : CannonModel
    flux, ivar : array_like, (N, P)
    start : FitResult, optional
        A plain fit of the same spectra to start from (made if not given).
    batch_size : int, optional
        Stars per batch; memory is about ``batch_size * P * 16`` bytes.
    max_iter : int, optional
    xtol : float, optional
        Converged when an accepted step moves no scaled label (and b, in units of
        ``BroadenedModel.velocity_unit``) by more than this ...
    ftol : float, optional
        ... or lowers chi² by less than ``ftol * chi²`` (see ``fit_generic``).
    progress_bar : bool, optional
    correct_training_noise : bool, optional
        Remove the pull of the model's training noise on b (see above), scaled by
        ``1 - rho`` with ``rho`` the neighbouring pixels' noise correlation the
        model measured in training (``train_info["neighbour_noise_correlation"]``;
        models without it are not corrected).

    Returns
    -------
    FitResult
        Labels, errors and covariance marginalised over the broadening, which
        is in ``broadening`` and ``broadening_error`` ((km/s)²). Stars the
        plain fit could not use keep that fit, with NaN broadening. Flags are
        the plain fit's and this fit's (NOT_CONVERGED, HIT_BOUND).
    """
    model._require_trained()
    flux, ivar = _check_fit_input(flux, ivar, model.n_pixels)
    if start is None:
        start = fit_cannon(model, flux, ivar, debias=False, progress_bar=progress_bar)
    elif start.debiased or len(start) != len(flux):
        raise ValueError("start must be a plain fit (debias=False) of the same spectra")
    broad = BroadenedModel(model)
    n_labels, n_terms = model.n_labels, model.n_terms
    out = dataclasses.replace(start, labels=start.labels.copy(), errors=start.errors.copy(),
                              covariance=start.covariance.copy(), chi2=start.chi2.copy(),
                              reduced_chi2=start.reduced_chi2.copy(),
                              iterations=start.iterations.copy(), flags=start.flags.copy(),
                              broadening=np.full(len(start), np.nan),
                              broadening_error=np.full(len(start), np.nan))
    use = np.flatnonzero(start.ok)
    # b in units of a pixel's velocity width squared: order unity, like the scaled labels
    b_unit = broad.velocity_unit
    theta, d_theta = model.theta, broad.d2_theta * b_unit
    outer_g = vz.packed_outer(theta)  # (P, T2)
    outer_k = vz.packed_outer(d_theta)
    outer_s = np.ascontiguousarray(
        (theta[:, :, None] * d_theta[:, None, :]).reshape(len(theta), -1))  # (P, T²)
    rho = model.train_info.get("neighbour_noise_correlation")
    if rho is None:  # a model from before this was measured: no correction
        correct_training_noise = False
    if correct_training_noise:
        # beta_p C_p and beta_p² (4 C_p + C_(p-1) + C_(p+1)), beta in b's units (packed),
        # times 1 - rho: neighbouring coefficients' noise correlated by rho cancels that
        # much of -e_p (D²e)_p (to first order in rho)
        beta = broad.d2_scale * b_unit * (1.0 - min(max(rho, 0.0), 1.0))
        cov = model.theta_cov
        near = 4.0 * cov
        near[1:] += cov[:-1]
        near[:-1] += cov[1:]
        noise_b1 = cov * beta[:, None]
        noise_b2 = near * (beta ** 2)[:, None]
    bounds = model.scaled_label_bounds  # (2, L)
    lo = np.append(bounds[0], -BROADENING_BOUND_PIXELS)
    hi = np.append(bounds[1], BROADENING_BOUND_PIXELS)
    bar = progress(total=len(use), desc="fitting labels + broadening", unit="star",
                   disable=None if progress_bar is None and len(use) > batch_size
                   else not progress_bar)
    def fit_batch(b0):
        rows = use[b0:b0 + batch_size]
        n = len(rows)
        f, w, _ = _batch_weights(flux[rows], ivar[rows], model.s2, broad.good_pixels)
        wf = w * f
        mom = dict(c=np.einsum("np,np->n", wf, f), h=wf @ theta, k=wf @ d_theta,
                   g=vz.unpack_symmetric(w @ outer_g, n_terms),
                   kk=vz.unpack_symmetric(w @ outer_k, n_terms))
        mom["hd"] = (w @ outer_s).reshape(n, n_terms, n_terms)  # sum w theta D^T
        p = np.column_stack([model.scale_labels(start.labels[rows]), np.zeros(n)])
        p, _, norm, iters, converged = _lm_batched(
            p, lambda rows, pr: _broadened_chi2(pr, {k: v[rows] for k, v in mom.items()},
                                                model.exponents),
            lo, hi, max_iter, xtol, ftol)
        if correct_training_noise:
            # a few Newton steps on the corrected objective from the chi² minimum, with the
            # chi²'s own (positive definite) Gauss-Newton matrix: the correction is smooth,
            # and fixed steps cannot leave a star "not converged"
            objective = _training_noise_corrected(mom, w, noise_b1, noise_b2, n_terms, p,
                                                  model.exponents)
            for _ in range(DEBIAS_STEPS):
                grad = _broadened_chi2(p, objective, model.exponents)[2]
                p = np.clip(p + _solve_batched(norm, grad), lo, hi)
                norm = _broadened_chi2(p, mom, model.exponents)[1]
        chi = _broadened_chi2(p, mom, model.exponents)[0]  # chi² itself, not the objective
        cov = _inverse(norm)
        d = np.column_stack([model.label_derivatives(p[:, :n_labels]), np.full(n, b_unit)])
        cov *= d[:, :, None] * d[:, None, :]
        out.labels[rows] = model.unscale_labels(p[:, :n_labels])
        out.covariance[rows] = cov[:, :n_labels, :n_labels]
        diag = np.diagonal(cov, axis1=1, axis2=2)
        err = np.sqrt(np.where(diag > 0, diag, np.nan))
        out.errors[rows] = err[:, :n_labels]
        out.broadening[rows] = p[:, -1] * b_unit
        out.broadening_error[rows] = err[:, -1]
        out.chi2[rows] = chi
        out.reduced_chi2[rows] = chi / np.maximum(start.n_pixels[rows] - n_labels - 1, 1)
        out.iterations[rows] += iters
        flags = np.where(converged, 0, FLAGS["NOT_CONVERGED"])
        flags[np.any(np.isclose(p, lo) | np.isclose(p, hi), axis=1)] |= FLAGS["HIT_BOUND"]
        flags[~np.all(np.isfinite(diag) & (diag > 0), axis=1)] |= FLAGS["FAILED"]
        out.flags[rows] |= flags
        return n

    # batches side by side in single-threaded streams when there are threads (as
    # fit_cannon's): each writes its own rows of `out`; numpy and BLAS only, so the
    # model's backend only says whether streams are allowed
    backend = resolve_backend(model.backend)
    batches = range(0, len(use), batch_size)
    for n in map_in_streams(fit_batch, batches, stream_count(backend, len(batches)), backend):
        bar.update(n)
    bar.close()
    return _mark_label_flags(model, out)


def _training_noise_corrected(mom, w, noise_b1, noise_b2, n_terms, p, exponents):
    """The moments of ``fit_broadened``'s objective with the training noise's pull removed.

    chi² keeps its form with ``S -> S + 4 B1`` (``hd -> hd + 2 B1``) and
    ``K -> K - B2``; B2 is capped at half of K at the start labels, so the
    objective stays convex in b where K is poorly determined.
    """
    b1 = vz.unpack_symmetric(w @ noise_b1, n_terms)
    b2 = vz.unpack_symmetric(w @ noise_b2, n_terms)
    v = vz.label_vector(p[:, :-1], exponents)
    k_quad = np.einsum("nt,ntu,nu->n", v, mom["kk"], v)
    b2_quad = np.einsum("nt,ntu,nu->n", v, b2, v)
    shrink = np.minimum(1.0, 0.5 * k_quad / np.maximum(b2_quad, 1e-300))
    out = dict(mom)
    out["hd"] = mom["hd"] + 2.0 * b1
    out["kk"] = mom["kk"] - shrink[:, None, None] * b2
    return out


def _broadened_chi2(p, mom, exponents):
    """chi² of the broadened model from its moments, the GN normal matrix and gradient.

    ``p`` is (N, L + 1): scaled labels, then b. Returns chi² (N,), ``J^T W J``
    (N, L + 1, L + 1) and ``J^T W r`` (N, L + 1).
    """
    x, b = p[:, :-1], p[:, -1][:, None, None]
    v = vz.label_vector(x, exponents)  # (N, T)
    hd = mom["hd"]  # sum w theta D^T
    # sum w theta_b theta_b^T, theta_b = theta + b D
    a = mom["g"] + b * (hd + np.swapaxes(hd, 1, 2)) + b * b * mom["kk"]
    u = mom["h"] + b[:, :, 0] * mom["k"]  # sum w f theta_b
    av = np.einsum("ntu,nu->nt", a, v)
    chi2 = mom["c"] - 2 * np.einsum("nt,nt->n", v, u) + np.einsum("nt,nt->n", v, av)
    dv = vz.label_vector_jacobian(x, exponents)  # (N, T, L)
    cross = hd + b * mom["kk"]  # sum w theta_b D^T
    n, n_lab = x.shape
    norm = np.empty((n, n_lab + 1, n_lab + 1))
    norm[:, :-1, :-1] = np.swapaxes(dv, 1, 2) @ a @ dv
    jxb = np.einsum("ntl,ntu,nu->nl", dv, cross, v)
    norm[:, :-1, -1] = norm[:, -1, :-1] = jxb
    norm[:, -1, -1] = np.einsum("nt,ntu,nu->n", v, mom["kk"], v)
    grad = np.empty((n, n_lab + 1))
    grad[:, :-1] = np.einsum("ntl,nt->nl", dv, u - av)
    grad[:, -1] = np.einsum("nt,nt->n", v, mom["k"] - np.einsum("nut,nu->nt", cross, v))
    return chi2, norm, grad


def _lm_batched(p, normal_equations, lo, hi, max_iter, xtol, ftol):
    """Levenberg-Marquardt for a batch of stars, each with its own damping.

    Parameters
    ----------
    p : ndarray, (N, K)
        Starting points (scaled parameters).
    normal_equations : callable
        ``(rows, p_rows) -> (chi² (n,), J^T W J (n, K, K), J^T W r (n, K))`` for
        the stars ``rows`` of the batch at ``p_rows``.
    lo, hi : ndarray, (K,)
        Bounds; steps are clipped to them.
    max_iter : int
    xtol, ftol : float
        Converged when an accepted step moves no parameter by more than ``xtol``
        or lowers chi² by less than ``ftol * chi²`` (far from a good fit, where
        the Gauss-Newton model is poor, LM can creep on with ever smaller gains);
        or when no damping finds a lower chi² (a piecewise-linear emulator has
        kinks where damping alone cannot help).

    Returns
    -------
    p, chi2, normal matrix, iterations, converged
    """
    n, k = p.shape
    chi, norm, grad = normal_equations(np.arange(n), p)
    lam = np.full(n, 1e-3)
    done = np.zeros(n, bool)
    iters = np.zeros(n, dtype=np.int64)
    for _ in range(max_iter):
        act = np.flatnonzero(~done)  # only stars still moving cost an evaluation
        if len(act) == 0:
            break
        iters[act] += 1
        diag = np.diagonal(norm[act], axis1=1, axis2=2)[:, :, None] + 1e-12
        damp = norm[act] + lam[act, None, None] * (np.eye(k) * diag)
        p_new = np.clip(p[act] + _solve_batched(damp, grad[act]), lo, hi)
        chi_new, norm_new, grad_new = normal_equations(act, p_new)
        ok = chi_new <= chi[act]
        moved = np.max(np.abs(p_new - p[act]), axis=1)
        small_gain = chi[act] - chi_new < ftol * chi[act]
        acc = act[ok]
        p[acc], chi[acc], norm[acc], grad[acc] = p_new[ok], chi_new[ok], norm_new[ok], grad_new[ok]
        lam[act] = np.where(ok, np.maximum(lam[act] / 3, 1e-9), lam[act] * 4)
        done[act] = (ok & ((moved < xtol) | small_gain)) | (lam[act] > 1e12)
    return p, chi, norm, iters, done
