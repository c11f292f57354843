"""The modeling lab end to end: survey -> cuts -> normalization -> model -> validation -> report.

:func:`run_lab` is what ``cannon-fast demo`` runs. With no data it generates (or
reuses) the embedded synthetic survey (:func:`cannon_fast.demo.datasets.demo_survey`);
with ``data_dir`` it reads downloaded files in the SDSS archive layout. Both go
through the same code: :func:`cannon_fast.apogee.prepare.prepare_dataset` (cross-match,
the lab's cuts, PIXMASK masking, per-chip pseudo-continuum), a seeded random
half/half split, a 5-label quadratic :class:`~cannon_fast.core.model.CannonModel`,
label fits of the validation half (de-biased and plain), and a report folder
(:mod:`cannon_fast.lab.report`) with every figure, ``summary.json`` and the model.

Optional steps owned by other modules (MCMC on a held-back "mystery" star,
movies, binaries, the neural-network comparison) are called through small
guarded functions: when a module is absent or fails, the report says so and the
rest of the lab is unaffected.

Inside, :func:`run_lab` checks every option before any work (``_new_context``)
and runs one private function per step, ``_step_data`` to ``_step_outputs``,
over a shared ``_LabContext``: each step reads what the earlier ones left there
and adds its own results, and ``_summary`` assembles ``summary.json`` from them.
"""
from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import shutil
import time
import traceback

import numpy as np

from .._util import atomic_path, key_rows, progress
from . import report as _report
from .fit_steps import FIT_STEP_NAMES, FIT_STEPS, fit_step_title

__all__ = ["LAB_LABELS", "TARGETS", "run_lab", "label_statistics", "diagnose_outliers",
           "read_summary", "cv_scatter", "REPORT_FILES"]

#: The five labels of the lab's model.
LAB_LABELS = ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE")
#: The lab's targets against the true labels: (max |bias|, max scatter) per label.
TARGETS = {"TEFF": (5.0, 30.0), "FE_H": (0.005, 0.02)}
#: Files of a report folder that ``force=True`` may replace (besides the figures).
REPORT_FILES = ("report.html", "summary.json", "model.fits", "validation_labels.fits",
                "movie_feh.gif", "movie_feh.mp4", "movie_rgb.gif", "movie_rgb.mp4")
_WORK_DIR = ".work"
#: Fit flags that point at a problem with a star's fit (others are informational).
_TROUBLE_FLAGS = ("NOT_CONVERGED", "HIT_BOUND", "STARTS_DISAGREE", "TOO_FEW_PIXELS", "FAILED")


# --------------------------------------------------------------------------- statistics
def label_statistics(fitted, reference, label_names, good=None):
    """Bias and scatter of fitted minus reference labels, per label (JSON-friendly).

    Parameters
    ----------
    fitted, reference : array_like, (N, L)
    label_names : sequence of str
    good : array_like of bool, (N,), optional
        Stars to use (default: all with finite values).

    Returns
    -------
    dict
        ``{name: {"bias", "scatter", "mad_scatter", "rms", "n"}}``; scatter is the
        standard deviation, mad_scatter 1.4826 x the median absolute deviation.
    """
    from .plots.lab import bias_scatter

    fitted = np.atleast_2d(np.asarray(fitted, float))
    reference = np.atleast_2d(np.asarray(reference, float))
    if good is not None:
        fitted, reference = fitted[np.asarray(good, bool)], reference[np.asarray(good, bool)]
    bias, std, rms, mad = bias_scatter(fitted, reference)
    n = np.sum(np.isfinite(fitted - reference), axis=0)
    return {name: dict(bias=_num(bias[j]), scatter=_num(std[j]), mad_scatter=_num(mad[j]),
                       rms=_num(rms[j]), n=int(n[j])) for j, name in enumerate(label_names)}


#: Candidate models of ``run_lab(extra_terms="auto")``: the lab's quadratic; the
#: quadratic with two more powers of Teff (line strengths go roughly as exp(-chi/kT),
#: which a quadratic follows poorly at the hot and cool edges of a giant sample); and
#: that with [Fe/H]^3 as well (a line's depth flattens with abundance as it saturates,
#: the curve of growth, which a quadratic follows poorly over -1 < [Fe/H] < +0.5); and
#: that as a polynomial in 1/Teff (theta = 5040/Teff, in which the Boltzmann factors
#: exp(-chi theta) of line strengths are simpler). ``CannonModel`` keyword arguments.
AUTO_MODELS = {
    "quadratic": dict(extra_terms=()),
    "quadratic + TEFF^3 + TEFF^4": dict(extra_terms=("TEFF^3", "TEFF^4")),
    "quadratic + TEFF^3 + TEFF^4 + FE_H^3": dict(extra_terms=("TEFF^3", "TEFF^4", "FE_H^3")),
    "quadratic + TEFF^3 + TEFF^4 + FE_H^3, in 1/TEFF": dict(
        extra_terms=("TEFF^3", "TEFF^4", "FE_H^3"), reciprocal_labels=("TEFF",)),
}


def cross_validate(models, flux, ivar, labels, steps=tuple(FIT_STEPS), n_folds=3, seed=0,
                   label_errors=None, heldout=None):
    """Choose a model and a label fit by cross-validation on a training set.

    Each fold is fitted by each model trained on the other folds, with each label
    fit; the scatter of (fit - catalogue label) then compares them, because the
    catalogue's own errors add the same variance to all. The score is the mean over
    labels of log(variance), so every label counts by its relative change.
    De-biasing removes the pull of the model's training noise, but when the
    catalogue labels are noisy (their errors attenuate the model) it can add
    scatter instead: only the data can say which effect wins.

    Parameters
    ----------
    models : dict of str -> callable
        Name -> a function ``(flux, ivar, labels, label_errors)`` returning a
        trained ``CannonModel`` (``label_errors`` is None when not given).
    flux, ivar : ndarray, (N, P)
    labels : ndarray, (N, L)
        The training (catalogue) labels.
    steps : sequence of keys of FIT_STEPS
    n_folds : int
    seed : int
    label_errors : ndarray, (N, L), optional
        The catalogue's label errors, passed on to the models.
    heldout : dict, optional
        Filled with ``(model_name, step) -> (labels, errors)``, each (N, L): every
        training star's held-out fit (NaN where it failed), for error calibration.

    Returns
    -------
    model_name : str
    step : str
    info : dict
        ``scatter`` and ``score`` per ``"model / step"``, and a one-line ``note``.
    """
    n = len(labels)
    folds = np.random.default_rng(seed).permutation(n) % n_folds
    fitted = {(m, st): (np.full(labels.shape, np.nan), np.full(labels.shape, np.nan))
              for m in models for st in steps}
    for k in range(n_folds):
        inner, held = folds != k, folds == k
        for name, train_model in models.items():
            m = train_model(flux[inner], ivar[inner], labels[inner],
                            None if label_errors is None else label_errors[inner])
            for st in steps:
                r = m.fit(flux[held], ivar[held], **FIT_STEPS[st])
                fitted[name, st][0][held] = np.where(r.ok[:, None], r.labels, np.nan)
                fitted[name, st][1][held] = r.errors
    if heldout is not None:
        heldout.update(fitted)
    resid = {key: f[0] - labels for key, f in fitted.items()}
    scatter, score = {}, {}
    for key, r in resid.items():
        sd = np.nanstd(r, axis=0)
        scatter[" / ".join(key)] = sd.tolist()
        score[" / ".join(key)] = float(np.mean(np.log(sd ** 2)))
    best = min(resid, key=lambda key: score[" / ".join(key)])
    ranked = sorted(score, key=score.get)
    note = (f"{n_folds}-fold cross-validation on {n} training stars, scatter against the "
            f"catalogue labels (geometric mean over labels) relative to the best: "
            + ", ".join(f"{k} {np.exp(0.5 * (score[k] - score[ranked[0]])):.3f}"
                        for k in ranked))
    return best[0], best[1], dict(scatter=scatter, score=score, note=note)


def _catalogue_errors(errors, wanted):
    """The catalogue's label errors for training, filled where missing; and a note.

    Returns (None, note) when they are not wanted or there are none to use.
    """
    if wanted is False:
        return None, ""
    errors = np.array(errors, dtype=float)
    usable = np.isfinite(errors) & (errors > 0)
    if not usable.any(axis=0).all():
        missing = [n for n, u in zip(LAB_LABELS, usable.any(axis=0)) if not u]
        if wanted is True:
            raise ValueError(f"label_errors=True but the catalogue has no errors for {missing} "
                             "(<LABEL>_ERR columns)")
        return None, f"Label errors not used: the catalogue has none for {missing}."
    note = ""
    if not usable.all():
        med = np.array([np.median(errors[usable[:, j], j]) for j in range(errors.shape[1])])
        errors = np.where(usable, errors, med)
        note = (f"{int((~usable).any(axis=1).sum())} star(s) without a catalogue error for some "
                "label got that label's median error.")
    return errors, note


def _num(x):
    x = float(x)
    return x if np.isfinite(x) else None


def _targets(stats):
    out, ok_all = {}, True
    for name, (bmax, smax) in TARGETS.items():
        s = stats.get(name)
        if s is None or s["bias"] is None:
            out[name] = dict(bias_max=bmax, scatter_max=smax, met=False)
            ok_all = False
            continue
        met = abs(s["bias"]) <= bmax and s["scatter"] <= smax
        ok_all &= met
        out[name] = dict(bias=s["bias"], scatter=s["scatter"], bias_max=bmax, scatter_max=smax,
                         met=bool(met))
    out["all_met"] = bool(ok_all)
    return out


def _population_breakdown(fitted, true, ok, population, names=("TEFF", "FE_H")):
    """Bias, scatter and share of the total squared error of each true population.

    A population whose share of the squared error is far above its share of the stars
    is where the model fails (a rare kind of star the training set barely covers).
    """
    res = np.asarray(fitted, float) - np.asarray(true, float)
    use = ok & np.all(np.isfinite(res), axis=1)
    cols = [LAB_LABELS.index(n) for n in names]
    rows = []
    for pop in sorted(set(population[use])):
        sel = use & (population == pop)
        share = _share_of_squared_error(res, sel, use)
        row = dict(population=str(pop), n=int(sel.sum()))
        for n, j in zip(names, cols):
            r = res[sel, j]
            row[n] = dict(bias=_num(r.mean()),
                          scatter=_num(r.std(ddof=1)) if len(r) > 1 else None,
                          share_of_squared_error=_num(share[j]))
        rows.append(row)
    return dict(rows=rows, note="fitted - true per true population; share_of_squared_error is "
                                "the population's part of sum((fitted - true)^2)")


def _share_of_squared_error(residuals, part, whole):
    """Per label, the part of sum(residual²) over the stars ``whole`` that ``part`` carries.

    NaN residuals count as 0; a label without error gets NaN.
    """
    d2 = np.asarray(residuals, float) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(d2[part], axis=0) / np.nansum(d2[whole], axis=0)


def _sparse_training_split(fit, catalog, truth=None):
    """Validation statistics without the SPARSE_TRAINING stars, and what those carry."""
    sparse = fit.ok & (fit.flags & fit.FLAGS["SPARSE_TRAINING"] > 0)
    dense = fit.ok & ~sparse
    ref = truth if truth is not None else catalog
    share = _share_of_squared_error(fit.labels - ref, sparse, fit.ok)
    out = dict(n=int(dense.sum()), n_flagged=int(sparse.sum()),
               stats=label_statistics(fit.labels, catalog, LAB_LABELS, good=dense),
               flagged_share_of_squared_error={n: _num(share[j])
                                               for j, n in enumerate(LAB_LABELS)},
               note=f"validation stars without the {int(sparse.sum())} flagged "
                    f"SPARSE_TRAINING (fitted labels where the training set is thin), which "
                    f"carry {100 * share[0]:.0f}% of the squared Teff error against the "
                    f"{'true' if truth is not None else 'catalog'} labels")
    if truth is not None:
        out["vs_true"] = label_statistics(fit.labels, truth, LAB_LABELS, good=dense)
    return out


# --------------------------------------------------------------------------- inputs
def _find_allstar(data_dir):
    hits = sorted(glob.glob(os.path.join(data_dir, "**", "allStar*.fits"), recursive=True))
    if not hits:
        raise FileNotFoundError(f"no allStar*.fits catalogue found under {data_dir} (pass "
                                "allstar= / --allstar)")
    return hits[0]


