"""The Data-Driven Payne on the LAMOST-/DESI-like mock spectra (issue 17): a script printing tables.

Run (2 shared CPU cores; a few minutes per network)::

    nice python benchmarks/bench_ddpayne.py --out /work/scratch/ddpayne
    nice python benchmarks/bench_ddpayne.py --instrument desi --out DIR

What a real user has: the instrument's spectra and, for the stars it shares with the
APOGEE mock survey, the survey's CATALOGUE labels (truth + ASPCAP-like errors). The
networks (with the gradient prior, the same without it) and a quadratic Cannon are trained
on a seeded 70 % of the stars with complete catalogue labels; the other stars' spectra are
fitted and judged against the TRUE labels, per star against its Cramér–Rao bound (the
ab initio model at the true labels, the spectrum's own ivar). Extrapolation: the same
three trained only on stars with catalogue [Fe/H] > -1, tested on stars with true
[Fe/H] < -1.

The gradient template: the ab initio model of ``../shared/data/synthetic_grid`` on the
instrument's grid (``_abinitio.py``), differentiated at a Sobol design over the survey's
label range with [Fe/H] down to -2.5 (the model's edge), written to ``--out``. Caveat
(stated in the note): the mock spectra were made with that same model, so the template is
exact here; with real data it is not.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _abinitio as ab  # noqa: E402

NAMES = list(ab.LABEL_NAMES)
DESIGN_BOX = np.array([[3700.0, 6700.0], [0.3, 5.0], [-2.5, 0.5]])


def load(args):
    """Instrument spectra with the catalogue and true labels of each row."""
    inst = ab.read_instrument(os.path.join(args.inst, f"{args.instrument}_spectra.fits"))
    with np.load(os.path.join(args.survey, "survey.npz"), allow_pickle=False) as d:
        ids = np.char.strip(d["apogee_id"].astype(str))
        names = [str(s) for s in d["label_names"]]
        cat = d["labels"][:, [names.index(n) for n in NAMES]].astype(np.float64)
    row = {s: i for i, s in enumerate(ids)}
    idx = np.array([row[s] for s in inst["apogee_id"]])
    inst["catalogue"] = cat[idx]
    inst["star"] = idx
    return inst


def split(inst, seed, test_fraction=0.3):
    """Seeded split by star (repeat spectra of a star stay on one side)."""
    stars = np.unique(inst["star"])
    rng = np.random.default_rng(seed)
    test_stars = rng.choice(stars, int(round(test_fraction * len(stars))), replace=False)
    test = np.isin(inst["star"], test_stars)
    complete = np.all(np.isfinite(inst["catalogue"]), axis=1)
    return ~test & complete, test


def crbs(model, labels, ivar):
    """Each spectrum's Cramér–Rao bounds at its true labels (ideal model)."""
    from cannon_fast.core.information import information_content

    return np.array([information_content(model, lab, ivar=iv, s2=0.0).crb
                     for lab, iv in zip(labels, ivar)])


def make_template(model, grid, ref, args):
    """The model's gradient spectra at the design (optionally made imperfect on purpose)."""
    from cannon_fast.core.grid import PixelGrid
    from cannon_fast.nn.dd_payne import GradientTemplate

    source = f"ab initio model (doppler polynomial) on the {grid.name} grid"
    if args.template_resolution is None and args.template_shift is None:
        return GradientTemplate.from_model(model, ref, source=source)
    other = model
    if args.template_resolution is not None:
        other = ab.AbInitioModel(PixelGrid(grid.wavelength, resolution=args.template_resolution,
                                           name=grid.name))
        source += f" at R {args.template_resolution:g}"
    shift = np.zeros(3) if args.template_shift is None else np.asarray(args.template_shift)
    source += f", labels shifted by {shift.tolist()}"
    tpl = GradientTemplate.from_model(other, ref + shift)
    print(f"imperfect template: {source}", flush=True)
    return GradientTemplate(ref, tpl.gradients, NAMES, grid=grid, source=source)


def train_all(inst, train, template, args, grid, tag):
    """DD-Payne, the same network without the prior, and a quadratic Cannon."""
    from cannon_fast import CannonModel
    from cannon_fast.nn.dd_payne import train_dd_payne

    flux, ivar, lab = inst["flux"][train], inst["ivar"][train], inst["catalogue"][train]
    # one box for both networks (the data's and the template's ranges): the network without
    # the prior may extrapolate as far as the one with it
    box = np.column_stack([np.minimum(lab.min(0), template.labels.min(0)),
                           np.maximum(lab.max(0), template.labels.max(0))])
    out = {}
    runs = [(f"DD-Payne {s:g}", s) for s in args.strength] + [("no prior", 0.0)]
    for name, strength in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        net = train_dd_payne(flux, ivar, lab, NAMES, template if strength else None,
                             strength=strength, hidden=tuple(args.hidden), epochs=args.epochs,
                             box=box,
                             learning_rate=args.lr, grid=grid, seed=args.seed,
                             progress=False)
        print(f"  {tag} {name}: trained on {train.sum()} spectra in "
              f"{time.perf_counter() - t0:.0f} s ({time.process_time() - c0:.0f} s CPU), "
              f"val chi2/px {net.history['val_chi2'][net.history['best_epoch']]:.3f}, "
              f"gradient mismatch vs template {np.round(net.gradient_mismatch(template), 3)}",
              flush=True)
        if args.out:
            net.write(os.path.join(args.out, f"ddpayne_{args.instrument}_{tag}_"
                                             f"{f'prior{strength:g}' if strength else 'noprior'}"
                                             f"{args.suffix}.npz"))
        out[name] = net
    cannon = CannonModel(NAMES, order=2)
    cannon.train(flux, ivar, lab)
    out["Cannon"] = cannon
    return out


