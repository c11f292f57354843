"""Evaluation of predicted labels: metrics, calibration, plots, a table against the Cannon.

Only numpy and (lazily) matplotlib/astropy: usable with any label source.
"""
from __future__ import annotations

import numpy as np

__all__ = ["label_metrics", "calibration_fraction", "calibration_scale", "three_cornered_hat",
           "plot_predictions", "plot_loss", "comparison_table"]


def _check_pair(pred, true):
    pred = np.atleast_2d(np.asarray(pred, float))
    true = np.atleast_2d(np.asarray(true, float))
    if pred.shape != true.shape:
        raise ValueError(f"predicted labels {pred.shape} and true labels {true.shape} differ")
    return pred, true


def label_metrics(pred, true, label_names=None):
    """Bias, RMSE, median absolute error and R^2 per label.

    Stars where either value is not finite are skipped for that label.

    Parameters
    ----------
    pred, true : array_like, (N, L)
    label_names : sequence of str, optional

    Returns
    -------
    dict
        ``{name: {"bias", "rmse", "mae", "r2", "n"}}`` where ``mae`` is the
        median absolute error and ``r2 = 1 - SS_res / SS_tot``.
    """
    pred, true = _check_pair(pred, true)
    if label_names is None:
        label_names = [f"label{j}" for j in range(pred.shape[1])]
    out = {}
    for j, name in enumerate(label_names):
        ok = np.isfinite(pred[:, j]) & np.isfinite(true[:, j])
        d = pred[ok, j] - true[ok, j]
        t = true[ok, j]
        if ok.sum() == 0:
            out[name] = dict(bias=np.nan, rmse=np.nan, mae=np.nan, r2=np.nan, n=0)
            continue
        ss_tot = np.sum((t - t.mean()) ** 2)
        out[name] = dict(bias=float(d.mean()), rmse=float(np.sqrt(np.mean(d ** 2))),
                         mae=float(np.median(np.abs(d))),
                         r2=float(1.0 - np.sum(d ** 2) / ss_tot) if ss_tot > 0 else np.nan,
                         n=int(ok.sum()))
    return out


def calibration_fraction(pred, errors, true):
    """Fraction of stars with ``|pred - true| < errors``, per label (0.683 if Gaussian).

    Parameters
    ----------
    pred, errors, true : array_like, (N, L)

    Returns
    -------
    ndarray, (L,)
    """
    pred, true = _check_pair(pred, true)
    errors = np.atleast_2d(np.asarray(errors, float))
    ok = np.isfinite(pred) & np.isfinite(true) & np.isfinite(errors)
    inside = (np.abs(pred - true) < errors) & ok
    return inside.sum(axis=0) / np.maximum(ok.sum(axis=0), 1)


def calibration_scale(pred, errors, labels, label_errors=None, method="coverage",
                      target=0.6827):
    """Per-label factor ``s`` on ``errors`` from reference labels that have errors of their own.

    The residuals ``d = pred - labels`` have variance ``s^2 errors^2 +
    label_errors^2`` if the reference labels' errors are right and independent
    of the predictions' (true for stars the predictor was not trained on).

    Parameters
    ----------
    pred, errors : array_like, (N, L)
        Predictions and their (uncalibrated) 1-sigma errors.
    labels : array_like, (N, L)
        Reference labels (NaN where missing), e.g. a catalogue's.
    label_errors : array_like, (N, L), optional
        1-sigma errors of ``labels`` (default 0: exact labels).
    method : {"coverage", "variance"}
        ``"coverage"``: the fraction of stars with ``|d| < sqrt((s e)^2 +
        label_errors^2)`` is ``target`` (bisection; robust to outliers, but
        when the reference errors are as large as the predictions' it depends
        on the shape of their distribution, not just on their size).
        ``"variance"``: method of moments, ``s^2 = (<d^2> - <label_errors^2>) /
        <errors^2>`` (needs only the reference errors' rms; ``target`` unused).
    target : float

    Returns
    -------
    ndarray, (L,)
        1 where fewer than 10 stars have every value.
    """
    pred, labels = _check_pair(pred, labels)
    errors = np.atleast_2d(np.asarray(errors, float))
    le = (np.zeros_like(labels) if label_errors is None
          else np.atleast_2d(np.asarray(label_errors, float)))
    if method not in ("coverage", "variance"):
        raise ValueError(f"method must be 'coverage' or 'variance', got {method!r}")
    scale = np.ones(pred.shape[1])
    for j in range(pred.shape[1]):
        ok = (np.isfinite(labels[:, j]) & np.isfinite(pred[:, j]) & np.isfinite(errors[:, j])
              & np.isfinite(le[:, j]))
        if ok.sum() < 10:
            continue
        d = pred[ok, j] - labels[ok, j]
        sig, e2 = errors[ok, j], le[ok, j] ** 2
        if method == "variance":
            s2 = (np.mean(d ** 2) - np.mean(e2)) / max(np.mean(sig ** 2), 1e-300)
            scale[j] = np.sqrt(np.clip(s2, 1e-4, 1e4))
            continue
        lo, hi = 1e-2, 1e2  # coverage rises with the scale: bisect in log space
        for _ in range(50):
            mid = np.sqrt(lo * hi)
            if np.mean(np.abs(d) < np.sqrt((mid * sig) ** 2 + e2)) < target:
                lo = mid
            else:
                hi = mid
        scale[j] = np.sqrt(lo * hi)
    return scale


