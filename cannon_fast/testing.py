"""Seeded synthetic spectra with a known quadratic truth, shipped for tests and examples.

The generator follows the structure of APOGEE-like benchmark data: many weak
lines and a few deep ones, label responses proportional to line depth, noise
set by a per-star SNR and a per-pixel throughput, a per-pixel intrinsic
scatter on a subset of pixels, and a small fraction of bad pixels with
``ivar = 0`` and flux filled with 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticSpectra", "make_synthetic", "LABEL_NAMES", "LABEL_RANGES"]

LABEL_NAMES = ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE")
#: Uniform label ranges of the synthetic stars (giants).
LABEL_RANGES = np.array([[3800.0, 5700.0], [0.5, 4.0], [-1.0, 0.5], [-0.1, 0.4], [-0.1, 0.4]])


@dataclass
class SyntheticSpectra:
    """Spectra, inverse variances and the truth they were drawn from.

    Attributes
    ----------
    labels : ndarray, (N, L)
    flux, ivar, true_flux : ndarray, (N, P)
    s2_true : ndarray, (P,)
        True per-pixel intrinsic variance.
    coeffs : ndarray, (P, T)
        True quadratic coefficients in the scaled labels ``x`` (see ``scale_labels``).
    label_names : tuple of str
    """

    labels: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    true_flux: np.ndarray
    s2_true: np.ndarray
    coeffs: np.ndarray
    label_names: tuple

    @property
    def grid(self):
        """An APOGEE-like pixel grid for the P pixels (uniform in log lambda, 4.14 km/s)."""
        return synthetic_grid(self.flux.shape[1])

    def scale_labels(self, labels):
        """Map physical labels to the generator's x in [-1, 1]."""
        lo, hi = LABEL_RANGES[: len(self.label_names)].T
        return (np.asarray(labels) - 0.5 * (lo + hi)) / (0.5 * (hi - lo))


def synthetic_grid(n_pixels):
    """A stretch of the apStar log-lambda grid with ``n_pixels`` pixels, one segment.

    Parameters
    ----------
    n_pixels : int

    Returns
    -------
    PixelGrid
    """
    from .core.grid import APOGEE_RESOLUTION, APSTAR_CDELT1, PixelGrid
    return PixelGrid.log_uniform(15500.0, step=APSTAR_CDELT1, n_pixels=n_pixels,
                                 resolution=APOGEE_RESOLUTION, name="synthetic")


def _quad_design(x):
    n, k = x.shape
    iu = np.triu_indices(k)
    quad = (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]
    return np.hstack([np.ones((n, 1)), x, quad])


def make_synthetic(n_stars=64, n_pix=200, n_labels=3, seed=0, snr=(80.0, 120.0),
                   intrinsic_frac=0.3, intrinsic_level=0.004, bad_frac=0.01,
                   masked_pixel=True, masked_star=False, coeffs=None, s2_true=None):
    """Draw seeded synthetic spectra from an exactly quadratic model.

    Parameters
    ----------
    n_stars, n_pix, n_labels : int
        N, P and L (L <= 5; the labels are the first L of ``LABEL_NAMES``).
    seed : int
        Seed of ``numpy.random.default_rng``.
    snr : (float, float)
        Range of the per-star signal-to-noise ratio (uniform).
    intrinsic_frac, intrinsic_level : float
        Fraction of pixels with intrinsic scatter and its typical size.
    bad_frac : float
        Fraction of bad pixels per star (``ivar = 0``, flux = 1).
    masked_pixel : bool
        Make the last pixel bad in every star (a column with no data).
    masked_star : bool
        Make the last star bad at every pixel.
    coeffs, s2_true : ndarray, optional
        Reuse the truth of another draw (to make a test set for a training set).

    Returns
    -------
    SyntheticSpectra
    """
    if not 1 <= n_labels <= len(LABEL_NAMES):
        raise ValueError(f"n_labels must be 1..{len(LABEL_NAMES)}, got {n_labels}")
    rng = np.random.default_rng(seed)
    k = n_labels
    n_terms = 1 + k + k * (k + 1) // 2
    if coeffs is None:
        d0 = 0.42 * rng.beta(0.7, 4.0, size=n_pix)
        cont = rng.random(n_pix) < 0.15
        d0[cont] = 1e-3 * rng.random(cont.sum())
        lin = np.zeros((n_pix, k))
        lin[:, 0] = -d0 * rng.uniform(0.15, 0.35, n_pix)
        if k > 1:
            lin[:, 1] = d0 * rng.normal(0.0, 0.08, n_pix)
        if k > 2:
            lin[:, 2] = d0 * rng.uniform(0.05, 0.25, n_pix)
        for j in range(3, k):
            sens = rng.random(n_pix) < 0.10
            lin[sens, j] = d0[sens] * rng.uniform(0.05, 0.2, sens.sum())
        quad = d0[:, None] * rng.normal(0.0, 0.03, size=(n_pix, n_terms - 1 - k))
        coeffs = np.hstack([d0[:, None], lin, quad])  # depth coefficients
    if s2_true is None:
        s_true = np.zeros(n_pix)
        has = rng.random(n_pix) < intrinsic_frac
        s_true[has] = intrinsic_level * np.exp(rng.normal(0.0, 0.5, has.sum()))
        s2_true = s_true ** 2
    lo, hi = LABEL_RANGES[:k].T
    labels = lo + (hi - lo) * rng.random((n_stars, k))
    x = (labels - 0.5 * (lo + hi)) / (0.5 * (hi - lo))
    true_flux = 1.0 - _quad_design(x) @ coeffs.T
    w_pix = rng.uniform(0.8, 1.25, n_pix)
    s = rng.uniform(*snr, n_stars)
    sigma = w_pix[None, :] / s[:, None]
    flux = (true_flux + sigma * rng.standard_normal((n_stars, n_pix))
            + np.sqrt(s2_true)[None, :] * rng.standard_normal((n_stars, n_pix)))
    ivar = 1.0 / sigma ** 2
    bad = rng.random((n_stars, n_pix)) < bad_frac
    if masked_pixel:
        bad[:, -1] = True
    if masked_star:
        bad[-1, :] = True
    ivar[bad] = 0.0
    flux[bad] = 1.0
    return SyntheticSpectra(labels=labels, flux=flux, ivar=ivar, true_flux=true_flux,
                            s2_true=np.asarray(s2_true, float), coeffs=coeffs,
                            label_names=LABEL_NAMES[:k])
