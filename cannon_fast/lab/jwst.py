"""The JWST project (seed 001) as one run: catalogue, cross-match, spectra, StarNet vs the Cannon.

:func:`run_jwst_report` reads an APOGEE-like catalogue, a JWST/NIRSpec-like set of
spectra of the same stars (named ``'<row>_00'`` or by an ID column) and,
optionally, the APOGEE spectra; it writes a report folder (PNG figures,
``summary.json``, ``report.html``) with

* the catalogue: 2-D histogram log g-Teff, [Fe/H] histogram, 2-D histogram
  [Mg/Fe]-[Fe/H], a corner plot of the labels;
* the cross-match: stars in one set only (with their labels), repeated IDs,
  whether the labels of matched stars agree;
* ten stars spanning the labels: their APOGEE spectra (chip gaps visible), the
  same with the JWST spectra overplotted on the JWST range and zoomed to APOGEE's;
* StarNet (the regressor's default CNN, Fabbro et al. 2018) trained on the JWST
  spectra on a seeded 5:1:2 split, and the Cannon trained on the same training
  stars: loss curves, predicted-vs-true and residuals, RMSE, bias, R^2 and the
  fraction of true labels within 1 sigma, side by side.
"""
from __future__ import annotations

import html
import json
import os
import time

import numpy as np

from ..instruments import crossmatch_sets, parse_row_index, read_spectra
from ..instruments.crossmatch import ROW_INDEX_PATTERN
from .report import save_figure, to_jsonable, write_report, write_summary

__all__ = ["run_jwst_report", "rebuild_jwst_report", "spanning_stars", "read_catalog",
           "jwst_summary_html", "JWST_LABELS"]

#: What StarNet and the Cannon predict in the seed.
JWST_LABELS = ("TEFF", "LOGG", "FE_H")
#: Catalogue columns for the corner plot, those present are used.
CORNER_LABELS = ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE", "C_FE", "N_FE", "O_FE", "AL_FE")
#: APOGEE's wavelength range (the zoomed overlay), vacuum Angstrom.
APOGEE_RANGE = (15100.0, 17000.0)
TITLE = "cannon_fast JWST report"


def read_catalog(path):
    """A FITS catalogue (allStar-like; first table HDU) as a dict of columns.

    Placeholder values (<= -9998, as in allStar) become NaN; strings are stripped.
    """
    import fitsio

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such catalogue")
    with fitsio.FITS(path) as f:
        hdu = next((h for h in f if h.get_exttype() in ("BINARY_TBL", "ASCII_TBL")), None)
        if hdu is None:
            raise ValueError(f"{path}: no table HDU")
        data = hdu.read()
    out = {}
    for c in data.dtype.names:
        col = data[c]
        if col.ndim > 1:
            continue
        if col.dtype.kind in "SU":
            out[c] = np.char.strip(col.astype(str))
        elif col.dtype.kind == "f":
            col = col.astype(np.float64)
            col[col <= -9998.0] = np.nan
            out[c] = col
        else:
            out[c] = col
    if not out:
        raise ValueError(f"{path}: the table has no columns")
    return out


def spanning_stars(labels, n=10, seed=0):
    """``n`` stars that span the labels: farthest-point sampling in standardized labels.

    Starts from the star nearest the median and adds, each time, the star
    farthest from those already chosen, so the set reaches the edges of the
    distribution (unlike a random sample, which piles up where stars are dense).

    Parameters
    ----------
    labels : array_like, (N, L)
        Stars with a non-finite label are never chosen.
    n : int
    seed : int
        Breaks ties (unused otherwise).

    Returns
    -------
    ndarray of int64, (min(n, N_finite),)
        Row indices, in order of increasing first label.
    """
    lab = np.asarray(labels, float)
    ok = np.flatnonzero(np.all(np.isfinite(lab), axis=1))
    if ok.size == 0:
        raise ValueError("no star has every label: cannot choose stars spanning them")
    x = lab[ok]
    x = (x - np.median(x, 0)) / np.where(np.std(x, 0) > 0, np.std(x, 0), 1.0)
    x = x + 1e-9 * np.random.default_rng(seed).standard_normal(x.shape)
    chosen = [int(np.argmin(np.sum(x ** 2, axis=1)))]
    dist = np.sum((x - x[chosen[0]]) ** 2, axis=1)
    while len(chosen) < min(n, ok.size):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.sum((x - x[i]) ** 2, axis=1))
    rows = ok[chosen]
    return rows[np.argsort(lab[rows, 0], kind="stable")].astype(np.int64)