def three_cornered_hat(a, b, c):
    """Scatter of each of three independent estimates of the same labels.

    With ``a = t + e_a`` etc. and independent errors, ``var(a - b) = s_a^2 +
    s_b^2`` and so on, which three pairs solve for (Gray & Allan 1974; used in
    astronomy to check catalogue errors against two other pipelines). Errors
    correlated between two of them (the same spectrum, the same training
    labels) make those two look better and the third worse.

    Parameters
    ----------
    a, b, c : array_like, (N, L)
        Stars where any of the three is not finite are skipped for that label.

    Returns
    -------
    ndarray, (3, L)
        1-sigma scatter of a, b, c (NaN where a variance comes out negative).
    """
    a, b = _check_pair(a, b)
    a, c = _check_pair(a, c)
    out = np.full((3, a.shape[1]), np.nan)
    for j in range(a.shape[1]):
        ok = np.isfinite(a[:, j]) & np.isfinite(b[:, j]) & np.isfinite(c[:, j])
        if ok.sum() < 3:
            continue
        vab = np.var(a[ok, j] - b[ok, j])
        vac = np.var(a[ok, j] - c[ok, j])
        vbc = np.var(b[ok, j] - c[ok, j])
        v = np.array([vab + vac - vbc, vab + vbc - vac, vac + vbc - vab]) / 2
        out[:, j] = np.where(v >= 0, np.sqrt(np.abs(v)), np.nan)
    return out


def plot_predictions(pred, true, label_names, errors=None, path=None):
    """Predicted-vs-true (top row) and residual-vs-true (bottom row) per label.

    Parameters
    ----------
    pred, true : array_like, (N, L)
    label_names : sequence of str
    errors : array_like, (N, L), optional
        Drawn as error bars.
    path : str, optional
        Save the figure there (any matplotlib format).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    pred, true = _check_pair(pred, true)
    n_l = pred.shape[1]
    fig = Figure(figsize=(3.2 * n_l, 6.0), layout="constrained")
    axes = fig.subplots(2, n_l, squeeze=False)
    metrics = label_metrics(pred, true, label_names)
    for j, name in enumerate(label_names):
        t, p = true[:, j], pred[:, j]
        e = None if errors is None else np.asarray(errors)[:, j]
        ax = axes[0, j]
        ax.errorbar(t, p, yerr=e, fmt=".", ms=3, alpha=0.5, elinewidth=0.5)
        lim = [np.nanmin([t.min(), np.nanmin(p)]), np.nanmax([t.max(), np.nanmax(p)])]
        ax.plot(lim, lim, "k-", lw=0.8)
        m = metrics[name]
        ax.set_title(f"{name}: bias {m['bias']:.3g}, rmse {m['rmse']:.3g}, "
                     f"R$^2$ {m['r2']:.3f}", fontsize=8)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax = axes[1, j]
        ax.errorbar(t, p - t, yerr=e, fmt=".", ms=3, alpha=0.5, elinewidth=0.5)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel("predicted - true")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_loss(history, path=None):
    """Training and validation loss per epoch (the best epoch marked).

    Parameters
    ----------
    history : dict
        With ``train_loss`` and ``val_loss`` lists (optionally ``best_epoch`` and
        ``loss_name``).
    path : str, optional
        Save the figure there.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.5), layout="constrained")
    ax = fig.subplots()
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], label="training")
    ax.plot(epochs, history["val_loss"], label="validation")
    best = history.get("best_epoch")
    if best is not None and best >= 0:
        ax.axvline(best + 1, color="0.6", ls=":", label="kept")
    ax.set_xlabel("epoch")
    ax.set_ylabel(history.get("loss_name", "loss"))
    ax.legend()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def comparison_table(true, results, label_names, costs=None):
    """Side-by-side metrics of several label sources on the same stars.

    Parameters
    ----------
    true : array_like, (N, L)
        Reference labels.
    results : dict
        Method name -> predicted labels (N, L) (e.g. ``{"NN": ..., "Cannon": ...}``).
    label_names : sequence of str
    costs : dict, optional
        Method name -> ``{"train_s": float, "infer_per_s": float}``.

    Returns
    -------
    astropy.table.Table
        One row per method: bias and RMSE per label, and the costs.
    """
    from astropy.table import Table

    rows = []
    for method, pred in results.items():
        m = label_metrics(pred, true, label_names)
        row = {"method": method}
        for name in label_names:
            row[f"{name}_bias"] = m[name]["bias"]
            row[f"{name}_rmse"] = m[name]["rmse"]
        c = (costs or {}).get(method, {})
        row["train_s"] = float(c.get("train_s", np.nan))
        row["spectra_per_s"] = float(c.get("infer_per_s", np.nan))
        rows.append(row)
    return Table(rows=rows)
