"""The lab's report folder: figures as PNG, ``summary.json`` and a self-contained ``report.html``.

:func:`write_report` builds the page from a summary dict and the figures;
:func:`rebuild_report` rebuilds it from a folder's ``summary.json`` and whatever
PNG files are there (``cannon-fast report DIR``), so figures added later by
other steps (MCMC, movies) appear too.
"""
from __future__ import annotations

import glob
import html
import json
import os

import numpy as np

from .._util import atomic_path
from .fit_steps import FIT_STEPS, fit_step_title

__all__ = ["save_figure", "write_summary", "write_report", "rebuild_report", "to_jsonable"]


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


def _fmt(name, v, digits=None):
    if v is None:
        return "–"
    if name == "TEFF":
        return f"{v:.1f}"
    return f"{v:.{digits or 4}f}"


def _share(v):
    return "–" if v is None else f"{100 * v:.0f}%"


def _stats_table(title, stats, labels):
    rows = []
    for key in ("bias", "scatter", "mad_scatter", "n"):
        cells = "".join(f"<td>{_fmt(n, stats[n][key]) if key != 'n' else stats[n][key]}</td>"
                        for n in labels if n in stats)
        rows.append(f"<tr><th>{key}</th>{cells}</tr>")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in labels if n in stats)
    return (f"<h3>{html.escape(title)}</h3><table><tr><th></th>{head}</tr>"
            + "".join(rows) + "</table>")


def _summary_html(s):
    """The summary tables of the report page, one section after another."""
    parts = []
    for section in (_overview_html, _cuts_html, _targets_html, _validation_html,
                    _diagnostics_html, _outliers_html, _extras_html, _nn_html, _timings_html,
                    _notes_html):
        parts += section(s)
    return "\n".join(parts)


def _overview_html(s):
    d = s.get("data", {})
    parts = ["<h2>Summary</h2><table>"]
    for k, v in (("data", f"{d.get('kind', '')}: {d.get('root', '')}"),
                 ("allStar", d.get("allstar")), ("truth", d.get("truth") or "none"),
                 ("apStar files", d.get("n_apstar_files")),
                 ("kept by the cuts", s.get("cuts", {}).get("n_kept")),
                 ("training / validation", f"{s.get('n_train')} / {s.get('n_validation')}"),
                 ("held-back mystery star", s.get("mystery_star", {}).get("apogee_id")),
                 ("model", s.get("model", {}).get("path")),
                 ("continuum pixels", f"{s.get('continuum', {}).get('n_pixels')} "
                                      f"({s.get('continuum', {}).get('method', '')})"),
                 ("fit shown in figures", s.get("primary_fit")),
                 ("example stars", ", ".join(f"{e['apogee_id']} ({e['role']})"
                                             for e in s.get("example_stars", [])) or "n/a"),
                 ("Kiel diagram isochrones", "; ".join(
                     i.get("label", "") + (f" ({i['origin']}: {i.get('path')})"
                                           if i.get("origin") else "")
                     for i in s.get("isochrones", [])) or "none"),
                 ("total run time", f"{s.get('timings', {}).get('total', float('nan')):.1f} s")):
        parts.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>")
    parts.append("</table>")
    return parts


def _cuts_html(s):
    rows = s.get("cuts", {}).get("rows", [])
    if not rows:
        return []
    parts = ["<h3>Cuts</h3><table><tr><th>cut</th><th>fails</th><th>removed</th>"
             "<th>remaining</th></tr>",
             f"<tr><td>input</td><td></td><td></td><td>{s['cuts'].get('n_input')}</td></tr>"]
    for r in rows:
        parts.append(f"<tr><td>{html.escape(r['name'])} ({html.escape(r['description'])})"
                     f"</td><td>{r['fails']}</td><td>{r['removed']}</td>"
                     f"<td>{r['remaining']}</td></tr>")
    parts.append("</table>")
    return parts


def _targets_html(s):
    t = (s.get("targets") or {}).get("primary")
    if not t:
        return []
    parts = ["<h3>The lab's targets, against the true labels</h3><table><tr><th>label</th>"
             "<th>bias</th><th>|bias| max</th><th>scatter</th><th>max</th><th>met</th></tr>"]
    for n, v in t.items():
        if n == "all_met":
            continue
        parts.append(f"<tr><td>{n}</td><td>{_fmt(n, v.get('bias'))}</td>"
                     f"<td>{v['bias_max']}</td><td>{_fmt(n, v.get('scatter'))}</td>"
                     f"<td>{v['scatter_max']}</td><td>{'yes' if v['met'] else 'NO'}</td></tr>")
    parts.append("</table>")
    return parts


