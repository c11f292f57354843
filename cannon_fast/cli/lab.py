"""``cannon-fast demo`` and ``cannon-fast report``: the modeling lab end to end."""
from __future__ import annotations

import os
import sys
import time

__all__ = ["register", "parse_fehs"]


def register(subparsers, parent):
    """Add the ``demo`` and ``report`` subcommands.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
    parent : argparse.ArgumentParser
        Shared options (``--backend``, ``--seed``, ``--quiet``).
    """
    p = subparsers.add_parser(
        "demo", parents=[parent],
        help="the whole modeling lab on the embedded survey (or --data DIR), with a report",
        description="Generate (or reuse) the embedded synthetic APOGEE survey, apply the lab's "
                    "cuts, normalize, train the 5-label quadratic Cannon on a random half, fit "
                    "the other half and write a report folder (report.html, PNG figures, "
                    "summary.json, the model). No network. --data DIR runs the same pipeline "
                    "on downloaded files in the SDSS archive layout.")
    p.add_argument("--data", metavar="DIR",
                   help="downloaded apStar files + allStar catalogue (SAS layout) instead of the "
                        "embedded survey")
    p.add_argument("--out", default="cannon_fast_report",
                   help="report folder (default ./cannon_fast_report)")
    p.add_argument("--force", action="store_true",
                   help="replace the report files in an existing report folder")
    p.add_argument("--allstar", help="allStar catalogue (default: found under --data)")
    p.add_argument("--truth", help="truth.fits with true labels (default: <data>/truth.fits "
                                   "if present)")
    p.add_argument("--continuum", help="continuum pixel file (.npz/.npy/text); default: the "
                                       "embedded survey's mask, or found from --data")
    p.add_argument("--lines", metavar="FILE",
                   help="line list (wavelength ;species, AIR Å) for the gradient spectra")
    p.add_argument("--isochrone", action="append", metavar="FILE",
                   help="MIST (.iso/.iso.cmd) or PARSEC isochrone to overlay on the Kiel diagram "
                        "(repeatable); default for the demo: the survey's own giant branch")
    p.add_argument("--star", action="append", metavar="APOGEE_ID",
                   help="star of the continuum and data-vs-model figures (repeatable; default: "
                        "the median-S/N training star), e.g. the lab's checkpoint stars "
                        "2M19395986+2341280 and 2M03533659+2512012 in a download of its "
                        "fields (--data); an ID not in the data is an error listing near IDs")
    p.add_argument("--isochrone-source", choices=("files", "mist"), default="files",
                   help="files: the --isochrone files only; mist: also MIST isochrones from the "
                        "MIST web interpolator, fetched once and cached (~/.cache/cannon_fast/"
                        "isochrones or $CANNON_FAST_CACHE), so later runs work offline")
    p.add_argument("--isochrone-age", type=float, default=None, metavar="GYR",
                   help="age of the isochrones: the nearest in each file; fetched for mist "
                        "(default 6, as in lab step 11)")
    p.add_argument("--isochrone-feh", default=None, metavar="FEH[,FEH...]",
                   help="their [Fe/H]s, comma-separated, as for the age (default for mist: "
                        "0,-1, as in lab step 11)")
    p.add_argument("--n-stars", type=int, default=1200,
                   help="size of the embedded survey (default 1200)")
    p.add_argument("--min-stars", type=int, default=60,
                   help="fewest stars that must pass the cuts (default 60)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes reading files / generating the survey")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the optional steps (MCMC, movies, binaries, NN)")
    p.add_argument("--extra-terms", default="auto", metavar="TERMS",
                   help="terms added to the lab's quadratic model, comma-separated, e.g. "
                        "TEFF^3,TEFF^4; 'none' for the quadratic alone; default 'auto': the "
                        "quadratic, + TEFF^3,TEFF^4 or + TEFF^3,TEFF^4,FE_H^3, chosen by "
                        "cross-validation on the training set")
    p.add_argument("--test-step", choices=("auto", "debias", "plain", "broadened"),
                   default="auto",
                   help="label fit used for the figures and headline numbers (all are in "
                        "summary.json): de-biased, plain chi², or plain chi² with extra line "
                        "broadening fitted; auto: chosen by cross-validation on the training "
                        "set")
    p.add_argument("--no-binary-screen", action="store_true",
                   help="do not screen the stars for unresolved binaries (by default the "
                        "flagged training stars leave the training set and the validation "
                        "stars get BINARY_* columns)")
    p.add_argument("--training-margin", action="store_true",
                   help="train also on the stars up to 400 K and 0.3 dex past the hot and "
                        "dwarf cuts (never validated): the stars at the cuts are then not at "
                        "the model's edge (docs/lab.md, step 15)")
    p.add_argument("--label-errors", choices=("auto", "yes", "no"), default="auto",
                   help="train with the catalogue's label errors (regression-calibrated "
                        "labels, error-weighted stars); auto: chosen by cross-validation when "
                        "the catalogue has <LABEL>_ERR columns")
    p.set_defaults(func=_demo)

    q = subparsers.add_parser(
        "report", parents=[parent],
        help="rebuild report.html of a report folder from its summary.json and figures",
        description="Rebuild report.html in a folder written by `cannon-fast demo`, picking up "
                    "every PNG (and GIF/MP4) in it, e.g. after `cannon-fast mcmc` or `movie` "
                    "added figures.")
    q.add_argument("folder", nargs="?", default="cannon_fast_report",
                   help="report folder (default ./cannon_fast_report)")
    q.set_defaults(func=_report)