# ----------------------------------------------------------------------------- steps
def _prepare_out(out_dir, force):
    out_dir = os.fspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "summary.json")) and not force:
        raise FileExistsError(f"{out_dir} already holds a report (summary.json); pass "
                              "--force to replace it")
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def _catalog_figures(cat, out_dir, figures):
    from .plots.instruments import plot_hist, plot_hist2d

    have = [n for n in CORNER_LABELS if n in cat and np.isfinite(cat[n]).any()]
    if "TEFF" in cat and "LOGG" in cat:
        figures.append(save_figure(plot_hist2d(cat["TEFF"], cat["LOGG"], "TEFF", "LOGG",
                                               invert=(True, True)),
                                   out_dir, "catalog_logg_teff",
                                   "2-D histogram of log g against Teff (the Kiel diagram)."))
    if "FE_H" in cat:
        figures.append(save_figure(plot_hist(cat["FE_H"], "FE_H"), out_dir, "catalog_feh",
                                   "Distribution of [Fe/H]."))
    if "FE_H" in cat and "MG_FE" in cat:
        figures.append(save_figure(plot_hist2d(cat["FE_H"], cat["MG_FE"], "FE_H", "MG_FE"),
                                   out_dir, "catalog_mgfe_feh",
                                   "2-D histogram of [Mg/Fe] against [Fe/H]."))
    if len(have) >= 2:
        from .plots.lab import plot_corner
        lab = np.column_stack([cat[n] for n in have])
        lab = lab[np.all(np.isfinite(lab), axis=1)]
        if len(lab) > len(have):
            figures.append(save_figure(plot_corner(lab, have), out_dir, "catalog_corner",
                                       f"Corner plot of {', '.join(have)} "
                                       f"({len(lab)} stars with all of them)."))
    stats = {n: dict(n=int(np.isfinite(cat[n]).sum()), median=float(np.nanmedian(cat[n])),
                     p5=float(np.nanpercentile(cat[n], 5)),
                     p95=float(np.nanpercentile(cat[n], 95)))
             for n in have}
    return dict(n_stars=len(next(iter(cat.values()))), columns=list(cat), label_stats=stats)


def _match_spectra(cat, cat_path, spectra, id_column, duplicates):
    """Match a set of spectra to the catalogue: by '<row>_NN' names, else by an ID column."""
    name = os.path.basename(spectra.path)
    n_cat = len(next(iter(cat.values())))
    labels_cat = np.column_stack([cat[n] for n in JWST_LABELS]) if all(
        n in cat for n in JWST_LABELS) else None
    have = [n for n in JWST_LABELS if n in spectra.table]
    labels_b = spectra.labels(JWST_LABELS) if len(have) == len(JWST_LABELS) else None
    if id_column is None and all(ROW_INDEX_PATTERN.match(str(s)) for s in spectra.ids):
        rows, _ = parse_row_index(spectra.ids, name)
        keys_a, keys_b, rule = np.arange(n_cat), rows, "row index ('<row>_<visit>')"
    else:
        col = id_column or "APOGEE_ID"
        if col not in cat:
            raise ValueError(f"{cat_path}: no {col} column to match {name} by")
        ids_b = spectra.table.get(col, spectra.ids if id_column is None else None)
        if ids_b is None:
            raise ValueError(f"{name}: no {col} column to match the catalogue by")
        keys_a, keys_b, rule = cat[col], ids_b, f"ID column {col}"
    cm = crossmatch_sets(keys_a, keys_b, duplicates=duplicates,
                         labels_a=labels_cat if labels_b is not None else None,
                         labels_b=labels_b, label_names=JWST_LABELS,
                         names=(os.path.basename(cat_path), name))
    return cm, rule, labels_cat


def _apogee_bad_pixels(path):
    """APOGEE's PIXMASK decoding when the file has a bitmask array (else nothing masked)."""
    from ..apogee.bitmask import bad_pixel_mask

    path = os.fspath(path)
    if path.lower().endswith(".npz"):
        with np.load(path, allow_pickle=False) as d:
            has = any(k.upper() in ("BITMASK", "PIXMASK") for k in d.files)
    else:
        import fitsio
        with fitsio.FITS(path) as f:
            has = any((h.get_extname() or "").upper() in ("BITMASK", "PIXMASK") for h in f)
    return bad_pixel_mask if has else None