def _read_truth(path, ids):
    """Read the true labels (N, L) of the stars ``ids`` from a truth.fits (NaN where absent)."""
    import fitsio

    t = fitsio.read(path, ext=1)
    names = t.dtype.names
    tid = np.char.strip(np.asarray(t["APOGEE_ID"]).astype(str))
    index = {}
    for i, s in enumerate(tid):
        index.setdefault(s, i)
    rows = np.array([index.get(str(s).strip(), -1) for s in ids])
    out = np.full((len(ids), len(LAB_LABELS)), np.nan)
    have = rows >= 0
    for j, name in enumerate(LAB_LABELS):
        if name in names:
            out[have, j] = np.asarray(t[name], float)[rows[have]]
    extra = {}
    for col in ("IS_BINARY", "POPULATION", "VMACRO", "FLUX_RATIO_H", "K_REL"):
        if col in names:
            vals = np.asarray(t[col])[np.maximum(rows, 0)]
            missing = np.full_like(vals, np.nan) if vals.dtype.kind == "f" else \
                np.zeros_like(vals)
            extra[col] = np.where(have, vals, missing)
    return out, extra


#: S/N bins of the pull statistics (lower edges inclusive)
SNR_BINS = ((0, 70), (70, 100), (100, 200), (200, np.inf))


def pull_statistics(fit, reference, snr, reference_errors=None, names=LAB_LABELS, select=None):
    """Standard deviation of (fit - reference) / error per label and S/N bin.

    For calibrated fits both the calibrated errors and the formal ones are scored;
    ``reference_errors`` (a catalogue's) are added in quadrature. A well-calibrated
    error gives 1; the issue's band is 0.8-1.25. ``select`` (N,) bool keeps only
    those stars (e.g. the ones the binary screen passes).
    """
    ok = fit.ok & np.isfinite(snr) & (True if select is None else np.asarray(select, bool))
    ref_var = 0.0 if reference_errors is None else np.nan_to_num(reference_errors) ** 2
    kinds = {"calibrated": fit.errors} if fit.formal_errors is not None else {}
    kinds["formal"] = fit.errors if fit.formal_errors is None else fit.formal_errors
    out = {}
    for j, name in enumerate(names):
        out[name] = {}
        for lo, hi in SNR_BINS:
            sel = ok & (snr >= lo) & (snr < hi) & np.isfinite(reference[:, j])
            key = f"{lo:g}-{hi:g}"
            entry = dict(n=int(sel.sum()))
            ref_v = ref_var if np.isscalar(ref_var) else ref_var[:, j]
            with np.errstate(invalid="ignore"):
                pulls = {kind: (fit.labels[:, j] - reference[:, j]) / np.sqrt(
                    err[:, j] ** 2 + ref_v) for kind, err in kinds.items()}
            for kind, pull in pulls.items():
                entry[kind] = _num(np.std(pull[sel])) if sel.sum() >= 5 else None
            # a few catastrophic fits (flagged) can set a bin's std alone: the same
            # without the warned stars, and the robust (MAD) width
            cal = pulls.get("calibrated", pulls["formal"])
            quiet = sel & ~fit.warn
            entry["without_warned"] = _num(np.std(cal[quiet])) if quiet.sum() >= 5 else None
            entry["robust"] = _num(1.4826 * np.median(np.abs(cal[sel] - np.median(
                cal[sel])))) if sel.sum() >= 5 else None
            out[name][key] = entry
    return out


def _allstar_column(allstar, ids, column):
    """One numeric allStar column for the stars ``ids`` (NaN where absent)."""
    import fitsio

    out = np.full(len(ids), np.nan)
    try:
        with fitsio.FITS(allstar) as f:
            if column not in f[1].get_colnames() or "APOGEE_ID" not in f[1].get_colnames():
                return out
            t = f[1].read(columns=["APOGEE_ID", column])
    except OSError:
        return out
    order, lo, hi = key_rows(np.char.strip(np.asarray(t["APOGEE_ID"]).astype(str)),
                             np.char.strip(np.asarray(ids).astype(str)))
    have = hi > lo   # a repeated ID: its first row, as the other allStar readers here
    out[have] = np.asarray(t[column], float)[order[lo[have]]]
    return out


def _catalog_flags(allstar, ids):
    """ASPCAP/STAR flag names per star (empty strings when the columns are absent)."""
    import fitsio

    try:
        with fitsio.FITS(allstar) as f:
            cols = f[1].get_colnames()
            want = [c for c in ("APOGEE_ID", "ASPCAPFLAGS", "STARFLAGS", "EXTRATARG")
                    if c in cols]
            if "APOGEE_ID" not in want:
                return [""] * len(ids)
            t = f[1].read(columns=want)
    except OSError:
        return [""] * len(ids)
    tid = np.char.strip(np.asarray(t["APOGEE_ID"]).astype(str))
    index = {}
    for i, s in enumerate(tid):
        index.setdefault(s, i)
    out = []
    for s in ids:
        i = index.get(str(s).strip(), -1)
        parts = []
        if i >= 0:
            for c in ("ASPCAPFLAGS", "STARFLAGS"):
                if c in t.dtype.names:
                    v = str(np.asarray(t[c][i]).astype(str)).strip()
                    if v:
                        parts.append(v)
        out.append(",".join(p for p in parts if p))
    return out


def _continuum_from_data(paths, allstar, n_max, seed, workers, backend, show):
    """Find continuum pixels from the data (Ness et al. 2015, §5.3) with <= n_max kept stars.

    The stars are drawn from all that pass the cuts (before the train/validation
    split), using their catalog labels; only the pixel selection sees them.
    """
    from ..apogee.catalog import select
    from ..core.continuum import find_continuum_pixels
    from ..apogee.files import match_ids, parse_apstar_path, read_allstar
    from ..core.model import CannonModel
    from ..apogee.prepare import load_spectra

    ids, tels, flds, keep_paths = [], [], [], []
    for p in paths:
        try:
            _, sid, tel, fld = parse_apstar_path(p)
        except ValueError:
            continue
        ids.append(sid)
        tels.append(tel)
        flds.append(fld)
        keep_paths.append(p)
    cat = read_allstar(allstar, labels=LAB_LABELS)
    idx = match_ids(cat, ids, tels, flds)
    found = np.flatnonzero(idx >= 0)
    keep, _ = select(cat[idx[found]], min_remaining=1)
    use = found[keep]
    rng = np.random.default_rng(seed)
    use = np.sort(rng.permutation(use)[:n_max])
    flux, ivar, ok, _ = load_spectra([keep_paths[i] for i in use], workers=workers,
                                     show_progress=show)
    labels = np.column_stack([np.asarray(cat[c], float)[idx[use]] for c in LAB_LABELS])
    mask, history = find_continuum_pixels(flux[ok].astype(np.float64),
                                          ivar[ok].astype(np.float64), labels[ok],
                                          lambda: CannonModel(LAB_LABELS, order=2,
                                                              backend=backend),
                                          backend=backend)
    return mask, dict(method="found from the data (normalize -> train -> select, Ness et al. "
                             "2015 §5.3)", n_stars=int(ok.sum()), history=history)


# --------------------------------------------------------------------------- outliers
def diagnose_outliers(fit, reference, label_names, flux, ivar, model_flux, scatter,
                      continuum_flags=None, catalog_flags=None, truth=None, truth_extra=None,
                      bounds=None, edges=None, n=6, binary_screen=None):
    """Pick the worst cross-validation outliers and say what went wrong with each.

    Parameters
    ----------
    fit : FitResult
        Fits of N validation stars.
    reference : array_like, (N, L)
        Labels they are compared with (the catalog's).
    label_names : sequence of str
    flux, ivar, model_flux : array_like, (N, P)
        Normalized spectra and the model at the fitted labels.
    scatter : array_like, (L,)
        Robust scatter per label; the outlier score is max_l |fit - ref| / scatter.
    continuum_flags : array_like of int, (N,), optional
        :data:`cannon_fast.core.continuum.CONTINUUM_FLAGS` bits.
    catalog_flags : sequence of str, (N,), optional
        ASPCAP/STAR flag names from the catalog.
    truth : array_like, (N, L), optional
        True labels (synthetic surveys).
    truth_extra : dict, optional
        ``IS_BINARY`` per star, from the truth table.
    bounds : array_like, (L, 2), optional
        Training label range.
    edges : array_like, (L, 2), optional
        Inner range of the training labels (e.g. 2.5-97.5 percentiles); stars
        outside it are "at the edge".
    n : int
        How many outliers.
    binary_screen : core.binaries.BinaryScreen, optional
        The screen of the same stars: a flagged star's diagnosis names the companion
        found from the data (not from the truth).

    Returns
    -------
    list of dict
        One per outlier (worst first): ``index``, ``score``, ``worst_label``,
        ``delta``, ``reduced_chi2``, ``fit_flags``, ``bad_pixel_fraction``,
        ``continuum_offset`` (largest per-chip |median data/model - 1|),
        ``continuum_flags``, ``catalog_flags``, ``catalog_minus_true``, ``diagnosis``.
    """
    from ..core.continuum import CONTINUUM_FLAGS
    from ..apogee.files import CHIP_RANGES

    labels = np.asarray(fit.labels, float)
    ref = np.asarray(reference, float)
    scatter = np.where(np.asarray(scatter, float) > 0, scatter, 1.0)
    z = np.abs(labels - ref) / scatter
    score = np.nanmax(np.where(np.isfinite(z), z, -1), axis=1)
    score[~np.isfinite(labels).all(axis=1)] = np.inf
    order = np.argsort(-score, kind="stable")[:n]
    med_rchi = float(np.nanmedian(fit.reduced_chi2))
    on_chip = np.zeros(np.shape(flux)[1], bool)
    for a, b in CHIP_RANGES:
        on_chip[a:b] = True
    out = []
    for i in order:
        i = int(i)
        good = np.asarray(ivar[i]) > 0
        badfrac = 1.0 - float(np.mean(good[on_chip]))
        offsets = []
        for a, b in CHIP_RANGES:
            g = good[a:b]
            if g.sum() > 50:
                offsets.append(float(np.median(np.asarray(flux[i][a:b])[g]
                                               / np.asarray(model_flux[i][a:b])[g]) - 1.0))
        cont_off = max(offsets, key=abs) if offsets else float("nan")
        j = int(np.nanargmax(np.where(np.isfinite(z[i]), z[i], -1))) if np.isfinite(
            z[i]).any() else 0
        cflags = [k for k, v in CONTINUUM_FLAGS.items()
                  if continuum_flags is not None and int(continuum_flags[i]) & v]
        info = dict(index=i, score=_num(score[i]), worst_label=label_names[j],
                    fitted=_num(labels[i, j]), reference=_num(ref[i, j]),
                    delta=_num(labels[i, j] - ref[i, j]),
                    reduced_chi2=_num(fit.reduced_chi2[i]), fit_flags=fit.flag_names(i),
                    bad_pixel_fraction=badfrac, continuum_offset=_num(cont_off),
                    continuum_flags=cflags,
                    catalog_flags=catalog_flags[i] if catalog_flags is not None else "")
        reasons = []
        if truth is not None and np.isfinite(truth[i, j]):
            cat_err = float(ref[i, j] - truth[i, j])
            fit_err = float(labels[i, j] - truth[i, j])
            info["catalog_minus_true"] = cat_err
            info["fit_minus_true"] = fit_err
            if abs(cat_err) > 2 * abs(fit_err) and abs(cat_err) > 2 * scatter[j]:
                reasons.append(f"catalog label error: catalog - true = {cat_err:+.3g}, "
                               f"fit - true = {fit_err:+.2g}")
            elif abs(fit_err) > 2 * abs(cat_err):
                reasons.append(f"model/fit error: fit - true = {fit_err:+.3g}, catalog - true "
                               f"= {cat_err:+.2g}")
        if binary_screen is not None and binary_screen.flagged[i]:
            info["binary_delta_chi2"] = _num(binary_screen.delta_chi2[i])
            pj = binary_screen.primary_labels[i, j]
            reasons.append(
                f"a likely binary (the screen's composite fit improves chi2 by "
                f"{binary_screen.delta_chi2[i]:.0f}: a companion with "
                f"{100 * binary_screen.weight[i]:.0f}% of the light at "
                f"{binary_screen.velocity[i]:+.0f} km/s); the composite fit's primary "
                f"{label_names[j]} = {pj:.4g}" + (
                    f" (true {truth[i, j]:.4g})" if truth is not None
                    and np.isfinite(truth[i, j]) else ""))
        if truth_extra and "IS_BINARY" in truth_extra and bool(truth_extra["IS_BINARY"][i]):
            reasons.append("a true (injected) binary in the mock's truth")
        trouble = [f for f in info["fit_flags"] if f in _TROUBLE_FLAGS]
        if trouble:
            reasons.append("fit flags " + "+".join(trouble))
        if np.isfinite(info["reduced_chi2"] or np.nan) and info["reduced_chi2"] > 2 * med_rchi:
            reasons.append(f"poor fit (reduced chi2 {info['reduced_chi2']:.2f} vs median "
                           f"{med_rchi:.2f})")
        if badfrac > 0.2:
            reasons.append(f"{100 * badfrac:.0f}% of the pixels masked")
        if cflags or (np.isfinite(cont_off) and abs(cont_off) > 0.01):
            reasons.append("continuum trouble (" + ", ".join(
                cflags + ([f"chip median data/model off by {100 * cont_off:+.1f}%"]
                          if np.isfinite(cont_off) and abs(cont_off) > 0.01 else [])) + ")")
        if info["catalog_flags"]:
            reasons.append(f"catalog flags {info['catalog_flags']}")
        if bounds is not None:
            lo, hi = np.asarray(bounds, float).T
            tr_lo, tr_hi = lo, hi
            outside = [label_names[k] for k in range(len(label_names))
                       if np.isfinite(ref[i, k]) and not tr_lo[k] <= ref[i, k] <= tr_hi[k]]
            if outside:
                reasons.append("catalog labels outside the training range: " + ", ".join(outside))
        if "SPARSE_TRAINING" in info["fit_flags"]:
            reasons.append("fitted labels where the training set is thin (SPARSE_TRAINING), "
                           "where the model is least constrained")
        if edges is not None:
            lo, hi = np.asarray(edges, float).T
            near = [label_names[k] for k in range(len(label_names))
                    if np.isfinite(ref[i, k]) and (ref[i, k] < lo[k] or ref[i, k] > hi[k])]
            if near:
                reasons.append("at the edge of the training labels (outside their 2.5-97.5% "
                               "range), where the quadratic model is least accurate: "
                               + ", ".join(near))
        if not reasons:
            # the spectrum is fitted as well as most: the model describes it, the labels it
            # finds are as good as any star's, so the catalogue's is the one to doubt
            reasons.append(f"no problem in the data or the fit (reduced chi2 "
                           f"{info['reduced_chi2']:.2f}, median {med_rchi:.2f}): the catalogue "
                           "label is the likely culprit")
        info["diagnosis"] = "; ".join(reasons)
        info["main_reason"] = reasons[0]
        out.append(info)
    return out