def fit(model, flux, ivar):
    """Labels of test spectra: the fast MLP fit for networks, the Cannon's own fit."""
    from cannon_fast.nn.dd_payne import DataDrivenPayne
    from cannon_fast.nn.fast_fit import fit_emulator

    if isinstance(model, DataDrivenPayne):
        return fit_emulator(model, flux, ivar).labels
    return model.fit(flux, ivar).labels


def table(results, truth, crb, sel, title):
    """Offset, scatter and scatter in units of each star's CRB, per model and label."""
    print(f"\n{title} ({sel.sum()} spectra; median CRB "
          + ", ".join(f"{n} {v:.3g}" for n, v in zip(NAMES, np.median(crb[sel], axis=0)))
          + ")")
    print("| model | " + " | ".join(f"{n}: offset / scatter / rms err/CRB" for n in NAMES)
          + " |")
    print("|---|" + "---|" * len(NAMES))
    for name, lab in results.items():
        d = lab[sel] - truth[sel]
        ok = np.all(np.isfinite(d), axis=1)
        d, c = d[ok], crb[sel][ok]
        med = np.median(d, axis=0)
        mad = 1.4826 * np.median(np.abs(d - med), axis=0)
        z = np.sqrt(np.mean((d / c) ** 2, axis=0))
        cells = [f"{m:+.3g} / {s:.3g} / {r:.2f}" for m, s, r in zip(med, mad, z)]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def figure(results, truth, path, title):
    """Fitted minus true labels against the true [Fe/H], one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NAMES), figsize=(4.2 * len(NAMES), 3.6),
                             constrained_layout=True)
    for j, (ax, name) in enumerate(zip(axes, NAMES)):
        for model, lab in results.items():
            ax.plot(truth[:, 2], lab[:, j] - truth[:, j], ".", ms=3, alpha=0.7, label=model)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("true FE_H")
        ax.set_ylabel(f"fitted - true {name}")
    axes[0].legend(fontsize=7, markerscale=2)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure: {path}")


def main(argv=None):
    """Run the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instrument", default="lamost", choices=("lamost", "desi"))
    p.add_argument("--inst", default="/work/scratch/inst")
    p.add_argument("--survey", default="/work/scratch/mock3036")
    p.add_argument("--out", default=None)
    p.add_argument("--strength", type=float, nargs="+", default=[100.0, 1000.0])
    p.add_argument("--template-shift", type=float, nargs=3, default=None,
                   metavar=("DTEFF", "DLOGG", "DFEH"),
                   help="an imperfect template: gradients of the model at labels + these")
    p.add_argument("--template-resolution", type=float, default=None,
                   help="an imperfect template: the model at this resolving power")
    p.add_argument("--suffix", default="", help="appended to the written file names")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 300])
    p.add_argument("--n-template", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=("main", "extrapolation"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from cannon_fast.nn.ab_initio import label_design

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    print(f"# Data-Driven Payne, {args.instrument}-like (load {os.getloadavg()[0]:.1f})",
          flush=True)
    inst = load(args)
    grid = ab.instrument_grid(args.instrument)
    if not np.allclose(grid.wavelength, inst["wave"], rtol=1e-9):
        raise SystemExit("the instrument file's wavelengths differ from _abinitio's grid")
    model = ab.AbInitioModel(grid)
    ref = label_design(DESIGN_BOX, args.n_template, accept=model.in_hull, seed=args.seed)
    template = make_template(model, grid, ref, args)
    if args.out:
        template.write(os.path.join(args.out, f"template_{args.instrument}{args.suffix}.npz"))
    train, test = split(inst, args.seed)
    truth = inst["labels"]
    crb = crbs(model, truth[test], inst["ivar"][test])
    snr = inst["snr"][test]
    if "main" not in args.skip:
        models = train_all(inst, train, template, args, grid, "all")
        res = {k: fit(m, inst["flux"][test], inst["ivar"][test]) for k, m in models.items()}
        table(res, truth[test], crb, snr >= 50, "Test stars, S/N >= 50")
        table(res, truth[test], crb, snr < 50, "Test stars, S/N < 50")
    if "extrapolation" not in args.skip:
        rich = train & (inst["catalogue"][:, 2] > -1.0)
        models = train_all(inst, rich, template, args, grid, "feh_gt_-1")
        poor = truth[test][:, 2] < -1.0
        res = {k: fit(m, inst["flux"][test][poor], inst["ivar"][test][poor])
               for k, m in models.items()}
        table(res, truth[test][poor], crb[poor], np.ones(poor.sum(), bool),
              "Extrapolation: trained on catalogue [Fe/H] > -1, test stars with true [Fe/H] < -1")
        table(res, truth[test][poor], crb[poor], snr[poor] >= 50, "  the same at S/N >= 50")
        if args.out:
            figure(res, truth[test][poor], os.path.join(
                args.out, f"extrapolation_{args.instrument}{args.suffix}.png"),
                f"{args.instrument}-like: trained on catalogue [Fe/H] > -1, stars below")
    print(f"\n(load at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