def _star_names(cat, rows):
    ids = cat.get("APOGEE_ID")
    return [str(ids[r]) if ids is not None else f"row {r}" for r in rows]


def _spectra_figures(cat, rows_cat, apogee, ap_rows, jwst, jw_rows, out_dir, figures):
    """The ten stars on the APOGEE grid, then with JWST overplotted (full range and zoomed)."""
    from .plots.instruments import plot_spectra_stack

    names = _star_names(cat, rows_cat)
    caps = [", ".join(f"{n} {cat[n][r]:.4g}" for n in JWST_LABELS if n in cat) for r in rows_cat]
    info = {}
    if apogee is not None:
        w = apogee.grid.wavelength
        good = apogee.ivar[ap_rows] > 0
        figures.append(save_figure(
            plot_spectra_stack(w, apogee.flux[ap_rows], good, names, caps,
                               title="Ten stars spanning the labels on the APOGEE grid"),
            out_dir, "apogee_ten_stars",
            "Pseudo-continuum normalized APOGEE spectra of ten stars chosen to span Teff, "
            "log g and [Fe/H]; the empty stretches are the gaps between the detector chips."))
        info["apogee"] = _coverage(apogee, good)
    if jwst is not None and apogee is not None:
        over = (jwst.grid.wavelength, jwst.flux[jw_rows], jwst.ivar[jw_rows] > 0)
        figures.append(save_figure(
            plot_spectra_stack(apogee.grid.wavelength, apogee.flux[ap_rows],
                               apogee.ivar[ap_rows] > 0, names, caps, overlay=over,
                               title="The same stars, JWST spectra overplotted"),
            out_dir, "apogee_jwst_full", "APOGEE (black) and JWST (red) spectra of the ten "
                                         "stars over the JWST range."))
        figures.append(save_figure(
            plot_spectra_stack(apogee.grid.wavelength, apogee.flux[ap_rows],
                               apogee.ivar[ap_rows] > 0, names, caps, overlay=over,
                               xlim=APOGEE_RANGE,
                               title="Zoomed to APOGEE's range"),
            out_dir, "apogee_jwst_zoom", "The same, zoomed to APOGEE's wavelength range: the "
                                         "lines line up; JWST's resolution is ~8x lower."))
    if jwst is not None:
        info["jwst"] = _coverage(jwst, jwst.ivar[jw_rows] > 0)
    return info


def _coverage(spectra, good):
    """Pixel count, range, and the gaps where none of the shown stars has data."""
    w = spectra.grid.wavelength
    empty = ~np.asarray(good).any(axis=0)
    gaps, i = [], 0
    inner = np.flatnonzero(~empty)
    lo_i, hi_i = (inner[0], inner[-1]) if inner.size else (0, -1)
    while i < len(w):
        if empty[i] and lo_i < i < hi_i:
            j = i
            while j < len(w) and empty[j]:
                j += 1
            if j - i >= 5:  # a run of bad pixels is no gap
                gaps.append([float(w[i - 1]), float(w[j])])
            i = j
        else:
            i += 1
    return dict(file=spectra.path, n_pixels=int(spectra.grid.n_pixels),
                wavelength_range=[float(w[0]), float(w[-1])],
                data_range=[float(w[lo_i]), float(w[hi_i])] if inner.size else None,
                step=float(np.median(np.diff(w))), spacing=spectra.grid.spacing,
                segments=[list(s) for s in spectra.grid.segments], gaps=gaps)


