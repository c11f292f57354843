"""The figures of the modeling lab, one function each, all returning a matplotlib Figure.

The figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot
state, no ``plt.show``), so they render with the Agg canvas in scripts, tests and
servers alike; save them with ``fig.savefig(path)``.

Lines marked on the gradient and s² spectra come from :func:`known_lines`: the
H-band line list the embedded survey is made from (:func:`cannon_fast.apogee.lines.line_list`),
a small built-in table of well-known Mg I and Si I H-band lines when that lacks a species,
or a user's file (:func:`read_line_file`, air wavelengths converted to vacuum).
"""
from __future__ import annotations

import os
import textwrap

import numpy as np

from ...apogee.lines import air_to_vacuum, line_list
from ._labels import axis_label, label_name, value_title

__all__ = [
    "FLUX_UNIT", "known_lines", "read_line_file", "bias_scatter",
    "plot_spectrum", "plot_corner", "plot_continuum", "plot_data_vs_model",
    "plot_gradient_spectra", "plot_s2", "plot_one_to_one", "plot_outliers", "plot_kiel",
    "plot_broadening", "plot_pulls",
]

#: Flux unit of apStar spectra, for axis labels.
FLUX_UNIT = r"$10^{-17}$ erg s$^{-1}$ cm$^{-2}$ $\mathrm{\AA}^{-1}$"
_WAVE_LABEL = r"vacuum wavelength [$\mathrm{\AA}$]"

# Well-known Mg I and Si I lines of the APOGEE H band (air Å), used only when the
# line list lacks a species.
_BUILTIN_AIR = {
    "Mg I": (15740.716, 15748.988, 15765.842, 15879.5, 15886.2, 15954.477, 16364.75),
    "Si I": (15361.16, 15376.83, 15557.79, 15833.6, 15888.41, 15960.06, 16060.01, 16094.79,
             16215.67, 16380.15, 16680.77, 16828.16),
}


def _figure(figsize, **kwargs):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize, **kwargs)


