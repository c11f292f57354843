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

import dataclasses
import time

import numpy as np

__all__ = ["LAB_NN_ARCHITECTURES", "LAB_NN_TRAINING", "TARGET_RATIO", "cannon_spectra",
           "combine_predictions", "compare_networks"]

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
    # the same CNN trained on the observed stars plus 4000 spectra of the lab's Cannon
    # (cannon_spectra(); it learns from the Cannon), 30 epochs with the learning rate
    # falling along a cosine, no dropout: with exact labels in plenty, dropout's noise was
    # what kept it at 1.6-2x the Cannon's RMSE (docs/lab.md, step 16). Its errors are the
    # predicted ones only, calibrated on the observed validation stars; members=2 adds a
    # seed ensemble's spread for twice the time.
    "cnn+cannon": dict(arch="cnn", filters=(8, 16), kernel_size=(8, 8), stride=(3, 1),
                       pool_size=(1, 4), hidden=(256, 128), dropout=0.0, cannon_spectra=4000,
                       epochs=30, train=dict(lr_schedule="cosine")),
}
#: Training settings (benchmarks/bench_nn.py's): the catalogue's label errors go
#: into the loss, noise augmentation, Adam with a little weight decay, early
#: stopping on the validation loss of the averaged weights.
LAB_NN_TRAINING = dict(split=(5, 1, 0), batch_size=32, learning_rate=1e-3, weight_decay=1e-4,
                       patience=12, lr_patience=4, augment_noise=1.0)
#: The issue's target: NN RMSE at most this many times the Cannon's (Teff, log g, [Fe/H]).
TARGET_RATIO = 1.5
_TARGET_LABELS = ("TEFF", "LOGG", "FE_H")


def cannon_spectra(model, labels, ivar, n, *, jitter=0.15, seed=0):
    """Spectra of a trained Cannon at labels around the training stars', with noise.

    Each spectrum takes a random training star's labels, moved by Gaussian noise
    of ``jitter`` times each label's spread (so the network sees the space
    between the stars, not only their points), and another random training
    star's inverse variances and one noise draw at them (sigma capped at
    :data:`~cannon_fast.nn.regressor.NOISE_SIGMA_CAP`): like an observed star,
    so that the spectra the network holds out for validation are as noisy as real
    ones. (Its errors are calibrated on observed stars only: a Cannon spectrum is
    the Cannon's exactly, without its misfit to real stars.) The noise augmentation of training
    draws fresh noise on top every epoch, as it does for observed stars; masked
    pixels stay masked.

    Parameters
    ----------
    model : cannon_fast.CannonModel
        Trained on (the lab's) training stars, with these labels in this order.
    labels : array_like, (N, L)
        Training labels (stars with a missing label are not drawn).
    ivar : array_like, (N, P)
        Training inverse variances.
    n : int
        Spectra to make.
    jitter : float
    seed : int

    Returns
    -------
    flux : ndarray, (n, P) float32
    ivar : ndarray, (n, P)
    labels : ndarray, (n, L)
    """
    labels = np.asarray(labels, float)
    rows = np.flatnonzero(np.all(np.isfinite(labels), axis=1))
    if rows.size == 0:
        raise ValueError("no training star has every label: cannot draw Cannon spectra")
    rng = np.random.default_rng(seed)
    spread = np.std(labels[rows], axis=0)
    drawn = labels[rng.choice(rows, n)] + jitter * spread * rng.standard_normal(
        (n, labels.shape[1]))
    iv = np.asarray(ivar)[rng.integers(0, len(ivar), n)]
    from ..nn.regressor import NOISE_SIGMA_CAP

    # capped as the augmentation's: a pixel with ivar 1e-20 (the mock survey has them)
    # would otherwise get noise of 1e10 and set the network's input scale
    sigma = np.where(iv > 0, np.minimum(1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)),
                                        NOISE_SIGMA_CAP), 0.0)
    flux = np.asarray(model.predict(drawn) + sigma * rng.standard_normal(iv.shape), np.float32)
    return flux, iv, drawn