# --------------------------------------------------------------------------- guarded extras
def _guarded(name, func, *args, **kwargs):
    """Run an optional step; return ``(status dict, value)``, never raise."""
    t0 = time.perf_counter()
    try:
        value = func(*args, **kwargs)
    except ImportError as err:
        return dict(status="skipped", reason=f"module not available ({err})"), None
    except Exception as err:  # noqa: BLE001 - an optional step must not sink the lab
        tb = traceback.format_exc(limit=3)
        return dict(status="failed", reason=f"{type(err).__name__}: {err}", traceback=tb), None
    status = dict(status="ok", seconds=round(time.perf_counter() - t0, 2))
    if isinstance(value, dict):
        status.update({k: v for k, v in value.items() if k not in ("figure", "figures")})
    return status, value


def _extra_mcmc(inputs):
    from .mcmc import sample_posterior

    res = sample_posterior(inputs["model"], inputs["mystery_flux"], inputs["mystery_ivar"],
                           seed=inputs["seed"], warn=False, progress_bar=inputs["show"])
    d = res.to_dict()
    out = {"star": inputs["mystery_id"], "path": inputs["mystery_path"]}
    for key in ("converged", "median", "sigma", "p16", "p84", "autocorr_time", "fit_labels",
                "fit_errors", "fit_errors_debiased", "prior_text", "warnings", "n_steps",
                "acceptance_fraction", "runtime"):
        if key in d:
            out[key] = d[key]
    cv = inputs.get("cv_scatter")
    if inputs.get("mystery_truth") is not None:
        out["true_labels"] = np.asarray(inputs["mystery_truth"]).tolist()
    out["catalog_labels"] = np.asarray(inputs["mystery_catalog"]).tolist()
    if res.converged:
        out["summary"] = res.summary(cv_scatter=cv)
    else:
        out["summary"] = "chain not converged: no posterior reported"
    try:
        fig = res.corner(truths=inputs.get("mystery_truth"))
        if fig is not None and hasattr(fig, "savefig"):
            out["figure"] = ("mcmc_corner", fig,
                             f"MCMC posterior of the held-back mystery star {inputs['mystery_id']}"
                             " (uniform priors within the training range), in blue; orange: the "
                             "chi² fit ± its formal error"
                             + ("; green lines: the true labels, outside the axes when the "
                                "posterior misses them" if inputs.get("mystery_truth") is not None
                                else "") + ".")
    except ImportError as err:
        out["figure_note"] = f"corner plot skipped ({err})"
    return out


def _extra_movies(inputs):
    from .plots import movies

    func = getattr(movies, "lab_movies", None) or getattr(movies, "make_movies", None)
    if func is None:
        raise ImportError("cannon_fast.lab.plots.movies has no lab_movies()")
    res = func(inputs["model"], inputs["out_dir"], progress_bar=inputs["show"])
    files = res if isinstance(res, (list, tuple)) else (res.get("files", []) if isinstance(
        res, dict) else [])
    out = {"files": [os.path.basename(os.fspath(f)) for f in files]}
    if isinstance(res, dict) and res.get("notes"):
        out["notes"] = list(res["notes"])
    return out


def _extra_binaries(inputs, n_max=30):
    from .binaries import fit_binaries

    k = min(n_max, len(inputs["val_flux"]))
    res = fit_binaries(inputs["model"], inputs["val_flux"][:k], inputs["val_ivar"][:k],
                       progress_bar=inputs["show"])
    flagged = np.asarray(res.is_binary, bool)
    out = {"n_fitted": int(k), "n_flagged": int(flagged.sum()),
           "note": f"single-vs-binary fits (BIC) of the first {k} validation stars"}
    tb = inputs.get("val_is_binary")
    if tb is not None:
        tb = np.asarray(tb[:k], bool)
        out["n_true_binaries"] = int(tb.sum())
        out["n_flagged_true_binaries"] = int(np.sum(flagged & tb))
    return out


def _extra_nn(inputs):
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ImportError("torch is not installed")
    from .nn_compare import compare_networks

    return compare_networks(
        inputs["train_flux"], inputs["train_ivar"], inputs["train_labels"], inputs["val_flux"],
        inputs["val_ivar"], inputs["val_catalog"], inputs["val_cannon"], LAB_LABELS,
        train_errors=inputs["train_errors"], val_truth=inputs.get("val_truth"),
        train_truth=inputs.get("train_truth"),
        epochs=inputs["nn_epochs"], seed=inputs["seed"], progress=inputs["show"],
        cannon_model=inputs["model"])


# --------------------------------------------------------------------------- the lab
#: The optional steps, in the order they run.
_EXTRAS = ("mcmc", "movies", "binaries", "nn")


@dataclasses.dataclass(frozen=True)
class _LabOptions:
    """The parameters of :func:`run_lab` as given (documented there)."""

    data_dir: object
    out_dir: object
    seed: int
    force: bool
    n_stars: int
    survey_seed: int
    cache_dir: object
    allstar: object
    truth: object
    continuum: object
    line_file: object
    isochrones: object
    train_fraction: float
    min_stars: int
    workers: int
    backend: str
    n_outliers: int
    extras: object
    nn_epochs: int
    keep_store: bool
    extra_terms: object
    test_step: str
    label_errors: object
    binary_screen: bool
    training_margin: bool
    show_progress: object
    log: object
    stars: object
    isochrone_age: object
    isochrone_feh: object
    isochrone_source: str


@dataclasses.dataclass(eq=False)
class _LabContext:
    """What the lab's steps share: the checked options, then each step's results.

    Each group of fields after the first is filled by the step named in its
    comment and read by the later ones; ``summary.json`` is assembled from them
    at the end.
    """

    opts: _LabOptions
    out_dir: str  # absolute, created
    model_sets: dict  # candidate name -> CannonModel keyword arguments
    extras_wanted: set
    iso_tracks: list
    say: object  # one line of text per step
    t_start: float
    timings: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    summary_extra: dict = dataclasses.field(default_factory=dict)  # more summary.json keys
    figures: list = dataclasses.field(default_factory=list)  # saved, with captions
    # _step_data
    source: dict = None
    files: list = None
    id_to_path: dict = None  # APOGEE_ID -> apStar path
    stars: list = None  # the stars named for the example figures (--star), as the data spell them
    allstar_path: str = None
    truth_path: str = None
    # _step_continuum_pixels
    cont_mask: np.ndarray = None  # (P,) bool
    cont_info: dict = None
    # _step_prepare, _step_load
    work: str = None  # the store's folder, removed at the end unless keep_store
    prep: object = None  # prepare_dataset's result: the store and the cut report
    flux: np.ndarray = None  # (N, P), memory-mapped from the store
    ivar: np.ndarray = None  # (N, P)
    cat_labels: np.ndarray = None  # (N, L)
    cat_errors: np.ndarray = None  # (N, L), or None when not used
    ids: np.ndarray = None  # (N,) str
    cflags: np.ndarray = None  # (N,) continuum flags
    wave: np.ndarray = None  # (P,)
    continuum_degree: int = None
    truth_labels: np.ndarray = None  # (N, L), or None without truth
    truth_extra: dict = dataclasses.field(default_factory=dict)  # truth.fits' other columns
    # _step_split: indices into the N kept stars
    n_kept: int = None  # stars the cuts keep (the per-star arrays then get the margin's)
    train: np.ndarray = None
    valid: np.ndarray = None
    mystery: int = None
    # _step_choose_model, _step_train
    candidates: dict = None  # name -> trainer (flux, ivar, labels, errors) -> model
    model_name: str = None
    primary_key: str = None  # the label fit the figures and headline numbers use
    cv: dict = None
    model: object = None
    model_path: str = None
    # _step_screen_training, _step_screen_validation
    binaries: dict = dataclasses.field(default_factory=dict)  # summary.json's "binaries"
    secondary_model: object = None  # _step_secondary_model: the companions' CannonModel
    val_screen: object = None  # core.binaries.BinaryScreen of the validation stars
    margin: dict = None  # _step_training_margin: the stars past the cuts that train the model
    error_calibration: dict = None
    # _step_fit
    fits: dict = dataclasses.field(default_factory=dict)  # FIT_STEPS key -> FitResult
    val_snr: np.ndarray = None  # (N_valid,) the catalogue's S/N, for the pull statistics
    validation: dict = None
    # _step_error_budget
    diagnostics: dict = None
    # _step_figures
    outliers: list = None
    # _step_extras
    extras_status: dict = dataclasses.field(default_factory=dict)

    @property
    def primary(self):
        """The validation fit the figures and headline numbers use."""
        return self.fits[self.primary_key]

    @property
    def val_cat(self):
        """Catalog labels of the validation stars, (N_valid, L)."""
        return self.cat_labels[self.valid]

    @property
    def val_true(self):
        """True labels of the validation stars, (N_valid, L), or None."""
        return self.truth_labels[self.valid] if self.truth_labels is not None else None

    @property
    def train_errors(self):
        """Catalogue label errors of the training stars, or None."""
        return None if self.cat_errors is None else self.cat_errors[self.train]