def read_line_file(path, species=("Mg I", "Si I"), air=True):
    """Read a line-identification file: one ``wavelength ;species`` (or whitespace) per line.

    Parameters
    ----------
    path : str or os.PathLike
        E.g. an APOGEE ``atlas_line_ids_apogee.txt``.
    species : sequence of str or None
        Species to keep (None keeps every species).
    air : bool
        The file gives air wavelengths (converted to vacuum here).

    Returns
    -------
    dict of str -> ndarray
        Vacuum wavelengths (Å) per species.

    Raises
    ------
    FileNotFoundError, ValueError
        When the file is missing or has no parsable line.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: line list not found")
    out = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            if ";" in text:
                wave, name = text.split(";", 1)
            else:
                parts = text.split(None, 1)
                wave, name = parts[0], parts[1] if len(parts) > 1 else "?"
            try:
                w = float(wave)
            except ValueError:
                continue
            name = " ".join(name.split())
            if species is None or name in species:
                out.setdefault(name, []).append(w)
    if not out:
        want = "any species" if species is None else ", ".join(species)
        raise ValueError(f"{path}: no lines of {want} found")
    return {k: (air_to_vacuum(v) if air else np.asarray(v, float)) for k, v in out.items()}


def known_lines(species=("Mg I", "Si I"), line_file=None, air=True):
    """Vacuum wavelengths of known lines to mark on gradient spectra.

    Parameters
    ----------
    species : sequence of str
    line_file : str or os.PathLike, optional
        A user's line list (see :func:`read_line_file`); otherwise the embedded
        survey's named atomic lines, or the built-in Mg I / Si I table.
    air : bool
        Whether ``line_file`` lists air wavelengths.

    Returns
    -------
    lines : dict of str -> ndarray
    source : str
        Where the lines came from, for captions.
    """
    if line_file is not None:
        return read_line_file(line_file, species, air), os.path.basename(os.fspath(line_file))
    try:
        table = line_list()
        lines = {s: np.asarray(table["wavelength"][(table["species"] == s)
                                                    & (table["kind"] == "atom")], float)
                 for s in species}
        if all(len(v) for v in lines.values()):
            return lines, "embedded survey line list"
    except (KeyError, ValueError):
        pass
    return ({s: air_to_vacuum(np.asarray(_BUILTIN_AIR[s])) for s in species if s in _BUILTIN_AIR},
            "built-in Mg I / Si I table")


def bias_scatter(fitted, reference):
    """Bias, scatter and robust scatter of ``fitted - reference`` per label.

    Parameters
    ----------
    fitted, reference : array_like, (N, L)

    Returns
    -------
    bias, std, rms, mad_std : ndarray, (L,)
        Mean, standard deviation, root mean square and 1.4826 x MAD of the
        differences over stars where both are finite.
    """
    d = np.asarray(fitted, float) - np.asarray(reference, float)
    d = np.atleast_2d(d)
    out = np.full((4, d.shape[1]), np.nan)
    for j in range(d.shape[1]):
        x = d[:, j][np.isfinite(d[:, j])]
        if len(x) == 0:
            continue
        out[0, j] = x.mean()
        out[1, j] = x.std(ddof=1) if len(x) > 1 else 0.0
        out[2, j] = np.sqrt(np.mean(x ** 2))
        out[3, j] = 1.4826 * np.median(np.abs(x - np.median(x)))
    return out[0], out[1], out[2], out[3]


def _fmt(name, value):
    return f"{value:.1f} K" if str(name).upper() == "TEFF" else f"{value:.3f}"


def _gaps_to_nan(wavelength, y, good=None):
    """Break a curve where there is no data (chip gaps, bad pixels): NaN there."""
    y = np.array(y, dtype=float)
    bad = ~np.isfinite(y)
    if good is not None:
        bad |= ~np.asarray(good, bool)
    y[bad] = np.nan
    return y


def plot_spectrum(wavelength, flux, good=None, title=None, err=None, unit=FLUX_UNIT):
    """Flux against wavelength for one (un-normalized) spectrum, chip gaps left empty.

    Parameters
    ----------
    wavelength : array_like, (P,)
        Vacuum Å.
    flux : array_like, (P,)
        Flux in ``unit`` (apStar: 1e-17 erg/s/cm²/Å).
    good : array_like of bool, (P,), optional
        Pixels to draw (default: flux finite and non-zero; the chip gaps of an
        apStar spectrum are zeros).
    title : str, optional
    err : array_like, (P,), optional
        1-sigma errors, drawn as a band.
    unit : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    wavelength = np.asarray(wavelength, float)
    flux = np.asarray(flux, float)
    if good is None:
        good = np.isfinite(flux) & (flux != 0)
    y = _gaps_to_nan(wavelength, flux, good)
    fig = _figure((11, 3.6), layout="constrained")
    ax = fig.add_subplot()
    if err is not None:
        e = _gaps_to_nan(wavelength, err, good)
        ax.fill_between(wavelength, y - e, y + e, color="0.75", lw=0, label=r"$\pm1\sigma$")
    ax.plot(wavelength, y, lw=0.5, color="k", label="flux")
    ax.set_xlabel(_WAVE_LABEL)
    ax.set_ylabel(f"flux [{unit}]")
    finite = y[np.isfinite(y)]
    if finite.size:  # every line shown; the top ignores a few spikes (cosmic rays)
        lo, hi = finite.min(), np.percentile(finite, 99.95)
        pad = 0.05 * (hi - lo if hi > lo else abs(hi) + 1.0)
        ax.set_ylim(min(lo - pad, 0.0) if lo < 0 else max(lo - pad, 0.0), hi + pad)
    ax.set_xlim(wavelength[np.isfinite(y)].min() - 20 if finite.size else wavelength[0],
                wavelength[np.isfinite(y)].max() + 20 if finite.size else wavelength[-1])
    if title:
        ax.set_title(title)
    if err is not None:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_corner(labels, label_names, title=None, **kwargs):
    """Corner plot of labels (the ``corner`` package).

    Parameters
    ----------
    labels : array_like, (N, L)
    label_names : sequence of str
    title : str, optional
    **kwargs
        Passed to ``corner.corner``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If ``corner`` is not installed or there are fewer than L + 1 stars.
    """
    try:
        import corner
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ValueError("the corner plot needs the 'corner' package "
                         "(pip install 'cannon_fast[plot]')") from err
    lab = np.asarray(labels, float)
    lab = lab[np.all(np.isfinite(lab), axis=1)]
    k = lab.shape[1]
    if len(lab) <= k:
        raise ValueError(f"a corner plot of {k} labels needs more than {k} stars, got {len(lab)}")
    fig = _figure((2.0 * k + 0.6, 2.0 * k + 0.6))
    own_titles = "show_titles" not in kwargs and "title_fmt" not in kwargs
    kw = dict(labels=[axis_label(n) for n in label_names], show_titles=not own_titles,
              title_kwargs=dict(fontsize=9), label_kwargs=dict(fontsize=10),
              plot_contours=len(lab) >= 50, plot_density=len(lab) >= 50,
              data_kwargs=dict(alpha=0.4, ms=2), bins=20 if len(lab) >= 200 else 10,
              labelpad=0.08, max_n_ticks=4)
    kw.update(kwargs)
    import warnings
    with warnings.catch_warnings():
        # corner warns when a 2-D histogram is too sparse for contours; with few stars the
        # plain scatter is what we want and contours are already off (plot_contours above)
        warnings.filterwarnings("ignore", message="Too few points to create valid contours")
        fig = corner.corner(lab, fig=fig, **kw)
    for ax in fig.axes:
        ax.tick_params(labelsize=8)
    if own_titles:  # corner's one title_fmt gives "4786.55" for Teff: digits per label instead
        lo, med, hi = np.percentile(lab, [16, 50, 84], axis=0)
        for j, name in enumerate(label_names):
            fig.axes[j * k + j].set_title(value_title(name, med[j], med[j] - lo[j], hi[j] - med[j]),
                                          fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.1, bottom=0.1, right=0.98, top=0.94 if title else 0.97)
    return fig