def combine_predictions(results):
    """One result from a seed ensemble's (a list of :class:`~cannon_fast.nn.NNResult`).

    The labels are the members' mean; the model (epistemic) error adds the
    members' spread to their mean MC-dropout variance (a deep ensemble,
    Lakshminarayanan et al. 2017), the predictive error is the root mean of the
    members' predicted variances, and a flag is set when any member set it.
    """
    if len(results) == 1:
        return results[0]
    means = np.stack([r.labels for r in results])
    model_err = np.sqrt(np.mean([r.model_errors ** 2 for r in results], axis=0)
                        + means.var(axis=0))
    pred_err = np.sqrt(np.mean([r.predictive_errors ** 2 for r in results], axis=0))
    return dataclasses.replace(
        results[0], labels=means.mean(axis=0), errors=np.hypot(model_err, pred_err),
        model_errors=model_err, predictive_errors=pred_err,
        flags=np.bitwise_or.reduce([r.flags for r in results]),
        uncertain=np.any([r.uncertain for r in results], axis=0))


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


def _coverage(res, ref, names):
    """Fraction of reference labels within the stated 1 sigma, and the pull std, per label."""
    d = res.labels - ref
    out = {}
    for j, n in enumerate(names):
        ok = np.isfinite(d[:, j]) & (res.errors[:, j] > 0)
        pull = d[ok, j] / res.errors[ok, j]
        out[n] = dict(fraction=float(np.mean(np.abs(pull) < 1)) if ok.any() else None,
                      pull_std=float(np.std(pull)) if ok.any() else None)
    return out


def _training_set(flux, ivar, labels, errors, model, n_cannon, seed):
    """The observed training stars, plus ``n_cannon`` spectra of ``model`` (exact labels)."""
    flux, ivar, labels = np.asarray(flux), np.asarray(ivar), np.asarray(labels, float)
    errors = None if errors is None else np.asarray(errors, float)
    if not n_cannon:
        return flux, ivar, labels, errors
    f, iv, lab = cannon_spectra(model, labels, ivar, n_cannon, seed=seed)
    err = None if errors is None else np.concatenate([errors, np.zeros_like(lab)])
    return (np.concatenate([flux.astype(np.float32), f]), np.concatenate([ivar, iv]),
            np.concatenate([labels, lab]), err)


def _rank(targets):
    """Sort key: most targets met first, then the lowest worst ratio."""
    ratios = [v["ratio"] for k, v in targets.items() if k != "all_met" and v["ratio"]]
    return (-sum(v["met"] for k, v in targets.items() if k != "all_met"),
            max(ratios) if ratios else np.inf)


