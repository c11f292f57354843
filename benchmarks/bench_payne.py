"""The Payne family on the ab initio model and the mock surveys (issue 17): a script printing figures.

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
           (target >= 500 stars/s on 2 cores).
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
    print(f"\n## {msg}   (uptime: {os.getloadavg()[0]:.1f} load)", flush=True)


# ----------------------------------------------------------------------------- information
def section_info(args):
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
                           title="LAMOST-like, S/N 100: each pixel's share of each label's variance")
        top = {n: model.grid.wavelength[info.top_pixels(n, 3)].round(1).tolist()
               for n in info.label_names}
        print(f"LAMOST-like: pixels carrying most of each label (A): {top}")
    return bounds


# ----------------------------------------------------------------------------- rotation
def section_rotation(args):
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["info", "rotation", "abinitio", "transformer"])
    ap.add_argument("--out", default=None, help="folder for figures")
    ap.add_argument("--inst", default="/work/scratch/inst", help="mock_instruments.py output")
    ap.add_argument("--survey", default="/work/scratch/mock3036", help="mock_survey.py output")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-rot", type=int, default=20, help="stars per v sin i")
    ap.add_argument("--threads", type=int, default=1)
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
