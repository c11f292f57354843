"""``cannon-fast jwst`` and ``cannon-fast transfer``: other instruments' spectra.

``jwst`` is the JWST project (seed 001) as one run; ``transfer`` carries a
catalogue's labels to another survey's spectra through the stars in common.
"""
from __future__ import annotations

import sys
import time

__all__ = ["register"]


def _ints(text):
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def register(subparsers, parent):
    """Add the ``jwst`` and ``transfer`` subcommands.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
    parent : argparse.ArgumentParser
        Shared options (``--backend``, ``--seed``, ``--quiet``).
    """
    p = subparsers.add_parser(
        "jwst", parents=[parent],
        help="catalogue figures, APOGEE-JWST cross-match and spectra, StarNet vs the Cannon",
        description="The JWST project as one run: read an APOGEE-like catalogue and a "
                    "JWST/NIRSpec-like set of spectra of its stars (named '<row>_00' or with an "
                    "ID column), report the stars in one set only and whether the labels agree, "
                    "plot the catalogue and ten stars spanning the labels (APOGEE and JWST "
                    "spectra), train StarNet (Fabbro et al. 2018) and the Cannon on one seeded "
                    "5:1:2 split and compare them. Writes report.html, summary.json and PNGs.")
    p.add_argument("--catalog", required=True, help="catalogue FITS (TEFF, LOGG, FE_H, ...)")
    p.add_argument("--jwst", required=True, help="JWST spectra (FITS or .npz)")
    p.add_argument("--apogee", help="APOGEE spectra of the catalogue's stars (.npz or FITS with "
                                    "APOGEE_ID), normalized per chip if they are not")
    p.add_argument("--out", default="cannon_fast_jwst", help="report folder "
                                                             "(default ./cannon_fast_jwst)")
    p.add_argument("--force", action="store_true", help="replace an existing report there")
    p.add_argument("--id-column", help="match the JWST set by this column, not '<row>_00' names")
    p.add_argument("--continuum", help="continuum pixel file for the APOGEE spectra")
    p.add_argument("--n-show", type=int, default=10, help="stars whose spectra are drawn")
    p.add_argument("--cannon-order", type=int, default=2, help="the Cannon's polynomial order")
    p.add_argument("--resolution", type=float,
                   help="resolving power of the JWST spectra (R = lambda / FWHM)")
    p.add_argument("--band-limit", action="store_true",
                   help="smooth the Cannon's coefficients within the LSF's band (needs "
                        "--resolution; less training noise on grids that oversample the LSF)")
    p.add_argument("--no-nn", action="store_true", help="skip StarNet")
    g = p.add_argument_group("StarNet (defaults: Fabbro et al. 2018 as in the seed)")
    g.add_argument("--filters", type=_ints, default=(4, 16), help="conv filters (4,16)")
    g.add_argument("--kernel-size", type=_ints, default=(8,), help="conv kernel length(s) (8)")
    g.add_argument("--pool-size", type=_ints, default=(1, 4),
                   help="max-pool after each conv layer, 1 = none (1,4)")
    g.add_argument("--hidden", type=_ints, default=(256, 128), help="dense widths (256,128)")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--learning-rate", type=float, default=1e-3)
    g.add_argument("--patience", type=int, default=5)
    p.set_defaults(func=_jwst)

    t = subparsers.add_parser(
        "transfer", parents=[parent],
        help="carry a catalogue's labels to another survey's spectra (Cannon, optionally NN)",
        description="Train the Cannon (and with --nn the StarNet regressor) on the spectra of "
                    "stars the catalogue labels, a seeded share of them, and label every "
                    "spectrum; repeat visits of the stars not trained on give the scatter of "
                    "the labels over their stated errors (pull std). Writes a FITS table.")
    t.add_argument("--catalog", required=True, help="reference catalogue FITS with labels")
    t.add_argument("--spectra", required=True, help="the other survey's spectra (FITS or .npz)")
    t.add_argument("--out", required=True, help="output FITS table, one row per spectrum")
    t.add_argument("--force", action="store_true", help="replace --out")
    t.add_argument("--labels", default="TEFF,LOGG,FE_H", help="labels to carry over")
    t.add_argument("--match-column", default="APOGEE_ID",
                   help="column of both files naming the star (default APOGEE_ID)")
    t.add_argument("--train-fraction", type=float, default=0.5,
                   help="share of the stars in common trained on (default 0.5)")
    t.add_argument("--cannon-order", type=int, default=2)
    t.add_argument("--no-debias", action="store_true",
                   help="plain chi² fit: noise-only errors, what repeat visits measure")
    t.add_argument("--nn", action="store_true", help="also train StarNet (needs torch)")
    t.add_argument("--resolution", type=float,
                   help="resolving power of the spectra (R = lambda / FWHM)")
    t.add_argument("--band-limit", action="store_true",
                   help="smooth the Cannon's coefficients within the LSF's band (needs "
                        "--resolution)")
    t.set_defaults(func=_transfer)