def _validation_html(s):
    labels = s.get("labels", [])
    parts = []
    for key in FIT_STEPS:
        v = s.get("validation", {}).get(key)
        if not v:
            continue
        parts.append(f"<h3>Validation, {html.escape(fit_step_title(key))}: {v['n_ok']} of "
                     f"{v['n_fitted']} fits usable; flags {html.escape(json.dumps(v['flags']))}"
                     "</h3>")
        broad = (v.get("broadening") or {}).get("percentiles_5_50_95")
        if broad:
            parts.append(f"<p>Fitted extra line broadening (Gaussian velocity variance "
                         f"relative to the model's, (km/s)²): 5th/50th/95th percentiles "
                         f"{broad[0]:+.2f} / {broad[1]:+.2f} / {broad[2]:+.2f}; median error "
                         f"{v['broadening']['median_error']:.2f}.</p>")
        if "vs_true" in v:
            parts.append(_stats_table("fitted - true", v["vs_true"], labels))
        parts.append(_stats_table("fitted - catalog", v["vs_catalog"], labels))
    return parts


def _diagnostics_html(s):
    """One table per diagnostic: by its form, Teff bins, populations or label statistics."""
    labels = s.get("labels", [])
    parts = []
    for key, v in (s.get("diagnostics") or {}).items():
        if "bins" in v:
            parts.append(_teff_bins_html(key, v))
        elif "rows" in v:
            parts.append(_populations_html(key, v))
        else:
            stats = v.get("vs_true") or v.get("stats")
            if stats:
                parts.append(_stats_table(f"{key}: {v.get('note', '')}", stats, labels))
    return parts


def _teff_bins_html(key, v):
    return (f"<h3>{html.escape(key)}: {html.escape(v.get('note', ''))}</h3><table>"
            "<tr><th>true Teff</th><th>n</th><th>bias (K)</th><th>scatter (K)</th>"
            "</tr>" + "".join(
                f"<tr><td>{b['teff_range'][0]}-{b['teff_range'][1]}</td>"
                f"<td>{b['n']}</td><td>{_fmt('TEFF', b['bias'])}</td>"
                f"<td>{_fmt('TEFF', b['scatter'])}</td></tr>" for b in v["bins"])
            + "</table>")


def _populations_html(key, v):
    names = [n for n in v["rows"][0] if n not in ("population", "n")] if v["rows"] else []
    return (f"<h3>{html.escape(key)}: {html.escape(v.get('note', ''))}</h3><table>"
            "<tr><th>population</th><th>n</th>" + "".join(
                f"<th>{html.escape(n)} bias</th><th>{html.escape(n)} scatter</th>"
                f"<th>{html.escape(n)} share of squared error</th>" for n in names)
            + "</tr>" + "".join(
                f"<tr><td>{html.escape(r['population'])}</td><td>{r['n']}</td>"
                + "".join(f"<td>{_fmt(n, r[n]['bias'])}</td>"
                          f"<td>{_fmt(n, r[n]['scatter'])}</td>"
                          f"<td>{_share(r[n]['share_of_squared_error'])}</td>"
                          for n in names) + "</tr>" for r in v["rows"])
            + "</table>")


def _outliers_html(s):
    outl = s.get("outliers") or []
    if not outl:
        return []
    parts = ["<h3>Worst outliers</h3><table><tr><th>star</th><th>label</th><th>fit</th>"
             "<th>catalog</th><th>reduced chi2</th><th>fit flags</th>"
             "<th>bad pixels</th><th>continuum offset</th><th>catalog flags</th>"
             "<th>diagnosis</th></tr>"]
    for o in outl:
        co = o.get("continuum_offset")
        parts.append(
            "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
                o.get("apogee_id", o["index"]), o["worst_label"],
                _fmt(o["worst_label"], o.get("fitted")),
                _fmt(o["worst_label"], o.get("reference")),
                f"{o['reduced_chi2']:.2f}" if o.get("reduced_chi2") is not None else "–",
                "+".join(o.get("fit_flags") or []) or "–",
                f"{100 * o['bad_pixel_fraction']:.1f}%",
                f"{100 * co:+.2f}%" if co is not None else "–",
                o.get("catalog_flags") or "–", o.get("diagnosis", ""))) + "</tr>")
    parts.append("</table>")
    return parts


def _extras_html(s):
    ex = s.get("extras") or {}
    if not ex:
        return []
    parts = ["<h3>Optional steps</h3><table>"]
    for k, v in ex.items():
        text = v.get("status", "")
        if v.get("reason"):
            text += f": {v['reason']}"
        if v.get("headline"):  # an optional step's result in one line, not just "ok"
            text += f": {v['headline']}"
        parts.append(f"<tr><th>{html.escape(k)}</th><td>{html.escape(text)}</td></tr>")
    parts.append("</table>")
    return parts