def _prepare_out_dir(out_dir, force):
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not force:
            raise FileExistsError(f"report folder {out_dir} already exists; choose another "
                                  "--out or pass --force to replace the report in it")
        if force:  # remove only what a report run writes
            for name in REPORT_FILES:
                p = os.path.join(out_dir, name)
                if os.path.isfile(p):
                    os.unlink(p)
            for p in glob.glob(os.path.join(out_dir, "*.png")):
                os.unlink(p)
            shutil.rmtree(os.path.join(out_dir, _WORK_DIR), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def run_lab(data_dir=None, out_dir="cannon_fast_report", seed=0, force=False, *,
            n_stars=1200, survey_seed=0, cache_dir=None, allstar=None, truth=None,
            continuum=None, line_file=None, isochrones=None, train_fraction=0.5,
            min_stars=60, workers=2, backend="auto", n_outliers=6, extras=True,
            nn_epochs=150, keep_store=False, extra_terms="auto", test_step="auto",
            label_errors="auto", binary_screen=True, training_margin=False,
            show_progress=None, log=print,
            stars=None, isochrone_age=None, isochrone_feh=None, isochrone_source="files"):
    """Run the modeling lab end to end and write a report folder.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Downloaded files in the SDSS archive layout (apStar files found
        recursively, the allStar catalogue found as ``allStar*.fits``); by default
        the embedded synthetic survey (generated once, then reused from the cache).
    out_dir : str or os.PathLike
        The report folder to create.
    seed : int
        Seed of the train/validation split and the held-back mystery star.
    force : bool
        Replace the report files in an existing ``out_dir`` (other files are kept).
    n_stars, survey_seed : int
        Size and seed of the embedded survey (ignored with ``data_dir``).
    cache_dir : str or os.PathLike, optional
        Cache root of the embedded survey (default ``$CANNON_FAST_CACHE`` or
        ``~/.cache/cannon_fast``).
    allstar : str or os.PathLike, optional
        The allStar catalogue (overrides the search in ``data_dir``).
    truth : str or os.PathLike, optional
        A ``truth.fits`` with true labels (default: ``<data_dir>/truth.fits`` when it
        exists; always present for the embedded survey).
    continuum : str, os.PathLike or array_like, optional
        Continuum pixels (see :func:`cannon_fast.core.continuum.load_continuum_pixels`);
        default: the embedded survey's continuum mask for the demo, pixels found
        from the data otherwise.
    line_file : str or os.PathLike, optional
        Line list (air wavelengths) for the gradient-spectrum marks.
    isochrones : sequence of str, os.PathLike or dict, optional
        MIST (``.iso``/``.iso.cmd``) or PARSEC files (their giants are drawn) or
        dicts with ``teff``, ``logg`` and ``label``, overlaid on the Kiel diagram;
        default for the demo: the survey's own giant branch (said so in the caption).
    train_fraction : float
        Fraction of the kept stars used for training.
    min_stars : int
        Fewest stars that must survive the cuts (otherwise a TooFewStarsError
        listing the per-cut counts).
    workers : int
        Processes reading apStar files.
    backend : str
        Kernel backend of the model.
    n_outliers : int
        Outliers diagnosed in the report.
    extras : bool or sequence of str
        Run the optional steps (``"mcmc"``, ``"movies"``, ``"binaries"``, ``"nn"``)
        when their modules are available: True for all, False for none.
    nn_epochs : int
        Maximum epochs of each network of the NN comparison (lab step 16,
        :func:`cannon_fast.lab.nn_compare.compare_networks`; early stopping ends most
        runs sooner).
    keep_store : bool
        Keep the normalized SpectraStore in ``out_dir/.work``.
    extra_terms : "auto" or sequence of str
        Terms added to the lab's quadratic model (``CannonModel(extra_terms=...)``),
        e.g. ``("TEFF^3", "TEFF^4")``; ``()`` for the lab's model as it is.
        ``"auto"`` chooses between the candidates of :data:`AUTO_MODELS` by
        cross-validation (:func:`cross_validate`).
    label_errors : {"auto", True, False}
        Train with the catalogue's label errors (``CannonModel.train(...,
        label_errors=)``: regression-calibrated labels and error-weighted
        stars). ``"auto"`` lets the cross-validation choose when the
        catalogue has ``<LABEL>_ERR`` columns (missing errors are filled with
        the label's median error).
    binary_screen : bool
        Screen every star for an unresolved companion (``core.binaries``): the
        flagged training stars leave the training set before the model is chosen
        and trained; the validation stars get BINARY_* columns, the composite
        fit's primary labels, and separate statistics for singles and binaries.
    training_margin : bool
        Train also on the stars up to ``TRAINING_MARGIN`` past the lab's hot and
        dwarf cuts (screened for binaries like every training star; never validated),
        so that the validation stars at those cuts are not at the model's edge. Off by
        default: on mock surveys it improves the singles but not the composite fits'
        primaries, whose target is relative to the singles (docs/lab.md, step 15).
    test_step : {"auto", "debias", "plain"}
        The label fit whose results the figures and the headline numbers use. Both
        are always computed and in ``summary.json``. ``"auto"`` chooses by 3-fold
        cross-validation inside the training set against the catalogue labels
        (:func:`cross_validate`, together with the model when that is "auto").
    show_progress : bool, optional
        Progress bars (default: when stderr is a terminal).
    log : callable or None
        Called with one line of text per step.
    stars : sequence of str, optional
        APOGEE IDs for the example figures (the lab's checkpoints name
        2M19395986+2341280 for the continuum and 2M03533659+2512012 for data
        against the model): the first replaces the median-S/N training star of
        ``example_spectrum``, ``continuum`` and ``data_vs_model``; each other
        one adds ``continuum_<ID>`` and ``data_vs_model_<ID>``. A star cut by
        the lab's cuts gets the continuum figure only. An ID not in the data is
        a ValueError listing the nearest IDs, raised before the spectra are read.
    isochrone_age : float, optional
        Age (Gyr) of the isochrones on the Kiel diagram: the nearest one in each
        ``isochrones`` file; for ``isochrone_source="mist"`` the age fetched
        (default 6, lab step 11).
    isochrone_feh : sequence of float, optional
        Their [Fe/H]s, as for the age (default for MIST: 0 and -1, lab step 11).
    isochrone_source : {"files", "mist"}
        ``"files"``: the ``isochrones`` given (none: the demo draws the survey's
        own giant branch). ``"mist"``: also MIST isochrones from the MIST web
        interpolator (:mod:`cannon_fast.lab.mist_web`), cached under
        ``cache_dir`` (default ``$CANNON_FAST_CACHE`` or ``~/.cache/cannon_fast``)
        so later runs need no network; offline with nothing cached is a
        ConnectionError before any work. summary.json's ``isochrones`` says which
        were drawn (source, origin, path, age, [Fe/H]).

    Returns
    -------
    dict
        The summary also written to ``summary.json``.

    Raises
    ------
    FileExistsError
        ``out_dir`` exists and ``force`` is False.
    cannon_fast.apogee.catalog.TooFewStarsError
        Too few stars survive the cuts (the message lists the per-cut counts).
    """
    opts = _LabOptions(**locals())  # the first statement: locals() holds only the parameters
    ctx = _new_context(opts)  # bad options fail here, before any work or any folder
    _step_data(ctx)
    _step_continuum_pixels(ctx)
    _step_prepare(ctx)
    _step_load(ctx)
    _step_split(ctx)
    _step_training_margin(ctx)
    _step_secondary_model(ctx)
    _step_screen_training(ctx)
    _step_choose_model(ctx)
    _step_train(ctx)
    _step_calibrate_errors(ctx)
    _step_fit(ctx)
    _step_screen_validation(ctx)
    _step_error_budget(ctx)
    _step_figures(ctx)
    _step_extras(ctx)
    return _step_outputs(ctx)


# --------------------------------------------------------------------------- the lab's steps
# Each step reads what the steps before it left in the context and adds its own results.
# "Lab step N" is the step of the lab's handout that docs/lab.md walks through.
def _new_context(opts):
    """Check every option, then create the report folder and the context of the steps."""
    from ..core.model import CannonModel

    t_start = time.perf_counter()
    if opts.test_step != "auto" and opts.test_step not in FIT_STEPS:
        raise ValueError(f"test_step must be 'auto' or one of {list(FIT_STEPS)}, "
                         f"got {opts.test_step!r}")
    if opts.label_errors not in ("auto", True, False):
        raise ValueError(f"label_errors must be 'auto', True or False, "
                         f"got {opts.label_errors!r}")
    if isinstance(opts.extra_terms, str) and opts.extra_terms == "auto":
        model_sets = dict(AUTO_MODELS)
    else:
        terms = tuple(opts.extra_terms or ())
        model_sets = {"quadratic" + "".join(f" + {t}" for t in terms): dict(extra_terms=terms)}
    for options in model_sets.values():  # bad extra terms fail here, not after the survey
        CannonModel(LAB_LABELS, order=2, backend=opts.backend, **options)
    wanted = set(_EXTRAS) if opts.extras is True else set(opts.extras or ())
    if wanted - set(_EXTRAS):
        raise ValueError(f"unknown optional steps {sorted(wanted - set(_EXTRAS))}; "
                         f"choose from {_EXTRAS}")
    iso_tracks, iso_notes = _read_isochrones(opts)  # bad files, or offline, fail here as well
    return _LabContext(opts=opts, out_dir=_prepare_out_dir(opts.out_dir, opts.force),
                       model_sets=model_sets, extras_wanted=wanted, iso_tracks=iso_tracks,
                       say=opts.log if opts.log is not None else (lambda *_: None),
                       t_start=t_start, notes=iso_notes,
                       summary_extra=dict(isochrones=[t["info"] for t in iso_tracks]))


def _step_data(ctx):
    """The apStar files and the catalogue: the embedded survey, or ``data_dir``'s (lab step 1)."""
    from ..apogee.files import parse_apstar_path
    from ..apogee.prepare import find_apstar_files

    o = ctx.opts
    t0 = time.perf_counter()
    if o.data_dir is None:
        from ..demo import datasets

        ctx.say(f"embedded survey: {o.n_stars} stars, seed {o.survey_seed} (generated once, "
                "then cached)")
        paths = datasets.demo_survey(cache_dir=o.cache_dir, n_stars=o.n_stars,
                                     seed=o.survey_seed, progress=o.show_progress,
                                     workers=max(1, int(o.workers)))
        apstar_root, ctx.allstar_path = paths.apstar_root, paths.allstar
        ctx.truth_path = o.truth or paths.truth
        ctx.source = dict(kind="embedded synthetic survey (cannon_fast.demo.datasets)",
                          root=paths.root, n_stars=o.n_stars, seed=o.survey_seed)
    else:
        data_dir = os.path.abspath(os.fspath(o.data_dir))
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"{data_dir}: no such data folder")
        apstar_root = data_dir
        ctx.allstar_path = os.fspath(o.allstar) if o.allstar else _find_allstar(data_dir)
        default_truth = os.path.join(data_dir, "truth.fits")
        ctx.truth_path = o.truth or (default_truth if os.path.exists(default_truth) else None)
        ctx.source = dict(kind="files in the SDSS archive layout", root=data_dir)
    ctx.files = find_apstar_files(apstar_root)
    if not ctx.files:
        raise FileNotFoundError(f"no apStar-*.fits files under {apstar_root}")
    ctx.id_to_path = {}
    for p in ctx.files:
        try:
            ctx.id_to_path.setdefault(parse_apstar_path(p)[1], p)
        except ValueError:
            pass
    ctx.source.update(allstar=ctx.allstar_path, truth=ctx.truth_path,
                      n_apstar_files=len(ctx.files))
    from .stars import find_stars
    ctx.stars = find_stars(o.stars, ctx.id_to_path, *_data_description(o, apstar_root))
    ctx.timings["survey"] = time.perf_counter() - t0


def _data_description(o, apstar_root):
    """What the data are, and a hint, for the message about a star they do not have."""
    if o.data_dir is None:
        return ("the embedded synthetic survey", "its IDs are made up; the lab's checkpoint "
                "stars are real DR17 stars: `cannon-fast download --fields M15 N6791 "
                "K2_C4_168-21 060+00 --out DIR`, then `cannon-fast demo --data DIR --star ID`")
    return f"the apStar files under {apstar_root}", ""


def _step_continuum_pixels(ctx):
    """The continuum pixels: given, the embedded survey's, or found from the data (lab step 4)."""
    from ..core.continuum import load_continuum_pixels

    o = ctx.opts
    t0 = time.perf_counter()
    if o.continuum is not None:
        ctx.cont_mask = load_continuum_pixels(o.continuum)
        ctx.cont_info = dict(method="given", source=str(o.continuum) if isinstance(
            o.continuum, (str, os.PathLike)) else "array")
    elif o.data_dir is None:
        from ..demo.datasets import continuum_mask

        ctx.cont_mask = continuum_mask()
        ctx.cont_info = dict(method="the embedded survey's continuum mask "
                                    "(cannon_fast.demo.datasets.continuum_mask)")
    else:
        ctx.say("finding continuum pixels from the data (no --continuum given)")
        ctx.cont_mask, ctx.cont_info = _continuum_from_data(
            ctx.files, ctx.allstar_path, 400, o.seed, o.workers, o.backend, o.show_progress)
    ctx.cont_info["n_pixels"] = int(np.sum(ctx.cont_mask))
    ctx.timings["continuum_pixels"] = time.perf_counter() - t0


def _step_prepare(ctx):
    """Cross-match, cuts, bad-pixel masks, normalization, into a store (lab steps 2-4)."""
    from ..apogee.catalog import TooFewStarsError
    from ..apogee.prepare import prepare_dataset

    o = ctx.opts
    t0 = time.perf_counter()
    ctx.work = os.path.join(ctx.out_dir, _WORK_DIR)
    ctx.say("cross-match, quality cuts, bad-pixel masks, pseudo-continuum normalization")
    try:
        prep = prepare_dataset(ctx.files, ctx.allstar_path, os.path.join(ctx.work, "store"),
                               ctx.cont_mask, labels=LAB_LABELS, workers=o.workers,
                               min_remaining=o.min_stars, overwrite=True,
                               show_progress=o.show_progress)
    except TooFewStarsError as err:
        shutil.rmtree(ctx.work, ignore_errors=True)
        raise TooFewStarsError(f"{ctx.source['root']}: too few stars to train the lab's model "
                               f"(need >= {o.min_stars}).\n{err}") from None
    ctx.say(str(prep.report))
    # the cuts count catalogue rows; files can still fail to read or to normalize
    if len(prep.store) < o.min_stars:
        shutil.rmtree(ctx.work, ignore_errors=True)
        raise TooFewStarsError(f"{ctx.source['root']}: only {len(prep.store)} stars left after "
                               f"reading and normalization (need >= {o.min_stars}):\n"
                               f"{prep.report}")
    ctx.prep = prep
    ctx.timings["prepare"] = time.perf_counter() - t0