def _jwst(args):
    from ..lab.jwst import run_jwst_report

    quiet = getattr(args, "quiet", False)
    ks = args.kernel_size[0] if len(args.kernel_size) == 1 else args.kernel_size
    nn_options = dict(filters=args.filters, kernel_size=ks, pool_size=args.pool_size,
                      hidden=args.hidden, dropout=args.dropout)
    nn_training = dict(epochs=args.epochs, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, patience=args.patience)
    t0 = time.perf_counter()
    s = run_jwst_report(args.catalog, args.jwst, args.out, args.apogee, force=args.force,
                        seed=args.seed, n_show=args.n_show, id_column=args.id_column,
                        continuum_pixels=args.continuum, nn=not args.no_nn,
                        nn_options=nn_options, nn_training=nn_training,
                        cannon_order=args.cannon_order, backend=args.backend,
                        resolution=args.resolution, cannon_band_limit=args.band_limit,
                        show_progress=False if quiet else None,
                        log=None if quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    m = s["jwst_match"]
    print(f"{m['n_matched']} stars in both; in the catalogue only: "
          + (", ".join(f"row {x['row']} ({x.get('id', '')}) TEFF {x['TEFF']:.1f} LOGG "
                       f"{x['LOGG']:.3f} FE_H {x['FE_H']:.3f}" for x in m["only_a"]) or "none"))
    comp = s["comparison"]
    for method in ("cannon", "starnet"):
        if method in comp:
            print(f"{method:8s} RMSE " + "  ".join(
                f"{n} {v['rmse']:.4g}" for n, v in comp[method]["metrics"].items()))
    print(f"done in {time.perf_counter() - t0:.0f} s; report: {s['report']}")
    return 0


def _transfer(args):
    import os

    import numpy as np

    from .._util import atomic_path
    from ..instruments import read_spectra
    from ..lab.jwst import read_catalog
    from ..lab.transfer import transfer_labels

    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to replace it")
    names = [n.strip() for n in args.labels.split(",") if n.strip()]
    cat = read_catalog(args.catalog)
    missing = [n for n in names + [args.match_column] if n not in cat]
    if missing:
        raise ValueError(f"{args.catalog}: no column(s) {', '.join(missing)}")
    if args.band_limit and args.resolution is None:
        raise ValueError(f"{args.spectra}: --band-limit needs --resolution (the spectra's "
                         "resolving power)")
    sp = read_spectra(args.spectra, normalize=True, resolution=args.resolution)
    if args.match_column not in sp.table:
        raise ValueError(f"{args.spectra}: no {args.match_column} column to match by")
    quiet = getattr(args, "quiet", False)
    out = transfer_labels(cat[args.match_column], np.column_stack([cat[n] for n in names]), sp,
                          sp.table[args.match_column], names,
                          train_fraction=args.train_fraction, seed=args.seed,
                          cannon_order=args.cannon_order, debias=not args.no_debias, nn=args.nn,
                          band_limit=args.band_limit,
                          backend=args.backend,
                          names=(os.path.basename(args.catalog), os.path.basename(args.spectra)),
                          log=None if quiet else (lambda m: print(m, file=sys.stderr)))
    cols = {"ID": sp.ids, args.match_column: sp.table[args.match_column]}
    trained = np.zeros(len(sp), bool)
    trained[out.train_rows] = True
    for method in out.labels:
        for j, n in enumerate(names):
            cols[f"{n}_{method.upper()}"] = out.labels[method][:, j]
            cols[f"{n}_{method.upper()}_ERR"] = out.errors[method][:, j]
        cols[f"OK_{method.upper()}"] = out.ok[method]
    cols["TRAINED_ON"] = trained
    from astropy.table import Table
    with atomic_path(args.out) as tmp:
        Table(cols).write(tmp, format="fits")
    for method, p in out.pulls.items():
        print(f"{method}: {p['n_pairs']} repeat pairs; pull std " + "  ".join(
            f"{n} {v:.3f}" for n, v in zip(names, p["std"])))
    print(f"{len(sp)} spectra labeled -> {args.out}")
    return 0
