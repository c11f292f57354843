"""The Payne family on the ab initio model and mock surveys (issue 17): a script printing figures.

Run (2 shared CPU cores; each section a few minutes)::

    nice python benchmarks/bench_payne.py --out payne_out                 # every section
    nice python benchmarks/bench_payne.py --only info rotation --out DIR

Sections (``--only``):

info       Cramér–Rao bounds of TEFF, LOGG, FE_H (and VSINI) of one red giant
           (4750 K, 2.5, 0.0) from the ab initio model on the APOGEE (ASPCAP 7514), JWST-,
           LAMOST- and DESI-like grids vs S/N; figure ``crb_vs_snr.png`` (HotPayne fig. 2 style),
           ``pixel_share_lamost.png``.
rotation   v sin i 10-150 km/s and labels fitted with ``BroadenedForwardModel`` on rotated
           ab initio spectra at S/N 100 (APOGEE and LAMOST-like). Target: v sin i within 10 %,
           labels unbiased by the rotation.
abinitio   The Payne's MLP trained on ab initio spectra (Sobol design) for the APOGEE and
           LAMOST-like grids; emulation error; fits of the mock APOGEE survey and the LAMOST-like
           set; offsets vs truth, and a linear recalibration on a reference half. Fit rate
           (target >= 500 stars/s on 2 cores). Honest errors: ``PayneEmulator.calibrate`` on
           the reference half, pulls and POOR_FIT per S/N bin on the other, before and after.
transformer  TransformerPayne vs the MLP at 500 / 2,000 / 8,000 training spectra.

Data: ``../shared/data/synthetic_grid`` (the ab initio model), the mock instruments
(``--inst``, default /work/scratch/inst) and the mock APOGEE survey (``--survey``, a
``mock_survey.py`` folder with survey.npz). The package never reads ../shared; this script does.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _abinitio as ab  # noqa: E402

INSTRUMENTS = ("apogee", "jwst", "lamost", "desi")
STAR = np.array([4750.0, 2.5, 0.0])
SNRS = np.array([10, 20, 30, 50, 100, 200, 300], float)


def load_info(msg):
    """Print a section header with the machine's load."""
    print(f"\n## {msg}   (uptime: {os.getloadavg()[0]:.1f} load)", flush=True)


# ----------------------------------------------------------------------------- information
def section_info(args):
    """CRB vs S/N on four instruments (the HotPayne figure)."""
    from cannon_fast.core.broadening import BroadenedForwardModel
    from cannon_fast.core.information import bound_vs_snr, information_content

    load_info("information content: CRB of a red giant (4750 K, 2.5, 0.0), ideal model")
    bounds, vbounds = {}, {}
    for name in INSTRUMENTS:
        model = ab.AbInitioModel(ab.instrument_grid(name))
        bounds[name] = bound_vs_snr(model, STAR, SNRS)
        rot = BroadenedForwardModel(model)
        vbounds[name] = {v: information_content(rot, np.r_[STAR, v], snr=100.0, s2=0.0).crb
                         for v in (10.0, 50.0, 150.0)}
    k50, k100 = list(SNRS).index(50), list(SNRS).index(100)
    print("| instrument | pixels | S/N 50: TEFF, LOGG, FE_H | S/N 100: TEFF, LOGG, FE_H |"
          " S/N 100 with v sin i fitted, v sin i = 10 / 50 / 150: CRB(v sin i) km/s |")
    print("|---|---|---|---|---|")
    for name in INSTRUMENTS:
        b = bounds[name]
        g = ab.instrument_grid(name)
        v = vbounds[name]
        print(f"| {name} | {g.n_pixels} | {b[k50, 0]:.1f} K, {b[k50, 1]:.4f}, {b[k50, 2]:.4f} | "
              f"{b[k100, 0]:.1f} K, {b[k100, 1]:.4f}, {b[k100, 2]:.4f} | "
              + " / ".join(f"{v[x][3]:.2f} ({100 * v[x][3] / x:.0f} %)" for x in v) + " |")
    if args.out:
        from cannon_fast.lab.plots.information import bound_vs_snr_figure, pixel_share_figure

        os.makedirs(args.out, exist_ok=True)
        bound_vs_snr_figure(SNRS, bounds, list(ab.LABEL_NAMES),
                            path=os.path.join(args.out, "crb_vs_snr.png"),
                            title="Cramér–Rao bounds, ab initio model, 4750 K / 2.5 / 0.0")
        model = ab.AbInitioModel(ab.instrument_grid("lamost"))
        info = information_content(model, STAR, snr=100.0)
        pixel_share_figure(model.grid.wavelength, info, flux=model.predict(STAR),
                           path=os.path.join(args.out, "pixel_share_lamost.png"),
                           title="LAMOST-like, S/N 100: each pixel's share of each "
                                 "label's variance")
        top = {n: model.grid.wavelength[info.top_pixels(n, 3)].round(1).tolist()
               for n in info.label_names}
        print(f"LAMOST-like: pixels carrying most of each label (A): {top}")
    return bounds


