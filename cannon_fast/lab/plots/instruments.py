"""Figures of the JWST project (seed 001): catalogue histograms and spectra of two instruments.

Each function returns a :class:`matplotlib.figure.Figure`; pixels without data
(chip gaps, ``ivar = 0``) are left empty, so the gaps show.
"""
from __future__ import annotations

import numpy as np

from ._labels import axis_label

__all__ = ["plot_hist2d", "plot_hist", "plot_spectra_stack"]

_WAVE_LABEL = r"vacuum wavelength [$\mathrm{\AA}$]"


def _figure(figsize, **kwargs):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize, **kwargs)


def plot_hist2d(x, y, x_name, y_name, bins=60, invert=(False, False), title=None):
    """2-D histogram (log colour scale) of two labels, e.g. log g against Teff.

    Parameters
    ----------
    x, y : array_like, (N,)
    x_name, y_name : str
        Label names (axis labels with units).
    bins : int
    invert : (bool, bool)
        Reverse the x / y axis (a Kiel diagram has both reversed).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import LogNorm

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    fig = _figure((5.6, 4.6), layout="constrained")
    ax = fig.add_subplot()
    if ok.sum() == 0:
        ax.text(0.5, 0.5, "no star has both labels", ha="center", transform=ax.transAxes)
    else:
        _, _, _, im = ax.hist2d(x[ok], y[ok], bins=bins, norm=LogNorm(), cmap="viridis")
        fig.colorbar(im, ax=ax, label="stars per bin")
    ax.set_xlabel(axis_label(x_name))
    ax.set_ylabel(axis_label(y_name))
    if invert[0]:
        ax.invert_xaxis()
    if invert[1]:
        ax.invert_yaxis()
    ax.set_title(title or f"{int(ok.sum())} stars", fontsize=10)
    return fig


def plot_hist(x, name, bins=60, title=None):
    """1-D histogram of one label, with its median marked."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    fig = _figure((5.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(x, bins=bins, color="0.35")
    if x.size:
        ax.axvline(np.median(x), color="C1", lw=1, label=f"median {np.median(x):.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel(axis_label(name))
    ax.set_ylabel("stars")
    ax.set_title(title or f"{x.size} stars", fontsize=10)
    return fig


def _gapped(y, good):
    y = np.array(y, float)
    y[~np.asarray(good, bool) | ~np.isfinite(y)] = np.nan
    return y


def plot_spectra_stack(wavelength, flux, good, names, captions, overlay=None, xlim=None,
                       offset=0.6, title=None, base_name="APOGEE", overlay_name="JWST"):
    """Normalized spectra one above the other, gaps empty, optionally a second instrument's.

    Parameters
    ----------
    wavelength : array_like, (P,)
    flux, good : array_like, (K, P)
        Normalized flux and which pixels have data.
    names : sequence of str, (K,)
        Star names, written at the left.
    captions : sequence of str, (K,)
        Labels of each star, written at the right.
    overlay : (wavelength (Q,), flux (K, Q), good (K, Q)), optional
        A second instrument's spectra of the same stars, drawn on top.
    xlim : (float, float), optional
    offset : float
        Vertical spacing of the spectra.
    title : str, optional
    base_name, overlay_name : str
        Legend names of the two instruments.

    Returns
    -------
    matplotlib.figure.Figure
    """
    wave = np.asarray(wavelength, float)
    flux, good = np.atleast_2d(flux), np.atleast_2d(good)
    k = flux.shape[0]
    fig = _figure((12, 1.0 + 0.75 * k), layout="constrained")
    ax = fig.add_subplot()
    lo, hi = xlim if xlim is not None else (wave[0], wave[-1])
    if overlay is not None:
        ow, of, og = np.asarray(overlay[0], float), np.atleast_2d(overlay[1]), overlay[2]
        lo, hi = (lo, hi) if xlim is not None else (min(lo, ow[0]), max(hi, ow[-1]))
    for i in range(k):
        shift = offset * (k - 1 - i)
        ax.plot(wave, _gapped(flux[i], good[i]) + shift, lw=0.5, color="k",
                label=base_name if i == 0 else None)
        if overlay is not None:
            ax.plot(ow, _gapped(of[i], np.atleast_2d(og)[i]) + shift, lw=0.6, color="C3",
                    alpha=0.8, label=overlay_name if i == 0 else None)
        ax.text(lo, shift + 1.12, names[i], fontsize=7, va="bottom")
        ax.text(hi, shift + 1.12, captions[i], fontsize=7, va="bottom", ha="right")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0.2, 1.35 + offset * (k - 1))
    ax.set_xlabel(_WAVE_LABEL)
    ax.set_ylabel("normalized flux + offset")
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