def _step_load(ctx):
    """The kept stars as arrays: spectra, catalogue labels and errors, true labels."""
    from ..core.continuum import DEFAULT_DEGREE

    store = ctx.prep.store
    ctx.flux = np.asarray(store.flux)
    ctx.ivar = np.asarray(store.ivar)
    ctx.cat_labels = np.asarray(store.labels, float)
    ctx.cat_errors, error_note = _catalogue_errors(store.label_errors, ctx.opts.label_errors)
    if error_note:
        ctx.notes.append(error_note)
    ctx.ids = np.asarray(store.ids).astype(str)
    ctx.cflags = np.asarray(store.flags)
    ctx.wave = np.asarray(store.wavelength)
    ctx.continuum_degree = int(store.meta.get("continuum_degree", DEFAULT_DEGREE))
    if ctx.truth_path is not None and os.path.exists(ctx.truth_path):
        ctx.truth_labels, ctx.truth_extra = _read_truth(ctx.truth_path, ctx.ids)
        if not np.isfinite(ctx.truth_labels).all(axis=1).any():
            ctx.notes.append(f"{ctx.truth_path}: no true labels matched the kept stars")
            ctx.truth_labels = None


def _step_split(ctx):
    """The seeded split: training half, validation half, and one held-back star."""
    n_kept = ctx.n_kept = len(ctx.ids)
    perm = np.random.default_rng(ctx.opts.seed).permutation(n_kept)
    n_train = int(round(ctx.opts.train_fraction * n_kept))
    ctx.train = np.sort(perm[:n_train])
    valid_all = perm[n_train:]
    ctx.mystery = int(valid_all[0])  # held back from training and validation, for the MCMC
    ctx.valid = np.sort(valid_all[1:])
    ctx.say(f"{n_kept} stars kept: {len(ctx.train)} training, {len(ctx.valid)} validation, "
            f"1 held back ({ctx.ids[ctx.mystery]})")


#: How far past the lab's hot and dwarf cuts (``lab_cuts``' teff_max and logg_max) the
#: training set reaches (see ``_step_training_margin``)
TRAINING_MARGIN = dict(TEFF=400.0, LOGG=0.3)


def _step_training_margin(ctx):
    """Stars just past the lab's hot and dwarf cuts join the training set, never validation.

    A polynomial model is least constrained at the edge of its training set, and a cut
    on the catalogue makes the edge where the validation stars are: on a mock survey
    (seed 12) the 3 % of the validation stars hotter than 5,200 K, at the hot and dwarf
    cuts' corner, were fitted 113 K cool and held half of the singles' Teff variance.
    Stars up to ``TRAINING_MARGIN`` past those two cuts (every other cut as the lab's)
    put that edge inside the model; like every training star they are screened for
    binaries before training. The validation set and the figures of the kept stars are
    unchanged. Only with ``run_lab(training_margin=True)``.
    """
    from ..apogee.catalog import lab_cuts
    from ..apogee.prepare import prepare_dataset

    if not ctx.opts.training_margin:
        return
    t0 = time.perf_counter()
    kw = inspect.signature(lab_cuts).parameters
    teff_max = kw["teff_max"].default + TRAINING_MARGIN["TEFF"]
    logg_max = kw["logg_max"].default + TRAINING_MARGIN["LOGG"]
    prep = prepare_dataset(ctx.files, ctx.allstar_path, os.path.join(ctx.work, "margin"),
                           ctx.cont_mask, labels=LAB_LABELS,
                           cuts=lab_cuts(LAB_LABELS, teff_max=teff_max, logg_max=logg_max),
                           workers=ctx.opts.workers, min_remaining=0, overwrite=True,
                           show_progress=False)
    store = prep.store
    ids = np.asarray(store.ids).astype(str)
    new = np.flatnonzero(~np.isin(ids, ctx.ids))
    ctx.margin = dict(teff_max=teff_max, logg_max=logg_max, n_stars=int(len(new)))
    if len(new):
        _append_stars(ctx, store, ids, new)
        ctx.train = np.concatenate([ctx.train, ctx.n_kept + np.arange(len(new))])
    ctx.timings["training_margin"] = time.perf_counter() - t0
    ctx.say(f"{len(new)} stars past the hot and dwarf cuts (TEFF <= {teff_max:g}, LOGG <= "
            f"{logg_max:g}) join the training set ({ctx.timings['training_margin']:.1f} s)")


def _append_stars(ctx, store, ids, rows):
    """Append stars ``rows`` of ``store`` to the context's per-star arrays."""
    ctx.flux = np.concatenate([ctx.flux, np.asarray(store.flux)[rows]])
    ctx.ivar = np.concatenate([ctx.ivar, np.asarray(store.ivar)[rows]])
    ctx.cat_labels = np.concatenate([ctx.cat_labels, np.asarray(store.labels, float)[rows]])
    if ctx.cat_errors is not None:
        err, _ = _catalogue_errors(store.label_errors, ctx.opts.label_errors)
        ctx.cat_errors = np.concatenate([ctx.cat_errors, np.asarray(err, float)[rows]])
    ctx.ids = np.concatenate([ctx.ids, ids[rows]])
    ctx.cflags = np.concatenate([ctx.cflags, np.asarray(store.flags)[rows]])
    if ctx.truth_labels is not None:
        t, extra = _read_truth(ctx.truth_path, ids[rows])
        ctx.truth_labels = np.concatenate([ctx.truth_labels, t])
        ctx.truth_extra = {k: np.concatenate([v, extra[k]]) for k, v in ctx.truth_extra.items()
                           if k in extra}


#: labels of the model that makes a binary's secondary (it shares the primary's composition)
SECONDARY_LABELS = ("TEFF", "LOGG", "FE_H", "MG_FE")
#: fewest dwarfs that make a secondary model; with fewer the lab's own model makes them
MIN_SECONDARY_STARS = 50


def _step_secondary_model(ctx):
    """A model of the survey's dwarfs, for the secondaries of the composite fits (step 15).

    The companions of giants are mostly main-sequence stars, which the lab's
    giant-trained model cannot make; the survey's own dwarfs (catalogue labels, the
    validation stars left out, screened for binaries themselves) can. Without enough
    of them the lab's model makes the secondaries.
    """
    from ..apogee.catalog import TooFewStarsError, companion_cuts
    from ..apogee.prepare import prepare_dataset
    from ..core.binaries import train_secondary_model

    if not ctx.opts.binary_screen:
        return
    t0 = time.perf_counter()
    info = dict(labels=list(SECONDARY_LABELS), n_stars=0)
    ctx.binaries["secondary_model"] = info
    try:
        prep = prepare_dataset(ctx.files, ctx.allstar_path, os.path.join(ctx.work, "dwarfs"),
                               ctx.cont_mask, labels=SECONDARY_LABELS,
                               cuts=companion_cuts(SECONDARY_LABELS), workers=ctx.opts.workers,
                               min_remaining=MIN_SECONDARY_STARS, overwrite=True,
                               show_progress=False)
    except TooFewStarsError:
        info["note"] = (f"fewer than {MIN_SECONDARY_STARS} dwarfs in the survey: the lab's own "
                        f"model makes the secondaries")
        ctx.say(f"binary screen: {info['note']}")
        return
    held = set(ctx.ids[ctx.valid]) | {ctx.ids[ctx.mystery]}
    ids = np.asarray(prep.store.ids).astype(str)
    use = np.flatnonzero([i not in held for i in ids])
    if len(use) < MIN_SECONDARY_STARS:
        info["note"] = f"only {len(use)} dwarfs outside the validation set: not used"
        return
    labels = np.asarray(prep.store.labels, float)[use]
    ctx.secondary_model = train_secondary_model(
        np.asarray(prep.store.flux)[use], np.asarray(prep.store.ivar)[use], labels,
        SECONDARY_LABELS, backend=ctx.opts.backend)
    n_model = len(ctx.secondary_model.training_labels)
    info.update(n_stars=int(n_model), n_binaries_left_out=int(len(use) - n_model),
                teff_range=[_num(v) for v in np.percentile(labels[:, 0], [1, 99])],
                logg_range=[_num(v) for v in np.percentile(labels[:, 1], [1, 99])])
    ctx.timings["secondary_model"] = time.perf_counter() - t0
    ctx.say(f"binary screen: secondaries from a model of {n_model} dwarfs of the survey "
            f"({len(use) - n_model} flagged as binaries left out; "
            f"TEFF {info['teff_range'][0]:.0f}-{info['teff_range'][1]:.0f} K, LOGG "
            f"{info['logg_range'][0]:.2f}-{info['logg_range'][1]:.2f}; "
            f"{ctx.timings['secondary_model']:.1f} s)")


def _step_screen_training(ctx):
    """Flagged binaries leave the training set before anything is trained on it (step 15).

    A first model of the lab's form fits the training stars; the screen compares
    single and composite fits of each; the flagged stars are set aside.
    """
    from ..core.binaries import screen_binaries
    from ..core.model import CannonModel

    if not ctx.opts.binary_screen:
        return
    t0 = time.perf_counter()
    tr = ctx.train
    m = CannonModel(LAB_LABELS, order=2, backend=ctx.opts.backend).train(
        ctx.flux[tr], ctx.ivar[tr], ctx.cat_labels[tr])
    single = m.fit(ctx.flux[tr], ctx.ivar[tr], debias=False)
    scr = screen_binaries(m, ctx.flux[tr], ctx.ivar[tr], single.labels, n_refine=0,
                          progress_bar=not _bar_disabled(ctx.opts.show_progress))
    ctx.binaries["training"] = dict(n_screened=int(len(tr)), n_flagged=int(scr.flagged.sum()),
                                    min_delta_chi2=scr.min_delta_chi2,
                                    flagged_ids=[str(i) for i in ctx.ids[tr][scr.flagged]])
    truth_b = ctx.truth_extra.get("IS_BINARY")
    if truth_b is not None:
        ctx.binaries["training"]["n_true_binaries_flagged"] = int(np.sum(
            scr.flagged & np.asarray(truth_b[tr], bool)))
    ctx.train = tr[~scr.flagged]
    ctx.timings["binary_screen_training"] = time.perf_counter() - t0
    ctx.say(f"binary screen: {int(scr.flagged.sum())} of {len(tr)} training stars flagged "
            f"(Δχ² > {scr.min_delta_chi2:g}) and left out of training "
            f"({ctx.timings['binary_screen_training']:.1f} s)")


def _step_choose_model(ctx):
    """The model and the label fit, by cross-validation in the training set (lab step 9).

    Nothing is chosen when the options leave one model and one label fit.
    """
    o = ctx.opts
    with_errors = {"auto": (False, True), True: (True,), False: (False,)}[o.label_errors]
    if ctx.cat_errors is None:
        with_errors = (False,)
    ctx.candidates = {name + (", label errors" if e else ""): _trainer(options, e, o.backend)
                      for name, options in ctx.model_sets.items() for e in with_errors}
    steps = tuple(FIT_STEPS) if o.test_step == "auto" else (o.test_step,)
    if len(ctx.candidates) * len(steps) == 1:
        (ctx.model_name,), ctx.primary_key = ctx.candidates, steps[0]
        ctx.cv = dict(note="model and label fit given")
        return
    t0 = time.perf_counter()
    tr = ctx.train
    ctx.model_name, ctx.primary_key, ctx.cv = cross_validate(
        ctx.candidates, ctx.flux[tr], ctx.ivar[tr], ctx.cat_labels[tr], steps=steps,
        seed=o.seed, label_errors=ctx.train_errors)
    ctx.timings["cross_validation"] = time.perf_counter() - t0
    ctx.say(f"chosen by cross-validation: model {ctx.model_name}, {ctx.primary_key} fit "
            f"({ctx.cv['note']})")
    ctx.notes.append(f"Model ({ctx.model_name}) and label fit ({ctx.primary_key}) chosen by "
                     f"{ctx.cv['note']}. The figures and headline numbers use them; "
                     "summary.json also has the other label fit.")


def _trainer(model_options, with_errors, backend):
    """A function ``(flux, ivar, labels, errors) -> trained CannonModel`` (the lab's labels)."""
    from ..core.model import CannonModel

    def train_model(flux, ivar, labels, errors):
        m = CannonModel(LAB_LABELS, order=2, backend=backend, **model_options)
        return m.train(flux, ivar, labels, label_errors=errors if with_errors else None)
    return train_model