# ----------------------------------------------------------------------------- rotation
def section_rotation(args):
    """Rotation fitted with the labels on rotated ab initio spectra."""
    from cannon_fast import fit_spectra
    from cannon_fast.core.broadening import BroadenedForwardModel, broaden

    load_info("rotation: v sin i and labels at S/N 100 (ab initio spectra, rotated)")
    rng = np.random.default_rng(args.seed)
    vsinis = np.array([10.0, 20.0, 50.0, 100.0, 150.0])
    print("| grid | v sin i | n | median v sin i / true - 1 | p16-p84 | bias TEFF, LOGG, FE_H"
          " (rotation fitted) | same, rotation ignored |")
    print("|---|---|---|---|---|---|---|")
    out = {}
    for name in ("apogee", "lamost"):
        model = ab.AbInitioModel(ab.instrument_grid(name))
        rot = BroadenedForwardModel(model, vsini_max=300.0)
        n = args.n_rot
        stars = np.column_stack([rng.uniform(4000, 5500, n), rng.uniform(1.0, 3.5, n),
                                 rng.uniform(-1.5, 0.3, n)])
        for v in vsinis:
            t0 = time.perf_counter()
            clean = broaden(model.predict(stars), model.grid, vsini=v)
            flux = clean + rng.standard_normal(clean.shape) / 100.0
            ivar = np.full_like(flux, 1e4)
            res = fit_spectra(rot, flux, ivar)
            plain = fit_spectra(model, flux, ivar)
            rel = res.labels[:, 3] / v - 1
            bias = np.median(res.labels[:, :3] - stars, axis=0)
            pbias = np.median(plain.labels - stars, axis=0)
            out[(name, v)] = (np.median(rel), bias, pbias)
            print(f"| {name} | {v:.0f} | {n} | {np.median(rel):+.3f} | "
                  f"{np.percentile(rel, 16):+.3f} .. {np.percentile(rel, 84):+.3f} | "
                  f"{bias[0]:+.1f}, {bias[1]:+.3f}, {bias[2]:+.3f} | "
                  f"{pbias[0]:+.1f}, {pbias[1]:+.3f}, {pbias[2]:+.3f} | "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return out

# ----------------------------------------------------------------------------- ab initio Payne
def _train_payne(model, n, args, seed=0):
    from cannon_fast.nn.ab_initio import train_on_model

    return train_on_model(model, n, accept=model.in_hull, activation="silu", schedule="onecycle",
                          epochs=args.epochs, learning_rate=3e-3, batch_size=128, seed=seed,
                          progress=False)


def _held_out(model, n=300):
    from cannon_fast.nn.ab_initio import label_design

    # inside the box by a margin: the design's edges are where every emulator is worst
    return label_design([[3800.0, 7700.0], [0.2, 4.8], [-2.3, 0.4]], n, seed=99,
                        accept=model.in_hull)


def _recalibrate(fit, truth, ref, other):
    """Linear recalibration truth ~ [1, fitted labels] on the reference stars."""
    a = np.column_stack([np.ones(len(ref)), fit[ref]])
    coef = np.linalg.lstsq(a, truth[ref], rcond=None)[0]
    return np.column_stack([np.ones(len(other)), fit[other]]) @ coef


def _bias_scatter(d):
    med = np.median(d, axis=0)
    return med, 1.4826 * np.median(np.abs(d - med), axis=0)


def section_abinitio(args):
    """The MLP Payne on ab initio spectra: emulation, the mock surveys, recalibration."""
    from cannon_fast import fit_spectra
    from cannon_fast.core.information import information_content
    from cannon_fast.nn.ab_initio import emulation_errors

    load_info(f"ab initio Payne: MLP (SiLU, 300x300) on {args.n_payne} ab initio spectra "
              f"(Sobol in the model's box, the hot-giant corner left out), {args.epochs} epochs")
    from cannon_fast.nn import PayneEmulator

    emus = {}
    for name in ("apogee", "lamost"):
        model = ab.AbInitioModel(ab.instrument_grid(name))
        path = os.path.join(args.out or "", f"payne_abinitio_{name}_{args.n_payne}.npz")
        if args.out and os.path.exists(path):  # a rerun reuses the trained emulator
            emu = PayneEmulator.read(path, grid=model.grid)
            emu.history = dict(train_time=np.nan, train_cpu_time=np.nan, best_epoch=-1)
        else:
            emu = _train_payne(model, args.n_payne, args)
        emus[name] = (model, emu)
        err = emulation_errors(emu, model, _held_out(model))
        print(f"{name}: trained in {emu.history['train_time']:.0f} s "
              f"(cpu {emu.history['train_cpu_time']:.0f} s), best epoch "
              f"{emu.history['best_epoch']}; held-out emulation |error| median "
              f"{err['median']:.2e} (target <= 1e-3 on APOGEE), MAE {err['mae']:.2e}, "
              f"p99 {err['p99']:.2e}, max {err['max']:.2e}", flush=True)
        if args.out and not os.path.exists(path):
            os.makedirs(args.out, exist_ok=True)
            emu.write(path)

    # the mock APOGEE survey: another (data-driven) model made its spectra
    import bench_nn

    model, emu = emus["apogee"]
    cache = os.path.join(args.out or "", "apogee_survey_normalized.npz")
    if args.out and os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        d["normalization"] = str(d["normalization"])
    else:
        d = bench_nn.load_survey(args.survey)
        if args.out:
            keys = ("flux", "ivar", "truth", "label_names", "train", "test", "normalization")
            np.savez(cache, **{k: np.asarray(d[k]) for k in keys})
    names = [str(n) for n in d["label_names"]]
    cols = [names.index(n) for n in ab.LABEL_NAMES]
    truth = d["truth"][:, cols]
    from cannon_fast.nn.fast_fit import fit_emulator

    fit_emulator(emu, d["flux"][:8], d["ivar"][:8])  # the SVD of the output layer, once
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_emulator(emu, d["flux"], d["ivar"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    k, kerr = emu.history["fast_fit_rank"]
    sub = slice(0, args.n_generic)
    t1 = time.perf_counter()
    gen = fit_spectra(emu, d["flux"][sub], d["ivar"][sub])
    dt_gen = time.perf_counter() - t1
    diff = np.median(np.abs(gen.labels - res.labels[sub]), axis=0)
    print(f"APOGEE mock survey ({len(truth)} stars after cuts): fast fit (output layer of rank "
          f"{k}, max flux error {kerr:.1e}) {len(truth) / dt:.0f} stars/s "
          f"({len(truth) / cpu:.0f} per CPU second), fit_generic "
          f"{gen.labels.shape[0] / dt_gen:.1f} stars/s (target >= 500 on 2 cores; BLAS threads "
          f"from the environment, load {os.getloadavg()[0]:.1f}); median |fast - generic| on "
          f"{gen.labels.shape[0]} stars: " + ", ".join(f"{x:.3g}" for x in diff)
          + f"; flagged OUTSIDE_TRAINING: "
          f"{int(np.sum(res.flags & res.FLAGS['OUTSIDE_TRAINING'] > 0))}", flush=True)
    _offsets_table("APOGEE mock survey", res.labels, truth, d["train"], d["test"])
    _calibration_table(emu, d, truth)

    # the LAMOST-like set: made by the same ab initio model (only emulation error and noise)
    model, emu = emus["lamost"]
    lam = ab.read_instrument(os.path.join(args.inst, "lamost_spectra.fits"))
    keep = np.flatnonzero(model.in_hull(lam["labels"]))[: args.n_lamost]
    res = fit_emulator(emu, lam["flux"][keep], lam["ivar"][keep])
    order = np.random.default_rng(1).permutation(len(keep))
    half = len(keep) // 2
    _offsets_table("LAMOST-like set", res.labels, lam["labels"][keep], np.sort(order[:half]),
                   np.sort(order[half:]))
    snr50 = np.abs(lam["snr"][keep] - 50) < 10
    crb = information_content(model, STAR, snr=50.0, s2=0.0).crb
    sc = _bias_scatter(res.labels[snr50] - lam["labels"][keep][snr50])[1]
    print(f"LAMOST-like stars at S/N 40-60 ({int(snr50.sum())}): scatter "
          + ", ".join(f"{n} {s:.3g}" for n, s in zip(ab.LABEL_NAMES, sc))
          + "; CRB of the red giant at S/N 50: " + ", ".join(f"{c:.3g}" for c in crb))
    return emus


def _calibration_table(emu, d, truth):
    """Errors and flags of the ab initio Payne before and after ``calibrate`` on the train half."""
    import copy

    snr = np.array([np.median(np.sqrt(iv[iv > 0])) if (iv > 0).any() else 0.0
                    for iv in d["ivar"]])
    test = d["test"]
    ref = d["train"][~emu.outside_training(truth[d["train"]])]
    cal = copy.deepcopy(emu)
    c0 = time.process_time()
    cal.calibrate(d["flux"][ref], d["ivar"][ref], truth[ref])
    cpu = time.process_time() - c0
    info = cal.train_info
    print(f"\nhonest errors: calibrate() on {len(ref)} reference stars (the train half inside the "
          f"box) in {cpu:.1f} CPU s: median reduced chi² "
          f"{info['calibration']['median_reduced_chi2_before']:.2f} -> "
          f"{info['calibration']['median_reduced_chi2_after']:.2f}, POOR_FIT above "
          f"{info['poor_fit_reduced_chi2']:.2f}; judged on the {len(test)} test stars")
    print("| fit | S/N | stars | POOR_FIT | TEFF off / rms / err / pull std / in 1σ | LOGG "
          "| FE_H |")
    print("|---|---|---|---|---|---|---|")
    for tag, model in (("uncalibrated (formal × √χ²ᵣ)", emu), ("calibrated", cal)):
        res = model.fit(d["flux"][test], d["ivar"][test])
        poor = (res.flags & res.FLAGS["POOR_FIT"]) > 0
        for lo, hi in ((0, 70), (70, 100), (100, 200), (200, np.inf)):
            sel = res.ok & ~res.warn & (snr[test] >= lo) & (snr[test] < hi)
            inbin = (snr[test] >= lo) & (snr[test] < hi)
            if sel.sum() < 10:
                continue
            d_ = res.labels[sel] - truth[test][sel]
            pull = d_ / res.errors[sel]
            cells = [f"{np.median(d_[:, j]):+.3g} / {np.std(d_[:, j]):.3g} / "
                     f"{np.median(res.errors[sel, j]):.3g} / {np.std(pull[:, j]):.2f} / "
                     f"{np.mean(np.abs(pull[:, j]) < 1):.0%}" for j in range(3)]
            print(f"| {tag} | {lo}-{hi} | {int(sel.sum())} | {poor[inbin].mean():.1%} | "
                  + " | ".join(cells) + " |")
    return cal


def _offsets_table(what, fitted, truth, ref, other):
    ok = np.all(np.isfinite(fitted), axis=1)
    ref, other = ref[ok[ref]], other[ok[other]]
    b0, s0 = _bias_scatter(fitted[other] - truth[other])
    cal = _recalibrate(fitted, truth, ref, other)
    b1, s1 = _bias_scatter(cal - truth[other])
    slope = [np.polyfit(truth[other][:, j], fitted[other][:, j], 1)[0] for j in range(3)]
    print(f"| {what}: {len(other)} stars, fitted - true | TEFF | LOGG | FE_H |")
    print("|---|---|---|---|")
    print("| median offset | " + " | ".join(f"{x:+.3g}" for x in b0) + " |")
    print("| scatter (1.4826 MAD) | " + " | ".join(f"{x:.3g}" for x in s0) + " |")
    print("| slope fitted vs true | " + " | ".join(f"{x:.3f}" for x in slope) + " |")
    print(f"| after a linear recalibration on {len(ref)} reference stars: offset | "
          + " | ".join(f"{x:+.3g}" for x in b1) + " |")
    print("| ... scatter | " + " | ".join(f"{x:.3g}" for x in s1) + " |", flush=True)


# ----------------------------------------------------------------------------- TransformerPayne
def section_transformer(args):
    """TransformerPayne vs the MLP Payne on the same ab initio training spectra (APOGEE grid)."""
    from cannon_fast import fit_spectra
    from cannon_fast.nn.ab_initio import emulation_errors, label_design, model_spectra
    from cannon_fast.nn.transformer import train_transformer

    load_info(f"TransformerPayne (d={args.tp_d}, 2 blocks, {args.tp_steps} steps of 16 spectra x "
              f"256 wavelengths) vs MLP Payne (SiLU 300x300, one-cycle) on the APOGEE grid")
    model = ab.AbInitioModel(ab.instrument_grid("apogee"))
    held = _held_out(model, args.n_held)
    rng = np.random.default_rng(5)
    fit_truth = held[: args.n_fit]
    clean = model.predict(fit_truth)
    noisy = clean + rng.standard_normal(clean.shape) / 100.0
    ivar = np.full_like(noisy, 1e4)
    print("| N train | emulator | train s (cpu) | eval ms/spectrum | MAE | median | p99 |"
          f" fit errors at S/N 100 ({args.n_fit} held-out stars): TEFF, LOGG, FE_H (rms) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        design = label_design(ab.BOX, n, seed=0, accept=model.in_hull)
        flux = model_spectra(model, design)
        runs = {}
        c0, t0 = time.process_time(), time.perf_counter()
        epochs = args.epochs if n <= 2000 else max(args.epochs * 2000 // n * 2, 20)
        from cannon_fast.nn.emulator import train_emulator

        runs["MLP Payne"] = (train_emulator(
            flux, np.full_like(flux, 1e6), design, list(ab.LABEL_NAMES), activation="silu",
            schedule="onecycle", epochs=epochs, learning_rate=3e-3, box=ab.BOX, extrapolate=0.0,
            grid=model.grid, progress=False), time.perf_counter() - t0, time.process_time() - c0)
        c0, t0 = time.process_time(), time.perf_counter()
        runs["TransformerPayne"] = (train_transformer(
            flux, design, model.grid.wavelength, ab.LABEL_NAMES, box=ab.BOX, grid=model.grid,
            d=args.tp_d, blocks=2, steps=args.tp_steps, batch_spectra=16, batch_wavelengths=256,
            eval_every=max(args.tp_steps // 4, 1), progress=False),
            time.perf_counter() - t0, time.process_time() - c0)
        for name, (emu, wall, cpu) in runs.items():
            t1 = time.perf_counter()
            err = emulation_errors(emu, model, held)
            ms = 1e3 * (time.perf_counter() - t1) / len(held) / 2  # emulator + model: ~emulator
            res = fit_spectra(emu, noisy, ivar, n_starts=2)
            rms = np.sqrt(np.nanmean((res.labels - fit_truth) ** 2, axis=0))
            print(f"| {n} | {name} | {wall:.0f} ({cpu:.0f}) | {ms:.1f} | {err['mae']:.2e} | "
                  f"{err['median']:.2e} | {err['p99']:.2e} | {rms[0]:.1f} K, {rms[1]:.3f}, "
                  f"{rms[2]:.3f} |", flush=True)


def main(argv=None):
    """Run the sections asked for."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["info", "rotation", "abinitio", "transformer"])
    ap.add_argument("--out", default=None, help="folder for figures")
    ap.add_argument("--inst", default="/work/scratch/inst", help="mock_instruments.py output")
    ap.add_argument("--survey", default="/work/scratch/mock3036", help="mock_survey.py output")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-rot", type=int, default=20, help="stars per v sin i")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-payne", type=int, default=2000, help="ab initio training spectra")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--n-lamost", type=int, default=1000, help="LAMOST-like spectra to fit")
    ap.add_argument("--n-generic", type=int, default=100,
                    help="APOGEE stars also fitted with fit_generic (the reference)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[500, 2000, 8000],
                    help="training-set sizes of the emulator comparison")
    ap.add_argument("--tp-steps", type=int, default=2000)
    ap.add_argument("--tp-d", type=int, default=32)
    ap.add_argument("--n-held", type=int, default=100, help="held-out spectra for emulation errors")
    ap.add_argument("--n-fit", type=int, default=20, help="held-out noisy spectra fitted")
    args = ap.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    sections = args.only or ["info", "rotation", "abinitio", "transformer"]
    for s in sections:
        globals()[f"section_{s}"](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
