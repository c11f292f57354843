"""astroNN parity on the mock survey: the lab's NN and AstroNNDist-like distances (prints figures).

Run (2 CPU cores; the distance part ~10 min, each lab run a few minutes)::

    nice python benchmarks/bench_astronn.py --survey DIR          # DIR/survey.npz + truth.fits
    nice python benchmarks/bench_astronn.py --lab                 # lab step 16 on the demo
    nice python benchmarks/bench_astronn.py --lab --lab-data SAS  # ... on a mock SAS tree

Distances: the mock's spectra are masked and normalized (the lab's continuum pixels from
``../shared``), split in halves; the training half goes through
``distance_training_cuts`` (counts printed) and trains a ``DistanceNetwork``; the
other half is scored against truth.fits' DIST_PC. Targets (issue #18): median
|d - d_true| / d_true <= 5 % for S/N > 100 giants; 60-76 % of the stars within 1 sigma;
better than 1/parallax for parallax / error < 5.

Censoring (``--censor``): a whole-spectrum MLP and a censored network (the DR17 Si windows
plus the MLP's Teff, log g, [Fe/H]) on the same halves; the correlation of the [Si/Fe] error
with the true [Mg/Fe] (target: drops >= 2x at equal or better [Si/Fe] RMSE), and the same at
fixed true [Si/Fe].

Lab: ``run_lab(extras=("nn",))`` and its summary's ``extras.nn``: each network's and the
Cannon's RMSE against the true labels. Target: NN RMSE <= 1.5x the Cannon's for Teff,
log g, [Fe/H], the whole demo <= 10 min on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

CNN = dict(arch="cnn", filters=(8, 16), kernel_size=(8, 8), stride=(3, 1), pool_size=(1, 4),
           hidden=(256, 128), dropout=0.1)
FIT = dict(split=(5, 1, 0), batch_size=32, learning_rate=1e-3, weight_decay=1e-4, patience=12,
           lr_patience=4, augment_noise=1.0)


def _shared():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared")


def load_mock(survey_dir, continuum):
    """Masked, normalized spectra of every mock star and its catalogue / truth columns."""
    from astropy.table import Table

    from cannon_fast.apogee.bitmask import mask_spectra
    from cannon_fast.core.continuum import load_continuum_pixels, normalize

    z = np.load(os.path.join(survey_dir, "survey.npz"))
    iv = z["ivar"].astype(np.float64)
    err = np.where(iv > 0, 1.0 / np.sqrt(np.where(iv > 0, iv, 1.0)), np.inf)
    f, v, _ = mask_spectra(z["flux"].astype(np.float64), err, z["bitmask"])
    ns = normalize(f, v, load_continuum_pixels(continuum), dtype=np.float32)
    truth = Table.read(os.path.join(survey_dir, "truth.fits"))
    cat = Table(dict(APOGEE_ID=z["apogee_id"], SNR=z["snr"], STARFLAG=z["starflag"],
                     K=z["k_mag"], K_ERR=z["k_err"], AK_TARG=z["ak"],
                     GAIAEDR3_PARALLAX=z["parallax"], GAIAEDR3_PARALLAX_ERROR=z["parallax_error"],
                     GAIAEDR3_RUWE=z["ruwe"]))
    return ns.flux, ns.ivar, cat, truth


def bench_distances(args):
    """Train on half the mock (training cuts), score distances on the other half."""
    from cannon_fast.apogee.catalog import distance_training_cuts, select
    from cannon_fast.nn.distance import DistanceNetwork

    t0 = time.perf_counter()
    flux, ivar, cat, truth = load_mock(args.survey, args.continuum)
    n = len(cat)
    order = np.random.default_rng(0).permutation(n)
    half, test = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    keep, report = select(cat[half], cuts=distance_training_cuts(cat.colnames,
                                                                 snr_min=args.snr_min))
    tr = half[keep]
    print(f"mock: {n} stars, normalized in {time.perf_counter() - t0:.0f} s; training half "
          f"{len(half)} -> cuts (S/N > {args.snr_min:g}; Astra uses 200):\n{report}")
    col = {c: np.asarray(cat[c], float) for c in cat.colnames if c not in ("APOGEE_ID",)}
    net = DistanceNetwork(seed=0, device="cpu", **CNN)
    net.train(flux[tr], ivar[tr], col["GAIAEDR3_PARALLAX"][tr], col["GAIAEDR3_PARALLAX_ERROR"][tr],
              col["K"][tr], col["AK_TARG"][tr], k_error=col["K_ERR"][tr], epochs=args.epochs,
              progress=False, **FIT)
    h = net.regressor.history
    print(f"trained on {len(tr)} stars: {h['n_epochs']} epochs (best {h['best_epoch'] + 1}), "
          f"{h['train_time']:.0f} s wall, {h['train_cpu_time']:.0f} s CPU; error scale "
          f"{net.regressor.error_scale[0]:.2f}")
    res = net.predict(flux[test], ivar[test], col["K"][test], col["AK_TARG"][test],
                      k_error=col["K_ERR"][test], n_samples=30)
    score_distances(res, cat[test], truth[test])


def score_distances(res, cat, truth):
    """The issue's three distance figures (and a few more) against the truth."""
    d_true = np.asarray(truth["DIST_PC"], float)
    rel = (res.distance - d_true) / d_true
    snr = np.asarray(cat["SNR"], float)
    giant = np.asarray(truth["LOGG"], float) < 3.8
    ok = np.isfinite(res.distance)  # scored: every star with a distance; flag_bad said apart
    plx = np.asarray(cat["GAIAEDR3_PARALLAX"], float)
    plx_err = np.asarray(cat["GAIAEDR3_PARALLAX_ERROR"], float)
    print(f"test half: {len(rel)} stars, {int((~ok).sum())} flag_bad "
          f"({int(np.sum(res.result_flags & 1 > 0))} FAKEMAG_UNRELIABLE), "
          f"{int(res.flag_warn.sum())} flag_warn")
    sel = ok & giant & (snr > 100)
    m = np.median(np.abs(rel[sel]))
    good = sel & ~res.flag_bad
    print(f"S/N > 100 giants (N = {sel.sum()}): median |d - d_true| / d_true = {100 * m:.2f} % "
          f"(target <= 5 %: {'met' if m <= 0.05 else 'NOT met'}); median bias "
          f"{100 * np.median(rel[sel]):+.2f} %; without flag_bad (N = {good.sum()}) "
          f"{100 * np.median(np.abs(rel[good])) if good.any() else np.nan:.2f} %")
    inside = np.abs(res.distance - d_true) < res.distance_err
    f_all, f_sel = np.mean(inside[ok]), np.mean(inside[sel])
    print(f"within 1 sigma: {100 * f_all:.1f} % of all not-bad stars, {100 * f_sel:.1f} % of the "
          f"S/N > 100 giants (target 60-76 %: {'met' if 0.6 <= f_all <= 0.76 else 'NOT met'})")
    low = ok & (plx / plx_err < 5)
    inv = np.where(plx > 0, np.abs(1000.0 / np.where(plx > 0, plx, 1.0) - d_true) / d_true,
                   np.inf)
    a, b = np.median(np.abs(rel[low])), np.median(inv[low])
    print(f"parallax / error < 5 (N = {low.sum()}, {int(np.sum(low & (plx <= 0)))} with "
          f"parallax <= 0): median |rel. error| NN {100 * a:.1f} % vs 1/parallax {100 * b:.1f} % "
          f"(target: better: {'met' if a < b else 'NOT met'})")
    for lo, hi in ((0, 50), (50, 100), (100, 200), (200, np.inf)):
        s = ok & (snr >= lo) & (snr < hi)
        if s.any():
            print(f"  S/N {lo:g}-{hi:g}: N = {s.sum():4d} (giants {np.sum(s & giant):4d}), median "
                  f"|rel. error| {100 * np.median(np.abs(rel[s])):.2f} %")


