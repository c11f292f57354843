"""``cannon-fast download`` and ``cannon-fast prepare``: the data steps of the workflow."""
from __future__ import annotations

import os
import sys

__all__ = ["register"]


def register(subparsers, parent):
    """Add the ``download`` and ``prepare`` subcommands.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
    parent : argparse.ArgumentParser
        Shared options (``--backend``, ``--seed``, ``--quiet``).
    """
    from ..apogee.download import DEFAULT_BASE_URL

    p = subparsers.add_parser(
        "download", parents=[parent],
        help="fetch the apStar files of APOGEE fields (and the allStar catalogue)",
        description="Download every apStar file of the given fields from the SDSS archive (or a "
                    "mirror): concurrent keep-alive connections, resume, retries, FITS check, "
                    "atomic rename; failures are listed at the end.")
    p.add_argument("--fields", nargs="+", required=True, metavar="FIELD",
                   help="field names, e.g. M15 N6791 K2_C4_168-21 060+00")
    p.add_argument("--out", "--dest", dest="dest", required=True,
                   help="target directory (a SAS-like tree is made)")
    p.add_argument("--release", default="dr17", choices=("dr17", "dr16"))
    p.add_argument("--telescope", default="apo25m", help="telescope directory (default apo25m)")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"archive root preceding /dr17/apogee/... (default {DEFAULT_BASE_URL})")
    p.add_argument("--allstar", help="find the fields' stars in this local allStar file instead "
                                     "of the archive's directory listings")
    p.add_argument("--fetch-allstar", action="store_true",
                   help="also download the allStar catalogue (several GB for DR17)")
    p.add_argument("--workers", type=int, default=8, help="concurrent connections (default 8)")
    p.add_argument("--retries", type=int, default=4, help="retries per file (default 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per connect/read")
    p.set_defaults(func=_download)

    q = subparsers.add_parser(
        "prepare", parents=[parent],
        help="apStar files + allStar -> quality cuts -> masks -> normalized SpectraStore",
        description="Cross-match apStar files with allStar, apply the quality cuts (reported "
                    "cut by cut), mask bad pixels, pseudo-continuum normalize per chip and write "
                    "a memory-mappable SpectraStore.")
    q.add_argument("--apstar", nargs="+", required=True,
                   help="apStar files or directories (searched recursively)")
    q.add_argument("--allstar", required=True, help="allStar catalogue (FITS)")
    cont = q.add_mutually_exclusive_group(required=True)
    cont.add_argument("--continuum",
                      help="continuum pixels: .npz/.npy mask or indices (7214/7514/8575 grid), "
                           "text indices, or a text list of wavelength ranges")
    cont.add_argument("--model", "--continuum-from", dest="continuum_model", metavar="MODEL",
                      help="normalize as this model's training spectra were: the continuum "
                           "pixels and degree recorded in the model file (cannon-fast train "
                           "on a store, and the demo's model.fits, record them); to prepare "
                           "spectra for `fit` with that model")
    q.add_argument("--out", required=True, help="SpectraStore directory to create")
    q.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                   help="replace an existing store, once the new one is complete")
    q.add_argument("--labels", default="TEFF,LOGG,FE_H,MG_FE,SI_FE",
                   help="label columns, comma-separated (default the lab's five)")
    q.add_argument("--degree", type=int, default=None,
                   help="continuum Chebyshev degree per chip (default: the library's)")
    q.add_argument("--bad-bits", default=None,
                   help="PIXMASK bits marking bad pixels, names or numbers, comma-separated "
                        "(default 0-7,12)")
    q.add_argument("--snr-min", type=float, default=50.0)
    q.add_argument("--logg-max", type=float, default=4.0)
    q.add_argument("--teff-max", type=float, default=5700.0)
    q.add_argument("--feh-min", type=float, default=-1.0)
    q.add_argument("--flag-bits", default=None, metavar="NAMES",
                   help="remove stars with these ASPCAPFLAG/STARFLAG bits set, comma-separated "
                        "(each counted); 'astronn' for Astra AstroNN's training filter: "
                        "M_H_BAD,STAR_BAD,NO_ASPCAP_RESULT,MISSING_APSTAR,NO_GRID,PROBLEM_TARGET")
    q.add_argument("--keep-missing-labels", action="store_true",
                   help="keep stars with some labels missing (stored as NaN) for the NN's "
                        "masked loss; only stars with none of the labels are cut")
    q.add_argument("--min-stars", type=int, default=1,
                   help="fail if fewer stars pass the cuts (default 1)")
    q.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="reader processes")
    q.add_argument("--corner", help="write a corner plot of the kept labels to this file")
    q.set_defaults(func=_prepare)


