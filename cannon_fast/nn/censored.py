"""Censored abundance networks: an element's label from that element's pixels only.

A network that sees the whole spectrum can learn [Si/Fe] from Mg lines when the
training stars' [Si/Fe] and [Mg/Fe] are correlated (as they are in the Galaxy):
its [Si/Fe] then follows [Mg/Fe] in stars where the two part. astroNN censors:
each element is predicted from the pixels of its own windows, with the stellar
parameters (Teff, log g, [Fe/H], which set every line's strength) as further
inputs (Leung & Bovy 2019, section 3.3).

:class:`CensoredAbundanceNetwork` does this with a
:class:`~cannon_fast.nn.SpectrumRegressor` (MC dropout, predicted variance, masked
loss) whose inputs are the window pixels and the standardized parameters.
"""
from __future__ import annotations

import numpy as np

from .regressor import SpectrumRegressor

__all__ = ["CensoredAbundanceNetwork", "window_mask"]


def window_mask(wave, windows):
    """(P,) bool: pixels whose wavelength falls in any ``(start, end)`` window.

    Parameters
    ----------
    wave : array_like, (P,)
        Pixel wavelengths (same frame and units as ``windows``, e.g. vacuum Å).
    windows : array_like, (W, 2)

    Returns
    -------
    ndarray of bool, (P,)
    """
    wave = np.asarray(wave, float)
    w = np.atleast_2d(np.asarray(windows, float))
    return np.any((wave[:, None] >= w[None, :, 0]) & (wave[:, None] <= w[None, :, 1]), axis=1)


class CensoredAbundanceNetwork:
    """One label from the pixels of ``mask`` and the stellar parameters.

    Parameters
    ----------
    label : str
        The abundance label, e.g. ``"SI_FE"``.
    mask : array_like of bool, (P,)
        The element's pixels (:func:`window_mask`).
    arch, **network
        As :class:`SpectrumRegressor` (default a small MLP: the inputs are a few
        hundred pixels).
    """

    def __init__(self, label, mask, arch="mlp", hidden=(64, 32), **network):
        self.mask = np.asarray(mask, bool)
        if self.mask.ndim != 1 or not self.mask.any():
            raise ValueError(f"{label}: the pixel mask selects no pixel")
        self.regressor = SpectrumRegressor([label], arch, hidden=hidden, **network)
        self.param_offsets = self.param_scales = None
        self.feature_scale = 1.0

    def _inputs(self, flux, ivar, params):
        flux = np.atleast_2d(np.asarray(flux, float))
        if flux.shape[1] != self.mask.size:
            raise ValueError(f"flux has {flux.shape[1]} pixels, the mask {self.mask.size}")
        ivar = np.ones_like(flux) if ivar is None else np.atleast_2d(np.asarray(ivar, float))
        p = np.atleast_2d(np.asarray(params, float))
        z = (p - self.param_offsets) / self.param_scales
        z = np.where(np.isfinite(z), z, 0.0)  # a missing parameter counts as the mean
        # the parameters enter like pixels of the size of the spectra's variations, and
        # with an ivar so large that the noise augmentation leaves them alone
        x = np.hstack([flux[:, self.mask], 1.0 + self.feature_scale * z])
        v = np.hstack([ivar[:, self.mask], np.full(z.shape, 1e12)])
        return x, v

    def train(self, flux, ivar, params, labels, *, label_errors=None, **train_options):
        """Train on spectra, their stellar parameters and the element's labels.

        Parameters
        ----------
        flux, ivar : array_like, (N, P)
        params : array_like, (N, K)
            Teff, log g, [Fe/H] (or any K parameters), as the network will get them
            at prediction (e.g. from a full-spectrum network).
        labels, label_errors : array_like, (N,)
        **train_options
            Passed to :meth:`SpectrumRegressor.train`.

        Returns
        -------
        self
        """
        p = np.atleast_2d(np.asarray(params, float))
        self.param_offsets = np.nanmean(p, axis=0)
        scale = np.nanstd(p, axis=0)
        self.param_scales = np.where(scale > 0, scale, 1.0)
        f = np.asarray(flux, float)[:, self.mask]
        good = np.ones(f.shape, bool) if ivar is None else np.asarray(ivar)[:, self.mask] > 0
        count = np.maximum(good.sum(0), 1)
        mean = np.where(good, f, 0.0).sum(0) / count
        resid2 = np.where(good, (f - mean) ** 2, 0.0).sum() / max(int(good.sum()), 1)
        self.feature_scale = float(np.sqrt(resid2)) or 1.0
        x, v = self._inputs(flux, ivar, params)
        err = None if label_errors is None else np.asarray(label_errors, float).reshape(-1, 1)
        self.regressor.train(x, np.asarray(labels, float).reshape(-1, 1), v, label_errors=err,
                             **train_options)
        return self

    def predict(self, flux, ivar, params, **predict_options):
        """Predict the label (an :class:`~cannon_fast.nn.NNResult` with one column)."""
        if self.param_offsets is None:
            raise RuntimeError("the network is not trained: call train()")
        x, v = self._inputs(flux, ivar, params)
        return self.regressor.predict(x, v, **predict_options)