def _step_train(ctx):
    """Train the chosen model on the training half; write model.fits (lab steps 5-8)."""
    from ..core.continuum import record_continuum

    t0 = time.perf_counter()
    tr = ctx.train
    with progress(total=1, desc="training the model", unit="model",
                  disable=_bar_disabled(ctx.opts.show_progress)) as bar:
        ctx.model = ctx.candidates[ctx.model_name](ctx.flux[tr], ctx.ivar[tr],
                                                   ctx.cat_labels[tr], ctx.train_errors)
        bar.update(1)
    record_continuum(ctx.model, ctx.cont_mask, ctx.continuum_degree)
    ctx.timings["train"] = time.perf_counter() - t0
    ctx.say(f"trained {ctx.model!r} in {ctx.timings['train']:.1f} s")


def _step_calibrate_errors(ctx):
    """Calibrated errors from the training set's held-out fits; write model.fits (step 12).

    The reference is the true labels when the data set has them (a simulation:
    its training half calibrates, the validation half checks), otherwise the
    catalogue labels with their stated errors.
    """
    from ..core.errors import fit_error_model

    t0 = time.perf_counter()
    tr, key = ctx.train, (ctx.model_name, ctx.primary_key)
    truth = ctx.truth_labels
    use_truth = truth is not None and np.isfinite(truth[tr]).all(axis=1).mean() > 0.9
    ref, ref_err = (truth[tr], None) if use_truth else (ctx.cat_labels[tr], ctx.train_errors)
    reference = "true labels" if use_truth else (
        "catalogue labels" + (" with their stated errors" if ref_err is not None else ""))
    # 5 folds, not the model choice's 3: the fold models are trained on 4/5 of the stars,
    # closer to the final model (on the mock survey 3 folds left the pulls 0.86-1.29 by S/N
    # bin, 5 folds 0.86-1.19)
    heldout = {}
    cross_validate({ctx.model_name: ctx.candidates[ctx.model_name]}, ctx.flux[tr],
                   ctx.ivar[tr], ctx.cat_labels[tr], steps=(ctx.primary_key,), n_folds=5,
                   seed=ctx.opts.seed, label_errors=ctx.train_errors, heldout=heldout)
    fitted, formal = heldout[key]
    # the stars of the training margin (past the cuts, never validated) train the model
    # but do not set the errors of the stars it is for: with them the floor is that of
    # the sample's edges (on a mock survey, seed 11, the validation stars' log g pulls
    # above S/N 200 were 0.64 calibrated with them, 0.70 without)
    inside = tr < ctx.n_kept
    if ref_err is not None:
        ref_err = ref_err[inside]
    try:
        ctx.model.error_model = fit_error_model(
            fitted[inside], formal[inside], ref[inside], LAB_LABELS, reference_errors=ref_err,
            training_labels=ctx.cat_labels[tr],
            info=dict(reference=reference, fit=ctx.primary_key, n_folds=5))
        ctx.error_calibration = dict(reference=reference, fit=ctx.primary_key,
                                     params=ctx.model.error_model.to_dict()["params"])
    except ValueError as err:  # too few usable held-out fits: formal errors, said so
        ctx.notes.append(f"errors not calibrated ({err}); the errors are the fits' formal ones")
        ctx.error_calibration = dict(reference=None, note=str(err))
    ctx.model_path = os.path.join(ctx.out_dir, "model.fits")
    ctx.model.write(ctx.model_path, overwrite=True)
    ctx.timings["calibrate_errors"] = time.perf_counter() - t0


def _step_fit(ctx):
    """Fit the validation half with every label fit, and score each (lab step 9)."""
    for st, options in FIT_STEPS.items():
        t0 = time.perf_counter()
        # the calibration belongs to the primary fit; the others keep their formal errors
        ctx.fits[st] = ctx.model.fit(ctx.flux[ctx.valid], ctx.ivar[ctx.valid],
                                     progress_bar=ctx.opts.show_progress,
                                     calibrated_errors=st == ctx.primary_key, **options)
        ctx.timings["fit_" + st] = time.perf_counter() - t0
    ctx.validation = {st: _validation_block(res, ctx.val_cat, ctx.val_true)
                      for st, res in ctx.fits.items()}
    ctx.val_snr = _allstar_column(ctx.allstar_path, ctx.ids[ctx.valid], "SNR")
    pulls = dict(snr_bins=[f"{lo:g}-{hi:g}" for lo, hi in SNR_BINS], vs_catalog=pull_statistics(
        ctx.primary, ctx.val_cat, ctx.val_snr, None if ctx.cat_errors is None
        else ctx.cat_errors[ctx.valid]))
    if ctx.val_true is not None:
        pulls["vs_true"] = pull_statistics(ctx.primary, ctx.val_true, ctx.val_snr)
    ctx.validation[ctx.primary_key]["pulls"] = pulls
    broad = ctx.fits["broadened"]
    ctx.validation["broadened"]["broadening"] = dict(
        unit="(km/s)^2", percentiles_5_50_95=[_num(q) for q in np.nanpercentile(
            broad.broadening[broad.ok], [5, 50, 95])] if broad.ok.any() else None,
        median_error=_num(np.nanmedian(broad.broadening_error[broad.ok]))
        if broad.ok.any() else None)
    # a fit that fails on most stars is a bug in the fitter, not a result: say so, fall back
    key, n_valid, val = ctx.primary_key, len(ctx.valid), ctx.validation
    if key != "plain" and val[key]["n_ok"] < 0.5 * n_valid <= val["plain"]["n_ok"]:
        ctx.notes.append(f"the {fit_step_title(key)} left only {val[key]['n_ok']} of {n_valid} "
                         f"fits usable (flags {val[key]['flags']}); the figures use the plain "
                         "chi2 fit (debias=False). All fits are in summary.json.")
        ctx.primary_key = "plain"
    ctx.say(f"fitted {n_valid} validation stars ("
            + ", ".join(f"{ctx.timings['fit_' + st]:.1f} s {st}" for st in FIT_STEPS) + ")")


def _step_screen_validation(ctx):
    """Screen the validation stars with the trained model; score singles and binaries."""
    from ..core.binaries import screen_binaries

    if not ctx.opts.binary_screen:
        return
    t0 = time.perf_counter()
    va, prim = ctx.valid, ctx.primary
    scr = screen_binaries(ctx.model, ctx.flux[va], ctx.ivar[va], prim.labels,
                          secondary_model=ctx.secondary_model,
                          progress_bar=not _bar_disabled(ctx.opts.show_progress))
    ctx.val_screen = scr
    dt = time.perf_counter() - t0
    ctx.timings["binary_screen_validation"] = dt
    flagged = scr.flagged
    b = dict(n_screened=int(len(va)), n_flagged=int(flagged.sum()),
             stars_per_second=_num(len(va) / dt), min_delta_chi2=scr.min_delta_chi2,
             columns="validation_labels.fits: BINARY_FLAG, BINARY_DELTA_CHI2, "
                     "BINARY_LIGHT_WEIGHT, BINARY_VELOCITY, BINARY_TEFF2, BINARY_LOGG2, "
                     "BINARY_PRIMARY_<LABEL>(_ERR)")
    if ctx.val_true is not None:
        ok = prim.ok
        b["singles_vs_true"] = label_statistics(prim.labels, ctx.val_true, LAB_LABELS,
                                                good=ok & ~flagged)
        b["flagged_single_fit_vs_true"] = label_statistics(prim.labels, ctx.val_true,
                                                           LAB_LABELS, good=ok & flagged)
        b["flagged_composite_fit_vs_true"] = label_statistics(
            scr.primary_labels, ctx.val_true, LAB_LABELS, good=flagged)
    truth_b = ctx.truth_extra.get("IS_BINARY")
    if truth_b is not None:
        isb = np.asarray(truth_b[va], bool)
        fr = ctx.truth_extra.get("FLUX_RATIO_H")
        kr = ctx.truth_extra.get("K_REL")
        b["truth"] = dict(n_binaries=int(isb.sum()), n_binaries_flagged=int(np.sum(flagged & isb)),
                          n_singles=int((~isb).sum()),
                          n_singles_flagged=int(np.sum(flagged & ~isb)))
        if fr is not None and kr is not None:
            strong = isb & (np.asarray(fr[va], float) > 0.3) & (np.asarray(kr[va], float) > 15)
            b["truth"].update(n_bright_fast=int(strong.sum()),
                              n_bright_fast_flagged=int(np.sum(flagged & strong)),
                              bright_fast="FLUX_RATIO_H > 0.3 and K_REL > 15 km/s")
        if ctx.val_true is not None:
            b["true_singles_vs_true"] = label_statistics(prim.labels, ctx.val_true, LAB_LABELS,
                                                         good=prim.ok & ~isb)
    if ctx.val_true is not None:   # the calibrated errors of the stars the screen passes
        b["pulls_unflagged_vs_true"] = pull_statistics(prim, ctx.val_true, ctx.val_snr,
                                                       select=~flagged)
    ctx.binaries["validation"] = b
    ctx.say(f"binary screen: {int(flagged.sum())} of {len(va)} validation stars flagged "
            f"({dt:.1f} s, {len(va) / dt:.0f} stars/s)")


def _validation_block(res, val_cat, val_true):
    """summary.json's ``validation`` entry of one label fit of the validation stars."""
    ok = res.ok
    b = dict(n_fitted=int(len(res)), n_ok=int(ok.sum()),
             flags={k: int(np.sum(res.flags & v > 0)) for k, v in res.FLAGS.items()},
             median_reduced_chi2=_num(np.nanmedian(res.reduced_chi2)),
             median_errors={n: _num(np.nanmedian(res.errors[:, j]))
                            for j, n in enumerate(LAB_LABELS)},
             vs_catalog=label_statistics(res.labels, val_cat, LAB_LABELS, good=ok))
    if val_true is not None:
        b["vs_true"] = label_statistics(res.labels, val_true, LAB_LABELS, good=ok)
        b["targets_vs_true"] = _targets(b["vs_true"])
    return b


def _step_error_budget(ctx):
    """Where the validation error comes from; all but the first part needs true labels."""
    primary, val_true = ctx.primary, ctx.val_true
    ctx.diagnostics = {"not_sparse_training": _sparse_training_split(primary, ctx.val_cat,
                                                                     val_true)}
    truth = ctx.truth_labels
    if truth is None or not np.isfinite(truth[ctx.train]).all():
        return
    t0 = time.perf_counter()
    tr, va = ctx.train, ctx.valid
    # cheap: one more training, on the true labels
    m_true = ctx.candidates[ctx.model_name](ctx.flux[tr], ctx.ivar[tr], truth[tr], None)
    r_true = m_true.fit(ctx.flux[va], ctx.ivar[va], **FIT_STEPS[ctx.primary_key])
    ctx.diagnostics["trained_on_true_labels"] = dict(
        vs_true=label_statistics(r_true.labels, val_true, LAB_LABELS, good=r_true.ok),
        note="same spectra and split, model trained on the TRUE labels: the difference "
             "to validation[primary] is the cost of the catalog's label errors")
    lo, hi = np.percentile(truth[tr], [5, 95], axis=0)
    inner = np.all((val_true >= lo) & (val_true <= hi), axis=1) & primary.ok
    ctx.diagnostics["inner_label_range"] = dict(
        n=int(inner.sum()),
        vs_true=label_statistics(primary.labels, val_true, LAB_LABELS, good=inner),
        note="validation stars whose true labels are inside the 5-95% range of the "
             "training labels: the difference to all stars is the model's edge error")
    ctx.diagnostics["teff_bins"] = _teff_bins(primary, val_true)
    pops = ctx.truth_extra.get("POPULATION")
    if pops is not None:
        ctx.diagnostics["populations"] = _population_breakdown(
            primary.labels, val_true, primary.ok, np.char.strip(
                np.asarray(pops[va]).astype(str)))
    cat_err = label_statistics(ctx.val_cat, val_true, LAB_LABELS)
    ctx.diagnostics["catalog_minus_true"] = dict(stats=cat_err,
                                                 note="the catalog's own label errors")
    ctx.timings["diagnostics"] = time.perf_counter() - t0


def _teff_bins(fit, true):
    """Fitted - true Teff in bins of true Teff (bins with at least 3 stars)."""
    d = fit.labels[:, 0] - true[:, 0]
    bins = []
    for a, b in ((3500, 4200), (4200, 4600), (4600, 5000), (5000, 5400), (5400, 6500)):
        sel = fit.ok & (true[:, 0] >= a) & (true[:, 0] < b)
        if sel.sum() >= 3:
            bins.append(dict(teff_range=[a, b], n=int(sel.sum()), bias=_num(d[sel].mean()),
                             scatter=_num(d[sel].std(ddof=1))))
    return dict(bins=bins, note="fitted - true Teff in bins of true Teff: a bias that changes "
                                "sign across the range is the model's compression at the edges")


