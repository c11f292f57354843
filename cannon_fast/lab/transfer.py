"""Labels carried from one survey to another through the stars they share.

The slides' data-driven step (``003_...txt``: APOGEE labels on LAMOST and DESI
spectra): a model trained on the spectra of the overlap, with the reference
survey's labels, labels every spectrum of the other survey. Repeat
observations of a star give an empirical precision: the difference of two
visits' labels over the errors stated for them (a "pull") has unit width when
the errors are right.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..instruments import crossmatch_sets

__all__ = ["TransferResult", "transfer_labels", "repeat_pulls"]


@dataclass
class TransferResult:
    """Labels of every spectrum of a survey, carried over from a reference catalogue.

    Attributes
    ----------
    label_names : tuple of str
    labels, errors : dict
        Method (``"cannon"``, ``"nn"``) -> (N, L) labels and 1-sigma errors of every spectrum.
    ok : dict
        Method -> (N,) bool: usable results (the Cannon's unflagged fits).
    reference : ndarray, (N, L)
        The reference catalogue's labels of each spectrum's star (NaN when not in it).
    train_rows : ndarray of int64
        Spectra the models were trained on (one per star of the overlap's training part).
    applied_rows : ndarray of int64
        Spectra of stars not trained on.
    match : CrossMatch
        Reference catalogue (A) against the spectra (B), every repeat kept.
    pulls : dict
        Method -> :func:`repeat_pulls` over the stars not trained on with more than one
        spectrum.
    timings : dict
    """

    label_names: tuple
    labels: dict
    errors: dict
    ok: dict
    reference: np.ndarray
    train_rows: np.ndarray
    applied_rows: np.ndarray
    match: object
    pulls: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def repeat_pulls(keys, labels, errors, ok=None):
    """Differences of repeat observations over their stated errors, per label.

    For each star with two or more spectra, the first two usable ones give
    ``(l1 - l2) / sqrt(e1**2 + e2**2)``: unit standard deviation when the
    stated errors are right and the visits independent.

    Parameters
    ----------
    keys : array_like, (N,)
        Star of each spectrum.
    labels, errors : array_like, (N, L)
    ok : array_like of bool, (N,), optional

    Returns
    -------
    dict
        ``n_pairs``; ``std`` and ``robust_std`` (1.4826 MAD) of the pulls per label;
        ``rms_difference`` (label units, per label) and ``median_error``.
    """
    keys = np.asarray(keys)
    labels = np.atleast_2d(np.asarray(labels, float))
    errors = np.atleast_2d(np.asarray(errors, float))
    use = np.all(np.isfinite(labels) & np.isfinite(errors), axis=1)
    if ok is not None:
        use &= np.asarray(ok, bool)
    first, second = {}, {}
    for i in np.flatnonzero(use):
        k = keys[i].item() if hasattr(keys[i], "item") else keys[i]
        if k not in first:
            first[k] = i
        elif k not in second:
            second[k] = i
    a = np.array([first[k] for k in second], np.int64)
    b = np.array([second[k] for k in second], np.int64)
    n_l = labels.shape[1]
    if a.size < 2:
        nan = [float("nan")] * n_l
        return dict(n_pairs=int(a.size), std=nan, robust_std=nan, rms_difference=nan,
                    median_error=nan)
    d = labels[a] - labels[b]
    s = np.sqrt(errors[a] ** 2 + errors[b] ** 2)
    p = d / s
    mad = np.median(np.abs(p - np.median(p, 0)), 0)
    return dict(n_pairs=int(a.size), std=np.std(p, 0).tolist(), robust_std=(1.4826 * mad).tolist(),
                rms_difference=np.sqrt(np.mean(d ** 2, 0)).tolist(),
                median_error=np.median(np.concatenate([errors[a], errors[b]]), 0).tolist())


def transfer_labels(ref_keys, ref_labels, spectra, spectra_keys, label_names, *,
                    ref_errors=None, train_fraction=0.5, seed=0, cannon_order=2, debias=True,
                    nn=False, nn_options=None, nn_training=None, backend="auto",
                    names=("reference", "spectra"), log=None, band_limit=False):
    """Train on the overlap's spectra with the reference labels; label every spectrum.

    Parameters
    ----------
    ref_keys : array_like, (M,)
        Star keys of the reference catalogue (e.g. APOGEE_ID).
    ref_labels : array_like, (M, L)
        Its labels (NaN where missing: such stars are not trained on).
    spectra : cannon_fast.instruments.Spectra
        Normalized spectra of the other survey (repeat visits allowed).
    spectra_keys : array_like, (N,)
        The reference star key of each spectrum (e.g. its APOGEE_ID column).
    label_names : sequence of str
    ref_errors : array_like, (M, L), optional
        1-sigma errors of ``ref_labels``: both models are trained for the true
        labels rather than the noisy ones (the Cannon's errors-in-variables
        training, the regressor's added label variance).
    train_fraction : float
        Share of the overlap's stars trained on (seeded); the rest, and the
        stars not in the reference, are labeled as new stars.
    seed : int
    cannon_order : int
    debias : bool
        The Cannon's de-biased fit, whose errors include the model's own training
        error, or the plain chi² fit (noise only). Repeat visits share the
        training error, so only the plain errors are what their scatter measures.
    nn : bool
        Also train the regressor (StarNet by default; needs torch).
    nn_options, nn_training : dict, optional
        Architecture and training of :class:`~cannon_fast.nn.SpectrumRegressor`.
    backend : str
    names : (str, str)
        The two sets' names in messages.
    log : callable, optional
    band_limit : bool
        Train the Cannon with theta band-limited to the LSF
        (``CannonModel.train(band_limit=True)``); needs the spectra's grid to
        have its resolving power.

    Returns
    -------
    TransferResult
    """
    from ..core.model import CannonModel

    log = log or (lambda m: None)
    names_l = tuple(label_names)
    ref_labels = np.atleast_2d(np.asarray(ref_labels, float))
    cm = crossmatch_sets(ref_keys, spectra_keys, duplicates="all", names=names)
    n = len(spectra)
    reference = np.full((n, len(names_l)), np.nan)
    reference[cm.rows_b] = ref_labels[cm.rows_a]
    ref_err = None
    if ref_errors is not None:
        ref_err = np.full((n, len(names_l)), np.nan)
        ref_err[cm.rows_b] = np.atleast_2d(np.asarray(ref_errors, float))[cm.rows_a]
    # one spectrum per star for training (the first), and whole stars on either side
    stars = np.unique(cm.rows_a)
    stars = stars[np.all(np.isfinite(ref_labels[stars]), axis=1)]
    rng = np.random.default_rng(seed)
    train_stars = set(rng.permutation(stars)[:int(round(train_fraction * len(stars)))].tolist())
    train_rows, seen = [], set()
    for a, b in zip(cm.rows_a.tolist(), cm.rows_b.tolist()):
        if a in train_stars and a not in seen:
            train_rows.append(b)
            seen.add(a)
    train_rows = np.sort(np.asarray(train_rows, np.int64))
    star_of = np.full(n, -1, np.int64)
    star_of[cm.rows_b] = cm.rows_a
    applied = np.flatnonzero(~np.isin(star_of, list(train_stars)))
    if len(train_rows) < 2 * len(names_l) + 2:
        raise ValueError(f"only {len(train_rows)} stars of {names[1]} with {names[0]} labels to "
                         "train on")
    log(f"{len(train_rows)} stars trained on; {len(applied)} spectra labeled as new")
    out = TransferResult(names_l, {}, {}, {}, reference, train_rows, applied, cm)
    t0 = time.perf_counter()
    model = CannonModel(list(names_l), order=cannon_order, grid=spectra.grid, backend=backend)
    model.train(spectra.flux[train_rows], spectra.ivar[train_rows], reference[train_rows],
                label_errors=None if ref_err is None else ref_err[train_rows],
                band_limit=band_limit)
    out.timings["cannon_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = model.fit(spectra.flux, spectra.ivar, debias=debias)
    out.timings["cannon_fit"] = time.perf_counter() - t0
    out.labels["cannon"], out.errors["cannon"], out.ok["cannon"] = res.labels, res.errors, res.ok
    if nn:
        from ..nn import STARNET_TRAINING, SpectrumRegressor
        reg = SpectrumRegressor(list(names_l), seed=seed, **(nn_options or {}))
        t0 = time.perf_counter()
        reg.train(spectra.flux[train_rows], reference[train_rows], spectra.ivar[train_rows],
                  label_errors=None if ref_err is None else ref_err[train_rows],
                  **dict(STARNET_TRAINING, progress=False, **(nn_training or {})))
        out.timings["nn_train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = reg.predict(spectra.flux, spectra.ivar)
        out.timings["nn_predict"] = time.perf_counter() - t0
        out.labels["nn"], out.errors["nn"] = pred.labels, pred.errors
        out.ok["nn"] = (pred.flags & pred.FLAGS["NO_RESULT"]) == 0
    # stars trained on are left out: a fit to its own training spectrum is pulled to the
    # training label, so that visit is not independent of the model
    new_star = np.zeros(n, bool)
    new_star[applied] = True
    for method in out.labels:
        out.pulls[method] = repeat_pulls(star_of, out.labels[method], out.errors[method],
                                         out.ok[method] & (star_of >= 0) & new_star)
    return out
