"""Lab step 16: neural networks that predict labels from spectra, against the Cannon.

:func:`compare_networks` trains a few architectures of
:class:`cannon_fast.nn.SpectrumRegressor` on the lab's training stars (each
with its own on-the-fly validation split inside the training set), keeps the
one with the lowest validation loss, predicts the lab's validation stars with
every one of them and tabulates bias and RMSE against the catalogue (and the
true labels when there are any) next to the Cannon's on the same stars. It
also draws the loss curves and the chosen network's predicted-vs-true labels.
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["LAB_NN_ARCHITECTURES", "LAB_NN_TRAINING", "TARGET_RATIO", "compare_networks"]

#: The architectures lab step 16 compares. "cnn" is StarNet's layout as
#: benchmarks/bench_nn.py runs it (its first conv samples every 3rd pixel, which
#: keeps training and inference fast on 2 cores); "mlp" is a plain dense network
#: on the pixels, the baseline. (A third, the CNN pooling 8 pixels with dense
#: layers of 128 and 64, scored like "cnn" on the demo for 1.3x its training time:
#: docs/lab.md, step 16.)
LAB_NN_ARCHITECTURES = {
    "cnn": dict(arch="cnn", filters=(8, 16), kernel_size=(8, 8), stride=(3, 1),
                pool_size=(1, 4), hidden=(256, 128), dropout=0.1),
    "mlp": dict(arch="mlp", hidden=(256, 128), dropout=0.1),
}
#: Training settings (benchmarks/bench_nn.py's): the catalogue's label errors go
#: into the loss, noise augmentation, Adam with a little weight decay, early
#: stopping on the validation loss of the averaged weights.
LAB_NN_TRAINING = dict(split=(5, 1, 0), batch_size=32, learning_rate=1e-3, weight_decay=1e-4,
                       patience=12, lr_patience=4, augment_noise=1.0)
#: The issue's target: NN RMSE at most this many times the Cannon's (Teff, log g, [Fe/H]).
TARGET_RATIO = 1.5
_TARGET_LABELS = ("TEFF", "LOGG", "FE_H")


def _stats(pred, ref, names):
    """Bias, RMSE, 1.4826 MAD and count per label (stars with both values finite)."""
    out = {}
    for j, n in enumerate(names):
        ok = np.isfinite(pred[:, j]) & np.isfinite(ref[:, j])
        d = pred[ok, j] - ref[ok, j]
        if not ok.any():
            out[n] = dict(bias=None, rmse=None, mad_scatter=None, n=0)
            continue
        out[n] = dict(bias=float(d.mean()), rmse=float(np.sqrt(np.mean(d ** 2))),
                      mad_scatter=float(1.4826 * np.median(np.abs(d - np.median(d)))),
                      n=int(ok.sum()))
    return out


def _targets(nn_stats, cannon_stats, names):
    """NN RMSE / Cannon RMSE for the target labels present, and whether each is met."""
    out = {}
    for n in _TARGET_LABELS:
        if n not in names:
            continue
        a, b = nn_stats[n]["rmse"], cannon_stats[n]["rmse"]
        ratio = a / b if a is not None and b else None
        out[n] = dict(nn_rmse=a, cannon_rmse=b, ratio=ratio,
                      met=bool(ratio is not None and ratio <= TARGET_RATIO))
    out["all_met"] = bool(out) and all(v["met"] for v in out.values())
    return out


def compare_networks(train_flux, train_ivar, train_labels, val_flux, val_ivar, val_catalog,
                     cannon_labels, label_names, *, train_errors=None, val_truth=None,
                     architectures=None, training=None, epochs=150, seed=0, progress=None):
    """Train several network architectures and compare them with the Cannon (lab step 16).

    Parameters
    ----------
    train_flux, train_ivar : array_like, (N_train, P)
        Normalized training spectra.
    train_labels : array_like, (N_train, L)
        Their catalogue labels (NaN where missing: the loss ignores them).
    val_flux, val_ivar : array_like, (N_val, P)
        The validation stars (no network trains or stops on them).
    val_catalog : array_like, (N_val, L)
        Their catalogue labels.
    cannon_labels : array_like, (N_val, L)
        The Cannon's labels of the validation stars.
    label_names : sequence of str
    train_errors : array_like, (N_train, L), optional
        Catalogue errors of the training labels (added to the predicted variance).
    val_truth : array_like, (N_val, L), optional
        True labels, when the survey is synthetic: what the table scores against.
    architectures : dict, optional
        Name -> :class:`~cannon_fast.nn.SpectrumRegressor` keyword arguments
        (default :data:`LAB_NN_ARCHITECTURES`).
    training : dict, optional
        :meth:`~cannon_fast.nn.SpectrumRegressor.train` keyword arguments
        (default :data:`LAB_NN_TRAINING`).
    epochs : int
        Maximum epochs per network (early stopping ends most runs sooner).
    seed : int
    progress : bool, optional
        Progress bars.

    Returns
    -------
    dict
        ``chosen`` (the architecture with the lowest validation loss),
        ``networks`` (per architecture: weights, epochs, best validation loss,
        training time, statistics against the catalogue and the truth),
        ``cannon`` (the same statistics), ``scored_against``, ``targets`` (the
        chosen network's RMSE over the Cannon's, met when at most
        :data:`TARGET_RATIO`), ``headline`` (one line) and ``figures`` (name,
        matplotlib Figure, caption).
    """
    from ..nn import SpectrumRegressor

    architectures = dict(architectures or LAB_NN_ARCHITECTURES)
    training = dict(training or LAB_NN_TRAINING)
    names = tuple(label_names)
    cannon = np.asarray(cannon_labels, float)
    ref = np.asarray(val_truth if val_truth is not None else val_catalog, float)
    scored = "true labels" if val_truth is not None else "catalogue labels"
    nets, preds, regs = {}, {}, {}
    for arch_name, arch in architectures.items():
        reg = SpectrumRegressor(names, seed=seed, device="cpu", **arch)
        reg.train(train_flux, train_labels, train_ivar, label_errors=train_errors,
                  epochs=epochs, progress=progress, **training)
        t0 = time.perf_counter()
        res = reg.predict(val_flux, val_ivar, n_samples=20)
        infer = time.perf_counter() - t0
        h = reg.history
        preds[arch_name], regs[arch_name] = res, reg
        nets[arch_name] = dict(
            settings={k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
            n_weights=int(reg.n_parameters), n_epochs=int(h["n_epochs"]),
            best_epoch=int(h["best_epoch"]) + 1,
            best_val_loss=float(h["val_loss"][h["best_epoch"]]),
            train_seconds=round(float(h["train_time"]), 1),
            train_cpu_seconds=round(float(h["train_cpu_time"]), 1),
            spectra_per_second=round(len(res.labels) / max(infer, 1e-9), 1),
            vs_catalog=_stats(res.labels, np.asarray(val_catalog, float), names),
            n_bad=int(res.bad.sum()))
        if val_truth is not None:
            nets[arch_name]["vs_true"] = _stats(res.labels, ref, names)
    chosen = min(nets, key=lambda k: nets[k]["best_val_loss"])
    cannon_stats = dict(vs_catalog=_stats(cannon, np.asarray(val_catalog, float), names))
    if val_truth is not None:
        cannon_stats["vs_true"] = _stats(cannon, ref, names)
    key = "vs_true" if val_truth is not None else "vs_catalog"
    targets = _targets(nets[chosen][key], cannon_stats[key], names)
    ratios = ", ".join(f"{n} {v['ratio']:.2f}x" for n, v in targets.items()
                       if n != "all_met" and v["ratio"] is not None)
    headline = (f"chosen by validation loss: {chosen}; RMSE against the {scored} over the "
                f"Cannon's: {ratios} (target <= {TARGET_RATIO}x: "
                f"{'met' if targets['all_met'] else 'NOT met'})")
    out = dict(chosen=chosen, networks=nets, cannon=cannon_stats, scored_against=scored,
               targets=targets, headline=headline, epochs_max=int(epochs),
               training={k: list(v) if isinstance(v, tuple) else v for k, v in training.items()})
    out["figures"] = [
        ("nn_loss", _loss_figure(regs, chosen),
         "Lab step 16: training and validation loss (Gaussian negative log-likelihood of the "
         "standardized labels) per epoch for each network; the dotted line marks the epoch "
         f"kept (lowest validation loss). The validation stars here are {training['split'][1]}"
         f"/{sum(training['split'][:2])} of the training set, not the lab's validation set."),
        ("nn_vs_true", _prediction_figure(preds[chosen], cannon, ref, names),
         f"Lab step 16: the chosen network ({chosen}) on the lab's validation stars, predicted "
         f"against the {scored} (blue, with the MC-dropout + predicted 1-sigma errors), and the "
         "Cannon's labels of the same stars (orange)."),
    ]
    return out


def _loss_figure(regs, chosen):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(regs), 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(regs), sharey=True))
    for ax, (name, reg) in zip(axes, regs.items()):
        h = reg.history
        ep = np.arange(1, len(h["train_loss"]) + 1)
        ax.plot(ep, h["train_loss"], label="training")
        ax.plot(ep, h["val_loss"], label="validation")
        ax.axvline(h["best_epoch"] + 1, color="0.5", ls=":")
        ax.set_title(name + (" (chosen)" if name == chosen else ""), fontsize=9)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("loss (NLL)")
    axes[0].legend(fontsize=8)
    return fig


def _prediction_figure(res, cannon, ref, names):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(names), 5.6), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    for j, n in enumerate(names):
        t, p, c = ref[:, j], res.labels[:, j], cannon[:, j]
        ax = axes[0, j]
        ax.errorbar(t, p, yerr=res.errors[:, j], fmt=".", ms=2, alpha=0.5, elinewidth=0.4,
                    label="NN")
        ax.plot(t, c, ".", ms=2, alpha=0.5, label="Cannon")
        lim = [np.nanmin(t), np.nanmax(t)]
        ax.plot(lim, lim, "k-", lw=0.7)
        ax.set_title(n, fontsize=9)
        ax.set_ylabel("predicted")
        ax = axes[1, j]
        ax.plot(t, p - t, ".", ms=2, alpha=0.5)
        ax.plot(t, c - t, ".", ms=2, alpha=0.5)
        ax.axhline(0, color="k", lw=0.7)
        ax.set_xlabel("reference " + n)
        ax.set_ylabel("predicted − reference")
    axes[0, 0].legend(fontsize=8)
    return fig