def _step_figures(ctx):
    """The report's figures (lab steps 1-11), and the worst outliers, which two of them mark."""
    from .plots import lab as pl

    t0 = time.perf_counter()
    lines = pl.known_lines(line_file=ctx.opts.line_file)
    primary, model = ctx.primary, ctx.model
    # a failed fit has NaN labels: draw the model at the training median there instead
    model_val = model.predict(np.where(np.isfinite(primary.labels), primary.labels,
                                       np.nanmedian(model.training_labels, axis=0)))
    plan = []
    shown = _figure_stars(ctx)
    for k, (star_id, _, _) in enumerate(shown):
        plan += _example_figures(ctx, pl, star_id, "" if k == 0 else "_" + star_id,
                                 raw_figure=k == 0)
    plan += _model_figures(ctx, pl, lines, [_data_vs_model_figure(ctx, pl, idx, role,
                                                                  "" if k == 0 else "_" + sid)
                                            for k, (sid, idx, role) in enumerate(shown)
                                            if idx is not None])
    ctx.outliers = _worst_outliers(ctx, model_val)
    plan += _validation_figures(ctx, pl, model_val) + _kiel_figure(ctx, pl)
    plan += _broadening_figure(ctx, pl)
    # a figure that cannot be drawn (e.g. too few stars) is noted, not fatal
    for name, make, caption in progress(plan, desc="figures", unit="fig",
                                        disable=_bar_disabled(ctx.opts.show_progress)):
        try:
            fig = make()
        except (ValueError, KeyError, IndexError) as err:
            ctx.notes.append(f"figure {name} skipped: {err}")
            continue
        ctx.figures.append(_report.save_figure(fig, ctx.out_dir, name, caption))
    ctx.timings["figures"] = time.perf_counter() - t0