def _train_compare(jwst, labels, *, out_dir, figures, seed, nn, nn_options, nn_training,
                   cannon_order, backend, progress, log, band_limit=False):
    """StarNet and the Cannon on one seeded 5:1:2 split of the JWST spectra; metrics and plots."""
    from ..core.model import CannonModel
    from ..nn._common import split_indices

    names = list(JWST_LABELS)
    out = {}
    flux, ivar = jwst.flux, jwst.ivar
    tr, va, te = split_indices(len(flux), (5, 1, 2), seed)
    out["split"] = dict(n_train=len(tr), n_validation=len(va), n_test=len(te), seed=seed,
                        ratio="5:1:2")
    log(f"Cannon (order {cannon_order}) on {len(tr)} training spectra")
    t0 = time.perf_counter()
    model = CannonModel(names, order=cannon_order, grid=jwst.grid, backend=backend)
    model.train(flux[tr], ivar[tr], labels[tr], band_limit=band_limit)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = model.fit(flux[te], ivar[te])
    t_fit = time.perf_counter() - t0
    out["cannon"] = _scores(res.labels, res.errors, labels[te], names, ok=res.ok)
    out["cannon"].update(order=cannon_order, band_limit=bool(band_limit), train_time=t_train,
                         fit_rate=len(te) / max(t_fit, 1e-9), n_flagged=int((~res.ok).sum()))
    _prediction_figure(res.labels, labels[te], res.errors, names, out_dir, figures,
                       "cannon_predictions", f"The Cannon (order {cannon_order}) on the test "
                       "stars: predicted against true (top) and residuals (bottom).")
    if not nn:
        return out
    out["starnet"] = _train_starnet(flux, ivar, labels, names, seed, nn_options, nn_training,
                                    out_dir, figures, progress, log)
    out["starnet_over_cannon_rmse"] = {
        n: out["starnet"]["metrics"][n]["rmse"] / out["cannon"]["metrics"][n]["rmse"]
        for n in names}
    return out


def _train_starnet(flux, ivar, labels, names, seed, nn_options, nn_training, out_dir, figures,
                   progress, log):
    from ..nn import STARNET_TRAINING, SpectrumRegressor
    from ..nn.evaluate import plot_loss

    opts = dict(nn_options or {})
    train_kw = dict(STARNET_TRAINING, **(nn_training or {}))
    reg = SpectrumRegressor(names, seed=seed, **opts)
    layers = reg.layer_summary(flux.shape[1])
    log(f"StarNet: {sum(r['n_parameters'] for r in layers):,d} parameters; training "
        f"(batch {train_kw['batch_size']}, lr {train_kw['learning_rate']:g}, <= "
        f"{train_kw['epochs']} epochs)")
    reg.train(flux, labels, ivar, progress=progress, **train_kw)
    te = reg.split["test"]
    t0 = time.perf_counter()
    pred = reg.predict(flux[te], ivar[te])
    t_pred = time.perf_counter() - t0
    out = _scores(pred.labels, pred.errors, labels[te], names)
    h = reg.history
    out.update(layers=[dict(r, output_shape=list(r["output_shape"])) for r in layers],
               n_parameters=int(reg.n_parameters), architecture=reg.config,
               training=train_kw, n_epochs=h["n_epochs"], best_epoch=h["best_epoch"] + 1,
               train_loss=h["train_loss"], val_loss=h["val_loss"], train_time=h["train_time"],
               predict_rate=len(te) / max(t_pred, 1e-9),
               error_scale=reg.error_scale.tolist())
    figures.append(save_figure(plot_loss(h), out_dir, "starnet_loss",
                               "StarNet's training and validation loss per epoch (the dotted "
                               "line marks the network kept)."))
    _prediction_figure(pred.labels, labels[te], pred.errors, names, out_dir, figures,
                       "starnet_predictions", "StarNet on the test stars: predicted against "
                       "true (top) and residuals (bottom), with MC-dropout + predicted errors.")
    return out


def _scores(pred, err, true, names, ok=None):
    from ..nn.evaluate import calibration_fraction, label_metrics

    use = np.ones(len(pred), bool) if ok is None else np.asarray(ok, bool)
    m = label_metrics(pred[use], true[use], names)
    within = calibration_fraction(pred[use], err[use], true[use])
    return dict(metrics=m, within_1sigma={n: float(w) for n, w in zip(names, within)},
                n_test=int(len(pred)), n_used=int(use.sum()))


def _prediction_figure(pred, true, err, names, out_dir, figures, name, caption):
    from ..nn.evaluate import plot_predictions

    figures.append(save_figure(plot_predictions(pred, true, names, errors=err), out_dir, name,
                               caption))


