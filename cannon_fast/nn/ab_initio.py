"""The Payne on ab initio spectra: a label design, spectra from a model, an emulator of them.

The Payne (Ting et al. 2019) interpolates a grid of model spectra computed at
O(1000) label sets. Which label sets matters more than how many: a
low-discrepancy (Sobol) sequence fills the box evenly at every sample size
(its gaps shrink as ~1/N, a random draw's as ~1/sqrt(N) and its largest holes
are where the interpolation fails), and it keeps every one-dimensional
projection even, unlike a regular grid whose 3 labels at 13 points take 2,197
spectra to resolve each label on only 13 values. A Latin hypercube
(``method="lhs"``) is the other choice with even projections. ``accept`` drops
design points where the model itself is not defined (e.g. the corner of an
ab initio grid without computed spectra).

References
----------
Ting, Y.-S., Conroy, C., Rix, H.-W. & Cargile, P. 2019, ApJ 879, 69 (The Payne, sect. 2.2).
Sobol', I. M. 1967, USSR Comput. Math. & Math. Phys. 7, 86.
"""
from __future__ import annotations

import numpy as np

from .emulator import train_emulator

__all__ = ["label_design", "model_spectra", "train_on_model", "emulation_errors",
           "degrade_spectra", "train_on_spectra"]