def _example_star(ctx):
    """The median-S/N training star among those with no continuum flag."""
    train, cflags = ctx.train, ctx.cflags
    cand = train[cflags[train] == 0] if np.any(cflags[train] == 0) else train
    snr_proxy = np.median(np.sqrt(ctx.ivar[cand]), axis=1)
    return int(cand[np.argsort(snr_proxy, kind="stable")[len(cand) // 2]])


def _figure_stars(ctx):
    """The stars of the example figures: ``(apogee_id, index or None, role)`` each.

    The named stars (``stars=``) in order, else the median-S/N training star;
    ``index`` is the star's row among the kept stars (None when the cuts removed
    it), ``role`` says which set it is in. summary.json's ``example_stars``
    records them.
    """
    where = {int(i): "training" for i in ctx.train}
    where.update({int(i): "validation" for i in ctx.valid})
    where[int(ctx.mystery)] = "held-back (MCMC)"
    row = {sid: i for i, sid in enumerate(ctx.ids)}
    if ctx.stars:
        out = [(sid, row.get(sid), where.get(row.get(sid), "not kept by the lab's cuts"))
               for sid in ctx.stars]
    else:
        ex = _example_star(ctx)
        out = [(ctx.ids[ex], ex, "training")]
    ctx.summary_extra["example_stars"] = [
        dict(apogee_id=str(sid), role=role, named=bool(ctx.stars)) for sid, _, role in out]
    for sid, idx, role in out:
        if idx is None:
            ctx.notes.append(f"star {sid} is in the data but {role}: its continuum figure is "
                             "drawn, data against the model is not (no catalogue labels kept)")
    return out


def _example_figures(ctx, pl, ex_id, suffix="", raw_figure=True):
    """Plan of star ``ex_id``'s raw spectrum and its normalization (none if unreadable)."""
    from ..apogee.bitmask import mask_spectra
    from ..apogee.files import read_apstar
    from ..core.continuum import normalize

    cont_mask = ctx.cont_mask
    try:
        spec = read_apstar(ctx.id_to_path[ex_id])
        f_raw, v_raw, _ = mask_spectra(spec.flux, spec.err, spec.pixmask)
        ns = normalize(f_raw, v_raw, cont_mask, degree=ctx.continuum_degree,
                       keep_continuum=True, dtype=np.float64)
    except (KeyError, OSError, ValueError) as err:
        ctx.notes.append(f"example/continuum figures of {ex_id} skipped: {err}")
        return []
    plan = [
        ("example_spectrum", lambda: pl.plot_spectrum(
            spec.wavelength, spec.flux, good=v_raw > 0,
            title=f"{ex_id}: combined apStar spectrum (chip gaps and flagged pixels left empty)"),
         "An example spectrum: flux against vacuum wavelength, in 1e-17 erg/s/cm²/Å "
         "(flux density per unit wavelength). The two gaps are the detector chip gaps."),
        ("continuum" + suffix, lambda: pl.plot_continuum(
            spec.wavelength, f_raw, ns.continuum, ns.flux, good=v_raw > 0,
            continuum_pixels=cont_mask,
            title=f"{ex_id}: raw spectrum, per-chip pseudo-continuum, normalized spectrum"),
         f"Pseudo-continuum normalization: a Chebyshev polynomial per chip fitted to the "
         f"continuum mask's {int(cont_mask.sum())} pixels (mask: {ctx.cont_info['method']}). "
         f"Each star's fit uses only those that are good pixels in its spectrum (inside "
         f"the chips' ranges, not flagged, finite): {int(np.sum(cont_mask & (v_raw > 0)))} "
         f"for this star (orange dots)."),
    ]
    return plan if raw_figure else plan[1:]


def _data_vs_model_figure(ctx, pl, ex, role, suffix=""):
    """Plan entry of kept star ``ex`` against the model at its catalogue labels."""
    model = ctx.model
    return ("data_vs_model" + suffix, lambda: pl.plot_data_vs_model(
        ctx.wave, ctx.flux[ex], ctx.ivar[ex], model.predict(ctx.cat_labels[ex]),
        (16000.0, 16100.0),
        title=f"{role} star {ctx.ids[ex]}: data and model at its catalog labels", s2=model.s2),
        f"Data against the model for a {role} star ({ctx.ids[ex]}), 16000-16100 Å; the "
        "residual band is the data error plus the model's intrinsic scatter.")


def _model_figures(ctx, pl, known_lines, data_vs_model):
    """Plan of the catalog labels' corner plot and the trained model's figures.

    ``data_vs_model`` are the plan entries of stars drawn against the model;
    ``known_lines`` is ``(lines, their source)`` of the gradient-spectrum marks.
    """
    from .plots._labels import label_name

    model, cat_labels, wave = ctx.model, ctx.cat_labels, ctx.wave
    lines, lines_src = known_lines
    ref_labels = np.median(model.training_labels, axis=0)
    return [
        ("corner", lambda: pl.plot_corner(
            cat_labels[:ctx.n_kept], LAB_LABELS,
            title=f"catalog labels of the {ctx.n_kept} stars kept by the cuts"),
         "Corner plot of the catalog labels of the stars that pass the lab's cuts."),
        *data_vs_model,
        ("gradients", lambda: pl.plot_gradient_spectra(
            wave, model.gradient(ref_labels), LAB_LABELS, lines=lines, lines_source=lines_src,
            title="gradient spectra at the median training labels: " + ", ".join(
                f"{label_name(n)} = {v:.4g}" for n, v in zip(LAB_LABELS, ref_labels))),
         f"Gradient spectra d flux / d label; Mg I and Si I lines ({lines_src}) marked on the "
         "[Mg/Fe] and [Si/Fe] panels."),
        ("s2", lambda: pl.plot_s2(wave, model.s2, lines=lines, lines_source=lines_src,
                                  title="intrinsic scatter of the model"),
         "The model's intrinsic scatter s at each pixel (log scale)."),
    ]


def _worst_outliers(ctx, model_val):
    """:func:`diagnose_outliers` of the primary fit of the validation stars, with their ids."""
    va, model = ctx.valid, ctx.model
    scat = np.array([ctx.validation[ctx.primary_key]["vs_catalog"][n]["mad_scatter"] or 1.0
                     for n in LAB_LABELS])
    common = dict(continuum_flags=ctx.cflags[va],
                  catalog_flags=_catalog_flags(ctx.allstar_path, ctx.ids[va]),
                  bounds=np.column_stack([model.training_labels.min(0),
                                          model.training_labels.max(0)]),
                  edges=np.percentile(model.training_labels, [2.5, 97.5], axis=0).T,
                  n=ctx.opts.n_outliers, binary_screen=ctx.val_screen)
    args = (ctx.primary, ctx.val_cat, LAB_LABELS, ctx.flux[va], ctx.ivar[va], model_val, scat)
    outl = diagnose_outliers(*args, truth=ctx.val_true,
                             truth_extra={k: v[va] for k, v in ctx.truth_extra.items()},
                             **common)
    # the same diagnosis from the data alone (no truth): what a survey user would read;
    # summary.json keeps both so the truth can judge it (lab step 10)
    blind = diagnose_outliers(*args, **common)
    for o, b in zip(outl, blind):
        o["apogee_id"] = ctx.ids[va][o["index"]]
        o["diagnosis_from_data"] = b["diagnosis"]
        o["main_reason_from_data"] = b["main_reason"]
    return outl


def _validation_figures(ctx, pl, model_val):
    """Plan of the one-to-one plots of the primary fit and the worst outliers' spectra."""
    primary, val_cat, val_true, outl = ctx.primary, ctx.val_cat, ctx.val_true, ctx.outliers
    va = ctx.valid
    ok = primary.ok
    hl = np.zeros(len(va), bool)
    hl[[o["index"] for o in outl]] = True
    # the fit's name goes in the title: as a y label on every panel it crowds the axes
    fit_name, fit_note = "fitted", f"{FIT_STEP_NAMES[ctx.primary_key]} fit"
    plan = []
    if val_true is not None:
        plan.append(("cv_true", lambda: pl.plot_one_to_one(
            val_true[ok], primary.labels[ok], LAB_LABELS, "true", fit_name, highlight=hl[ok],
            title=f"cross-validation against the TRUE labels ({int(ok.sum())} stars, "
                  f"{fit_note})"),
            "Cross-validation: fitted against true labels (synthetic survey), with residuals, "
            "bias and scatter per label. Red circles: the worst outliers."))
    plan.append(("cv_catalog", lambda: pl.plot_one_to_one(
        val_cat[ok], primary.labels[ok], LAB_LABELS, "catalog", fit_name, highlight=hl[ok],
        title=f"cross-validation against the CATALOG labels ({int(ok.sum())} stars, "
              f"{fit_note})"),
        "Cross-validation: fitted against the catalog (ASPCAP-like) labels, as in the lab."))
    pulls = ctx.validation[ctx.primary_key].get("pulls", {})
    ref = "vs_true" if "vs_true" in pulls else "vs_catalog"
    if ref in pulls:
        cal = ctx.error_calibration or {}
        plan.append(("pulls", lambda: pl.plot_pulls(
            pulls[ref], LAB_LABELS, title=f"are the errors right? validation stars against the "
            f"{'TRUE' if ref == 'vs_true' else 'CATALOG'} labels ({fit_note})"),
            "Error calibration (lab step 12): the standard deviation of (fit - reference) / "
            "error per S/N bin; 1 is right, the band is 0.8-1.25. Formal errors count only the "
            "pixel noise as the ivar states it; the calibrated ones add the model error "
            f"learned by cross-validation in the training set against the "
            f"{cal.get('reference') or 'reference'} (model.error_model)."))
    if outl:
        k = [o["index"] for o in outl]
        plan.append(("outliers", lambda: pl.plot_outliers(
            ctx.wave, ctx.flux[va][k], ctx.ivar[va][k], model_val[k],
            [o["apogee_id"] for o in outl], [_short_caption(o) for o in outl]),
            "The worst outliers (largest |fit - catalog| in units of the scatter): data and the "
            "model at the fitted labels; the diagnosis of each is in the table."))
    return plan


def _kiel_figure(ctx, pl):
    """Plan of the Kiel diagram, with the given isochrones or the survey's giant branch."""
    primary = ctx.primary
    iso = list(ctx.iso_tracks)
    iso_note = None
    if not iso and ctx.opts.data_dir is None and ctx.truth_labels is not None:
        gb = _survey_giant_branch(ctx.truth_labels, ctx.truth_extra.get("POPULATION"))
        if gb is not None:
            iso.append(gb)
            iso_note = gb.pop("note")
            ctx.summary_extra["isochrones"] = [dict(source="survey giant branch",
                                                    label=gb["label"], note=iso_note)]
    elif iso:
        iso_note = "isochrones (giants): " + "; ".join(
            t["label"] + (f" ({t['info']['origin']})" if t["info"].get("origin") else "")
            for t in iso)
    return [("kiel", lambda: pl.plot_kiel(primary.labels[primary.ok, 0],
                                          primary.labels[primary.ok, 1],
                                          primary.labels[primary.ok, 2], isochrones=iso,
                                          note=iso_note),
             "Kiel diagram of the fitted validation labels, coloured by fitted [Fe/H]. "
             + (iso_note or ("Isochrones as given." if iso else "No isochrone given.")))]


def _broadening_figure(ctx, pl):
    """Plan of the fitted extra line broadening (none with fewer than 3 fitted stars)."""
    broad = ctx.fits["broadened"]
    if broad.ok.sum() <= 2:
        return []
    vmac = ctx.truth_extra.get("VMACRO")
    vmac = None if vmac is None else np.asarray(vmac, float)[ctx.valid][broad.ok]
    return [("broadening", lambda: pl.plot_broadening(
        broad.broadening[broad.ok], broad.broadening_error[broad.ok],
        broad.labels[broad.ok, 0], broad.labels[broad.ok, 1], true_vmacro=vmac),
        "Extra line broadening fitted with the labels (model.fit(..., broadening=True)): "
        "the Gaussian velocity variance the validation stars' lines have beyond the "
        "model's at their labels; negative means narrower."
        + (" Right: against the part of the survey's true macroturbulence variance that "
           "a quadratic in the labels does not predict (the model already has the rest); "
           "a slope near 1 means the broadening is measured in the right units."
           if vmac is not None else ""))]


def _step_extras(ctx):
    """The optional steps asked for: MCMC, movies, binaries, NN (lab steps 12-15), guarded."""
    if not ctx.extras_wanted:
        ctx.extras_status = {k: dict(status="skipped", reason="not requested") for k in _EXTRAS}
        return
    t0 = time.perf_counter()
    inputs = _extras_inputs(ctx)
    for key, func in (("mcmc", _extra_mcmc), ("movies", _extra_movies),
                      ("binaries", _extra_binaries), ("nn", _extra_nn)):
        if key not in ctx.extras_wanted:
            ctx.extras_status[key] = dict(status="skipped", reason="not requested")
            continue
        ctx.say(f"optional step: {key}")
        status, value = _guarded(key, func, inputs)
        value = value if isinstance(value, dict) else {}
        for fname, fig, cap in ([value["figure"]] if "figure" in value else []) + list(
                value.get("figures", [])):
            ctx.figures.append(_report.save_figure(fig, ctx.out_dir, fname, cap))
        ctx.extras_status[key] = status
    ctx.timings["extras"] = time.perf_counter() - t0


def _extras_inputs(ctx):
    """What the optional steps see: plain arrays, not the context."""
    mystery, va, tr = ctx.mystery, ctx.valid, ctx.train
    truth_extra = ctx.truth_extra
    return dict(model=ctx.model, seed=ctx.opts.seed, show=ctx.opts.show_progress,
                out_dir=ctx.out_dir, mystery_index=mystery, mystery_id=ctx.ids[mystery],
                mystery_flux=ctx.flux[mystery].astype(np.float64),
                mystery_ivar=ctx.ivar[mystery].astype(np.float64),
                mystery_path=ctx.id_to_path.get(ctx.ids[mystery]),
                val_flux=ctx.flux[va], val_ivar=ctx.ivar[va], val_catalog=ctx.val_cat,
                val_truth=ctx.val_true, train_flux=ctx.flux[tr], train_ivar=ctx.ivar[tr],
                train_labels=ctx.cat_labels[tr], nn_epochs=ctx.opts.nn_epochs,
                train_truth=ctx.truth_labels[tr] if ctx.truth_labels is not None else None,
                train_errors=ctx.train_errors, val_cannon=np.asarray(ctx.primary.labels),
                mystery_catalog=ctx.cat_labels[mystery],
                mystery_truth=ctx.truth_labels[mystery] if ctx.truth_labels is not None
                else None,
                cv_scatter=cv_scatter(dict(validation=ctx.validation,
                                           primary_fit=ctx.primary_key)),
                val_is_binary=truth_extra["IS_BINARY"][va] if "IS_BINARY" in truth_extra
                else None)


def _step_outputs(ctx):
    """validation_labels.fits, summary.json and report.html; the store goes unless kept."""
    tab = ctx.primary.to_table(ids=ctx.ids[ctx.valid])
    if ctx.val_screen is not None:
        for name, col in ctx.val_screen.columns(LAB_LABELS).items():
            tab[name] = col
    for j, n in enumerate(LAB_LABELS):
        tab["CAT_" + n] = ctx.val_cat[:, j]
        if ctx.val_true is not None:
            tab["TRUE_" + n] = ctx.val_true[:, j]
    with atomic_path(os.path.join(ctx.out_dir, "validation_labels.fits")) as tmp:
        tab.write(tmp, format="fits")
    if not ctx.opts.keep_store:
        # the arrays map the store's files: let them go before the files do
        ctx.flux = ctx.ivar = None
        shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.timings["total"] = time.perf_counter() - ctx.t_start
    summary = _summary(ctx)
    _report.write_summary(summary, ctx.out_dir)
    _report.write_report(ctx.out_dir, summary=summary, figures=ctx.figures)
    return summary


def _summary(ctx):
    """The lab's summary (summary.json) from what the steps left in the context."""
    from .. import __version__

    o, model, prep = ctx.opts, ctx.model, ctx.prep
    return dict(
        package_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data=ctx.source, seed=int(o.seed), labels=list(LAB_LABELS),
        cuts=dict(rows=[dict(r) for r in prep.report.rows], n_input=int(prep.report.n_input),
                  n_kept=int(ctx.n_kept), failures=len(prep.failures),
                  n_continuum_flagged=int(prep.n_flagged)),
        continuum=ctx.cont_info,
        # the kept stars' training half (less the flagged binaries); the margin's apart
        n_train=int(np.sum(ctx.train < ctx.n_kept)), n_validation=int(len(ctx.valid)),
        training_margin=None if ctx.margin is None else dict(
            ctx.margin, n_training=int(np.sum(ctx.train >= ctx.n_kept))),
        mystery_star=dict(apogee_id=ctx.ids[ctx.mystery],
                          path=ctx.id_to_path.get(ctx.ids[ctx.mystery])),
        model=dict(path=ctx.model_path, order=model.order, extra_terms=model.term_names[
                       len(model.term_names) - len(model.extra_terms):],
                   reciprocal_labels=list(model.reciprocal_labels), n_terms=model.n_terms,
                   n_pixels=int(model.n_pixels), backend=model.backend,
                   n_flagged_pixels=int(np.sum(model.pixel_flags != 0)),
                   training_labels="catalog",
                   train_info={k: v for k, v in model.train_info.items()}),
        primary_fit=ctx.primary_key,
        choice=dict(requested=dict(extra_terms=o.extra_terms if isinstance(o.extra_terms, str)
                                   else list(o.extra_terms), test_step=o.test_step),
                    model=ctx.model_name, test_step=ctx.primary_key, **ctx.cv),
        validation=ctx.validation,
        error_calibration=ctx.error_calibration, binaries=ctx.binaries,
        targets=dict(against="true labels" if ctx.val_true is not None
                     else "unavailable (no truth)",
                     primary=ctx.validation[ctx.primary_key].get("targets_vs_true")),
        diagnostics=ctx.diagnostics, outliers=ctx.outliers,
        figures=[dict(file=f["file"], caption=f["caption"]) for f in ctx.figures],
        extras=ctx.extras_status,
        timings={k: round(v, 2) for k, v in ctx.timings.items()}, notes=ctx.notes,
        report=os.path.join(ctx.out_dir, "report.html"), **ctx.summary_extra)


def _bar_disabled(show_progress):
    """The ``disable`` of a progress bar: None lets tqdm decide (on a terminal)."""
    return None if show_progress is None else not show_progress


def _read_isochrones(opts):
    """Isochrone tracks for the Kiel diagram, and notes: files, dicts and MIST from the web.

    Each track is a dict with ``teff``, ``logg``, ``label`` (the giants of an
    isochrone: RGB and red clump) and ``info``, summary.json's record of it.
    """
    if opts.isochrone_source not in ("files", "mist"):
        raise ValueError(f"isochrone_source must be 'files' or 'mist', got "
                         f"{opts.isochrone_source!r}")
    fehs = None if opts.isochrone_feh is None else [float(f) for f in
                                                    np.atleast_1d(opts.isochrone_feh)]
    age = None if opts.isochrone_age is None else float(opts.isochrone_age)
    picked, notes = [], []  # (Isochrone, origin)
    for item in opts.isochrones or ():
        if isinstance(item, dict):
            continue
        picked += [(iso, "file") for iso in _isochrones_from_file(item, age, fehs)]
    if opts.isochrone_source == "mist":
        from .mist_web import mist_isochrones
        picked += mist_isochrones(6.0 if age is None else age,
                                  (0.0, -1.0) if fehs is None else fehs,
                                  cache_dir=opts.cache_dir)
    tracks = [dict(teff=np.asarray(item["teff"], float), logg=np.asarray(item["logg"], float),
                   label=str(item.get("label", "isochrone")),
                   info=dict(source="given", label=str(item.get("label", "isochrone"))))
              for item in opts.isochrones or () if isinstance(item, dict)]
    for iso, origin in picked:
        giants = iso.giants()
        label = iso.label  # e.g. "MIST 6 Gyr [Fe/H] = -1.00" ([M/H] for PARSEC)
        tracks.append(dict(teff=np.asarray(giants.teff, float),
                           logg=np.asarray(giants.logg, float), label=label,
                           info=dict(source=iso.source, origin=origin, path=iso.path,
                                     age_gyr=round(iso.age_gyr, 3), feh=round(iso.feh, 3),
                                     label=label)))
        far_age = age is not None and abs(np.log10(iso.age_gyr / age)) > 0.05
        far_feh = fehs is not None and min(abs(iso.feh - f) for f in fehs) > 0.1
        if far_age or far_feh:
            wanted = ([f"{age:g} Gyr"] if age is not None else []) + (
                ["[Fe/H] = " + " or ".join(f"{f:+.2f}" for f in fehs)] if fehs else [])
            notes.append(f"{iso.path}: the isochrone nearest {', '.join(wanted)} in this file "
                         f"is {iso.label}; drawn as it is")
    return tracks, notes


def _isochrones_from_file(path, age, fehs):
    """The file's isochrones nearest ``age`` and each of ``fehs`` (each drawn once)."""
    from .isochrones import read_isochrones, select_isochrone

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: isochrone file not found")
    try:
        blocks = read_isochrones(path)
        chosen = [select_isochrone(blocks, age_gyr=age, feh=f) for f in (fehs or [None])]
        for iso in chosen:
            iso.giants()  # a file without giants fails here, before any work
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise ValueError(f"{path}: cannot read the isochrone ({err})") from None
    return [iso for k, iso in enumerate(chosen) if all(iso is not c for c in chosen[:k])]


def _short_caption(o, width=125):
    """One line for an outlier panel: the label, fit vs catalog, and the main reason."""
    text = (f"{o['worst_label']} fit {o['fitted']:.4g} vs catalog {o['reference']:.4g}: "
            f"{o['main_reason']}")
    return text if len(text) <= width else text[:width - 3].rsplit(" ", 1)[0] + " ..."


def _survey_giant_branch(truth_labels, population=None):
    """Fit the embedded survey's own giant branch at [Fe/H] = 0 to its true labels (or None)."""
    try:
        from .isochrones import giant_branch
        gb = giant_branch(truth_labels[:, :3], ("TEFF", "LOGG", "FE_H"), feh=0.0)
        teff, logg = gb.track()
        return dict(teff=teff, logg=logg, label="survey giant branch, [Fe/H] = 0",
                    color="tab:red", note="line: the embedded survey's own giant branch fitted "
                    "to its true labels (cannon_fast.lab.isochrones.giant_branch), not a "
                    "stellar-model isochrone")
    except (ImportError, ValueError):
        pass
    if population is None:
        return None
    pop = np.char.strip(np.asarray(population).astype(str))
    sel = (pop == "rgb") & (np.abs(truth_labels[:, 2]) < 0.1)
    if sel.sum() < 20:
        return None
    g, t = truth_labels[sel, 1], truth_labels[sel, 0]
    edges = np.arange(np.floor(g.min() * 4) / 4, g.max() + 0.25, 0.25)
    mid, med = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        m = (g >= a) & (g < b)
        if m.sum() >= 3:
            mid.append(0.5 * (a + b))
            med.append(np.median(t[m]))
    if len(mid) < 3:
        return None
    return dict(teff=np.array(med), logg=np.array(mid), label="survey giant branch, [Fe/H] ~ 0",
                color="tab:red", note="line: the embedded survey's own giant branch (median "
                "true Teff of its RGB stars with |[Fe/H]| < 0.1 in log g bins), not a "
                "stellar-model isochrone")


def cv_scatter(summary):
    """The cross-validation scatter per label of a lab summary (fitted - catalog).

    The numbers the report compares an MCMC posterior with: the scatter of the
    validation fit the report uses (``primary_fit``) against the catalogue labels.
    """
    stats = summary["validation"][summary["primary_fit"]]["vs_catalog"]
    return {n: v["scatter"] for n, v in stats.items() if v.get("scatter") is not None}


def read_summary(path):
    """Read a lab summary: a report folder's ``summary.json``, or that file itself."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "summary.json")
    with open(path) as fh:
        return json.load(fh)
