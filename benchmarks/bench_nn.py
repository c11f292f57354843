"""Benchmark of ``cannon_fast.nn`` on the mock survey (a plain script that prints figures).

Run (2 CPU cores, a few minutes)::

    nice python benchmarks/bench_nn.py --data DIR      # DIR/survey.npz from mock_survey.py
    nice python benchmarks/bench_nn.py                 # generates the mock survey first

Steps: quality cuts and pixel masks (``cannon_fast.apogee.catalog``,
``cannon_fast.apogee.bitmask``); continuum normalization (``cannon_fast.core.continuum`` with continuum pixels found on the
training half; without the data layer, a per-chip Chebyshev fit to the upper envelope); half of
the stars train, half are held out; the Cannon (``cannon_fast.CannonModel``) and the
NN regressor are trained on
the catalogue labels (with their errors) and scored against the TRUE labels; the
emulator and the Cannon's quadratic model are trained on the true labels and compared
on the held-out spectra.

Targets (issue #5): NN RMSE within 1.5x of the Cannon's for Teff, log g, [Fe/H];
training <= 5 min; inference >= 2000 spectra/s; calibration fraction 0.6-0.76; emulator
median per-pixel residual below the noise of an SNR-200 spectrum (0.005).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Fallback only (no data layer): the apStar chips and the lab's PIXMASK bits
# 0-7 (bad/CR/saturated/unfixable/dark/flat/err/no sky) and 12 (SIG_SKYLINE).
CHIPS = ((246, 3274), (3585, 6080), (6344, 8335))
MASK_BITS = (0, 1, 2, 3, 4, 5, 6, 7, 12)
TARGET_LABELS = ("TEFF", "LOGG", "FE_H")


def _repo_shared():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "..", "shared")


# ----------------------------------------------------------------------------- data
def load_survey(data_dir, split_seed=0):
    """Cut, mask, split in halves and normalize the mock survey (on-chip pixels only)."""
    d = np.load(os.path.join(data_dir, "survey.npz"))
    names = [str(s) for s in d["label_names"]]
    try:
        from cannon_fast.apogee import catalog
        from cannon_fast.apogee import bitmask
        cat = {n: d["labels"][:, j] for j, n in enumerate(names)}
        cat["SNR"] = d["snr"]
        keep, report = catalog.select(cat)
        bad = bitmask.bad_pixel_mask(d["bitmask"][keep])
        how_cut = "cannon_fast.apogee.catalog.select + apogee.bitmask.bad_pixel_mask"
    except ImportError:
        keep = d["pass_lab_cuts"]
        bits = d["bitmask"][keep]
        bad = np.zeros(bits.shape, bool)
        for b in MASK_BITS:
            bad |= (bits & (1 << b)) != 0
        how_cut = "the mock's PASS_LAB_CUTS + PIXMASK bits"
    flux = d["flux"][keep].astype(np.float64)
    ivar = np.where(bad | ~np.isfinite(flux), 0.0, d["ivar"][keep].astype(np.float64))
    flux[ivar == 0] = 1.0
    labels = d["labels"][keep].astype(float)
    n = len(flux)
    order = np.random.default_rng(split_seed).permutation(n)
    tr, te = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    norm_flux, norm_ivar, how = normalize(flux, ivar, labels, tr, names)
    pix = np.concatenate([np.arange(a, b) for a, b in CHIPS])
    out = dict(flux=norm_flux[:, pix], ivar=norm_ivar[:, pix], pix=pix, labels=labels,
               label_errors=d["label_errors"][keep].astype(float),
               truth=d["truth_labels"][keep].astype(float), label_names=names,
               index=np.flatnonzero(keep), n_all=len(keep), cuts=how_cut,
               normalization=how, train=tr, test=te)
    return out


def normalize(flux, ivar, labels, train, names):
    """Normalize with the data layer (continuum pixels found on the training half)."""
    try:
        from cannon_fast import CannonModel
        from cannon_fast.core import continuum
        pixels, hist = continuum.find_continuum_pixels(
            flux[train], ivar[train], labels[train], lambda: CannonModel(names, order=2))
        ns = continuum.normalize(flux, ivar, pixels, dtype=np.float64)
        return ns.flux, ns.ivar, (f"cannon_fast.core.continuum ({int(pixels.sum())} continuum "
                                  f"pixels found on the training half, rounds {hist})")
    except ImportError as err:
        how = f"per-chip Chebyshev-2 upper envelope (no data layer: {err})"
    nf, ni = np.ones_like(flux), np.zeros_like(ivar)
    for a, b in CHIPS:
        V = np.polynomial.chebyshev.chebvander(np.linspace(-1, 1, b - a), 2)  # (p, 3)
        f, w = flux[:, a:b], ivar[:, a:b]
        use = w > 0
        for _ in range(6):  # iteratively keep the upper envelope (reject lines)
            ww = np.where(use, w, 0.0)
            A = np.einsum("pi,np,pj->nij", V, ww, V) + 1e-12 * np.eye(3)
            coef = np.linalg.solve(A, np.einsum("pi,np,np->ni", V, ww, f)[..., None])[..., 0]
            cont = coef @ V.T
            sig = 1.0 / np.sqrt(np.where(w > 0, w, np.inf))
            r = f - cont
            use = (w > 0) & (r > -sig - 0.002 * cont) & (r < 3.0 * sig + 0.02 * cont)
        ok = (w > 0) & (cont > 0)
        nf[:, a:b] = np.where(ok, f / np.where(ok, cont, 1.0), 1.0)
        ni[:, a:b] = np.where(ok, w * cont ** 2, 0.0)
    return nf, ni, how


def true_normalized(tool, n_stars, seed, index, pix):
    """Noise-free normalized spectra of the mock (its own generator), or None."""
    try:
        spec = importlib.util.spec_from_file_location("_mock_survey", tool)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        inp = mod.load_inputs(mod.DEFAULT_INPUTS)
        S = mod.draw_stars(n_stars, seed, list(mod.DEFAULT_FIELDS), 0.0, 20.0, inp)
        f = mod.emulate(inp, S["emu"][index]) + mod.si_response(inp, S["deriv_lab"][index],
                                                                 S["dsi"][index])
        full = np.ones((len(index), mod.NPIX), np.float32)
        full[:, mod.GRID_IDX] = np.clip(f, 0.02, 1.3)
        return full[:, pix].astype(float), mod.IN_GRID[pix]
    except Exception as err:  # noqa: BLE001 - an optional figure only
        print(f"  (noise-free mock spectra unavailable: {type(err).__name__}: {err})")
        return None


def _robust_std(x):
    x = x[np.isfinite(x)]
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def compare_regressors(which, train, test, names, args, out_dir):
    """Train the Cannon and the NN on ``which`` labels; score both against the truth."""
    from cannon_fast import CannonModel
    from cannon_fast.nn import (SpectrumRegressor, calibration_fraction, comparison_table,
                                label_metrics)
    from cannon_fast.nn.evaluate import plot_predictions

    key = "labels" if which == "catalog" else "truth"
    label_errors = train["label_errors"] if which == "catalog" else None
    n_test = len(test["flux"])
    print(f"\n=== training labels: {which} ===")
    t1 = time.perf_counter()
    cannon = CannonModel(names, order=2).train(train["flux"], train["ivar"], train[key])
    c_train = time.perf_counter() - t1
    t1 = time.perf_counter()
    c_labels = cannon.fit(test["flux"], test["ivar"]).labels
    c_rate = n_test / (time.perf_counter() - t1)
    print(f"Cannon (CannonModel, quadratic): train {c_train:.1f} s, fit {c_rate:.0f} spectra/s")

    if args.arch == "cnn":
        # StarNet's layout; the first conv samples every 3rd pixel (its kernel of 8 still
        # overlaps) so that inference reaches >= 2000 spectra/s on 2 cores. Stride 4 was
        # 1.6x faster but lost [Fe/H] (true-label training, RMSE 0.0326 vs 0.0236 dex).
        arch = dict(arch="cnn", filters=(8, 16), kernel_size=(8, 8), stride=(3, 1),
                    pool_size=(1, 4), hidden=(256, 128), dropout=0.1)
    else:
        arch = dict(arch="mlp", hidden=(256, 128), dropout=0.1)
    reg = SpectrumRegressor(names, seed=0, **arch)
    reg.train(train["flux"], train[key], train["ivar"], label_errors=label_errors,
              split=(5, 1, 0), epochs=args.epochs, batch_size=32, learning_rate=1e-3,
              weight_decay=1e-4, patience=12, lr_patience=4, augment_noise=1.0)
    h = reg.history
    reg.save(os.path.join(out_dir, f"nn_{which}.pt"))
    reg.plot_loss(os.path.join(out_dir, f"nn_loss_{which}.png"))
    print(f"NN {args.arch}: {reg.n_parameters} weights, {h['n_epochs']} epochs (best "
          f"{h['best_epoch'] + 1}), train {h['train_time']:.1f} s wall, "
          f"{h['train_cpu_time']:.0f} s CPU; error scale from the "
          f"validation set {np.round(reg.error_scale, 2)}")
    reg.predict(test["flux"][:256], test["ivar"][:256], n_samples=args.n_samples)  # warm-up
    rates, cpu_rates = {}, {}
    for s in (args.n_samples, 1):
        best, best_cpu = np.inf, np.inf
        for _ in range(3):  # best of 3: the machine is shared
            t1, c1 = time.perf_counter(), time.process_time()
            res = reg.predict(test["flux"], test["ivar"], n_samples=s)
            best = min(best, time.perf_counter() - t1)
            best_cpu = min(best_cpu, time.process_time() - c1)
        rates[s], cpu_rates[s] = n_test / best, n_test / best_cpu
    res = reg.predict(test["flux"], test["ivar"], n_samples=args.n_samples)
    print(f"NN inference: {rates[args.n_samples]:.0f} spectra/s with {args.n_samples} MC "
          f"samples ({cpu_rates[args.n_samples]:.0f} per CPU-second), {rates[1]:.0f} "
          f"spectra/s without ({cpu_rates[1]:.0f} per CPU-second)")
    plot_predictions(res.labels, test["truth"], names, errors=res.errors,
                     path=os.path.join(out_dir, f"nn_pred_vs_true_{which}.png"))

    mn = label_metrics(res.labels, test["truth"], names)
    mc = label_metrics(c_labels, test["truth"], names)
    cal = calibration_fraction(res.labels, res.errors, test["truth"])
    print(f"vs TRUE labels on the held-out half (N = {n_test}); sigma_r = 1.4826 MAD:")
    print(f"{'label':7s} {'NN rmse':>9s} {'Cannon':>9s} {'ratio':>6s} {'NN sig_r':>9s} "
          f"{'Cannon':>9s} {'NN bias':>9s} {'NN R2':>6s} {'calib':>6s} {'med err':>8s} "
          f"{'target':>7s}")
    for j, name in enumerate(names):
        ratio = mn[name]["rmse"] / mc[name]["rmse"]
        ok = ("ok" if ratio <= 1.5 and 0.6 <= cal[j] <= 0.76 else "MISS") \
            if name in TARGET_LABELS else ""
        print(f"{name:7s} {mn[name]['rmse']:9.4g} {mc[name]['rmse']:9.4g} {ratio:6.2f} "
              f"{_robust_std(res.labels[:, j] - test['truth'][:, j]):9.4g} "
              f"{_robust_std(c_labels[:, j] - test['truth'][:, j]):9.4g} "
              f"{mn[name]['bias']:9.3g} {mn[name]['r2']:6.3f} {cal[j]:6.3f} "
              f"{np.nanmedian(res.errors[:, j]):8.3g} {ok:>7s}")
    print(f"flags: {int(res.warn.sum())} warn, {int(res.bad.sum())} bad of {n_test}")
    if which == "catalog":
        recalibrate(reg, res, c_labels, test, names)
    table = comparison_table(
        test["truth"], {"NN": res.labels, "Cannon": c_labels}, names,
        costs={"NN": {"train_s": h["train_time"], "infer_per_s": rates[args.n_samples]},
               "Cannon": {"train_s": c_train, "infer_per_s": c_rate}})
    table.write(os.path.join(out_dir, f"nn_vs_cannon_{which}.ecsv"), overwrite=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; targets: "
          f"train {h['train_time']:.0f} s (<= 300), inference "
          f"{rates[args.n_samples]:.0f}/s (>= 2000)")


def recalibrate(reg, res, c_labels, test, names):
    """Truth-free check of the catalogue errors and a recalibration of the NN errors.

    The validation-split calibration trusts the stated catalogue errors. Here, on the
    held-out stars (neither model trained on them), a three-cornered hat of catalogue,
    Cannon and NN labels measures the catalogue's actual scatter (k = hat / stated rms),
    and the NN's error scale is refitted by the method of moments against the catalogue
    labels with errors k x stated. Two-fold: k and the scale come from one half of the
    held-out stars and are applied to the other, so no star is scored with a calibration
    it took part in. No true label is used; the truth only scores the result.
    """
    from cannon_fast.nn import calibration_fraction, calibration_scale, three_cornered_hat

    raw = res.errors / reg.error_scale
    halves = np.array_split(np.random.default_rng(1).permutation(len(raw)), 2)
    errors = np.empty_like(raw)
    ks = []
    for cal, use in ((halves[0], halves[1]), (halves[1], halves[0])):
        hat = three_cornered_hat(test["labels"][cal], c_labels[cal], res.labels[cal])
        k = hat[0] / np.sqrt(np.nanmean(test["label_errors"][cal] ** 2, axis=0))
        k = np.where(np.isfinite(k), k, 1.0)
        ks.append(k)
        s = calibration_scale(res.labels[cal], raw[cal], test["labels"][cal],
                              k * test["label_errors"][cal], method="variance")
        errors[use] = s * raw[use]
    cal_frac = calibration_fraction(res.labels, errors, test["truth"])
    print("catalogue errors from a three-cornered hat (catalogue, Cannon, NN) on the held-out "
          "stars, k = hat scatter / stated rms (two halves):")
    print("  " + "  ".join(f"{n} {a:.2f}/{b:.2f}" for n, a, b in zip(names, *ks)))
    print("NN errors recalibrated against the catalogue with errors k x stated (variance, "
          "two-fold; no true labels): calibration vs truth "
          + "  ".join(f"{n} {c:.3f}" for n, c in zip(names, cal_frac)))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """Run the benchmark; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="directory with survey.npz (default: generate one)")
    ap.add_argument("--n-stars", type=int, default=3036)
    ap.add_argument("--mock-tool", default=os.path.join(_repo_shared(), "tools",
                                                        "mock_survey.py"))
    ap.add_argument("--out", default=None, help="directory for the figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="cnn", choices=("cnn", "mlp"))
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--n-samples", type=int, default=20, help="MC-dropout samples")
    ap.add_argument("--skip-emulator", action="store_true")
    ap.add_argument("--train-labels", choices=("catalog", "true", "both", "none"),
                    default="both", help="labels the Cannon and the NN regressor train on "
                    "(scored against the truth); none: emulator only")
    args = ap.parse_args(argv)

    import torch

    from cannon_fast import CannonModel
    from cannon_fast.nn import PayneEmulator, label_metrics, train_emulator

    torch.set_num_threads(args.threads)
    if args.data is None:
        args.data = tempfile.mkdtemp(prefix="bench_nn_")
        subprocess.run([sys.executable, args.mock_tool, "--format", "npz", "--n-stars",
                        str(args.n_stars), "--out", args.data, "--workers", "1"], check=True)
    out_dir = args.out or args.data
    os.makedirs(out_dir, exist_ok=True)

    t0 = time.perf_counter()
    d = load_survey(args.data)
    names = d["label_names"]
    n = len(d["flux"])
    tr, te = d["train"], d["test"]
    print(f"data: {n} stars after cuts (of {d['n_all']}; {d['cuts']}), {d['flux'].shape[1]} "
          f"pixels; {len(tr)} train / {len(te)} held out\nnormalization: {d['normalization']} "
          f"({time.perf_counter() - t0:.1f} s)")
    train = {k: d[k][tr] for k in ("flux", "ivar", "labels", "label_errors", "truth")}
    test = {k: d[k][te] for k in ("flux", "ivar", "labels", "label_errors", "truth")}

    runs = {"both": ("catalog", "true"), "none": ()}.get(args.train_labels, (args.train_labels,))
    for which in runs:
        compare_regressors(which, train, test, names, args, out_dir)

    if args.skip_emulator:
        return 0
    # --- the emulator vs the Cannon's quadratic model (true labels) -------------------
    emu = train_emulator(train["flux"], train["ivar"], train["truth"], names, hidden=(300, 300),
                         epochs=1000, batch_size=64, learning_rate=1e-3, patience=30,
                         sigma_floor=0.002, seed=0)
    path = os.path.join(out_dir, "emulator.npz")
    emu.write(path)
    hist = emu.history
    emu = PayneEmulator.read(path)  # what fits use: the exported arrays
    quad = CannonModel(names, order=2).train(train["flux"], train["ivar"], train["truth"])
    print(f"\nemulator: {hist['n_epochs']} epochs, train {hist['train_time']:.0f} s wall, "
          f"{hist['train_cpu_time']:.0f} s CPU, validation chi2/pixel "
          f"{hist['val_loss'][hist['best_epoch']]:.3f}")
    truth_spec = true_normalized(args.mock_tool, d["n_all"], 0, d["index"][te], d["pix"])
    good = test["ivar"] > 0
    var = np.where(good, 1.0 / np.where(good, test["ivar"], 1.0), 0.0)
    for label, model in (("emulator", emu), ("quadratic Cannon", quad)):
        pred = model.predict(test["truth"])
        r = np.where(good, pred - test["flux"], 0.0)
        cnt = np.maximum(good.sum(0), 1)
        # per-pixel model error: the residual rms with the noise variance removed
        rms = np.sqrt(np.clip(((r ** 2).sum(0) - var.sum(0)) / cnt, 0, None))
        p50, p90 = np.percentile(rms, [50, 90])
        line = (f"{label:17s} held-out: per-pixel model rms median {p50:.4f}, 90th pct "
                f"{p90:.4f}, {np.mean(rms > 0.005):.1%} of pixels > 0.005; median |resid| "
                f"{np.median(np.abs(r[good])):.4f}")
        if truth_spec is not None:
            f_true, in_grid = truth_spec
            dt = np.abs(pred - f_true)[:, in_grid]
            line += f"; vs noise-free truth (incl. continuum error) {np.median(dt):.4f}"
        print(line)
    print("target: emulator median per-pixel residual < 0.005 (SNR-200 noise)")
    try:
        from cannon_fast import fit_spectra
        k = min(200, len(te))  # the generic fitter is slow: a subset is enough here
        t1 = time.perf_counter()
        fr = fit_spectra(emu, test["flux"][:k], test["ivar"][:k])
        m = label_metrics(fr.labels, test["truth"][:k], names)
        print(f"emulator fit of {k} held-out stars (fit_spectra, "
              f"{k / (time.perf_counter() - t1):.1f}/s): "
              + ", ".join(f"{n} rmse {v['rmse']:.3g}" for n, v in m.items()))
    except NotImplementedError:
        print("fit_spectra not implemented yet: emulator label fits skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
