"""Figures of the science steps: the MCMC corner plot and the binary-bias figure.

Both build a ``matplotlib.figure.Figure`` without pyplot (no global state,
no GUI backend), save it atomically when given a path, and return it.
"""
from __future__ import annotations

import os

import numpy as np

from ..._util import atomic_path
from ._labels import axis_label, value_title

__all__ = ["posterior_corner", "binary_bias_figure"]


def _save(fig, path, dpi=110):
    if path is None:
        return
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(path)[1].lstrip(".") or "png")


def posterior_corner(result, path=None, truths=None, show_fit=True, title=None, dpi=110):
    """Corner plot of a ``PosteriorResult`` with the chi² fit and its formal errors.

    Parameters
    ----------
    result : cannon_fast.lab.mcmc.PosteriorResult
    path : str or os.PathLike, optional
        Save the figure here (PNG/PDF by suffix).
    truths : array_like (L,), optional
        Known labels, drawn as green lines (the posterior is blue).
    show_fit : bool, optional
        Mark the chi² fit (orange) and its 1-sigma formal error bars.
    title : str, optional
    dpi : int, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    try:
        import corner
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError("the corner plot needs the 'corner' package: "
                          "pip install 'cannon_fast[mcmc]'") from err
    from matplotlib.figure import Figure

    names = list(result.label_names)
    n = len(names)
    fig = Figure(figsize=(2.0 * n + 0.6, 2.0 * n + 0.6))
    axes = fig.subplots(n, n)
    axes = np.atleast_2d(axes)
    corner.corner(result.samples, fig=fig, labels=[axis_label(s) for s in names],
                  quantiles=[0.16, 0.5, 0.84], show_titles=False, labelpad=0.12,
                  label_kwargs=dict(fontsize=10), color="C0",
                  truths=None if truths is None else list(np.asarray(truths, float)),
                  truth_color="tab:green", plot_datapoints=False, fill_contours=True,
                  levels=(0.393, 0.865), smooth=1.0, bins=30)
    for j, name in enumerate(names):
        med, lo, hi = result.median[j], result.median[j] - result.p16[j], \
            result.p84[j] - result.median[j]
        axes[j, j].set_title(value_title(name, med, lo, hi), fontsize=9)
    fig.subplots_adjust(left=0.12, bottom=0.1, right=0.98, top=0.9, wspace=0.06, hspace=0.06)
    if show_fit:
        for j in range(n):
            ax = axes[j, j]
            ax.axvline(result.fit_labels[j], color="tab:orange", lw=1.2)
            ax.axvspan(result.fit_labels[j] - result.fit_errors[j],
                       result.fit_labels[j] + result.fit_errors[j], color="tab:orange",
                       alpha=0.15, lw=0)
            for i in range(j + 1, n):
                axes[i, j].errorbar(result.fit_labels[j], result.fit_labels[i],
                                    xerr=result.fit_errors[j], yerr=result.fit_errors[i],
                                    color="tab:orange", ms=3, marker="o", lw=1)
    status = "converged" if result.converged else "NOT CONVERGED"
    head = title or "posterior of the labels"
    fig.suptitle(f"{head}\n{result.n_walkers} walkers x {result.n_steps} steps, "
                 f"max tau = {np.nanmax(result.autocorr_time):.0f} ({status})\n"
                 "blue: posterior, dashed: its 16/50/84th percentiles"
                 + ("; orange: chi² fit ± formal error" if show_fit else "")
                 + ("; green: true labels" if truths is not None else ""),
                 fontsize=10, y=0.995)
    _save(fig, path, dpi)
    return fig


def binary_bias_figure(study, path=None, labels=("TEFF", "LOGG", "FE_H"), dpi=110):
    """Bias of single-star labels vs the injected light ratio (a ``BiasStudy``).

    Parameters
    ----------
    study : cannon_fast.lab.binaries.BiasStudy
    path : str or os.PathLike, optional
    labels : sequence of str, optional
        Labels to show (those the model has).
    dpi : int, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    labels = [s for s in labels if s in study.label_names]
    has_det = np.any(np.isfinite(study.detected))
    n_pan = len(labels) + (1 if has_det else 0)
    fig = Figure(figsize=(4.0 * n_pan, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n_pan))
    q = study.light_ratios
    for ax, name in zip(axes, labels):
        j = study.label_names.index(name)
        err = study.scatter[:, j] / np.sqrt(np.maximum(study.n_used, 1))
        ax.axhline(0, color="0.6", lw=0.8)
        ax.errorbar(q, study.bias[:, j], yerr=err, marker="o", ms=4, capsize=2, lw=1.2,
                    label="median bias")
        ax.fill_between(q, study.bias[:, j] - study.scatter[:, j],
                        study.bias[:, j] + study.scatter[:, j], alpha=0.2, lw=0,
                        label="±1σ scatter")
        ax.set_xlabel("injected light ratio $q$ (secondary / primary, H band)")
        ax.set_ylabel(r"$\Delta$ " + axis_label(name) + " (single fit − primary)")
    axes[0].legend(fontsize=8, loc="best")
    if has_det:
        ax = axes[-1]
        ax.plot(q, study.detected, marker="s", color="tab:red")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("injected light ratio $q$")
        ax.set_ylabel("fraction flagged as binary (ΔBIC, f_imp)")
    fig.suptitle(f"Unresolved binaries fitted as single stars ({study.source} spectra, "
                 f"|Δv| = {study.velocity:g} km/s, S/N = {study.snr:g}, "
                 f"{int(np.max(study.n_used))} primaries per q)", fontsize=10)
    _save(fig, path, dpi)
    return fig