def leak(pred, true_si, true_mg):
    """[Si/Fe] RMSE; correlation of its error with true [Mg/Fe]; the same at fixed true [Si/Fe]."""
    e = pred - true_si
    ok = np.isfinite(e) & np.isfinite(true_si) & np.isfinite(true_mg)
    e, si, mg = e[ok], true_si[ok], true_mg[ok]
    r = np.corrcoef(e, mg)[0, 1]
    # a network that shrinks towards the mean [Si/Fe] has errors correlated with [Mg/Fe]
    # through [Si/Fe] alone; the partial correlation removes that
    res_mg = mg - np.polyval(np.polyfit(si, mg, 1), si)
    res_e = e - np.polyval(np.polyfit(si, e, 1), si)
    return np.sqrt(np.mean(e ** 2)), r, np.corrcoef(res_mg, res_e)[0, 1]


def bench_censoring(args):
    """[Mg/Fe] truth in the [Si/Fe] errors of a whole-spectrum and a censored network."""
    from cannon_fast.apogee.files import wavelength_grid
    from cannon_fast.apogee.lines import read_element_windows
    from cannon_fast.nn import SpectrumRegressor
    from cannon_fast.nn.censored import CensoredAbundanceNetwork, window_mask

    flux, ivar, _, _ = load_mock(args.survey, args.continuum)
    z = np.load(os.path.join(args.survey, "survey.npz"))
    names = [str(n) for n in z["label_names"]]
    lab, err, true = z["labels"].astype(float), z["label_errors"].astype(float), z["truth_labels"]
    n = len(lab)
    keep = np.isfinite(lab).any(axis=1) & (np.mean(ivar > 0, axis=1) > 0.7)
    order = np.random.default_rng(1).permutation(np.flatnonzero(keep))
    tr, te = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    j_si, j_mg, params = names.index("SI_FE"), names.index("MG_FE"), [0, 1, 2]
    fit = dict(FIT, epochs=args.epochs, progress=False)
    full = SpectrumRegressor(names, "mlp", hidden=(64, 32), seed=0, device="cpu")
    full.train(flux[tr], lab[tr], ivar[tr], label_errors=err[tr], **fit)
    pf = full.predict(flux[te], ivar[te], n_samples=20).labels
    si = window_mask(wavelength_grid(), read_element_windows(args.windows))
    masks = {f"censored: {int(si.sum())} px of Si.wind": si}
    if args.si_filter:  # the windows' cores: ASPCAP's Si filter (7514 on-chip pixels) above a level
        from cannon_fast.apogee.files import on_chip_mask

        w = np.zeros(on_chip_mask().size)
        w[on_chip_mask()] = np.loadtxt(args.si_filter)
        core = w > args.si_filter_min * w.max()
        masks[f"censored: {int(core.sum())} px, Si.filt > {args.si_filter_min:g}"] = core
    tr = tr[np.isfinite(lab[tr, j_si])]  # the censored networks need their label
    p_tr = full.predict(flux[tr], ivar[tr], n_samples=1).labels[:, params]
    print(f"censoring ({n} mock stars, {len(tr)} train / {len(te)} test; MLP 64/32 both; the "
          "censored ones get the whole-spectrum network's Teff, log g, [Fe/H]):")
    rows = {"whole spectrum": leak(pf[:, j_si], true[te, j_si], true[te, j_mg])}
    for name, mask in masks.items():
        cen = CensoredAbundanceNetwork("SI_FE", mask, seed=0, device="cpu")
        cen.train(flux[tr], ivar[tr], p_tr, lab[tr, j_si], label_errors=err[tr, j_si], **fit)
        pc = cen.predict(flux[te], ivar[te], pf[:, params], n_samples=20).labels[:, 0]
        rows[name] = leak(pc, true[te, j_si], true[te, j_mg])
    for k, (rmse, r, pr) in rows.items():
        print(f"  {k:36s} [Si/Fe] RMSE {rmse:.4f}  corr(error, true [Mg/Fe]) {r:+.3f}  "
              f"partial at fixed true [Si/Fe] {pr:+.3f}")
    a, ra, pa = rows["whole spectrum"]
    for k, (b, rb, pb) in list(rows.items())[1:]:
        print(f"  target (|corr| drops >= 2x at equal or better RMSE), {k}: corr {abs(ra):.3f} "
              f"-> {abs(rb):.3f} ({'met' if abs(rb) * 2 <= abs(ra) and b <= a else 'NOT met'}), "
              f"partial {abs(pa):.3f} -> {abs(pb):.3f} "
              f"({'met' if abs(pb) * 2 <= abs(pa) and b <= a else 'NOT met'}), RMSE {a:.4f} -> "
              f"{b:.4f}")