def plot_continuum(wavelength, flux, continuum, norm_flux, good=None, continuum_pixels=None,
                   title=None, unit=FLUX_UNIT):
    """One star: raw spectrum with its fitted pseudo-continuum, and the normalized spectrum.

    Parameters
    ----------
    wavelength, flux, continuum, norm_flux : array_like, (P,)
        Vacuum Å, raw flux, fitted continuum (0 where not fitted), normalized flux.
    good : array_like of bool, (P,), optional
        Usable pixels (e.g. ``ivar > 0``).
    continuum_pixels : array_like of bool, (P,), optional
        The continuum mask; those of its pixels that are ``good`` in this spectrum
        (the ones the fit used) are marked on the raw spectrum.
    title : str, optional
    unit : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    wavelength = np.asarray(wavelength, float)
    flux = np.asarray(flux, float)
    continuum = np.asarray(continuum, float)
    if good is None:
        good = np.isfinite(flux) & (flux != 0)
    good = np.asarray(good, bool)
    fig = _figure((11, 6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    y = _gaps_to_nan(wavelength, flux, good)
    c = _gaps_to_nan(wavelength, continuum, continuum > 0)
    ax1.plot(wavelength, y, lw=0.5, color="k", label="flux")
    if continuum_pixels is not None:  # those of the mask the fit used: good in this spectrum
        mask = np.asarray(continuum_pixels, bool)
        cp = mask & good
        ax1.plot(wavelength[cp], flux[cp], ".", ms=2.5, color="tab:orange",
                 label=f"continuum pixels used: {int(cp.sum())} of the mask's {int(mask.sum())}")
    ax1.plot(wavelength, c, lw=1.5, color="tab:red", label="pseudo-continuum (per chip)")
    ax1.set_ylabel(f"flux [{unit}]")
    finite = y[np.isfinite(y)]
    if finite.size:
        lo, hi = finite.min(), np.percentile(finite, 99.95)
        ax1.set_ylim(max(lo - 0.05 * (hi - lo), 0.0) if lo >= 0 else lo * 1.05,
                     hi + 0.25 * (hi - lo))
    ax1.legend(loc="upper right", fontsize=8, ncol=3)
    n = _gaps_to_nan(wavelength, norm_flux, good & (continuum > 0))
    ax2.plot(wavelength, n, lw=0.5, color="k")
    ax2.axhline(1.0, color="tab:red", lw=0.8, ls="--")
    nfin = n[np.isfinite(n)]
    ax2.set_ylim(min(0.45, nfin.min() - 0.03) if nfin.size else 0.45, 1.15)
    ax2.set_ylabel("normalized flux")
    ax2.set_xlabel(_WAVE_LABEL)
    if title:
        ax1.set_title(title)
    return fig


def plot_data_vs_model(wavelength, flux, ivar, model_flux, wave_range=(16000.0, 16100.0),
                       title=None, s2=None):
    """Plot normalized data against the model spectrum, with a residual panel.

    Parameters
    ----------
    wavelength, flux, ivar, model_flux : array_like, (P,)
    wave_range : (float, float)
        Å range shown.
    title : str, optional
    s2 : array_like, (P,), optional
        Model intrinsic variance, added to the data errors in the residual band.

    Returns
    -------
    matplotlib.figure.Figure
    """
    wavelength = np.asarray(wavelength, float)
    ivar = np.asarray(ivar, float)
    sel = (wavelength >= wave_range[0]) & (wavelength <= wave_range[1])
    good = ivar > 0
    f = _gaps_to_nan(wavelength, flux, good)[sel]
    m = np.asarray(model_flux, float)[sel]
    var = np.where(good, 1.0 / np.where(good, ivar, 1.0), np.nan)[sel]
    if s2 is not None:
        var = var + np.asarray(s2, float)[sel]
    fig = _figure((10, 5.5), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    w = wavelength[sel]
    ax1.plot(w, f, color="k", lw=1.0, label="data")
    ax1.plot(w, m, color="tab:red", lw=1.0, alpha=0.85, label="model")
    ax1.set_ylabel("normalized flux")
    ax1.legend(loc="best", fontsize=9)  # "best" keeps clear of the lines
    r = f - m
    err = np.sqrt(var)
    ax2.fill_between(w, -err, err, color="0.8", lw=0)
    ax2.plot(w, r, color="k", lw=0.8)
    ax2.axhline(0, color="tab:red", lw=0.8)
    lim = np.nanmax(np.abs(r)) if np.isfinite(r).any() else 0.05  # every residual shown
    ax2.set_ylim(-1.15 * max(lim, 0.005), 1.15 * max(lim, 0.005))
    ax2.set_ylabel("data - model")
    ax2.set_xlabel(_WAVE_LABEL)
    ax2.set_xlim(*wave_range)
    if np.isfinite(r).any():
        chi = r / err
        ax2.text(0.01, 0.93, f"rms {np.nanstd(r):.4f},  chi2/pixel "
                 f"{np.nanmean(chi ** 2):.2f};  grey: $\\pm1\\sigma$", transform=ax2.transAxes,
                 va="top", fontsize=8)
    if title:
        ax1.set_title(title)
    return fig


def _mark_lines(ax, lines, wave_range, colors=None):
    colors = colors or {"Mg I": "tab:blue", "Si I": "tab:orange"}
    handles = []
    for k, (name, ws) in enumerate(lines.items()):
        ws = np.asarray(ws, float)
        ws = ws[(ws >= wave_range[0]) & (ws <= wave_range[1])]
        col = colors.get(name, f"C{k + 2}")
        for i, w in enumerate(ws):
            h = ax.axvline(w, color=col, lw=0.9, alpha=0.8, ls="--", zorder=0,
                           label=name if i == 0 else None)
            if i == 0:
                handles.append(h)
    return handles


def plot_gradient_spectra(wavelength, gradients, label_names, lines=None, wave_range=None,
                          line_labels=("MG_FE", "SI_FE"), title=None, lines_source=None):
    """Plot the gradient spectra d flux / d label, one panel per label, known lines marked.

    Parameters
    ----------
    wavelength : array_like, (P,)
    gradients : array_like, (L, P)
        E.g. ``model.gradient(reference_labels)``.
    label_names : sequence of str
    lines : dict of str -> array_like, optional
        Vacuum wavelengths per species (:func:`known_lines`), marked on the panels
        of ``line_labels`` (all species on each).
    wave_range : (float, float), optional
        Å range (default: the whole spectrum).
    line_labels : sequence of str
        Labels whose panels get the line marks.
    title : str, optional
    lines_source : str, optional
        Where the lines came from (shown in the legend title).

    Returns
    -------
    matplotlib.figure.Figure
    """
    wavelength = np.asarray(wavelength, float)
    grads = np.atleast_2d(np.asarray(gradients, float))
    names = list(label_names)
    if grads.shape != (len(names), wavelength.size):
        raise ValueError(f"gradients must have shape ({len(names)}, {wavelength.size}), "
                         f"got {grads.shape}")
    if wave_range is None:
        fin = np.any(np.isfinite(grads) & (grads != 0), axis=0)
        wave_range = (wavelength[fin].min(), wavelength[fin].max()) if fin.any() \
            else (wavelength[0], wavelength[-1])
    sel = (wavelength >= wave_range[0]) & (wavelength <= wave_range[1])
    fig = _figure((11, 1.9 * len(names) + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(names), 1, sharex=True))
    for ax, name, g in zip(axes, names, grads):
        y = np.where(g[sel] == 0, np.nan, g[sel])
        ax.plot(wavelength[sel], y, lw=0.5, color="k")
        ax.axhline(0, color="0.6", lw=0.5)
        unit = "K" if name.upper() == "TEFF" else "dex"
        if name.upper() == "TEFF":  # per 100 K reads better than per K
            ax.lines[0].set_ydata(y * 100)
            ax.set_ylabel(f"df / d{label_name(name)}\n[per 100 K]", fontsize=9)
        else:
            ax.set_ylabel(f"df / d{label_name(name)}\n[per {unit}]", fontsize=9)
        fin = ax.lines[0].get_ydata()
        fin = np.asarray(fin, float)[np.isfinite(fin)]
        if fin.size:  # every feature shown: the data's min and max (and 0), plus a margin
            lo, hi = min(fin.min(), 0.0), max(fin.max(), 0.0)
            pad = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-6)
            ax.set_ylim(lo - pad, hi + pad)
        if lines and name.upper() in [n.upper() for n in line_labels]:
            handles = _mark_lines(ax, lines, wave_range)
            if handles:  # outside the axes, on the right: it hides no data
                ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                          fontsize=7, title="\n".join(textwrap.wrap(lines_source, 15))
                          if lines_source else None, title_fontsize=7, borderaxespad=0.0)
    axes[-1].set_xlabel(_WAVE_LABEL)
    axes[-1].set_xlim(*wave_range)
    if title:
        fig.suptitle(title)
    return fig


def plot_s2(wavelength, s2, lines=None, wave_range=None, title=None, lines_source=None):
    """Plot the model's intrinsic scatter sqrt(s²) against wavelength (log scale).

    Parameters
    ----------
    wavelength, s2 : array_like, (P,)
    lines : dict of str -> array_like, optional
        Known lines to mark.
    wave_range : (float, float), optional
    title : str, optional
    lines_source : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    wavelength = np.asarray(wavelength, float)
    s = np.sqrt(np.clip(np.asarray(s2, float), 0, None))
    if wave_range is None:
        fin = np.isfinite(s) & (s > 0)
        wave_range = (wavelength[fin].min(), wavelength[fin].max()) if fin.any() \
            else (wavelength[0], wavelength[-1])
    fig = _figure((11, 4.2), layout="constrained")
    ax = fig.add_subplot()
    sel = (wavelength >= wave_range[0]) & (wavelength <= wave_range[1])
    w, y = wavelength[sel], s[sel]
    pos = np.isfinite(y) & (y > 0)
    ax.plot(w[pos], y[pos], ".", ms=1.5, color="k", alpha=0.6, rasterized=True,
            label=r"$s_\lambda$ per pixel")
    if pos.sum() > 50:  # a running median shows where the scatter is systematically larger
        k = 51
        ys = np.where(pos, y, np.nan)
        pad = np.pad(ys, k // 2, constant_values=np.nan)
        win = np.lib.stride_tricks.sliding_window_view(pad, k)
        cnt = np.sum(np.isfinite(win), axis=1)
        run = np.full(len(ys), np.nan)
        ok = cnt >= 10
        run[ok] = np.nanmedian(win[ok], axis=1)
        ax.plot(w, np.where(np.isfinite(y), run, np.nan), color="tab:red", lw=1.0,
                label="running median (51 px)")
    ax.set_yscale("log")
    if pos.any():
        lo, hi = np.percentile(y[pos], [0.5, 100])
        ax.set_ylim(lo / 1.5, hi * 1.5)
    if lines:
        _mark_lines(ax, lines, wave_range)
    # pixels with data: on the apStar grid, those inside the chips (the chip gaps have s = 0
    # because there is no data there, not because the model fits perfectly)
    from ...apogee.files import NPIX, on_chip_mask
    has_data = np.isfinite(y)
    if wavelength.size == NPIX:
        has_data &= on_chip_mask()[sel]
    n_zero = int(np.sum(has_data & (y == 0)))
    fig.legend(loc="outside lower center", fontsize=8, ncol=4,
               title=f"lines: {lines_source}" if lines_source and lines else None,
               title_fontsize=7)
    ax.set_xlabel(_WAVE_LABEL)
    ax.set_ylabel(r"intrinsic scatter $s_\lambda = \sqrt{s^2_\lambda}$")
    ax.set_xlim(*wave_range)
    if title:
        ax.set_title(title, loc="left")
    if n_zero:  # in the title line, where no line marker crosses it
        ax.set_title(f"{n_zero} of {int(has_data.sum())} pixels with data have s = 0 "
                     "(not drawn on the log scale)", loc="right", fontsize=8, color="0.3")
    return fig


def plot_one_to_one(reference, fitted, label_names, reference_name="catalog",
                    fitted_name="The Cannon", highlight=None, title=None):
    """Cross-validation: fitted against reference labels, residual panels, bias and scatter.

    Parameters
    ----------
    reference, fitted : array_like, (N, L)
    label_names : sequence of str
    reference_name, fitted_name : str
        Axis names ("catalog", "true").
    highlight : array_like of bool, (N,), optional
        Stars drawn in red (e.g. the worst outliers).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    ref = np.atleast_2d(np.asarray(reference, float))
    fit = np.atleast_2d(np.asarray(fitted, float))
    names = list(label_names)
    bias, std, _, mad = bias_scatter(fit, ref)
    n = len(names)
    fig = _figure((3.3 * n, 6.4), layout="constrained")
    axes = fig.subplots(2, n, height_ratios=[3, 1.4], squeeze=False)
    hl = np.zeros(len(ref), bool) if highlight is None else np.asarray(highlight, bool)
    for j, name in enumerate(names):
        top, bot = axes[0, j], axes[1, j]
        x, y = ref[:, j], fit[:, j]
        ok = np.isfinite(x) & np.isfinite(y)
        lo = np.nanmin(np.r_[x[ok], y[ok]]) if ok.any() else 0.0
        hi = np.nanmax(np.r_[x[ok], y[ok]]) if ok.any() else 1.0
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        lim = (lo - pad, hi + pad)
        top.plot(x[ok & ~hl], y[ok & ~hl], ".", ms=3, alpha=0.6, color="k", rasterized=True)
        if (ok & hl).any():
            top.plot(x[ok & hl], y[ok & hl], "o", ms=4, mfc="none", color="tab:red",
                     label="worst outliers")
            top.legend(loc="lower right", fontsize=7)
        top.plot(lim, lim, color="tab:red", lw=0.8)
        top.set_xlim(lim)
        top.set_ylim(lim)
        top.set_title(label_name(name), fontsize=10)
        top.set_ylabel(f"{fitted_name}", fontsize=9)
        top.text(0.04, 0.96, f"bias {_fmt(name, bias[j])}\nscatter {_fmt(name, std[j])}\n"
                 f"1.48 MAD {_fmt(name, mad[j])}\nN = {int(ok.sum())}",
                 transform=top.transAxes, va="top", fontsize=8,
                 bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.9))
        r = y - x
        bot.plot(x[ok], r[ok], ".", ms=3, alpha=0.6, color="k", rasterized=True)
        bot.axhline(0, color="tab:red", lw=0.8)
        if ok.any():
            rl = np.percentile(np.abs(r[ok]), 99) if ok.sum() > 5 else np.max(np.abs(r[ok]))
            rl = max(rl, 1e-3) * 1.3
            bot.set_ylim(-rl, rl)
            n_out = int(np.sum(np.abs(r[ok]) > rl))
            if n_out:
                bot.text(0.98, 0.04, f"{n_out} beyond axis", transform=bot.transAxes,
                         ha="right", fontsize=7, color="tab:red")
        bot.set_xlim(lim)
        bot.set_xlabel(f"{reference_name} {axis_label(name)}", fontsize=9)
        bot.set_ylabel("fit - ref", fontsize=9)
        for ax in (top, bot):
            ax.tick_params(labelsize=8)
            ax.locator_params(axis="x", nbins=4)
    if title:
        fig.suptitle(title)
    return fig


def plot_outliers(wavelength, flux, ivar, model_flux, names, captions=None,
                  wave_range=(15870.0, 16430.0)):
    """Plot the worst cross-validation outliers: each spectrum against the model at its fit.

    Parameters
    ----------
    wavelength : array_like, (P,)
    flux, ivar, model_flux : array_like, (K, P)
    names : sequence of str, (K,)
        Star names for the panel titles.
    captions : sequence of str, (K,), optional
        One-line diagnosis per star.
    wave_range : (float, float)

    Returns
    -------
    matplotlib.figure.Figure
    """
    wavelength = np.asarray(wavelength, float)
    flux = np.atleast_2d(np.asarray(flux, float))
    ivar = np.atleast_2d(np.asarray(ivar, float))
    model_flux = np.atleast_2d(np.asarray(model_flux, float))
    k = len(flux)
    if k == 0:
        raise ValueError("no outliers to plot")
    sel = (wavelength >= wave_range[0]) & (wavelength <= wave_range[1])
    fig = _figure((11, 2.1 * k + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(k, 1, sharex=True))
    for i, ax in enumerate(axes):
        w = wavelength[sel]
        f = _gaps_to_nan(wavelength, flux[i], ivar[i] > 0)[sel]
        mod = np.where(np.isfinite(f), model_flux[i][sel], np.nan)  # no model in the gaps
        # the model broad and pale underneath, the data thin on top: both stay visible
        ax.plot(w, mod, color="tab:red", lw=1.6, alpha=0.45, label="model at fit", zorder=2)
        ax.plot(w, f, color="k", lw=0.5, label="data", zorder=3)
        r = f - model_flux[i][sel]
        ax.plot(w, r + 0.35, color="tab:blue", lw=0.5, label="residual + 0.35")
        ax.axhline(0.35, color="tab:blue", lw=0.4, ls=":")
        ax.set_ylim(0.2, 1.15)
        ax.set_ylabel("norm. flux", fontsize=8)
        text = str(names[i]) + (f": {captions[i]}" if captions is not None else "")
        ax.set_title(text, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    # below the axes, where it hides no data
    handles, labels = axes[0].get_legend_handles_labels()
    order = [labels.index(t) for t in ("data", "model at fit", "residual + 0.35")]
    fig.legend([handles[j] for j in order], [labels[j] for j in order],
               loc="outside lower center", fontsize=8, ncol=3)
    axes[-1].set_xlabel(_WAVE_LABEL)
    axes[-1].set_xlim(*wave_range)
    return fig


def plot_kiel(teff, logg, feh, isochrones=None, title=None, note=None):
    """Kiel diagram (log g against Teff, both axes inverted) coloured by [Fe/H].

    Parameters
    ----------
    teff, logg, feh : array_like, (N,)
        Fitted labels.
    isochrones : sequence of dict, optional
        Each with ``teff``, ``logg`` arrays and a ``label`` string, drawn as lines.
    title : str, optional
    note : str, optional
        A caption drawn in the corner (e.g. where the isochrones come from).

    Returns
    -------
    matplotlib.figure.Figure
    """
    teff = np.asarray(teff, float)
    logg = np.asarray(logg, float)
    feh = np.asarray(feh, float)
    ok = np.isfinite(teff) & np.isfinite(logg) & np.isfinite(feh)
    fig = _figure((7, 6), layout="constrained")
    ax = fig.add_subplot()
    sc = ax.scatter(teff[ok], logg[ok], c=feh[ok], s=8, cmap="viridis", vmin=-1.0, vmax=0.5,
                    edgecolors="none", rasterized=True)
    fig.colorbar(sc, ax=ax, label="fitted [Fe/H]")
    styles = ["-", "--", "-.", ":"]
    for i, iso in enumerate(isochrones or ()):
        ax.plot(iso["teff"], iso["logg"], ls=styles[i % 4], lw=1.6,
                color=iso.get("color", f"C{i + 1}"), label=iso.get("label"))
    if isochrones:
        leg = ax.legend(loc="upper left", fontsize=8,
                        title="\n".join(textwrap.wrap(note, 48)) if note else None,
                        title_fontsize=7)
        leg.get_title().set_multialignment("left")
    if ok.any():  # every star inside, with a margin (axes inverted, as usual for a Kiel diagram)
        t0, t1 = teff[ok].min(), teff[ok].max()
        g0, g1 = logg[ok].min(), logg[ok].max()
        tp, gp = max(0.05 * (t1 - t0), 50.0), max(0.05 * (g1 - g0), 0.1)
        ax.set_xlim(t1 + tp, t0 - tp)
        ax.set_ylim(g1 + gp, g0 - gp)
    else:
        ax.invert_xaxis()
        ax.invert_yaxis()
    ax.set_xlabel("fitted " + axis_label("TEFF"))
    ax.set_ylabel("fitted " + axis_label("LOGG"))
    if note and not isochrones:
        ax.text(0.02, 0.98, note, transform=ax.transAxes, ha="left", va="top", fontsize=7,
                color="0.3")
    ax.set_title(title or f"Kiel diagram of {int(ok.sum())} fitted stars")
    return fig


def plot_broadening(broadening, broadening_error, teff, logg, true_vmacro=None, title=None):
    """Fitted extra line broadening against log g, and against the true macroturbulence.

    Parameters
    ----------
    broadening, broadening_error : array_like, (N,)
        ``FitResult.broadening`` and its error, (km/s)².
    teff, logg : array_like, (N,)
        Fitted labels (log g on the x axis, Teff as colour).
    true_vmacro : array_like, (N,), optional
        True macroturbulence (Gaussian FWHM, km/s) of a synthetic survey: a second
        panel plots the broadening against the part of its velocity variance
        ``(FWHM / 2.355)²`` that the labels do not predict (the model, trained on
        stars of the same trend, already has that part), with the least-squares
        slope: 1 if the broadening is measured in the right units.

    Returns
    -------
    matplotlib.figure.Figure
    """
    b = np.asarray(broadening, float)
    teff, logg = np.asarray(teff, float), np.asarray(logg, float)
    ok = np.isfinite(b) & np.isfinite(teff) & np.isfinite(logg)
    if not ok.any():
        raise ValueError("no finite broadening to plot")
    err = float(np.nanmedian(np.asarray(broadening_error, float)[ok]))
    truth = None if true_vmacro is None else np.asarray(true_vmacro, float)
    two = truth is not None and np.isfinite(truth[ok]).sum() > 2
    fig = _figure((11 if two else 6.5, 4.8), layout="constrained")
    ax = fig.add_subplot(1, 2 if two else 1, 1)
    sc = ax.scatter(logg[ok], b[ok], c=teff[ok], s=8, cmap="plasma", edgecolors="none",
                    rasterized=True)
    fig.colorbar(sc, ax=ax, label="fitted " + axis_label("TEFF"))
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("fitted " + axis_label("LOGG"))
    ax.set_ylabel(r"fitted extra broadening $b$ [(km/s)$^2$]")
    ax.set_title(f"{int(ok.sum())} stars; median error {err:.2f} (km/s)$^2$", fontsize=10)
    if two:
        use = ok & np.isfinite(truth)
        var = (truth[use] / 2.3548) ** 2
        t, g = (teff[use] - 4500.0) / 1000.0, logg[use] - 2.5  # a quadratic, as the model
        trend = np.column_stack([np.ones_like(t), t, g, t * t, t * g, g * g])
        var = var - trend @ np.linalg.lstsq(trend, var, rcond=None)[0]
        slope, icpt = np.polyfit(var, b[use], 1)
        r = np.corrcoef(var, b[use])[0, 1]
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.scatter(var, b[use], s=8, color="C0", edgecolors="none", rasterized=True)
        xs = np.linspace(var.min(), var.max(), 2)
        ax2.plot(xs, icpt + slope * xs, color="C3",
                 label=f"least squares: slope {slope:.2f}, r = {r:.2f}")
        ax2.set_xlabel(r"true macroturbulence variance $(v_\mathrm{mac}/2.355)^2$ "
                       "\nminus its quadratic trend with the fitted Teff, log g [(km/s)$^2$]")
        ax2.set_ylabel(r"fitted $b$ [(km/s)$^2$]")
        ax2.legend(loc="upper left", fontsize=8)
        ax2.set_title("against the truth (a synthetic survey)", fontsize=10)
    fig.suptitle(title or "Extra line broadening fitted with the labels "
                 "(relative to the model's lines)")
    return fig


def plot_pulls(pulls, label_names, band=(0.8, 1.25), title=None):
    """Error calibration: std of (fit - reference) / error per label and S/N bin.

    Parameters
    ----------
    pulls : dict
        ``lab.pipeline.pull_statistics`` output: label -> S/N bin -> ``n``,
        ``formal`` and (for calibrated fits) ``calibrated`` pull std.
    label_names : sequence of str
    band : (float, float)
        The shaded band of acceptable calibration.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = list(label_names)
    bins = list(pulls[names[0]])
    fig = _figure((2.6 * len(names), 3.4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False, sharey=True)[0]
    x = np.arange(len(bins))
    for ax, name in zip(axes, names):
        ax.axhspan(*band, color="0.9", zorder=0)
        ax.axhline(1.0, color="0.5", lw=0.8, zorder=1)
        for kind, style in (("formal", dict(color="C3", marker="s", label="formal errors")),
                            ("calibrated", dict(color="C0", marker="o",
                                                label="calibrated errors"))):
            y = [pulls[name][b].get(kind) for b in bins]
            if any(v is not None for v in y):
                ax.plot(x, [np.nan if v is None else v for v in y], **style)
        ax.set_xticks(x, [f"{b}\n(n={pulls[name][b]['n']})" for b in bins], fontsize=7)
        ax.set_title(label_name(name), fontsize=10)
        ax.set_yscale("log")
        ax.set_xlabel("S/N bin", fontsize=8)
    axes[0].set_ylabel("std of (fit - reference) / error")
    axes[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
