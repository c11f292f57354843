"""What a spectrum can tell about its labels: Fisher information and the Cramér–Rao bound.

For a forward model ``f(labels)`` on a pixel grid and Gaussian pixel noise of
inverse variance ``w_p`` (the noise ``1/ivar`` plus the model's own variance
``s2``), the Fisher matrix of the labels is ``F = J^T W J`` with ``J = d f / d label``
(P, L). No unbiased estimate of label ``j`` scatters less than
``sqrt((F^-1)_jj)``, the Cramér–Rao bound (CRB), marginalised over the other labels.

Which pixels carry a label: the best linear estimate is ``x = C J^T W r``
(``C = F^-1``), so pixel ``p`` adds ``w_p (C J^T)_jp^2`` to the variance of
label ``j`` and those terms sum to ``C_jj``. Their fractions (:attr:`share`)
say which pixels the bound rests on *after* the other labels have taken
their part (a pixel that only tells Teff and [Fe/H] together counts for
neither if another pixel breaks the degeneracy). :attr:`pixel_information`
``w_p J_pj^2`` is the unmarginalised information of each pixel.

Any forward model works: one with ``predict_with_jacobian(labels (N, L)) ->
(flux (N, P), jac (N, P, L))`` (a ``CannonModel``, an emulator, a broadened
model), or a plain callable ``labels (L,) -> flux (P,)`` (an ab initio grid,
anything), differentiated by central finite differences
(:class:`CallableModel`).

References
----------
Ting, Y.-S., Conroy, C., Rix, H.-W. & Cargile, P. 2017, ApJ 843, 32 (the CRB of
low-resolution spectra). Xiang, M. et al. 2022, A&A 662, A66 (HotPayne, sect. 3).
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["CallableModel", "InformationContent", "information_content",
           "finite_difference_jacobian", "bound_vs_snr", "model_jacobian"]


def finite_difference_jacobian(func, labels, step):
    """Central finite differences of ``func`` at one point.

    Parameters
    ----------
    func : callable
        ``labels (L,) -> flux (P,)``.
    labels : array_like, (L,)
    step : array_like, (L,)
        Step per label, physical units.

    Returns
    -------
    flux : ndarray, (P,)
    jac : ndarray, (P, L)
    """
    x = np.asarray(labels, dtype=np.float64)
    step = np.broadcast_to(np.asarray(step, dtype=np.float64), x.shape)
    flux = np.asarray(func(x), dtype=np.float64)
    cols = []
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = step[j]
        cols.append((np.asarray(func(x + e), np.float64)
                     - np.asarray(func(x - e), np.float64)) / (2.0 * step[j]))
    return flux, np.stack(cols, axis=-1)


class CallableModel:
    """Any ``labels -> flux`` function as a forward model (Jacobian by finite differences).

    Usable by :func:`information_content`, :func:`cannon_fast.fit_spectra`
    (``fit_generic``) and MCMC like the trained models.

    Parameters
    ----------
    func : callable
        ``labels (L,) -> flux (P,)``, or ``(N, L) -> (N, P)`` when ``batched``.
    label_names : sequence of str
    label_bounds : array_like, (L, 2)
        Where the function may be evaluated (fits stay inside).
    step : array_like, (L,), optional
        Finite-difference step per label (default 1e-3 of the bounds' span).
    training_labels : array_like, (N, L), optional
        Starting points and label scaling for fits (default: the box's centre and corners).
    s2 : array_like, (P,), optional
        The model's own variance per pixel.
    batched : bool
        ``func`` takes and returns a batch.
    grid : PixelGrid, optional
        The pixels the function returns.
    """

    def __init__(self, func, label_names, label_bounds, step=None, training_labels=None,
                 s2=None, batched=False, grid=None):
        self.func = func
        self.label_names = [str(n) for n in label_names]
        n = len(self.label_names)
        self.label_bounds = np.asarray(label_bounds, dtype=np.float64).reshape(n, 2)
        span = self.label_bounds[:, 1] - self.label_bounds[:, 0]
        if np.any(span <= 0):
            raise ValueError("label_bounds must have lower < upper for every label")
        self.step = (1e-3 * span if step is None
                     else np.broadcast_to(np.asarray(step, np.float64), (n,)).copy())
        if training_labels is None:
            lo, hi = self.label_bounds.T
            corners = np.array(np.meshgrid(*[[0.25, 0.75]] * n)).reshape(n, -1).T
            training_labels = np.vstack([0.5 * (lo + hi), lo + corners * (hi - lo)])
        self.training_labels = np.atleast_2d(np.asarray(training_labels, np.float64))
        self.s2 = None if s2 is None else np.asarray(s2, np.float64)
        self.batched = bool(batched)
        self.grid = grid

    def predict(self, labels):
        """Flux, (N, L) -> (N, P); (L,) -> (P,)."""
        labels = np.asarray(labels, np.float64)
        if labels.ndim == 1:
            return self._eval(labels[None])[0]
        return self._eval(labels)

    def _eval(self, labels):
        if self.batched:
            return np.asarray(self.func(labels), np.float64)
        return np.stack([np.asarray(self.func(x), np.float64) for x in labels])

    def predict_with_jacobian(self, labels):
        """Flux (N, P) and central-difference Jacobian (N, P, L)."""
        labels = np.atleast_2d(np.asarray(labels, np.float64))
        n, n_lab = labels.shape
        # all 2L + 1 evaluations in one batch
        e = np.eye(n_lab) * self.step  # (L, L)
        pts = np.concatenate([labels[:, None, :], labels[:, None, :] + e, labels[:, None, :] - e],
                             axis=1)  # (N, 2L + 1, L)
        out = self._eval(pts.reshape(-1, n_lab)).reshape(n, 2 * n_lab + 1, -1)
        jac = (out[:, 1:n_lab + 1] - out[:, n_lab + 1:]) / (2.0 * self.step[None, :, None])
        return out[:, 0], np.swapaxes(jac, 1, 2)


def model_jacobian(model, labels):
    """Flux (P,) and Jacobian (P, L) of any forward model at one point.

    ``model`` has ``predict_with_jacobian`` (batched) or is a callable
    ``labels (L,) -> flux (P,)`` (finite differences, step 1e-4 of |label| + 1e-3).
    """
    labels = np.asarray(labels, np.float64)
    if hasattr(model, "predict_with_jacobian"):
        flux, jac = model.predict_with_jacobian(labels[None])
        return np.asarray(flux[0], np.float64), np.asarray(jac[0], np.float64)
    if callable(model):
        return finite_difference_jacobian(model, labels, 1e-4 * np.abs(labels) + 1e-3)
    raise TypeError("model must have predict_with_jacobian or be a callable labels -> flux")


@dataclasses.dataclass
class InformationContent:
    """The Fisher matrix of one spectrum and what it bounds.

    Attributes
    ----------
    label_names : list of str
    labels : ndarray, (L,)
        Where the model was differentiated.
    fisher : ndarray, (L, L)
        ``J^T W J``.
    covariance : ndarray, (L, L)
        ``F^-1`` (NaN if F is singular: a label the spectrum cannot tell).
    crb : ndarray, (L,)
        Marginalised 1-sigma bound per label.
    crb_fixed : ndarray, (L,)
        ``1 / sqrt(F_jj)``: the bound with every other label known.
    share : ndarray, (P, L)
        Each pixel's fraction of each label's variance (columns sum to 1).
    pixel_information : ndarray, (P, L)
        ``w_p J_pj^2``, unmarginalised.
    jacobian : ndarray, (P, L)
    weights : ndarray, (P,)
        ``w_p``, the inverse variance used.
    """

    label_names: list
    labels: np.ndarray
    fisher: np.ndarray
    covariance: np.ndarray
    crb: np.ndarray
    crb_fixed: np.ndarray
    share: np.ndarray
    pixel_information: np.ndarray
    jacobian: np.ndarray
    weights: np.ndarray

    def top_pixels(self, label, n=10):
        """Indices of the ``n`` pixels with the largest share of a label's variance."""
        j = self.label_names.index(label) if isinstance(label, str) else int(label)
        return np.argsort(self.share[:, j])[::-1][:n]

    def as_dict(self):
        """``{label: crb}``."""
        return dict(zip(self.label_names, self.crb.tolist()))


def _noise_weights(flux, snr, ivar, s2):
    if (snr is None) == (ivar is None):
        raise ValueError("give exactly one of snr (continuum S/N per pixel) and ivar")
    p = flux.shape[0]
    if ivar is not None:
        ivar = np.broadcast_to(np.asarray(ivar, np.float64), (p,))
        if np.any(ivar < 0) or not np.all(np.isfinite(ivar)):
            raise ValueError("ivar must be finite and >= 0")
        var = np.where(ivar > 0, 1.0 / np.where(ivar > 0, ivar, 1.0), np.inf)
    else:
        snr = np.broadcast_to(np.asarray(snr, np.float64), (p,))
        if np.any(snr < 0) or not np.all(np.isfinite(snr)):
            raise ValueError("snr must be finite and >= 0")
        # continuum-normalized flux: sigma = 1 / (S/N) at every pixel
        var = np.where(snr > 0, 1.0 / np.where(snr > 0, snr, 1.0) ** 2, np.inf)
    if s2 is not None:
        var = var + np.broadcast_to(np.asarray(s2, np.float64), (p,))
    return np.where(np.isfinite(var), 1.0 / var, 0.0)


def information_content(model, labels, snr=None, ivar=None, s2=None, label_names=None,
                        pixels=None):
    """Fisher information, Cramér–Rao bounds and per-pixel contributions of one spectrum.

    Parameters
    ----------
    model : forward model or callable
        ``predict_with_jacobian`` (batched), or ``labels (L,) -> flux (P,)``.
    labels : array_like, (L,)
        The star.
    snr : float or array_like (P,), optional
        Continuum S/N per pixel (noise ``1/snr`` on normalized flux).
    ivar : array_like, (P,), optional
        Inverse variances instead of ``snr`` (0 = masked pixel).
    s2 : array_like, (P,), optional
        Model variance added to the noise (default: the model's ``s2`` if it has one,
        e.g. the emulation error; pass 0 for the ideal-model bound).
    label_names : sequence of str, optional
        Default: the model's.
    pixels : array_like of bool, (P,), optional
        Use only these pixels.

    Returns
    -------
    InformationContent
    """
    labels = np.asarray(labels, np.float64).ravel()
    flux, jac = model_jacobian(model, labels)
    if s2 is None:
        s2 = getattr(model, "s2", None)
    w = _noise_weights(flux, snr, ivar, s2)
    if pixels is not None:
        w = np.where(np.asarray(pixels, bool), w, 0.0)
    jac = np.where(np.isfinite(jac), jac, 0.0)
    fisher = jac.T @ (w[:, None] * jac)  # (L, L)
    names = list(label_names if label_names is not None
                 else getattr(model, "label_names", None)
                 or [f"label{j}" for j in range(labels.size)])
    if len(names) != labels.size:
        raise ValueError(f"{len(names)} label names for {labels.size} labels")
    try:
        cov = np.linalg.inv(fisher)
        if not np.all(np.isfinite(cov)) or np.any(np.diag(cov) <= 0):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        cov = np.full_like(fisher, np.nan)
    gain = jac @ cov  # (P, L): (C J^T)^T
    contrib = w[:, None] * gain ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        share = contrib / contrib.sum(axis=0, keepdims=True)
        fixed = 1.0 / np.sqrt(np.diag(fisher))
    return InformationContent(
        label_names=names, labels=labels, fisher=fisher, covariance=cov,
        crb=np.sqrt(np.diag(cov)), crb_fixed=fixed, share=share,
        pixel_information=w[:, None] * jac ** 2, jacobian=jac, weights=w)


def bound_vs_snr(model, labels, snrs, s2=0.0, **kwargs):
    """Cramér–Rao bounds of every label at several continuum S/N.

    Parameters
    ----------
    model, labels
        As for :func:`information_content`.
    snrs : array_like, (K,)
    s2 : float or array_like (P,)
        Model variance (0: a perfect model, the bound scales as 1/S/N).
    **kwargs
        Passed on (``pixels``, ``label_names``).

    Returns
    -------
    ndarray, (K, L)
    """
    labels = np.asarray(labels, np.float64).ravel()
    flux, jac = model_jacobian(model, labels)

    class _Fixed:  # differentiate once, not once per S/N
        label_names = kwargs.pop("label_names", getattr(model, "label_names", None))

        @staticmethod
        def predict_with_jacobian(_):
            return flux[None], jac[None]

    names = _Fixed.label_names
    return np.array([information_content(_Fixed, labels, snr=s, s2=s2, label_names=names,
                                         **kwargs).crb for s in np.atleast_1d(snrs)])