def _summary_line(name, net, scored):
    """'cnn: RMSE against the true labels over the Cannon's: TEFF 1.2x, ... (met)'."""
    t = net["targets"]
    ratios = ", ".join(f"{n} {v['ratio']:.2f}x" for n, v in t.items()
                       if n != "all_met" and v["ratio"] is not None)
    return (f"{name}: RMSE against the {scored} over the Cannon's: {ratios} (target <= "
            f"{TARGET_RATIO}x: {'met' if t['all_met'] else 'NOT met'})")


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
                     architectures=None, training=None, epochs=150, seed=0, progress=None,
                     cannon_model=None, train_truth=None):
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
        (default :data:`LAB_NN_ARCHITECTURES`); an entry with ``cannon_spectra=n``
        also trains on ``n`` spectra of ``cannon_model`` (:func:`cannon_spectra`),
        and is skipped without one; ``epochs=n`` caps that network's epochs;
        ``members=n`` makes it a seed ensemble of ``n`` networks (seeds ``seed``,
        ``seed + 1``, ...; each its own Cannon spectra), scored on the members'
        mean (:func:`combine_predictions`); ``train=dict(...)`` overrides
        ``training`` keywords for that network.
    training : dict, optional
        :meth:`~cannon_fast.nn.SpectrumRegressor.train` keyword arguments
        (default :data:`LAB_NN_TRAINING`).
    epochs : int
        Maximum epochs per network (early stopping ends most runs sooner).
    seed : int
    progress : bool, optional
        Progress bars.
    cannon_model : cannon_fast.CannonModel, optional
        The Cannon trained on these training stars (same label order).
    train_truth : array_like, (N_train, L), optional
        True labels of the training stars (a simulation). Each network's error
        scale is then calibrated on them, over the observed stars of its own
        validation split (never the lab's validation stars), as the lab
        calibrates the Cannon's errors; without them, on the catalogue labels with
        their stated errors, which a catalogue that understates its errors makes
        too large.

    Returns
    -------
    dict
        ``chosen`` (of the networks trained on the observed stars only, the one
        with the lowest validation loss), ``networks`` (per architecture: weights,
        epochs, best validation loss, training time, number of Cannon spectra,
        statistics against the catalogue and the truth, ``targets``), ``cannon``
        (the same statistics), ``scored_against``, ``targets`` (the chosen
        network's RMSE over the Cannon's, met when at most :data:`TARGET_RATIO`),
        ``best`` (the network with the most targets met, then the lowest worst
        ratio; it may have learnt from the Cannon), ``headline`` (one line) and
        ``figures`` (name, matplotlib Figure, caption).
    """
    from ..nn import SpectrumRegressor

    architectures = dict(architectures or LAB_NN_ARCHITECTURES)
    training = dict(training or LAB_NN_TRAINING)
    names = tuple(label_names)
    cannon = np.asarray(cannon_labels, float)
    ref = np.asarray(val_truth if val_truth is not None else val_catalog, float)
    scored = "true labels" if val_truth is not None else "catalogue labels"
    cannon_stats = dict(vs_catalog=_stats(cannon, np.asarray(val_catalog, float), names))
    if val_truth is not None:
        cannon_stats["vs_true"] = _stats(cannon, ref, names)
    key = "vs_true" if val_truth is not None else "vs_catalog"
    nets, preds, regs, skipped = {}, {}, {}, {}
    for arch_name, arch in architectures.items():
        arch = dict(arch)
        n_cannon = int(arch.pop("cannon_spectra", 0))
        n_epochs = int(arch.pop("epochs", epochs))
        n_members = int(arch.pop("members", 1))
        train_kw = dict(training, **arch.pop("train", {}))
        if n_cannon and cannon_model is None:
            skipped[arch_name] = "no Cannon model given"
            continue
        members, results, infer, n_cal = [], [], 0.0, []
        for i in range(n_members):
            # each member its own seed, hence its own Cannon spectra, split and weights
            data = _training_set(train_flux, train_ivar, train_labels, train_errors,
                                 cannon_model, n_cannon, seed + i)
            reg = SpectrumRegressor(names, seed=seed + i, device="cpu", **arch)
            # the error scale from observed stars only: Cannon spectra know nothing of
            # the Cannon's misfit to real stars, errors calibrated on them are too small
            observed = np.arange(len(data[0])) < len(train_flux) if n_cannon else None
            reg.train(data[0], data[2], data[1], label_errors=data[3], epochs=n_epochs,
                      progress=progress, calibrate_on=observed, **train_kw)
            cal = reg.split["val"]
            cal = cal if observed is None else cal[observed[cal]]
            if train_truth is not None:   # rows < len(train_flux): observed stars
                reg.calibrate(data[0][cal], np.asarray(train_truth, float)[cal], data[1][cal])
            n_cal.append(len(cal))
            t0 = time.perf_counter()
            results.append(reg.predict(val_flux, val_ivar, n_samples=20))
            infer += time.perf_counter() - t0
            members.append(reg)
        res = combine_predictions(results)
        hs = [m.history for m in members]
        preds[arch_name], regs[arch_name] = res, members
        nets[arch_name] = dict(
            settings={k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
            cannon_spectra=n_cannon, max_epochs=n_epochs, members=n_members,
            lr_schedule=train_kw.get("lr_schedule", "plateau"),
            n_weights=int(sum(m.n_parameters for m in members)),
            n_epochs=int(max(h["n_epochs"] for h in hs)),
            best_epoch=int(max(h["best_epoch"] for h in hs)) + 1,
            best_val_loss=float(np.mean([h["val_loss"][h["best_epoch"]] for h in hs])),
            train_seconds=round(float(sum(h["train_time"] for h in hs)), 1),
            train_cpu_seconds=round(float(sum(h["train_cpu_time"] for h in hs)), 1),
            spectra_per_second=round(len(res.labels) / max(infer, 1e-9), 1),
            vs_catalog=_stats(res.labels, np.asarray(val_catalog, float), names),
            n_bad=int(res.bad.sum()), n_calibration_stars=int(min(n_cal)),
            calibrated_against="true labels" if train_truth is not None
            else "catalogue labels and errors")
        if val_truth is not None:
            nets[arch_name]["vs_true"] = _stats(res.labels, ref, names)
            nets[arch_name]["true_within_1sigma"] = _coverage(res, ref, names)
        nets[arch_name]["targets"] = _targets(nets[arch_name][key], cannon_stats[key], names)
    # validation losses compare only networks validated on the same (observed) stars
    observed = [k for k, v in nets.items() if not v["cannon_spectra"]] or list(nets)
    chosen = min(observed, key=lambda k: nets[k]["best_val_loss"])
    best = min(nets, key=lambda k: _rank(nets[k]["targets"]))
    targets = nets[chosen]["targets"]
    headline = (f"{_summary_line(chosen, nets[chosen], scored)} (chosen by validation loss "
                "among the networks trained on the observed stars only)")
    if best != chosen:
        headline += (f"; best: {_summary_line(best, nets[best], scored)}"
                     + (f", trained also on {nets[best]['cannon_spectra']} spectra of the "
                        "lab's Cannon, so it learnt from the Cannon"
                        if nets[best]["cannon_spectra"] else ""))
    out = dict(chosen=chosen, best=best, networks=nets, cannon=cannon_stats,
               scored_against=scored, targets=targets, headline=headline,
               epochs_max=int(epochs), skipped=skipped,
               training={k: list(v) if isinstance(v, tuple) else v for k, v in training.items()})
    out["figures"] = [
        ("nn_loss", _loss_figure(regs, chosen),
         "Lab step 16: training and validation loss (Gaussian negative log-likelihood of the "
         "standardized labels) per epoch for each network; the dotted line marks the epoch "
         f"kept (lowest validation loss). The validation stars here are {training['split'][1]}"
         f"/{sum(training['split'][:2])} of the training set, not the lab's validation set."),
        ("nn_vs_true", _prediction_figure(preds[best], cannon, ref, names),
         f"Lab step 16: the best network ({best}) on the lab's validation stars, predicted "
         f"against the {scored} (blue, with the MC-dropout + predicted 1-sigma errors), and the "
         "Cannon's labels of the same stars (orange)."),
    ]
    return out


def _loss_figure(regs, chosen):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(regs), 3.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(regs), sharey=True))
    for ax, (name, members) in zip(axes, regs.items()):
        for i, reg in enumerate(members):  # a seed ensemble: one pair of curves per member
            h = reg.history
            ep = np.arange(1, len(h["train_loss"]) + 1)
            ax.plot(ep, h["train_loss"], color="C0", lw=1.0, alpha=0.8,
                    label="training" if i == 0 else None)
            ax.plot(ep, h["val_loss"], color="C1", lw=1.0, alpha=0.8,
                    label="validation" if i == 0 else None)
            ax.axvline(h["best_epoch"] + 1, color="0.5", ls=":", lw=0.8)
        title = name + (f" ({len(members)} seeds)" if len(members) > 1 else "")
        ax.set_title(title + (" (chosen)" if name == chosen else ""), fontsize=9)
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
