"""Spectrophotometric distances: spectrum -> Ks-band pseudo-luminosity (astroNN's AstroNNDist).

The network predicts ``fakemag = parallax * 10**(0.2 * K0)`` (parallax in mas,
``K0 = Ks - A_K``), which equals ``10**(0.2 * M_Ks + 2)``: a luminosity-like
quantity that, unlike the absolute magnitude, is linear in the parallax. The
loss is the Gaussian likelihood of the *observed* parallax, written in fakemag
units: target ``parallax * 10**(0.2 K0)`` with variance ``(parallax_error *
10**(0.2 K0))**2`` plus the network's own predicted variance. A negative or
noisy parallax is therefore a measurement like any other (no cut on
``parallax > 0``, no bias from inverting it). MC dropout gives the model
uncertainty, the predicted variance the per-star (predictive) one; the total is
their sum in quadrature.

References
----------
Leung, H. W. & Bovy, J. 2019, MNRAS 489, 2079 (spectrophotometric distances
with astroNN); Leung, H. W. et al. 2023, MNRAS 522, 4577.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .regressor import SpectrumRegressor

__all__ = ["DistanceNetwork", "DistanceResult", "fakemag", "DIST_FLAGS", "LN10_5"]

#: result_flags bits of Astra's AstroNNDist.
DIST_FLAGS = {"FAKEMAG_UNRELIABLE": 1 << 0, "MISSING_PHOTOMETRY": 1 << 1,
              "MISSING_EXTINCTION": 1 << 2, "NO_RESULT": 1 << 11}
#: FAKEMAG_UNRELIABLE when the fakemag's total error over its value reaches this.
FAKEMAG_UNRELIABLE_FRACTION = 0.2
LN10_5 = 0.2 * np.log(10.0)  # d ln(10**(0.2 m)) / dm
_LABEL = "FAKEMAG"


def _missing(x):
    """NaN, inf and the DR17 sentinel (< -9000) are missing."""
    x = np.asarray(x, float)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(x) | (x < -9000)


def fakemag(parallax, k0):
    """``parallax * 10**(0.2 * k0)`` (parallax in mas): ``10**(0.2 M + 2)`` for a true parallax."""
    return np.asarray(parallax, float) * 10.0 ** (0.2 * np.asarray(k0, float))


def _k0(k, a_k):
    """Extinction-corrected Ks and the masks of missing Ks / missing A_K (taken as 0)."""
    k = np.asarray(k, float)
    a_k = np.broadcast_to(np.asarray(a_k, float), k.shape)
    no_k, no_a = _missing(k), _missing(a_k)
    return np.where(no_k, np.nan, k) - np.where(no_a, 0.0, a_k), no_k, no_a


@dataclass
class DistanceResult:
    """Distances predicted by :meth:`DistanceNetwork.predict` (one entry per star).

    Attributes
    ----------
    fakemag, fakemag_err : ndarray, (N,)
        Pseudo-luminosity ``10**(0.2 M_Ks + 2)`` and its total 1-sigma error.
    fakemag_model_err, fakemag_predictive_err : ndarray, (N,)
        MC-dropout (model) and predicted (per-star) parts of ``fakemag_err``.
    absmag_k, absmag_k_err : ndarray, (N,)
        Absolute Ks magnitude ``5 log10(fakemag) - 10``.
    distance, distance_err : ndarray, (N,)
        Parsec (NaN without Ks photometry); the error adds the Ks error.
    parallax, parallax_err : ndarray, (N,)
        Milliarcseconds, the same information as ``distance``.
    result_flags : ndarray, (N,) int
        Bits of :data:`DIST_FLAGS`.
    """

    fakemag: np.ndarray
    fakemag_err: np.ndarray
    fakemag_model_err: np.ndarray
    fakemag_predictive_err: np.ndarray
    absmag_k: np.ndarray
    absmag_k_err: np.ndarray
    distance: np.ndarray
    distance_err: np.ndarray
    parallax: np.ndarray
    parallax_err: np.ndarray
    result_flags: np.ndarray

    FLAGS = DIST_FLAGS

    def flag_names(self, i):
        """Names of the flags set for star ``i``."""
        return [k for k, v in self.FLAGS.items() if self.result_flags[i] & v]

    @property
    def flag_warn(self):
        """(N,) bool: MISSING_EXTINCTION is set (Astra's definition for AstroNNDist)."""
        return (self.result_flags & DIST_FLAGS["MISSING_EXTINCTION"]) != 0

    @property
    def flag_bad(self):
        """(N,) bool: FAKEMAG_UNRELIABLE, MISSING_PHOTOMETRY or NO_RESULT is set."""
        bad = (DIST_FLAGS["FAKEMAG_UNRELIABLE"] | DIST_FLAGS["MISSING_PHOTOMETRY"]
               | DIST_FLAGS["NO_RESULT"])
        return (self.result_flags & bad) != 0

    def to_table(self):
        """Return an astropy Table with astraAllStarAstroNNDist-like columns (lower case)."""
        from astropy.table import Table

        t = Table()
        for name in ("fakemag", "fakemag_err", "fakemag_model_err", "fakemag_predictive_err",
                     "absmag_k", "absmag_k_err", "distance", "distance_err", "parallax",
                     "parallax_err"):
            t[name] = np.asarray(getattr(self, name), np.float64)
        t["result_flags"] = self.result_flags.astype(np.int32)
        t["flag_warn"] = self.flag_warn
        t["flag_bad"] = self.flag_bad
        return t


class DistanceNetwork:
    """Normalized spectrum -> fakemag (Ks-band pseudo-luminosity), trained on parallaxes.

    Parameters
    ----------
    arch, **network
        As :class:`~cannon_fast.nn.SpectrumRegressor` (the one label is ``FAKEMAG``).

    Attributes
    ----------
    regressor : SpectrumRegressor
        The network underneath (its ``history``, ``split``, ``error_scale``).
    """

    def __init__(self, arch="cnn", **network):
        self.regressor = SpectrumRegressor([_LABEL], arch, **network)

    def train(self, flux, ivar, parallax, parallax_error, k, a_k, *, k_error=None,
              **train_options):
        """Train on spectra with Gaia parallaxes and Ks photometry.

        Parameters
        ----------
        flux, ivar : array_like, (N, P)
            Continuum-normalized spectra.
        parallax, parallax_error : array_like, (N,)
            Milliarcseconds; negative parallaxes are kept (they are measurements).
        k, a_k : array_like, (N,)
            Apparent Ks and its extinction A_K.
        k_error : array_like, (N,), optional
            Ks errors, propagated into the target's error.
        **train_options
            Passed to :meth:`SpectrumRegressor.train`.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            A training star without Ks, A_K, parallax or a positive parallax error:
            apply the training cuts first
            (:func:`cannon_fast.apogee.catalog.distance_training_cuts`).
        """
        plx = np.asarray(parallax, float)
        err = np.asarray(parallax_error, float)
        k0, no_k, no_a = _k0(k, a_k)
        bad = no_k | no_a | _missing(plx) | _missing(err) | ~(err > 0)
        if bad.any():
            from .._util import describe_bad

            raise ValueError(f"training stars need Ks, A_K, a parallax and a positive parallax "
                             f"error; not so for {describe_bad(bad)} (apply the training cuts)")
        scale = 10.0 ** (0.2 * k0)
        target = plx * scale
        t_err = err * scale
        if k_error is not None:  # Ks error moves the target by d(fakemag)/dK = 0.2 ln10 fakemag
            ke = np.where(_missing(k_error), 0.0, np.asarray(k_error, float))
            t_err = np.hypot(t_err, LN10_5 * np.abs(target) * ke)
        self.regressor.train(flux, target[:, None], ivar, label_errors=t_err[:, None],
                             **train_options)
        return self

    def predict(self, flux, ivar, k, a_k, *, k_error=None, n_samples=30, seed=None,
                max_bad_fraction=0.3):
        """Fakemag, absolute Ks, distance and parallax with errors and flags.

        A missing A_K is taken as 0 and flagged MISSING_EXTINCTION (a warning); a
        missing Ks leaves distance and parallax NaN with MISSING_PHOTOMETRY (bad);
        a spectrum with more than ``max_bad_fraction`` masked pixels gets
        NO_RESULT and NaN everywhere.

        Parameters
        ----------
        flux, ivar : array_like, (N, P)
        k, a_k : array_like, (N,)
            NaN (or < -9000) where missing.
        k_error : array_like, (N,), optional
        n_samples : int
            MC-dropout samples.
        seed : int, optional
        max_bad_fraction : float

        Returns
        -------
        DistanceResult
        """
        res = self.regressor.predict(flux, ivar, n_samples=n_samples, seed=seed,
                                     max_bad_fraction=max_bad_fraction,
                                     uncertain_thresholds={_LABEL: np.inf})
        f, fe = res.labels[:, 0], res.errors[:, 0]
        n = len(f)
        k0, no_k, no_a = _k0(np.broadcast_to(np.asarray(k, float), (n,)), a_k)
        ke = (np.zeros(n) if k_error is None
              else np.where(_missing(k_error), 0.0, np.asarray(k_error, float)))
        with np.errstate(invalid="ignore", divide="ignore"):
            absmag = 5.0 * np.log10(f) - 10.0
            absmag_err = fe / (LN10_5 * f)
            plx = f * 10.0 ** (-0.2 * k0)
            plx_err = np.abs(plx) * np.hypot(fe / f, LN10_5 * ke)
            dist = 1000.0 / plx
            dist_err = dist * plx_err / plx
            unreliable = ~(fe / f < FAKEMAG_UNRELIABLE_FRACTION)
        no_result = (res.flags & res.FLAGS["NO_RESULT"]) != 0
        flags = np.zeros(n, np.int64)
        flags[unreliable & ~no_result] |= DIST_FLAGS["FAKEMAG_UNRELIABLE"]
        flags[no_k] |= DIST_FLAGS["MISSING_PHOTOMETRY"]
        flags[no_a] |= DIST_FLAGS["MISSING_EXTINCTION"]
        flags[no_result] |= DIST_FLAGS["NO_RESULT"]
        return DistanceResult(
            fakemag=f, fakemag_err=fe, fakemag_model_err=res.model_errors[:, 0],
            fakemag_predictive_err=res.predictive_errors[:, 0], absmag_k=absmag,
            absmag_k_err=absmag_err, distance=dist, distance_err=dist_err, parallax=plx,
            parallax_err=plx_err, result_flags=flags)

    def save(self, path):
        """Write the checkpoint (a regressor checkpoint whose one label is FAKEMAG)."""
        self.regressor.save(path)

    @classmethod
    def load(cls, path, device="auto"):
        """Read a checkpoint written by :meth:`save`.

        Raises
        ------
        ValueError
            If the checkpoint is a label regressor, not a distance network.
        """
        reg = SpectrumRegressor.load(path, device=device)
        if reg.label_names != (_LABEL,):
            raise ValueError(f"{path} predicts {list(reg.label_names)}, not a distance network "
                             f"(which predicts {_LABEL})")
        self = cls.__new__(cls)
        self.regressor = reg
        return self