def label_design(bounds, n, method="sobol", seed=0, accept=None):
    """Label sets filling a box: Sobol, Latin hypercube or uniform random.

    Parameters
    ----------
    bounds : array_like, (L, 2)
        Lower and upper value of each label.
    n : int
        Label sets wanted (after ``accept``).
    method : {"sobol", "lhs", "random"}
    seed : int
        Scrambling seed.
    accept : callable, optional
        ``labels (M, L) -> bool (M,)``: keep only these.

    Returns
    -------
    ndarray, (n, L)
    """
    from scipy.stats import qmc

    bounds = np.asarray(bounds, np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or np.any(bounds[:, 1] <= bounds[:, 0]):
        raise ValueError(f"bounds must be (L, 2) with lower < upper, got {bounds.tolist()}")
    n_lab = bounds.shape[0]
    if method == "sobol":
        sampler = qmc.Sobol(n_lab, scramble=True, seed=seed)
    elif method == "lhs":
        sampler = qmc.LatinHypercube(n_lab, seed=seed)
    elif method == "random":
        sampler = None
        rng = np.random.default_rng(seed)
    else:
        raise ValueError(f"method must be 'sobol', 'lhs' or 'random', got {method!r}")
    out, kept = [], 0
    for attempt in range(64):
        m = (n - kept) * (1 if attempt == 0 else 2)  # one draw of n keeps an LHS's strata
        if method == "sobol":
            m = int(2 ** np.ceil(np.log2(max(m, 2))))  # Sobol is balanced in powers of 2
        u = sampler.random(m) if sampler is not None else rng.random((m, n_lab))
        lab = bounds[:, 0] + u * (bounds[:, 1] - bounds[:, 0])
        if accept is not None:
            lab = lab[np.asarray(accept(lab), bool)]
        out.append(lab)
        kept += len(lab)
        if kept >= n:
            break
    else:
        raise ValueError("accept() keeps too few of the design's points")
    return np.vstack(out)[:n]


def model_spectra(model, labels, batch_size=512):
    """A forward model's spectra (``model.predict`` or a callable), in batches: (N, P)."""
    predict = model.predict if hasattr(model, "predict") else model
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    return np.vstack([np.atleast_2d(predict(labels[i:i + batch_size]))
                      for i in range(0, len(labels), batch_size)])


def train_on_model(model, n_spectra, bounds=None, method="sobol", accept=None, seed=0,
                   noise=1e-3, activation="silu", hidden=(300, 300), grid=None, **kwargs):
    """Train The Payne's MLP on a model's spectra at a label design.

    Parameters
    ----------
    model : forward model or callable
        ``predict(labels (N, L)) -> (N, P)`` (e.g. an ab initio grid on an
        instrument's pixels), with ``label_names`` and ``label_bounds``
        (when ``bounds`` is not given).
    n_spectra : int
        Training spectra (a seeded fifth of them is held out for early stopping).
    bounds : array_like, (L, 2), optional
        The box (default ``model.label_bounds``); it becomes the emulator's
        training box, and fits stay inside it.
    method, accept, seed
        The design (:func:`label_design`).
    noise : float
        Flux error assigned to the noise-free spectra: the loss is then the mean
        squared error in units of it (a scale for the early stopping).
    activation, hidden
        The network (smooth activations follow model spectra better).
    grid : PixelGrid, optional
        The model's pixels (default ``model.grid``), kept with the emulator.
    **kwargs
        Passed to :func:`train_emulator` (``epochs``, ``learning_rate``, ...).

    Returns
    -------
    PayneEmulator
        ``history["design"]`` holds the label sets.
    """
    names = list(getattr(model, "label_names"))
    bounds = np.asarray(bounds if bounds is not None else model.label_bounds, np.float64)
    labels = label_design(bounds, n_spectra, method=method, seed=seed, accept=accept)
    flux = model_spectra(model, labels)
    if not np.all(np.isfinite(flux)):
        raise ValueError("the model returned non-finite flux inside the design's box")
    ivar = np.full_like(flux, 1.0 / noise ** 2)
    emu = train_emulator(flux, ivar, labels, names, activation=activation, hidden=hidden,
                         grid=grid if grid is not None else getattr(model, "grid", None),
                         box=bounds, extrapolate=0.0, seed=seed, **kwargs)
    emu.s2 = np.zeros(emu.n_pixels)  # the held-out noise is fictitious: keep no s2 from it
    emu.history["design"] = labels
    emu.history["design_method"] = method
    return emu


def emulation_errors(emulator, model, labels):
    """Emulator minus model on label sets (held out): median, mean and 99th percentile |error|.

    Returns
    -------
    dict
        ``median``, ``mae``, ``p99``, ``max`` over all pixels and spectra, and
        ``per_spectrum_mae`` (N,).
    """
    return _error_summary(model_spectra(emulator, labels) - model_spectra(model, labels))


def _error_summary(diff):
    """|emulator - truth| (N, P): median, mae, p99, max and per_spectrum_mae."""
    err = np.abs(diff)
    return dict(median=float(np.median(err)), mae=float(err.mean()),
                p99=float(np.percentile(err, 99)), max=float(err.max()),
                per_spectrum_mae=err.mean(axis=1))


def degrade_spectra(wavelength, flux, grid, resolution=None, batch_size=256):
    """Model spectra at high resolution taken to an instrument: its LSF, then its pixels.

    Parameters
    ----------
    wavelength : array_like, (W,)
        The model's wavelengths, increasing, in the frame of ``grid`` (vacuum
        for APOGEE).
    flux : array_like, (N, W)
        Continuum-normalized model spectra.
    grid : PixelGrid
        The instrument's pixels.
    resolution : float or array_like (P,), optional
        Resolving power of a Gaussian LSF; by default the grid's.

    Returns
    -------
    ndarray, (N, P)
    """
    from ..core.broadening import lsf_matrix

    res = grid.resolution if resolution is None else resolution
    if res is None:
        raise ValueError(f"the grid {grid!r} has no resolution; give one")
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    wavelength = np.asarray(wavelength, np.float64)
    if flux.shape[1] != wavelength.size:
        raise ValueError(f"the model spectra have {flux.shape[1]} pixels but "
                         f"{wavelength.size} wavelengths")
    if np.any(np.diff(wavelength) <= 0):
        raise ValueError("the model wavelengths must increase")
    lsf = lsf_matrix(wavelength, grid.wavelength, res)  # (P, W), sparse
    out = np.empty((flux.shape[0], grid.n_pixels))
    for i in range(0, flux.shape[0], batch_size):  # (N, W) @ (W, P) a batch at a time
        out[i:i + batch_size] = (lsf @ flux[i:i + batch_size].T).T
    return out


def train_on_spectra(flux, labels, label_names, grid, holdout=0.1, seed=0, noise=1e-3,
                     activation="silu", hidden=(300, 300), **kwargs):
    """The Payne from a set of model spectra already on the instrument's grid.

    The counterpart of :func:`train_on_model` for spectra computed at fixed label
    sets (a synthetic grid from a radiative-transfer code), after
    :func:`degrade_spectra`. A seeded ``holdout`` fraction is never trained on:
    the emulation errors on it say how well the emulator interpolates.

    Parameters
    ----------
    flux : array_like, (N, P)
        Noise-free normalized spectra.
    labels : array_like, (N, L)
    label_names : sequence of str
    grid : PixelGrid
    holdout : float
        Fraction held out (0 for none).
    seed : int
    noise, activation, hidden, **kwargs
        As for :func:`train_on_model`.

    Returns
    -------
    emulator : PayneEmulator
        Its box is the labels' range; ``history["holdout"]`` holds the held-out rows.
    errors : dict or None
        :func:`emulation_errors`' figures on the held-out spectra, and ``n`` of them.
    """
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    if labels.shape != (flux.shape[0], len(label_names)):
        raise ValueError(f"labels have shape {labels.shape}; expected ({flux.shape[0]}, "
                         f"{len(label_names)}) for {list(label_names)}")
    bad = ~np.all(np.isfinite(flux), axis=1) | ~np.all(np.isfinite(labels), axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} model spectra have non-finite flux or labels, the "
                         f"first row {int(np.flatnonzero(bad)[0])}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    order = np.random.default_rng(seed).permutation(flux.shape[0])
    n_out = int(round(holdout * flux.shape[0]))
    out, train = np.sort(order[:n_out]), np.sort(order[n_out:])
    box = np.column_stack([labels[train].min(axis=0), labels[train].max(axis=0)])
    emu = train_emulator(flux[train], np.full((len(train), flux.shape[1]), 1.0 / noise ** 2),
                         labels[train], list(label_names), activation=activation,
                         hidden=hidden, grid=grid, box=box, extrapolate=0.0, seed=seed,
                         **kwargs)
    emu.s2 = np.zeros(emu.n_pixels)  # noise-free spectra: no model scatter to keep
    emu.history["holdout"] = out
    errors = None
    if n_out:
        errors = dict(n=n_out, **_error_summary(emu.predict(labels[out]) - flux[out]))
    return emu, errors