def _extra_terms(text):
    """'auto', 'none' or a comma-separated list of terms -> run_lab's extra_terms."""
    if text.strip().lower() in ("auto", "none"):
        return "auto" if text.strip().lower() == "auto" else ()
    return [t for t in text.split(",") if t.strip()]


def parse_fehs(text, option="--isochrone-feh"):
    """``--isochrone-feh`` (or ``option``): comma-separated [Fe/H] values, or None."""
    if text is None:
        return None
    try:
        fehs = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        fehs = []
    if not fehs:
        raise ValueError(f"{option} {text!r}: give numbers separated by commas, e.g. 0,-1")
    return fehs


def _demo(args):
    from ..lab.pipeline import run_lab

    quiet = getattr(args, "quiet", False)
    t0 = time.perf_counter()
    summary = run_lab(data_dir=args.data, out_dir=args.out, seed=args.seed, force=args.force,
                      allstar=args.allstar, truth=args.truth, continuum=args.continuum,
                      line_file=args.lines, isochrones=args.isochrone,
                      n_stars=args.n_stars, min_stars=args.min_stars,
                      workers=args.workers, backend=args.backend, extras=not args.no_extras,
                      extra_terms=_extra_terms(args.extra_terms),
                      test_step=args.test_step,
                      label_errors={"auto": "auto", "yes": True, "no": False}[args.label_errors],
                      binary_screen=not args.no_binary_screen,
                      training_margin=args.training_margin,
                      show_progress=False if quiet else None,
                      stars=args.star,
                      isochrone_source=args.isochrone_source,
                      isochrone_age=args.isochrone_age,
                      isochrone_feh=parse_fehs(args.isochrone_feh),
                      log=None if quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    v = summary["validation"][summary["primary_fit"]]
    ref = "vs_true" if "vs_true" in v else "vs_catalog"
    print(f"validation ({summary['primary_fit']} fit, {ref.replace('_', ' ')}), "
          f"{v['n_ok']} stars:")
    for name, s in v[ref].items():
        if s["bias"] is not None:
            print(f"  {name:6s} bias {s['bias']:+10.4f}  scatter {s['scatter']:9.4f}")
    t = (summary.get("targets") or {}).get("primary")
    if t:
        print("the lab's targets: " + ("met" if t["all_met"] else "NOT met"))
    print(f"done in {time.perf_counter() - t0:.0f} s; report: {summary['report']}")
    return 0


def _report(args):
    import json

    from ..lab.report import rebuild_report

    path = rebuild_report(args.folder)
    with open(os.path.join(args.folder, "summary.json")) as fh:
        if json.load(fh).get("report_kind") == "jwst":  # its page has its own tables
            from ..lab.jwst import rebuild_jwst_report
            path = rebuild_jwst_report(args.folder)
    print(f"report: {os.path.abspath(path)}")
    return 0