def _nn_html(s):
    """Lab step 16: each network and the Cannon on the validation stars, side by side."""
    nn = (s.get("extras") or {}).get("nn") or {}
    if nn.get("status") != "ok" or not nn.get("networks"):
        return []
    key = "vs_true" if "vs_true" in nn["cannon"] else "vs_catalog"
    labels = [n for n in s.get("labels", []) if n in nn["cannon"][key]]
    head = "".join(f"<th>{html.escape(n)} bias</th><th>{html.escape(n)} RMSE</th>"
                   for n in labels)
    rows = [("Cannon", nn["cannon"], "")]
    rows += [(k, v, f"{v['n_weights']} weights, {v['n_epochs']} epochs, "
                    f"{v['train_seconds']:.0f} s") for k, v in nn["networks"].items()]
    body = "".join(
        f"<tr><td>{html.escape(name)}{' (chosen)' if name == nn['chosen'] else ''}</td>"
        + "".join(f"<td>{_fmt(n, st[key][n]['bias'])}</td><td>{_fmt(n, st[key][n]['rmse'])}"
                  "</td>" for n in labels) + f"<td>{html.escape(info)}</td></tr>"
        for name, st, info in rows)
    return [f"<h3>Lab step 16: neural networks against the Cannon "
            f"({html.escape(nn['scored_against'])}, validation stars)</h3>"
            f"<p>{html.escape(nn['headline'])}</p><table><tr><th>method</th>{head}"
            f"<th>training</th></tr>{body}</table>"]


def _timings_html(s):
    tm = s.get("timings") or {}
    if not tm:
        return []
    return ["<h3>Timings (s)</h3><table><tr>" + "".join(
        f"<th>{html.escape(k)}</th>" for k in tm) + "</tr><tr>" + "".join(
        f"<td>{v:.1f}</td>" for v in tm.values()) + "</tr></table>"]


def _notes_html(s):
    return [f"<p class='note'>Note: {html.escape(n)}</p>" for n in s.get("notes") or []]


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:0.9em;text-align:left}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:0.9em;color:#444}.note{color:#a40}"""


def write_report(out_dir, summary=None, figures=None, title="cannon_fast modeling lab report",
                 summary_html=None):
    """Write ``report.html``: the summary tables and every PNG in ``out_dir``.

    Parameters
    ----------
    out_dir : str or os.PathLike
    summary : dict, optional
        Default: read from ``summary.json``.
    figures : sequence of dict, optional
        ``{"file", "caption"}`` in display order; PNG files in ``out_dir`` that are
        not listed are appended (so every PNG there is on the page).
    title : str
        The page's heading.
    summary_html : callable, optional
        summary dict -> HTML of its tables; default the modeling lab's.

    Returns
    -------
    str
        The path of ``report.html``.
    """
    out_dir = os.fspath(out_dir)
    if summary is None:
        with open(os.path.join(out_dir, "summary.json")) as fh:
            summary = json.load(fh)
    listed = [dict(f) for f in (figures if figures is not None else summary.get("figures", []))
              if isinstance(f, dict)]
    seen = {f["file"] for f in listed}
    for p in sorted(glob.glob(os.path.join(out_dir, "*.png"))):
        if os.path.basename(p) not in seen:
            listed.append(dict(file=os.path.basename(p), caption=""))
    listed = [f for f in listed if os.path.exists(os.path.join(out_dir, f["file"]))]
    others = sorted(os.path.basename(p) for ext in ("gif", "mp4")
                    for p in glob.glob(os.path.join(out_dir, f"*.{ext}")))
    tables = (summary_html or _summary_html)(summary)
    body = [f"<h1>{html.escape(title)}</h1><p>{html.escape(summary.get('created', ''))}"
            f" &middot; cannon_fast {html.escape(str(summary.get('package_version', '')))}</p>",
            tables, "<h2>Figures</h2>"]
    for f in listed:
        src = html.escape(f["file"], quote=True)
        body.append(f"<figure id='{src}'><img src='{src}' alt='{src}'>"
                    f"<figcaption><b>{src}</b> {html.escape(f.get('caption') or '')}"
                    f"</figcaption></figure>")
    for m in others:
        src = html.escape(m, quote=True)
        tag = (f"<img src='{src}' alt='{src}'>" if m.endswith(".gif")
               else f"<video controls src='{src}'></video>")
        body.append(f"<figure>{tag}<figcaption><b>{src}</b></figcaption></figure>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>")
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
