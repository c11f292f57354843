"""Fast fits with The Payne's MLP: chi² as a quadratic form in a low-rank output.

The emulator's last layer is linear: ``flux = W a(x) + b`` with ``a`` the last
hidden activations (H) and ``W`` (P, H). For labels in the training box the
activations stay close to a k-dimensional subspace, ``a ~ m + A z`` (their
principal directions, k chosen so that the spectra are reproduced to ``rtol``:
a few labels span few directions), so ``flux ~ b' + B z`` with ``B = W A``
(P, k), ``b' = b + W m``, and

    chi²(x) = c - 2 h.z + z^T M z,   c = sum w (f - b')², h = B^T W (f - b'),
    M = B^T diag(w) B,

so after one pass over the pixels per star (one BLAS product over a batch for
``M``), every Levenberg–Marquardt step costs O(k² + H²) instead of O(P H): the
same idea as the Cannon's fast fit (``cannon_fast.core.fitting.fit_cannon``).
Many starting points are then almost free.
"""
from __future__ import annotations

import numpy as np

from .._util import progress
from ..core import fitting as _fitting
from ..core.model import fitted_pixels
from ._activations import _activate, _activation_slope

__all__ = ["fit_emulator", "output_basis"]


def output_basis(emulator, rtol=1e-4, max_rank=80, n_probe=2000, seed=0):
    """The last hidden layer's activations in a few principal directions, and the output there.

    The activations ``a`` (H) of labels in the training box lie close to a
    k-dimensional affine subspace ``a ~ m + A z`` (the output layer's weights
    themselves are not of low rank: training leaves their unused directions
    as initialized). The spectrum is then ``b' + B z`` with ``B = W A`` (P, k)
    and ``b' = b + W m``. ``k`` is the smallest rank that reproduces the
    emulator's spectra to ``rtol`` (max absolute flux difference) at its
    training labels and ``n_probe`` random labels in its box, at most ``max_rank``.

    Returns
    -------
    basis : ndarray, (P, k)
        ``B``.
    offset : ndarray, (P,)
        ``b'``.
    directions : ndarray, (H, k)
        ``A`` (orthonormal columns).
    mean : ndarray, (H,)
        ``m``.
    k : int
    error : float
        Largest flux difference at the probe labels.
    """
    x_train, _ = emulator._scaled(emulator.training_labels[:n_probe])
    rng = np.random.default_rng(seed)
    x = np.vstack([x_train, rng.uniform(-0.5, 0.5, (n_probe, emulator.n_labels))])
    _, pre = emulator._forward(x, keep=True)
    a = _activate(emulator.activation, pre[-1], emulator.negative_slope)  # (N, H)
    w_out = emulator.weights[-1]  # (P, H)
    mean = a.mean(axis=0)
    _, _, vt = np.linalg.svd(a - mean, full_matrices=False)
    full = (a - mean) @ w_out.T

    def error(k):
        z = (a - mean) @ vt[:k].T
        return float(np.max(np.abs(z @ (w_out @ vt[:k].T).T - full)))

    lo, hi = 1, min(int(max_rank), vt.shape[0])
    if error(hi) <= rtol:  # bisect the smallest rank within rtol
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if error(mid) <= rtol else (mid + 1, hi)
    k = hi
    directions = vt[:k].T  # (H, k)
    return (w_out @ directions, emulator.biases[-1] + w_out @ mean, directions, mean, k,
            error(k))


def _hidden(emulator, x):
    """Last hidden activations (N, H) and their Jacobian in scaled labels (N, H, L)."""
    a = x
    g = np.broadcast_to(np.eye(x.shape[1]), (x.shape[0],) + (x.shape[1],) * 2)
    for w, b in zip(emulator.weights[:-1], emulator.biases[:-1]):
        h = a @ w.T + b
        g = np.matmul(w, g)  # (N, H, L)
        slope = _activation_slope(emulator.activation, h, emulator.negative_slope)
        g = slope[:, :, None] * g
        a = _activate(emulator.activation, h, emulator.negative_slope)
    return a, g


