"""The lab's report folder: figures as PNG, ``summary.json`` and a self-contained ``report.html``.

:func:`write_report` builds the page from a summary dict and the figures;
:func:`rebuild_report` rebuilds it from a folder's ``summary.json`` and whatever
PNG files are there (``cannon-fast report DIR``), so figures added later by
other steps (MCMC, movies) appear too.

The page leads with what a reader looks for first: the headline numbers against
the truth (or the catalogue), the one-to-one figure, the Kiel diagram and the
gradient spectra. Then come the sections of :data:`SECTIONS`, each foldable, in
order; a last one holds every number of ``summary.json``. A step that adds to the
lab adds its section with one call::

    from cannon_fast.lab.report import ReportSection, add_section
    add_section(ReportSection("pulls", "Error pulls", render=lambda s: ...,
                              figures=("pulls*.png",)))

``render(summary)`` returns the section's HTML (or None to leave it out when the
summary has nothing for it); ``figures`` are file names or glob patterns of the
PNG/GIF/MP4 files shown in it. A section for an optional step (``summary["extras"]
[key]``) needs no render at all: its numbers are shown as a table by default.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import html
import json
import os
from typing import Callable, Optional

import numpy as np

from .._util import atomic_path
from .fit_steps import FIT_STEPS, FIT_STEP_NAMES, fit_step_title

__all__ = ["save_figure", "write_summary", "write_report", "rebuild_report", "to_jsonable",
           "ReportSection", "SECTIONS", "add_section"]


def to_jsonable(obj):
    """Convert numpy scalars/arrays (nested in dicts/lists) to plain JSON types; NaN -> None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_figure(fig, out_dir, name, caption="", dpi=110):
    """Save a Figure as ``<out_dir>/<name>.png`` (atomically) and release it.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    out_dir : str or os.PathLike
    name : str
        File stem.
    caption : str
    dpi : int

    Returns
    -------
    dict
        ``{"name", "file", "caption"}``.
    """
    path = os.path.join(os.fspath(out_dir), f"{name}.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    fig.clear()
    return dict(name=name, file=os.path.basename(path), caption=caption)


def write_summary(summary, out_dir):
    """Write ``summary.json`` (atomically); returns its path."""
    path = os.path.join(os.fspath(out_dir), "summary.json")
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(to_jsonable(summary), fh, indent=2, sort_keys=False)
    return path


# --------------------------------------------------------------------------- sections
@dataclasses.dataclass
class ReportSection:
    """One foldable section of ``report.html``.

    Attributes
    ----------
    key : str
        Its anchor (``report.html#key``); for an optional step, the key of its
        entry in ``summary["extras"]``.
    title : str
    render : callable, optional
        ``render(summary) -> str or None``: the section's HTML; None (or "")
        leaves the section out unless it has figures. Default: the numbers of
        ``summary["extras"][key]`` as a table.
    figures : tuple of str
        File names or glob patterns of the figures (PNG, GIF, MP4) shown in it.
    open : bool
        Unfolded when the page opens.
    """

    key: str
    title: str
    render: Optional[Callable] = None
    figures: tuple = ()
    open: bool = False


def add_section(section, before=None):
    """Add a section to every report written from now on (replacing one of the same key).

    Parameters
    ----------
    section : ReportSection
    before : str, optional
        Key of the section it goes before; default: after the lab's own sections,
        before the timings, notes and the table of every number.
    """
    keys = [s.key for s in SECTIONS]
    if section.key in keys:
        SECTIONS[keys.index(section.key)] = section
        return
    anchor = before if before in keys else "timings"
    SECTIONS.insert(keys.index(anchor) if anchor in keys else len(SECTIONS), section)


#: The figures of the first screen, in order: the one-to-one plot (against the truth when
#: there is one), the Kiel diagram and the gradient spectra.
HEADLINE_FIGURES = (("cv_true.png", "cv_catalog.png"), ("kiel.png",), ("gradients.png",))


def _fmt(name, v, digits=None):
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(v)
    if name == "TEFF":
        return f"{v:.1f}"
    return f"{v:.{digits or 4}f}"


def _share(v):
    return "–" if v is None else f"{100 * v:.0f}%"


def _esc(x):
    return html.escape(str(x))


def _table(header, rows, cls=""):
    """An HTML table: ``header`` (list of str) and rows of already-formatted cells."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _kv_table(pairs):
    """A two-column table of (name, value) pairs, values escaped; None values left out."""
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_scalar(v) if v != '' else 'none')}</td>"
                   "</tr>" for k, v in pairs if v is not None)
    return f"<table>{rows}</table>" if rows else ""


def _stats_table(stats, labels, caption=""):
    rows = []
    for key in ("bias", "scatter", "mad_scatter", "n"):
        rows.append([f"<b>{key.replace('_', ' ')}</b>"] + [
            _fmt(n, stats[n].get(key)) for n in labels if n in stats])
    table = _table([""] + [n for n in labels if n in stats], rows)
    return (f"<p class='cap'>{_esc(caption)}</p>" if caption else "") + table


def _flags_table(flags, total=None):
    """The flag counts as a small table (flags no star has are listed after it)."""
    if not flags:
        return ""
    set_ = [(k, v) for k, v in flags.items() if v]
    none = [k for k, v in flags.items() if not v]
    pct = (lambda v: f" ({100 * v / total:.0f}%)") if total else (lambda v: "")
    out = (_table(["flag", "stars"], [[_esc(k), f"{v}{pct(v)}"] for k, v in set_], "small")
           if set_ else "<p>No star carries a flag.</p>")
    if none:
        out += f"<p class='muted'>Set on no star: {_esc(', '.join(none))}.</p>"
    return out


def _labels(s):
    return list(s.get("labels") or [])


# --------------------------------------------------------------------------- headline
def _lead_html(s):
    """One line: the data, the split, the model and the label fit."""
    step = s.get("primary_fit")
    facts = [s.get("data", {}).get("kind"),
             f"{s.get('n_train')} training / {s.get('n_validation')} validation stars"
             if s.get("n_train") is not None else None,
             f"model: {(s.get('choice') or {}).get('model')}" if s.get("choice") else None,
             f"label fit: {FIT_STEP_NAMES.get(step, step)}" if step else None]
    return f"<p class='lead'>{_esc(' · '.join(f for f in facts if f))}</p>"


def _headline_html(s):
    """The first screen's numbers: against the truth and the catalogue, and the flags."""
    labels = _labels(s)
    v = (s.get("validation") or {}).get(s.get("primary_fit")) or {}
    out = []
    if v:
        out.append(_headline_table(s, v, labels))
        out.append(f"<p>{v.get('n_ok')} of {v.get('n_fitted')} validation fits usable; median "
                   f"reduced χ² {_fmt('', v.get('median_reduced_chi2'), 2)}. Stars per flag "
                   "(<a href='#validation'>every fit</a>, <a href='#outliers'>worst "
                   "outliers</a>):</p>")
        out.append(_flags_table(v.get("flags"), v.get("n_fitted")))
    return "\n".join(out)


_UNITS = {"TEFF": "K", "LOGG": "dex"}


def _headline_table(s, v, labels):
    """Per label: bias and scatter against the truth and the catalogue, formal error, target."""
    targets = (s.get("targets") or {}).get("primary") or {}
    true, cat = v.get("vs_true") or {}, v.get("vs_catalog") or {}
    header = ["label"]
    if true:
        header += ["bias vs truth", "scatter vs truth"]
    header += ["bias vs catalogue", "scatter vs catalogue", "median error", "target"]
    rows = []
    for n in labels:
        unit = _UNITS.get(n, "dex" if n.endswith(("_H", "_FE")) else "")
        row = [f"<b>{_esc(n)}</b>" + (f" <span class='muted'>({unit})</span>" if unit else "")]
        if true:
            row += [_fmt(n, (true.get(n) or {}).get("bias")),
                    _fmt(n, (true.get(n) or {}).get("scatter"))]
        row += [_fmt(n, (cat.get(n) or {}).get("bias")), _fmt(n, (cat.get(n) or {}).get("scatter")),
                _fmt(n, (v.get("median_errors") or {}).get(n))]
        t = targets.get(n)
        row.append("–" if not isinstance(t, dict) else (
            f"<span class='{'ok' if t['met'] else 'bad'}'>{'met' if t['met'] else 'NOT met'}"
            f"</span> (|bias| ≤ {t['bias_max']}, scatter ≤ {t['scatter_max']})"))
        rows.append(row)
    against = (s.get("targets") or {}).get("against", "the truth")
    cap = (f"The validation stars ({v.get('n_fitted')}), fitted - reference. Targets against "
           f"{against}.")
    return f"<p class='cap'>{_esc(cap)}</p>" + _table(header, rows, "headline")


# --------------------------------------------------------------------------- the lab's sections
def _validation_html(s):
    labels = _labels(s)
    parts = []
    for key in FIT_STEPS:
        v = (s.get("validation") or {}).get(key)
        if not v:
            continue
        chosen = " (the fit shown in the figures)" if key == s.get("primary_fit") else ""
        parts.append(f"<h3>{_esc(fit_step_title(key))}{chosen}</h3>")
        parts.append(f"<p>{v['n_ok']} of {v['n_fitted']} fits usable; median reduced χ² "
                     f"{_fmt('', v.get('median_reduced_chi2'), 3)}.</p>")
        rows = []
        for name, stats in (("vs truth", v.get("vs_true")), ("vs catalogue", v.get("vs_catalog"))):
            for k in ("bias", "scatter", "mad_scatter"):
                if stats:
                    rows.append([f"<b>{k.replace('_', ' ')} {name}</b>"]
                                + [_fmt(n, stats[n].get(k)) for n in labels if n in stats])
        if v.get("median_errors"):
            rows.append(["<b>median error</b>"]
                        + [_fmt(n, v["median_errors"].get(n)) for n in labels])
        parts.append(_table([""] + labels, rows))
        broad = (v.get("broadening") or {}).get("percentiles_5_50_95")
        if broad:
            parts.append(f"<p>Fitted extra line broadening (Gaussian velocity variance "
                         f"relative to the model's, (km/s)²): 5th/50th/95th percentiles "
                         f"{broad[0]:+.2f} / {broad[1]:+.2f} / {broad[2]:+.2f}; median error "
                         f"{v['broadening']['median_error']:.2f}.</p>")
        parts.append(_flags_table(v.get("flags"), v.get("n_fitted")))
    return "\n".join(parts)


def _choice_html(s):
    """The cross-validation candidates as a table, best first, the chosen one marked."""
    c = s.get("choice") or {}
    scatter = c.get("scatter") or {}
    if not scatter:
        return None
    labels = _labels(s)
    best = np.array(scatter[min(scatter, key=lambda k: _geo(scatter[k]))], float)
    rows = []
    for name in sorted(scatter, key=lambda k: _geo(scatter[k])):
        model, _, step = name.rpartition(" / ")
        rel = float(np.exp(np.mean(np.log(np.asarray(scatter[name], float) / best))))
        mark = name == f"{c.get('model')} / {c.get('test_step')}"
        cells = [_esc(model), _esc(FIT_STEP_NAMES.get(step, step)), f"{rel:.3f}"] + [
            _fmt(n, x) for n, x in zip(labels, scatter[name])]
        rows.append([f"<b>{x}</b>" for x in cells] if mark else cells)
    return (f"<p>{_esc(c.get('note', '').split(':')[0])}. Chosen: <b>{_esc(c.get('model'))}"
            f"</b> with the <b>{_esc(FIT_STEP_NAMES.get(c.get('test_step'), ''))}</b> fit "
            "(bold). Relative scatter: geometric mean over labels of the scatter against the "
            "catalogue, relative to the best.</p>"
            + _table(["model", "label fit", "relative scatter"] + labels, rows))


def _geo(values):
    return float(np.exp(np.mean(np.log(np.asarray(values, float)))))


def _data_html(s):
    d, cuts = s.get("data", {}), s.get("cuts") or {}
    cont = s.get("continuum", {})
    out = [_kv_table((
        ("data", f"{d.get('kind', '')}: {d.get('root', '')}"), ("allStar", d.get("allstar")),
        ("truth", d.get("truth") or "none"), ("apStar files", d.get("n_apstar_files")),
        ("kept by the cuts", cuts.get("n_kept")),
        ("training / validation", f"{s.get('n_train')} / {s.get('n_validation')}"),
        ("held-back mystery star", (s.get("mystery_star") or {}).get("apogee_id")),
        ("example stars", ", ".join(f"{e['apogee_id']} ({e['role']})"
                                    for e in s.get("example_stars", [])) or None),
        ("Kiel diagram isochrones", "; ".join(
            i.get("label", "") + (f" ({i['origin']}: {i.get('path')})" if i.get("origin")
                                  else "") for i in s.get("isochrones", [])) or None),
        ("continuum pixels", f"{cont.get('n_pixels')} ({cont.get('method', '')})"
         if cont else None)))]
    rows = cuts.get("rows") or []
    if rows:
        out.append("<h3>Cuts</h3>" + _table(
            ["cut", "fails", "removed", "remaining"],
            [["input", "", "", cuts.get("n_input")]]
            + [[f"{_esc(r['name'])} <span class='muted'>({_esc(r['description'])})</span>",
                r["fails"], r["removed"], r["remaining"]] for r in rows]))
    return "\n".join(out)


def _model_html(s):
    m = s.get("model") or {}
    if not m:
        return None
    info = m.get("train_info") or {}
    pairs = [(k, ", ".join(map(str, v)) if isinstance(v, list) else v)
             for k, v in m.items() if k != "train_info"]
    pairs += [(f"training: {k}", v) for k, v in info.items()
              if not isinstance(v, (dict, list))]
    return _kv_table(pairs)


def _diagnostics_html(s):
    """One table per diagnostic: by its form, Teff bins, populations or label statistics."""
    labels = _labels(s)
    parts = []
    for key, v in (s.get("diagnostics") or {}).items():
        parts.append(f"<h3>{_esc(key.replace('_', ' '))}</h3>"
                     f"<p class='cap'>{_esc(v.get('note', ''))}</p>")
        if "bins" in v:
            parts.append(_table(["true Teff", "n", "bias (K)", "scatter (K)"], [
                [f"{b['teff_range'][0]}-{b['teff_range'][1]}", b["n"],
                 _fmt("TEFF", b["bias"]), _fmt("TEFF", b["scatter"])] for b in v["bins"]]))
        elif "rows" in v:
            parts.append(_populations_html(v))
        else:
            stats = v.get("vs_true") or v.get("stats")
            if stats:
                parts.append(_stats_table(stats, labels))
            share = v.get("flagged_share_of_squared_error")
            if share:
                parts.append(_table(["", *share], [["<b>flagged stars' share of the squared "
                                                    "error</b>"] + [_share(x) for x in
                                                                   share.values()]]))
    return "\n".join(parts)


def _populations_html(v):
    names = [n for n in v["rows"][0] if n not in ("population", "n")] if v["rows"] else []
    header = ["population", "n"] + [f"{n} {k}" for n in names
                                    for k in ("bias", "scatter", "share of squared error")]
    return _table(header, [
        [_esc(r["population"]), r["n"]] + [x for n in names for x in (
            _fmt(n, r[n]["bias"]), _fmt(n, r[n]["scatter"]),
            _share(r[n]["share_of_squared_error"]))] for r in v["rows"]])


def _outliers_html(s):
    outl = s.get("outliers") or []
    if not outl:
        return None
    rows = []
    for o in outl:
        co = o.get("continuum_offset")
        rows.append([_esc(x) for x in (
            o.get("apogee_id", o["index"]), o["worst_label"],
            _fmt(o["worst_label"], o.get("fitted")), _fmt(o["worst_label"], o.get("reference")),
            f"{o['reduced_chi2']:.2f}" if o.get("reduced_chi2") is not None else "–",
            " ".join(o.get("fit_flags") or []) or "–", f"{100 * o['bad_pixel_fraction']:.1f}%",
            f"{100 * co:+.2f}%" if co is not None else "–", o.get("catalog_flags") or "–",
            o.get("diagnosis", ""))])
    return _table(["star", "label", "fit", "catalogue", "reduced χ²", "fit flags",
                   "bad pixels", "continuum offset", "catalogue flags", "diagnosis"], rows,
                  "outliers")


def _broadening_html(s):
    b = ((s.get("validation") or {}).get("broadened") or {}).get("broadening") or {}
    p = b.get("percentiles_5_50_95")
    if not p:
        return None
    return (f"<p>Fitted extra line broadening of the validation stars, {_esc(b.get('unit'))}: "
            f"5th/50th/95th percentiles {p[0]:+.2f} / {p[1]:+.2f} / {p[2]:+.2f}, median error "
            f"{b.get('median_error', float('nan')):.2f}.</p>")


def _extra(s, key):
    return (s.get("extras") or {}).get(key)


def _step_status(e):
    """How an optional step went, in words (not a verdict on its numbers)."""
    if e.get("status") == "ok":
        return f"<p class='muted'>Ran in {e.get('seconds', 0):.1f} s.</p>"
    return (f"<p class='bad'>{_esc(e.get('status'))}: {_esc(e.get('reason', ''))}</p>")


def _mcmc_html(s):
    e = _extra(s, "mcmc")
    if not e:
        return None
    out = [_step_status(e)]
    if e.get("summary"):
        out.append(f"<p>Star {_esc(e.get('star'))}; converged: "
                   f"{'yes' if e.get('converged') else 'NO'}.</p><pre>{_esc(e['summary'])}"
                   "</pre>")
    for w in e.get("warnings") or []:
        out.append(f"<p class='bad'>{_esc(w)}</p>")
    return "\n".join(out)


def _movies_html(s):
    e = _extra(s, "movies")
    if not e:
        return None
    return _step_status(e) + "".join(f"<p class='muted'>{_esc(n)}</p>"
                                     for n in e.get("notes") or [])


def _errors_html(s):
    """Lab step 12: pull widths per S/N bin, formal and calibrated, and the calibration."""
    pulls = ((s.get("validation") or {}).get(s.get("primary_fit")) or {}).get("pulls")
    if not pulls:
        return None
    cal = s.get("error_calibration") or {}
    ref = "vs_true" if "vs_true" in pulls else "vs_catalog"
    bins = pulls.get("snr_bins", [])
    rows = []
    for name, per_bin in pulls[ref].items():
        cells = []
        for b in bins:
            e = per_bin.get(b) or {}
            cells.append(f"{_fmt('', e.get('formal'), 2)} → <b>{_fmt('', e.get('calibrated'), 2)}"
                         f"</b> <span class='muted'>(n={e.get('n')})</span>")
        rows.append([f"<b>{_esc(name)}</b>"] + cells)
    unflagged = ((s.get("binaries") or {}).get("validation") or {}).get("pulls_unflagged_vs_true")
    for name, per_bin in (unflagged or {}).items():   # a binary's error is no model error
        rows.append([f"<b>{_esc(name)}</b>, stars the binary screen passes"] + [
            f"{_fmt('', (per_bin.get(b) or {}).get('formal'), 2)} → <b>"
            f"{_fmt('', (per_bin.get(b) or {}).get('calibrated'), 2)}</b>" for b in bins])
    return (f"<p>Standard deviation of (fit − {'true' if ref == 'vs_true' else 'catalogue'} "
            "label) / error per S/N bin: formal → calibrated (1 is right; 0.8–1.25 the lab's "
            f"band). The calibrated errors add a model-error term learned by "
            f"{_esc(cal.get('note') or 'cross-validation in the training set')} against the "
            f"{_esc(cal.get('reference') or 'reference')}; it is stored in model.fits and "
            "applied by fit and label.</p>" + _table(["label"] + bins, rows))


def _binaries_html(s):
    """Lab step 15: the binary screen of every star, and the optional composite fits."""
    b = s.get("binaries") or {}
    out = []
    tr, va = b.get("training"), b.get("validation")
    if tr:
        out.append(f"<p>Training stars: {tr['n_flagged']} of {tr['n_screened']} flagged "
                   f"(composite fit improves χ² by more than {tr['min_delta_chi2']:g} times the "
                   "single fit's reduced χ²) and left out of training.</p>")
    sm = b.get("secondary_model")
    if sm:
        out.append("<p>Composite fits: " + (
            f"the secondary's spectrum from a model of {sm['n_stars']} dwarfs of the survey "
            f"({sm.get('n_binaries_left_out', 0)} flagged as binaries themselves left out; "
            f"TEFF {sm['teff_range'][0]:.0f}-{sm['teff_range'][1]:.0f} K, LOGG "
            f"{sm['logg_range'][0]:.2f}-{sm['logg_range'][1]:.2f}), its light spread over "
            "velocities (visits at different orbital phases)" if sm.get("n_stars")
            else _esc(sm.get("note", ""))) + ".</p>")
    if va:
        out.append(f"<p>Validation stars: {va['n_flagged']} of {va['n_screened']} flagged "
                   f"({va.get('stars_per_second') or 0:.0f} stars/s); columns "
                   f"{_esc(va.get('columns', ''))}.</p>")
        t = va.get("truth")
        if t:
            bright = (f"; bright, fast binaries ({_esc(t.get('bright_fast', ''))}): "
                      f"{t.get('n_bright_fast_flagged')} of {t.get('n_bright_fast')}"
                      if "n_bright_fast" in t else "")
            out.append(f"<p>Against the truth: {t['n_binaries_flagged']} of {t['n_binaries']} "
                       f"binaries flagged{bright}; {t['n_singles_flagged']} of "
                       f"{t['n_singles']} single stars flagged.</p>")
        labels = _labels(s)
        rows = []
        for key, name in (("true_singles_vs_true", "true singles"),
                          ("singles_vs_true", "not flagged"),
                          ("flagged_single_fit_vs_true", "flagged: single-star fit"),
                          ("flagged_composite_fit_vs_true", "flagged: composite fit's primary")):
            st = va.get(key)
            if st:
                rows.append([f"<b>{name}</b>"] + [
                    f"{_fmt(n, st[n].get('bias'))} / {_fmt(n, st[n].get('scatter'))}"
                    for n in labels if n in st])
        if rows:
            out.append("<p class='cap'>Bias / scatter against the truth:</p>"
                       + _table([""] + labels, rows))
    extra = _extra_default("binaries")(s)
    if extra:
        out.append("<h3>Composite fits of a few stars (optional step)</h3>" + extra)
    return "\n".join(out) or None


def _extra_default(key):
    """The default render of an optional step: its status and its numbers as a table."""
    def render(s):
        e = _extra(s, key)
        if not e:
            return None
        rest = {k: v for k, v in e.items() if k not in ("status", "seconds", "reason")}
        return _step_status(e) + (_tree(rest) if rest else "")
    return render


def _nn_scatter_html(s, e):
    """One network's scatter next to the Cannon's, so that its status is no verdict."""
    out = [_step_status(e)]
    cannon = (s.get("validation") or {}).get(s.get("primary_fit")) or {}
    labels = _labels(s)
    for ref, name in (("vs_true", "truth"), ("vs_catalog", "catalogue")):
        if e.get(ref) and cannon.get(ref):
            rows = [[f"<b>{who}</b>"] + [_fmt(n, (st.get(n) or {}).get("scatter"))
                                         for n in labels]
                    for who, st in (("neural network", e[ref]), ("the Cannon", cannon[ref]))]
            rows += [["<b>ratio</b>"] + [
                _fmt("", (e[ref].get(n) or {}).get("scatter", np.nan)
                     / max((cannon[ref].get(n) or {}).get("scatter", np.nan), 1e-300), 2)
                for n in labels]]
            out.append(f"<p class='cap'>Scatter against the {name} "
                       f"({_esc(e.get('architecture', ''))}, ≤ {e.get('epochs_max')} epochs):"
                       "</p>" + _table([""] + labels, rows))
    return "\n".join(out)


def _nn_html(s):
    """Lab step 16: each network and the Cannon on the validation stars, side by side."""
    nn = _extra(s, "nn")
    if not nn:
        return None
    if nn.get("status") != "ok":
        return _step_status(nn)
    if not nn.get("networks"):   # one network's scatter (summaries before the comparison)
        return _nn_scatter_html(s, nn)
    key = "vs_true" if "vs_true" in nn["cannon"] else "vs_catalog"
    labels = [n for n in s.get("labels", []) if n in nn["cannon"][key]]
    header = ["method"] + [f"{n} {k}" for n in labels for k in ("bias", "RMSE")] + ["training"]
    rows = [("Cannon", nn["cannon"], "")]
    rows += [(k, v, f"{v['n_weights']} weights, {v['n_epochs']} epochs, "
                    f"{v['train_seconds']:.0f} s"
                    + (f", + {v['cannon_spectra']} Cannon spectra" if v.get("cannon_spectra")
                       else "")
                    + (f", mean of {v['members']} seeds" if v.get("members", 1) > 1 else "")
                    + (f", {v['lr_schedule']} learning rate" if v.get("lr_schedule", "plateau")
                       != "plateau" else "")
                    + (f"; errors calibrated on {v['n_calibration_stars']} "
                       + ("observed " if v.get("cannon_spectra") else "")
                       + f"stars against their {v.get('calibrated_against', 'catalogue labels')}"
                       if "n_calibration_stars" in v else "")
                    + ("; true labels within 1σ: " + " / ".join(
                        f"{100 * c['fraction']:.0f}" for c in v["true_within_1sigma"].values()
                        if c.get("fraction") is not None) + " %"
                       if v.get("true_within_1sigma") else ""))
             for k, v in nn["networks"].items()]
    body = [[_esc(name) + (" (chosen)" if name == nn.get("chosen") else "")
             + (" (best)" if name == nn.get("best") and name != nn.get("chosen") else "")]
            + [_fmt(n, st[key][n][k]) for n in labels for k in ("bias", "rmse")] + [_esc(info)]
            for name, st, info in rows]
    return (_step_status(nn) + f"<p>{_esc(nn.get('headline', ''))}</p>"
            f"<p class='cap'>Against the {_esc(nn.get('scored_against', ''))}, validation "
            "stars:</p>" + _table(header, body))


def _timings_html(s):
    tm = s.get("timings") or {}
    if not tm:
        return None
    return _table(list(tm), [[f"{v:.1f}" for v in tm.values()]]) + "<p class='muted'>seconds</p>"


def _notes_html(s):
    notes = [_short_note(s, n) for n in s.get("notes") or []]
    return "".join(f"<p class='note'>{_esc(n)}</p>" for n in notes) or None


def _short_note(s, note):
    """A note, without a list the report shows as a table (the cross-validation's)."""
    cv = (s.get("choice") or {}).get("note")
    if cv and cv in note:
        return note.replace(cv, "cross-validation (the table under “Model choice”)")
    return note


def _all_numbers_html(s):
    return ("<p>Everything in <a href='summary.json'>summary.json</a>, folded by key.</p>"
            + _tree(s))


def _tree(obj, depth=0):
    """Any JSON value as nested tables; long lists and dicts folded."""
    if isinstance(obj, dict):
        rows = []
        for k, v in obj.items():
            inner = _tree(v, depth + 1)
            if isinstance(v, (dict, list)) and len(v) > 6:
                inner = f"<details><summary>{len(v)} entries</summary>{inner}</details>"
            rows.append(f"<tr><th>{_esc(k)}</th><td>{inner}</td></tr>")
        return f"<table class='tree'>{''.join(rows)}</table>"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return _esc(", ".join(_scalar(v) for v in obj))
        return "".join(f"<div>{_tree(v, depth + 1)}</div>" for v in obj)
    if isinstance(obj, str) and "\n" in obj:
        return f"<pre>{_esc(obj)}</pre>"
    return _esc(_scalar(obj))


def _scalar(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "–" if v is None else str(v)


#: The report's sections after the first screen, in order (see :func:`add_section`).
SECTIONS = [
    ReportSection("validation", "Validation: every label fit", _validation_html,
                  ("cv_true.png", "cv_catalog.png")),
    ReportSection("errors", "Are the errors right? (step 12)", _errors_html, ("pulls.png",)),
    ReportSection("choice", "Model choice (cross-validation)", _choice_html),
    ReportSection("data", "Data, cuts and normalization", _data_html,
                  ("example_spectrum*.png", "continuum*.png", "corner.png")),
    ReportSection("model", "The model", _model_html, ("s2.png", "data_vs_model*.png")),
    ReportSection("diagnostics", "Where the errors come from", _diagnostics_html),
    ReportSection("outliers", "Worst outliers", _outliers_html, ("outliers.png",)),
    ReportSection("broadening", "Line broadening", _broadening_html, ("broadening.png",)),
    ReportSection("mcmc", "MCMC on the held-back star", _mcmc_html, ("mcmc_*.png",)),
    ReportSection("movies", "Spectrum movies", _movies_html, ("movie_*",)),
    ReportSection("nn", "Neural network", _nn_html, ("nn_*.png",)),
    ReportSection("binaries", "Binaries (step 15)", _binaries_html, ("binar*.png",)),
    ReportSection("timings", "Timings", _timings_html),
    ReportSection("notes", "Notes", _notes_html),
    ReportSection("other_figures", "Other figures", lambda s: None),
    ReportSection("all_numbers", "All numbers (summary.json)", _all_numbers_html),
]


# --------------------------------------------------------------------------- the page
_CSS = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:1.5em auto;color:#222;
padding:0 1em}h1{margin-bottom:0.2em}.lead{font-size:1.05em;color:#444;margin-top:0}
table{border-collapse:collapse;margin:0.4em 0}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:0.9em;text-align:left;vertical-align:top}table.headline td,table.headline th{
font-size:1em;padding:4px 10px}table.small td,table.small th{font-size:0.85em}
table.tree{margin:0}table.tree th{background:#f6f6f6;font-weight:normal}
figure{margin:1em 0}img,video{max-width:100%}figcaption{font-size:0.85em;color:#444}
.grid{display:flex;gap:1em;align-items:flex-start}.grid figure{flex:1;margin:0.5em 0}
.grid figure:last-child{flex:1.5}
details.section{border-top:1px solid #ddd;padding:0.3em 0}details.section>summary{
font-size:1.3em;font-weight:bold;cursor:pointer;padding:0.3em 0}nav{font-size:0.9em;
margin:0.5em 0 1em 0}nav a{margin-right:0.9em;white-space:nowrap}.ok{color:#060}
.bad{color:#b00;font-weight:bold}.muted{color:#777;font-size:0.85em}.note{color:#a40}
.cap{margin:0.6em 0 0.2em 0;color:#444;font-size:0.9em}pre{font-size:0.8em;overflow-x:auto}
table.outliers td:last-child{min-width:26em}table.headline td:first-child{white-space:nowrap}
img.square{max-width:min(100%,720px)}"""


def _figure(f, cls=""):
    src = html.escape(f["file"], quote=True)
    if src.endswith(".mp4"):
        tag = f"<video controls src='{src}'></video>"
    else:  # a square figure (a corner plot) at full page width would fill two screens
        height, width = f.get("shape", (0, 1))
        square = 0.95 * width <= height <= 1.05 * width
        tag = f"<img src='{src}' alt='{src}'{' class=square' if square else ''}>"
    return (f"<figure id='{src}' class='{cls}'>{tag}<figcaption><b>{src}</b> "
            f"{_esc(f.get('caption') or '')}</figcaption></figure>")


def _figures(out_dir, summary, figures):
    """Every figure file in ``out_dir``: the listed ones first (with captions), then the rest."""
    listed = [dict(f) for f in (figures if figures is not None else summary.get("figures", []))
              if isinstance(f, dict)]
    seen = {f["file"] for f in listed}
    for ext in ("png", "gif", "mp4"):
        for p in sorted(glob.glob(os.path.join(out_dir, f"*.{ext}"))):
            if os.path.basename(p) not in seen:
                listed.append(dict(file=os.path.basename(p), caption=""))
    listed = [f for f in listed if os.path.exists(os.path.join(out_dir, f["file"]))]
    for f in listed:
        f["shape"] = _png_shape(os.path.join(out_dir, f["file"]))
    return listed


def _png_shape(path):
    """(height, width) of a PNG from its header; (0, 1) for anything else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return (0, 1)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 24:
        return (0, 1)
    return (int.from_bytes(head[20:24], "big"), max(int.from_bytes(head[16:20], "big"), 1))


def _take(pool, patterns):
    """Remove from ``pool`` (in place) and return the figures matching ``patterns``, in order."""
    out = []
    for pat in patterns:
        for f in [f for f in pool if fnmatch.fnmatch(f["file"], pat)]:
            pool.remove(f)
            out.append(f)
    return out


def _headline_figures(pool):
    chosen = []
    for alternatives in HEADLINE_FIGURES:
        for name in alternatives:
            got = _take(pool, (name,))
            if got:
                chosen += got
                break
    if not chosen:
        return ""
    first, rest = chosen[0], chosen[1:]
    return _figure(first) + (f"<div class='grid'>{''.join(_figure(f) for f in rest)}</div>"
                             if rest else "")


def _section_html(sec, summary, pool):
    """A section's <details> block, or None if it has nothing to show."""
    render = sec.render or _extra_default(sec.key)
    body = render(summary) or ""
    figs = list(pool) if sec.key == "other_figures" else _take(pool, sec.figures)
    if sec.key == "other_figures":
        pool.clear()
    if not body and not figs:
        return None
    return (f"<details class='section' id='{html.escape(sec.key, quote=True)}'"
            f"{' open' if sec.open else ''}><summary>{_esc(sec.title)}</summary>{body}"
            + "".join(_figure(f) for f in _one_per_movie(figs)) + "</details>")


def _one_per_movie(figs):
    """A GIF with its MP4 twin shows once, the MP4 linked in its caption."""
    names = {f["file"] for f in figs}
    out = []
    for f in figs:
        stem, ext = os.path.splitext(f["file"])
        if ext == ".mp4" and stem + ".gif" in names:
            continue
        if ext == ".gif" and stem + ".mp4" in names:
            f = dict(f, caption=(f.get("caption") or "") + f" (also as {stem}.mp4)")
        out.append(f)
    return out


def _sections(summary):
    """The registered sections, plus a default one for every optional step without one."""
    keys = {s.key for s in SECTIONS}
    extra = [ReportSection(k, f"Optional step: {k}") for k in (summary.get("extras") or {})
             if k not in keys]
    out = list(SECTIONS)
    at = [s.key for s in out].index("timings") if "timings" in keys else len(out)
    return out[:at] + extra + out[at:]


def write_report(out_dir, summary=None, figures=None, title="cannon_fast modeling lab report",
                 summary_html=None):
    """Write ``report.html``: headline numbers and figures first, then foldable sections.

    Parameters
    ----------
    out_dir : str or os.PathLike
    summary : dict, optional
        Default: read from ``summary.json``.
    figures : sequence of dict, optional
        ``{"file", "caption"}`` in display order; figure files (PNG, GIF, MP4) in
        ``out_dir`` that are not listed are shown too (every one is on the page).
    title : str
        The page's heading.
    summary_html : callable, optional
        summary dict -> HTML of its tables, for a report other than the modeling lab's
        (e.g. :mod:`cannon_fast.lab.jwst`): the page is then those tables, every
        figure, and the table of every number.

    Returns
    -------
    str
        The path of ``report.html``.
    """
    out_dir = os.fspath(out_dir)
    if summary is None:
        with open(os.path.join(out_dir, "summary.json")) as fh:
            summary = json.load(fh)
    summary = to_jsonable(summary)
    pool = _figures(out_dir, summary, figures)
    if summary_html is None:
        lead = _lead_html(summary)
        head = _headline_html(summary) + _headline_figures(pool)
        sections = _sections(summary)
    else:
        lead, head = "", summary_html(summary) + "".join(_figure(f) for f in _one_per_movie(pool))
        pool.clear()
        sections = [sec for sec in SECTIONS if sec.key == "all_numbers"]
    blocks = [(sec, _section_html(sec, summary, pool)) for sec in sections]
    blocks = [(sec, b) for sec, b in blocks if b]
    nav = " ".join(f"<a href='#{html.escape(sec.key, quote=True)}'>{_esc(sec.title)}</a>"
                   for sec, _ in blocks)
    meta = (f"{_esc(summary.get('created', ''))} · cannon_fast "
            f"{_esc(summary.get('package_version', ''))}")
    total = (summary.get("timings") or {}).get("total")
    if isinstance(total, (int, float)):
        meta += f" · {total:.0f} s"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}"
            f"</title><style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p class='muted'>{meta}</p>{lead}<nav><b>Sections:</b> {nav}</nav>{head}"
            + "\n".join(b for _, b in blocks) + "</body></html>")
    path = os.path.join(out_dir, "report.html")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(page)
    return path


def rebuild_report(out_dir):
    """Rebuild ``report.html`` of an existing report folder (its summary.json and PNGs).

    Parameters
    ----------
    out_dir : str or os.PathLike

    Returns
    -------
    str
        The path of ``report.html``.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` has no ``summary.json``.
    """
    path = os.path.join(os.fspath(out_dir), "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {out_dir} a report folder written by "
                                "`cannon-fast demo`?")
    return write_report(out_dir)
