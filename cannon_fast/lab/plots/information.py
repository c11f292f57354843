"""Figures of a spectrum's information content: the Cramér–Rao bound vs S/N, and its pixels.

Both build a ``matplotlib.figure.Figure`` without pyplot, save it atomically when
given a path, and return it. The numbers come from
:mod:`cannon_fast.core.information`.
"""
from __future__ import annotations

import numpy as np

from ._labels import axis_label
from .science import _save

__all__ = ["bound_vs_snr_figure", "pixel_share_figure"]


def bound_vs_snr_figure(snrs, bounds, label_names, path=None, targets=None, title=None,
                        dpi=110):
    """Cramér–Rao bound of each label vs continuum S/N, one line per instrument (HotPayne fig.).

    Parameters
    ----------
    snrs : array_like, (K,)
    bounds : dict
        Instrument name -> (K, L) bounds (``core.information.bound_vs_snr``).
    label_names : sequence of str, (L,)
    path : str or os.PathLike, optional
    targets : dict, optional
        Label -> a precision to draw as a dotted line (e.g. a survey's goal).
    title : str, optional
    dpi : int, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    snrs = np.asarray(snrs, float)
    n = len(label_names)
    fig = Figure(figsize=(3.6 * n, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for j, (ax, name) in enumerate(zip(axes, label_names)):
        for inst, crb in bounds.items():
            ax.loglog(snrs, np.asarray(crb)[:, j], marker="o", ms=3, label=inst)
        if targets and name in targets:
            ax.axhline(targets[name], color="0.5", ls=":", lw=1)
        ax.set_xlabel("continuum S/N per pixel")
        ax.set_ylabel("CRB σ " + axis_label(name))
        ax.grid(True, which="both", alpha=0.25)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi)
    return fig


def pixel_share_figure(wavelength, info, path=None, flux=None, title=None, dpi=110):
    """Where each label's bound comes from: each pixel's share of its variance.

    Parameters
    ----------
    wavelength : array_like, (P,)
    info : cannon_fast.core.information.InformationContent
    path : str or os.PathLike, optional
    flux : array_like, (P,), optional
        The model spectrum, drawn on top for orientation.
    title : str, optional
    dpi : int, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    wave = np.asarray(wavelength, float)
    n = len(info.label_names)
    rows = n + (flux is not None)
    fig = Figure(figsize=(10, 1.6 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, 1, sharex=True))
    if flux is not None:
        axes[0].plot(wave, flux, lw=0.5, color="k")
        axes[0].set_ylabel("flux")
    for j, name in enumerate(info.label_names):
        ax = axes[j + (flux is not None)]
        share = np.nan_to_num(info.share[:, j])
        ax.plot(wave, share, lw=0.6)
        ax.set_ylabel("share of\n" + axis_label(name), fontsize=8)
        ax.text(0.99, 0.85, f"CRB {info.crb[j]:.3g}", transform=ax.transAxes, ha="right",
                fontsize=8)
    axes[-1].set_xlabel("wavelength [Å]")
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi)
    return fig