def fit_emulator(emulator, flux, ivar, rtol=3e-4, max_rank=80, n_starts=2, n_candidates=512,
                 batch_size=256, max_iter=100, xtol=1e-7, ftol=1e-10, progress_bar=None):
    """Fit labels with a Payne MLP from the moments of chi² (see the module).

    Parameters
    ----------
    emulator : PayneEmulator
    flux, ivar : array_like, (N, P)
    rtol, max_rank : float, int
        Flux accuracy of the low-rank output layer (the rank is chosen for it, up
        to ``max_rank``; see :func:`output_basis`). The default is below the
        emulation error of a Payne trained on O(1000) spectra (~1e-3), so the
        approximation moves the labels far less than their errors; the cost goes
        as the rank squared.
    n_starts, n_candidates : int
        chi² is evaluated at the box's centre and ``n_candidates`` training
        labels (k² operations each); the ``n_starts`` best are polished.
    batch_size, max_iter, xtol, ftol, progress_bar
        As for ``fit_generic``.

    Returns
    -------
    FitResult
        As ``fit_generic``'s (errors from the Gauss–Newton normal matrix); the
        rank and its accuracy are in ``emulator.history["fast_fit_rank"]``.
    """
    # the basis is the emulator's, not the spectra's: computed once per emulator and setting
    key = (float(rtol), int(max_rank))
    cache = emulator.__dict__.setdefault("_fast_fit_basis", {})
    if key not in cache:
        cache.clear()  # one setting kept: the weights could have changed since
        cache[key] = output_basis(emulator, rtol=rtol, max_rank=max_rank)
    u, bias, directions, mean, k, err = cache[key]
    emulator.history["fast_fit_rank"] = (k, err)
    n_pix = emulator.n_pixels
    flux, ivar = _fitting._check_fit_input(flux, ivar, n_pix)
    s2 = np.zeros(n_pix) if emulator.s2 is None else emulator.s2
    usable = fitted_pixels(emulator, n_pix)
    n_lab = emulator.n_labels
    span = emulator.x_max - emulator.x_min
    lo = (emulator.label_bounds[:, 0] - emulator.x_min) / span - 0.5
    hi = (emulator.label_bounds[:, 1] - emulator.x_min) / span - 0.5
    # candidate starts: chi² at many labels costs k² each once M is known; the best
    # few are polished by Levenberg-Marquardt
    rng = np.random.default_rng(0)
    xtr, _ = emulator._scaled(emulator.training_labels)
    if len(xtr) > n_candidates:
        xtr = xtr[rng.choice(len(xtr), n_candidates, replace=False)]
    cand = np.clip(np.vstack([np.zeros((1, n_lab)), xtr]), lo, hi)  # (C, L)
    a_c, _ = _hidden(emulator, cand)
    z_c = (a_c - mean) @ directions  # (C, k)
    iu, ju = np.triu_indices(k)  # M is symmetric: its k (k + 1) / 2 distinct entries only
    uu = u[:, iu] * u[:, ju]  # (P, k (k + 1) / 2)
    parts = []
    for b0 in progress(range(0, flux.shape[0], batch_size), desc="fitting labels", unit="batch",
                       disable=None if progress_bar is None else not progress_bar):
        f, w, valid = _fitting._batch_weights(flux[b0:b0 + batch_size],
                                              ivar[b0:b0 + batch_size], s2, usable)
        n = len(f)
        r0 = np.where(valid, f - bias, 0.0)
        c = np.einsum("np,np,np->n", r0, w, r0)
        h = (w * r0) @ u  # (N, k)
        m = np.empty((n, k, k))
        m[:, iu, ju] = m[:, ju, iu] = w @ uu  # one BLAS product for the batch

        def normal_equations(rows, x, c=c, h=h, m=m):
            a, g = _hidden(emulator, x)
            z = (a - mean) @ directions  # (n, k)
            dz = np.matmul(directions.T, g)  # (n, k, L)
            mz = np.einsum("nij,nj->ni", m[rows], z)
            chi2 = c[rows] - 2 * np.einsum("ni,ni->n", h[rows], z) + np.einsum("ni,ni->n", z, mz)
            mdz = np.matmul(m[rows], dz)
            norm = np.matmul(np.swapaxes(dz, 1, 2), mdz)
            grad = np.einsum("nkl,nk->nl", dz, h[rows] - mz)
            return np.maximum(chi2, 0.0), norm, grad

        mz_c = np.matmul(m, z_c.T)  # (n, k, C), batched BLAS
        chi_c = c[:, None] - 2 * h @ z_c.T + np.einsum("nkc,ck->nc", mz_c, z_c)
        order = np.argsort(chi_c, axis=1)[:, :n_starts]  # (n, S)
        best = None
        for s_idx in range(order.shape[1]):
            x = cand[order[:, s_idx]].copy()
            out = _fitting._lm_batched(x, normal_equations, lo, hi, max_iter, xtol, ftol)
            if best is None:
                best = list(out)
                continue
            better = out[1] < best[1]
            for i in (0, 1, 2, 4):
                best[i][better] = out[i][better]
            best[3] = best[3] + out[3]
        x, chi, norm, iters, done = best
        n_good = valid.sum(axis=1)
        cov = _fitting._inverse(norm) * span[None, :, None] * span[None, None, :]
        labels = (x + 0.5) * span + emulator.x_min
        flags = np.where(done, 0, _fitting.FLAGS["NOT_CONVERGED"])
        at_bound = np.any(np.isclose(x, lo) | np.isclose(x, hi), axis=1)
        flags[at_bound] |= _fitting.FLAGS["HIT_BOUND"]
        few = n_good < _fitting.min_good_pixels(n_lab, n_pix)
        flags[few] |= _fitting.FLAGS["TOO_FEW_PIXELS"]
        labels[few] = np.nan
        if (~few).any():
            flags[~few] |= np.where(emulator.outside_training(labels[~few]),
                                    _fitting.FLAGS["OUTSIDE_TRAINING"], 0)
        parts.append(_fitting.FitResult(
            labels=labels, errors=np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), covariance=cov,
            chi2=chi, reduced_chi2=chi / np.maximum(n_good - n_lab, 1), n_pixels=n_good,
            iterations=iters, flags=flags, label_names=list(emulator.label_names),
            debiased=False))
    return _fitting.mark_poor_fit(emulator, _fitting.FitResult.concatenate(parts))