def bench_lab(args):
    """Lab step 16 in run_lab; prints each network against the Cannon."""
    from cannon_fast.lab.pipeline import run_lab

    out = tempfile.mkdtemp(prefix="bench_astronn_lab_")
    t0 = time.perf_counter()
    s = run_lab(data_dir=args.lab_data, out_dir=os.path.join(out, "report"),
                extras=("nn",) if args.nn_only else True, show_progress=False, log=None)
    wall = time.perf_counter() - t0
    nn = s["extras"]["nn"]
    if nn.get("status") != "ok":
        print(f"lab NN step {nn.get('status')}: {nn.get('reason')}")
        return
    key = "vs_true" if "vs_true" in nn["cannon"] else "vs_catalog"
    names = ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE")
    print(f"lab on {args.lab_data or 'the embedded demo survey'}: {s['n_train']} training / "
          f"{s['n_validation']} validation stars; RMSE against the {nn['scored_against']}:")
    print(f"{'method':10s} " + " ".join(f"{n:>9s}" for n in names) + "   train s  epochs")
    print(f"{'Cannon':10s} " + " ".join(f"{nn['cannon'][key][n]['rmse']:9.4g}" for n in names))
    for k, v in nn["networks"].items():
        print(f"{k:10s} " + " ".join(f"{v[key][n]['rmse']:9.4g}" for n in names)
              + f"  {v['train_seconds']:7.0f}  {v['n_epochs']:6d}"
              + ("  (chosen)" if k == nn["chosen"] else ""))
    print(nn["headline"])
    print(f"whole lab {'(NN step only)' if args.nn_only else '(all extras)'}: {wall:.0f} s "
          f"(target <= 600 s); timings {s['timings']}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main(argv=None):
    """Run the selected parts; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--survey", help="mock survey folder with survey.npz and truth.fits "
                                     "(mock_survey.py --format npz): the distance benchmark")
    ap.add_argument("--continuum", default=os.path.join(_shared(), "data", "real", "lab2",
                                                        "cannon_continuum_apogee.npz"))
    ap.add_argument("--snr-min", type=float, default=50.0, help="training S/N cut")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--no-distances", action="store_true", help="skip the distance part")
    ap.add_argument("--censor", action="store_true",
                    help="with --survey: the [Mg/Fe] leak into [Si/Fe], censored or not")
    ap.add_argument("--windows", default=os.path.join(_shared(), "data", "real", "windows_dr17",
                                                      "Si.wind"))
    ap.add_argument("--si-filter", default=os.path.join(_shared(), "data", "real",
                                                        "windows_dr17", "Si.filt"),
                    help="ASPCAP's Si filter (7514 on-chip pixels): a second censored network "
                         "on its core pixels ('' to skip)")
    ap.add_argument("--si-filter-min", type=float, default=0.5)
    ap.add_argument("--lab", action="store_true", help="run the lab's NN step")
    ap.add_argument("--lab-data", default=None, help="SAS tree for the lab (default: the demo)")
    ap.add_argument("--nn-only", action="store_true", help="lab: only the NN extra")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s)")
    if args.survey and not args.no_distances:
        bench_distances(args)
    if args.survey and args.censor:
        bench_censoring(args)
    if args.lab:
        bench_lab(args)
    if not (args.survey or args.lab):
        ap.error("nothing to do: give --survey DIR and/or --lab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