# ----------------------------------------------------------------------------- the run
def run_jwst_report(catalog, jwst, out_dir, apogee=None, *, force=False, seed=0, n_show=10,
                    id_column=None, continuum_pixels=None, nn=True, nn_options=None,
                    nn_training=None, cannon_order=2, backend="auto", show_progress=None,
                    log=None, resolution=None, cannon_band_limit=False):
    """Run the JWST project and write its report folder.

    Parameters
    ----------
    catalog : str or os.PathLike
        APOGEE-like catalogue (FITS table with TEFF, LOGG, FE_H; MG_FE and other
        abundances are plotted when present; APOGEE_ID to match by ID).
    jwst : str or os.PathLike
        The JWST spectra (see :func:`cannon_fast.instruments.read_spectra`), named
        ``'<row>_NN'`` (row of the catalogue) or with an ID column.
    out_dir : str or os.PathLike
    apogee : str or os.PathLike, optional
        APOGEE spectra of the catalogue's stars (``.npz``/FITS with APOGEE_ID);
        normalized per chip when they are not.
    force : bool
        Replace an existing report in ``out_dir``.
    seed : int
        The 5:1:2 split, StarNet's weights and the choice of ties.
    n_show : int
        Stars whose spectra are drawn.
    id_column : str, optional
        Match the JWST set by this column instead of its '<row>_NN' names.
    continuum_pixels : str or array_like, optional
        Continuum pixels for the APOGEE spectra (a file for
        :func:`cannon_fast.core.continuum.load_continuum_pixels`); default: all pixels.
    nn : bool
        Train StarNet (needs torch).
    nn_options : dict, optional
        :class:`~cannon_fast.nn.SpectrumRegressor` architecture (default StarNet's).
    nn_training : dict, optional
        Overrides of :data:`~cannon_fast.nn.STARNET_TRAINING`.
    cannon_order : int
        Polynomial order of the Cannon (2 is The Cannon's; the mock is cubic).
    backend : str
    show_progress : bool, optional
    log : callable, optional
    resolution : float or array_like, optional
        Resolving power of the JWST spectra (their files do not say it).
    cannon_band_limit : bool
        Train the Cannon with theta band-limited to the LSF
        (``CannonModel.train(band_limit=True)``); needs ``resolution``.

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    log = log or (lambda m: None)
    if cannon_band_limit and resolution is None:
        raise ValueError(f"{os.fspath(jwst)}: band-limiting the Cannon needs the spectra's "
                         "resolving power (resolution=, --resolution)")
    t_start = time.perf_counter()
    out_dir = _prepare_out(out_dir, force)
    figures, summary = [], dict(report_kind="jwst", seed=seed, labels=list(JWST_LABELS))
    cat_path = os.fspath(catalog)
    cat = read_catalog(cat_path)
    missing = [n for n in JWST_LABELS if n not in cat]
    if missing:
        raise ValueError(f"{cat_path}: the catalogue lacks {', '.join(missing)}")
    summary["catalog"] = dict(path=cat_path, **_catalog_figures(cat, out_dir, figures))
    log(f"catalogue: {summary['catalog']['n_stars']} stars")
    jw = read_spectra(jwst, resolution=resolution)
    cm, rule, labels_cat = _match_spectra(cat, cat_path, jw, id_column, "error")
    summary["jwst_match"] = dict(rule=rule, **cm.as_dict(cat.get("APOGEE_ID"), labels_cat,
                                                         JWST_LABELS))
    log(cm.describe(cat.get("APOGEE_ID"), labels_cat, JWST_LABELS))
    ap, ap_rows = None, None
    jw_of_cat = dict(zip(cm.rows_a.tolist(), cm.rows_b.tolist()))
    candidates = np.array(sorted(jw_of_cat))
    if apogee is not None:
        cont = continuum_pixels
        if isinstance(cont, (str, os.PathLike)):
            from ..core.continuum import load_continuum_pixels
            cont = load_continuum_pixels(cont)
        ap = read_spectra(apogee, normalize=True, continuum_pixels=cont,
                          bad_pixels=_apogee_bad_pixels(apogee))
        acm, arule, _ = _match_spectra(cat, cat_path, ap, None, "first")
        summary["apogee_match"] = dict(rule=arule, **acm.as_dict())
        ap_of_cat = dict(zip(acm.rows_a.tolist(), acm.rows_b.tolist()))
        candidates = np.array([r for r in candidates if r in ap_of_cat])
    if candidates.size == 0:
        raise ValueError(f"no star of {cat_path} has spectra in every set given")
    show = candidates[spanning_stars(labels_cat[candidates], n_show, seed)]
    jw_rows = np.array([jw_of_cat[r] for r in show])
    if ap is not None:
        ap_rows = np.array([ap_of_cat[r] for r in show])
    summary["shown_stars"] = [dict(row=int(r), id=n, **{k: float(cat[k][r]) for k in JWST_LABELS})
                              for r, n in zip(show, _star_names(cat, show))]
    summary["spectra"] = _spectra_figures(cat, show, ap, ap_rows, jw, jw_rows, out_dir,
                                          figures)
    labels_jw = labels_cat[cm.rows_a]
    jw_m = jw.subset(cm.rows_b)
    summary["comparison"] = _train_compare(
        jw_m, labels_jw, out_dir=out_dir, figures=figures, seed=seed, nn=nn,
        nn_options=nn_options, nn_training=nn_training, cannon_order=cannon_order,
        backend=backend, progress=show_progress, log=log, band_limit=cannon_band_limit)
    from .. import __version__
    summary.update(figures=figures, package_version=__version__,
                   created=time.strftime("%Y-%m-%d %H:%M:%S"),
                   timings=dict(total=time.perf_counter() - t_start))
    write_summary(summary, out_dir)
    summary["report"] = write_report(out_dir, to_jsonable(summary), figures, title=TITLE,
                                     summary_html=jwst_summary_html)
    return summary


def rebuild_jwst_report(out_dir):
    """Rebuild ``report.html`` of a JWST report folder from its summary.json and PNGs."""
    return write_report(out_dir, title=TITLE, summary_html=jwst_summary_html)


# ----------------------------------------------------------------------------- the page
def _row(k, v):
    return f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"


def _metrics_table(comp, names):
    methods = [m for m in ("cannon", "starnet") if m in comp]
    head = "".join(f"<th>{m} {k}</th>" for m in methods for k in ("RMSE", "bias", "R²", "≤1σ"))
    rows = []
    for n in names:
        cells = ""
        for m in methods:
            s = comp[m]["metrics"][n]
            cells += (f"<td>{s['rmse']:.4g}</td><td>{s['bias']:+.3g}</td><td>{s['r2']:.4f}</td>"
                      f"<td>{100 * comp[m]['within_1sigma'][n]:.0f}%</td>")
        rows.append(f"<tr><th>{html.escape(n)}</th>{cells}</tr>")
    return f"<table><tr><th>label</th>{head}</tr>{''.join(rows)}</table>"


def jwst_summary_html(s):
    """The summary tables of the JWST report page (for :func:`write_report`)."""
    parts = ["<h2>Summary</h2><table>"]
    cat, m = s.get("catalog", {}), s.get("jwst_match", {})
    parts += [_row("catalogue", f"{cat.get('path')}: {cat.get('n_stars')} stars"),
              _row("JWST matched by", m.get("rule")),
              _row("stars in both", m.get("n_matched")),
              _row("in the catalogue only", json.dumps(m.get("only_a")))]
    for k, v in (s.get("spectra") or {}).items():
        parts.append(_row(f"{k} spectra", f"{v['n_pixels']} pixels, "
                          f"{v['wavelength_range'][0]:.1f}-{v['wavelength_range'][1]:.1f} Å "
                          f"({v['spacing']}); gaps "
                          + (", ".join(f"{a:.1f}-{b:.1f} Å" for a, b in v["gaps"]) or "none")))
    for n, a in (m.get("label_agreement") or {}).items():
        parts.append(_row(f"{n} catalogue vs JWST", f"max |diff| {a['max_abs_diff']:.3g}, "
                          f"{a['n_disagree']} beyond {a['tolerance']:.3g}"))
    parts.append("</table>")
    comp = s.get("comparison") or {}
    if comp:
        sp = comp["split"]
        parts.append(f"<h3>StarNet and the Cannon on the same test stars ({sp['n_train']} / "
                     f"{sp['n_validation']} / {sp['n_test']}, seed {sp['seed']})</h3>")
        parts.append(_metrics_table(comp, s.get("labels", list(JWST_LABELS))))
        st = comp.get("starnet")
        if st:
            parts.append(f"<p>StarNet: {st['n_parameters']:,d} parameters, {st['n_epochs']} "
                         f"epochs (kept {st['best_epoch']}), trained in {st['train_time']:.0f} s, "
                         f"predicts {st['predict_rate']:.0f} spectra/s.</p><pre>"
                         + html.escape(_layers_text(st["layers"])) + "</pre>")
    return "\n".join(parts)


def _layers_text(layers):
    from ..nn.regressor import format_layer_summary
    return format_layer_summary(layers)