def _download(args):
    from ..apogee.download import download_allstar, download_fields

    quiet = getattr(args, "quiet", False)
    if args.fetch_allstar:
        path = download_allstar(args.dest, args.release, args.base_url, workers=1,
                                retries=args.retries, timeout=args.timeout,
                                show_progress=None if not quiet else False)
        print(f"allStar: {path}")
    report = download_fields(args.fields, args.dest, release=args.release,
                             telescope=args.telescope, allstar=args.allstar,
                             base_url=args.base_url, workers=args.workers, retries=args.retries,
                             timeout=args.timeout, show_progress=None if not quiet else False)
    print(report)
    return 0 if report.ok else 1


def _recorded_continuum(path, backend):
    """(apStar continuum mask, degree) recorded in the model at ``path``; ValueError if none."""
    from ..apogee.files import NPIX
    from ..core.continuum import model_continuum
    from ..core.model import CannonModel

    model = CannonModel.read(path, backend=backend)
    if (model.train_info or {}).get("continuum_pixels") is None:
        raise ValueError(f"{path} records no continuum pixels (a model trained on an .npz or "
                         "by the Python API without record_continuum): give --continuum")
    mask, degree, _ = model_continuum(model)
    if mask.size != NPIX:
        raise ValueError(f"{path} is a model on a {model.n_pixels}-pixel grid, not APOGEE's: "
                         "prepare reads apStar files")
    return mask, degree


def _prepare(args):
    from ..apogee.prepare import corner_plot, find_apstar_files, prepare_dataset

    paths = []
    for a in args.apstar:
        paths.extend(find_apstar_files(a))
    labels = [c.strip().upper() for c in args.labels.split(",") if c.strip()]
    kw = {}
    continuum = args.continuum
    if args.continuum_model is not None:
        continuum, kw["degree"] = _recorded_continuum(args.continuum_model, args.backend)
    if args.degree is not None:
        kw["degree"] = args.degree
    if args.bad_bits is not None:
        kw["bits"] = args.bad_bits
    if args.flag_bits:
        from ..apogee.bitmask import ASTRONN_TRAINING_FLAGS

        kw["flags"] = (ASTRONN_TRAINING_FLAGS if args.flag_bits.strip().lower() == "astronn"
                       else [b for b in args.flag_bits.split(",") if b.strip()])
    kw["keep_missing"] = args.keep_missing_labels
    res = prepare_dataset(paths, args.allstar, args.out, continuum, labels=labels,
                          workers=args.workers, min_remaining=args.min_stars,
                          overwrite=args.overwrite,
                          show_progress=None if not getattr(args, "quiet", False) else False,
                          snr_min=args.snr_min, logg_max=args.logg_max, teff_max=args.teff_max,
                          feh_min=args.feh_min, **kw)
    print(res.report)
    if res.failures:
        print(f"{len(res.failures)} star(s) dropped by errors:", file=sys.stderr)
        for what, why in res.failures[:50]:
            print(f"  {what}: {why}", file=sys.stderr)
        if len(res.failures) > 50:
            print(f"  ... and {len(res.failures) - 50} more (see the store's index.json)",
                  file=sys.stderr)
    print(f"{res.store} ({res.n_flagged} kept with continuum flags)")
    if args.corner:
        if len(res.store) < 2:
            print("corner plot skipped: fewer than 2 stars", file=sys.stderr)
        else:
            try:
                corner_plot(res.store.labels, res.store.label_names, args.corner)
                print(f"corner plot: {args.corner}")
            except ValueError as err:
                print(f"corner plot skipped: {err}", file=sys.stderr)
    return 0
