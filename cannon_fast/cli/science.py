"""``cannon-fast mcmc``, ``movie`` and ``binaries``: the science steps of the lab."""
from __future__ import annotations

import json
import os
import sys

import numpy as np

__all__ = ["register", "load_one_spectrum"]

#: Exit code of ``mcmc`` when the chain did not converge (no result is reported).
EXIT_NOT_CONVERGED = 3
#: Exit code of ``mcmc`` when the spectrum has too few usable pixels (flag TOO_FEW_PIXELS).
EXIT_TOO_FEW_PIXELS = 4


def register(subparsers, parent):
    """Add the ``mcmc``, ``movie`` and ``binaries`` subcommands.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
    parent : argparse.ArgumentParser
        Shared options (``--backend``, ``--seed``, ``--quiet``).
    """
    p = subparsers.add_parser(
        "mcmc", parents=[parent], help="posterior of one star's labels (emcee)",
        description="Sample the posterior of one spectrum's labels with emcee: stated priors "
                    "(uniform within the training range unless --prior), walkers started from "
                    "the chi² fit, run until 50 autocorrelation times (or --max-steps). An "
                    "unconverged chain is not reported (exit code 3); a spectrum with too few "
                    "usable pixels (e.g. every pixel masked) is flagged TOO_FEW_PIXELS (exit "
                    "code 4). SPECTRUM is an apStar file (any star: masked with its PIXMASK and "
                    "pseudo-continuum normalized here as `prepare` does, with the continuum "
                    "pixels and degree the model records) or an .npz with normalized flux and "
                    "ivar on the model's pixels.")
    p.add_argument("spectrum", help="apStar FITS file, or .npz with flux, ivar (one spectrum)")
    p.add_argument("--model", required=True, help="model file (cannon-fast train)")
    p.add_argument("--continuum", default=None,
                   help="continuum pixels for normalizing an apStar file (any format "
                        "load_continuum_pixels reads); default: the model's record, else picked "
                        "from the model")
    p.add_argument("--prior", action="append", default=[], metavar="LABEL=KIND:A:B",
                   help="e.g. TEFF=uniform:4000:5200 or FE_H=gaussian:0:0.2 (repeatable); "
                        "other labels: uniform within the training range")
    p.add_argument("--walkers", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=20000,
                   help="cap on the chain length (default 20000)")
    p.add_argument("--corner", default=None, help="write the corner plot here (.png/.pdf)")
    p.add_argument("--out", "--output", dest="output", default=None,
                   help="write the summary as JSON here")
    p.add_argument("--samples", default=None, help="write the posterior samples (.npz) here")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing --out, --corner and --samples files")
    p.add_argument("--cv-scatter", default=None, metavar="LABEL=VALUE,... or REPORT",
                   help="cross-validation scatter per label for the comparison table: "
                        "e.g. TEFF=30,LOGG=0.06,FE_H=0.02, or a report folder (or its "
                        "summary.json) to use that lab run's validation scatter")
    p.set_defaults(func=_mcmc)

    m = subparsers.add_parser(
        "movie", parents=[parent], help="movies of the model spectrum ([Fe/H], RGB ascent)",
        description="GIF (and MP4 when ffmpeg is found: the PATH, or imageio-ffmpeg) of "
                    "the model spectrum over "
                    "16000-16200 Å: as [Fe/H] goes -1 -> +0.5 at fixed Teff/log g, and as "
                    "log g goes 3.5 -> 0.5 with Teff following an isochrone (or the survey's "
                    "giant branch) at [Fe/H] = 0.")
    m.add_argument("--model", required=True, help="model file (cannon-fast train)")
    m.add_argument("--out", default="movies", help="output folder (default ./movies)")
    m.add_argument("--kind", choices=("metallicity", "rgb", "both"), default="both")
    m.add_argument("--isochrone", default=None,
                   help="MIST .iso/.iso.cmd or PARSEC file for the RGB movie (default: the "
                        "survey giant branch fitted to the model's training labels)")
    m.add_argument("--age", type=float, default=None, help="isochrone age to pick (Gyr)")
    m.add_argument("--teff", type=float, default=4750.0, help="Teff of the [Fe/H] movie")
    m.add_argument("--logg", type=float, default=2.5, help="log g of the [Fe/H] movie")
    m.add_argument("--frames", type=int, default=31)
    m.add_argument("--fps", type=int, default=8)
    m.add_argument("--no-mp4", action="store_true", help="GIF only")
    m.add_argument("--force", action="store_true", help="overwrite existing movies")
    m.set_defaults(func=_movie)

    i = subparsers.add_parser(
        "isochrones", parents=[parent],
        help="MIST isochrones from the MIST web interpolator (cached), e.g. for lab step 11",
        description="Fetch MIST isochrones at one age and one or more [Fe/H] from the MIST web "
                    "interpolator (once: they are cached in ~/.cache/cannon_fast/isochrones or "
                    "$CANNON_FAST_CACHE) and print where they are and their giant branch; "
                    "--out copies them to a folder, for `demo --isochrone FILE` or "
                    "`movie --isochrone FILE`.")
    i.add_argument("--age", type=float, default=6.0, help="age in Gyr (default 6)")
    i.add_argument("--feh", default="0,-1", metavar="FEH[,FEH...]",
                   help="[Fe/H] values, comma-separated (default 0,-1)")
    i.add_argument("--out", default=None, help="copy the .iso files into this folder")
    i.add_argument("--force", action="store_true", help="overwrite files in --out")
    i.add_argument("--refresh", action="store_true",
                   help="fetch again even when cached (the cache is replaced only by a good file)")
    i.set_defaults(func=_isochrones)

    b = subparsers.add_parser(
        "binaries", parents=[parent], help="single vs binary fits; bias of binaries (study)",
        description="Fit each spectrum with the single-star model and a two-star composite "
                    "(El-Badry et al. 2018) and flag likely binaries by the BIC; with --study, "
                    "inject binaries at known light ratios and plot the bias of single-star "
                    "labels.")
    b.add_argument("spectra", nargs="*",
                   help="apStar files or .npz files (flux, ivar; one or many spectra)")
    b.add_argument("--model", required=True, help="model file (cannon-fast train)")
    b.add_argument("--continuum", default=None, help="continuum pixels (as for mcmc)")
    b.add_argument("--light-ratio", choices=("free", "physical"), default="free")
    b.add_argument("--bic-threshold", type=float, default=10.0)
    b.add_argument("--study", action="store_true", help="run the injection study")
    b.add_argument("--n-stars", type=int, default=30, help="primaries per light ratio (study)")
    b.add_argument("--velocity", type=float, default=0.0, help="|Δv| injected, km/s (study)")
    b.add_argument("--snr", type=float, default=100.0, help="S/N of injected spectra (study)")
    b.add_argument("--source", choices=("model", "synthetic"), default="model",
                   help="component spectra for the study: the model or the physical synthesis")
    b.add_argument("--detect", action="store_true", help="study: also run the binary flagging")
    b.add_argument("--out", default=None, help="folder for the table and figure")
    b.add_argument("--force", action="store_true", help="overwrite existing outputs")
    b.set_defaults(func=_binaries)


# ----------------------------------------------------------------------------- inputs
def _read_model(path, backend):
    from ..core.model import CannonModel
    return CannonModel.read(path, backend=backend)


def load_one_spectrum(path, model, continuum=None):
    """Read the normalized flux and ivar of one spectrum on the model's pixels.

    Parameters
    ----------
    path : str
        An apStar file (read with ``cannon_fast.apogee.files.read_apstar``, bad
        pixels masked with its PIXMASK, pseudo-continuum normalized with
        ``cannon_fast.core.continuum.normalize``) or an ``.npz`` with ``flux`` and
        ``ivar`` (already normalized; (P,) or (N, P)).
    model : CannonModel
    continuum : str, optional
        Continuum-pixel file; default the model's record, else pixels picked
        from the model (``cannon_fast.core.continuum.model_continuum``).

    Returns
    -------
    flux, ivar : ndarray, (N, P)
    ids : list of str
    notes : list of str
    """
    notes = []
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give one apStar file or an .npz spectrum")
    if path.lower().endswith(".npz"):
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in ("flux", "ivar") if k not in d.files]
            if missing:
                raise ValueError(f"{path} lacks {missing} (has {d.files})")
            flux, ivar = np.atleast_2d(d["flux"]), np.atleast_2d(d["ivar"])
            ids = [str(s) for s in d["ids"]] if "ids" in d.files else \
                [f"{os.path.basename(path)}[{i}]" for i in range(len(flux))]
        if flux.shape[1] != model.n_pixels:
            raise ValueError(f"{path}: {flux.shape[1]} pixels but the model has "
                             f"{model.n_pixels}")
        return flux.astype(np.float64), ivar.astype(np.float64), ids, notes
    from ..core.continuum import model_continuum, normalize
    from ..apogee.files import NPIX, grid_indices, read_apstar

    star = read_apstar(path)
    flux, ivar, bad = star.masked()
    notes.append(f"{int(bad.sum())} of {bad.size} pixels masked (bad PIXMASK bits, chip gaps, "
                 "non-finite values)")
    if flux.shape[-1] != NPIX:
        raise ValueError(f"{path}: {flux.shape[-1]} pixels, expected the {NPIX}-pixel apStar grid")
    cont, degree, source = model_continuum(model, continuum)
    notes.append(f"continuum pixels: {source}")
    norm = normalize(flux, ivar, cont, degree=degree, dtype=np.float64)
    if norm.flags[0]:
        notes.append(f"continuum flags: {', '.join(norm.flag_names(0))}")
    f, iv = norm.flux, norm.ivar
    if model.n_pixels != NPIX:
        idx = grid_indices(model.n_pixels)
        f, iv = f[idx], iv[idx]
    meta = star.meta
    notes.append(f"{meta.get('apogee_id')}: {meta.get('nvisits')} visit(s), S/N "
                 f"{meta.get('snr')}, release {meta.get('release') or 'unknown'}, "
                 f"{int((iv > 0).sum())} usable pixels")
    return f[None].astype(np.float64), iv[None].astype(np.float64), \
        [str(meta.get("apogee_id") or os.path.basename(path))], notes


def _parse_cv(text):
    """``--cv-scatter``: LABEL=VALUE pairs, or a report folder / its summary.json."""
    if not text:
        return None
    if os.path.isdir(text) or text.endswith(".json"):
        from ..lab.pipeline import cv_scatter, read_summary
        try:
            return cv_scatter(read_summary(text))
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"--cv-scatter {text}: not a lab report with validation "
                             f"numbers ({type(err).__name__}: {err})") from None
    out = {}
    for item in text.split(","):
        name, _, val = item.partition("=")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            raise ValueError(f"cannot parse --cv-scatter item {item!r}: use LABEL=VALUE "
                             "or a report folder") from None
    return out


def _refuse_existing(path, force):
    if path and os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


# ----------------------------------------------------------------------------- commands
def _mcmc(args):
    import warnings

    from ..lab.mcmc import TrainingRangeWarning, parse_prior_args, sample_posterior

    for path in (args.output, args.corner, args.samples):   # before the sampling, not after
        _refuse_existing(path, args.force)
    model = _read_model(args.model, args.backend)
    flux, ivar, ids, notes = load_one_spectrum(args.spectrum, model, args.continuum)
    if len(flux) != 1:
        raise ValueError(f"{args.spectrum} holds {len(flux)} spectra; mcmc takes one")
    for n in notes:
        print(n)
    if _too_few_pixels(args, model, flux[0], ivar[0], ids[0], notes):
        return EXIT_TOO_FEW_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingRangeWarning)  # printed below instead
        res = sample_posterior(model, flux[0], ivar[0], prior=parse_prior_args(args.prior),
                               n_walkers=args.walkers, n_steps=args.max_steps, seed=args.seed,
                               progress_bar=not args.quiet and None)
    cv = _parse_cv(args.cv_scatter)
    if args.output:
        from .._util import atomic_path
        with atomic_path(args.output) as tmp:
            with open(tmp, "w") as fh:
                json.dump(dict(res.to_dict(), spectrum=args.spectrum, star=ids[0],
                               model=args.model, notes=notes), fh, indent=1, default=float)
    if not res.converged:
        walls = [w for w in res.warnings if "piled against the prior's edge" in w]
        if walls:
            print(f"cannon-fast mcmc: no posterior is reported: {walls[0].split(' (')[0]}; the "
                  "data want a label the prior (or the model's label bounds) excludes, so the "
                  "chain measures the prior, not the star. A longer chain will not help.",
                  file=sys.stderr)
        else:
            print(f"cannon-fast mcmc: the chain did NOT converge after {res.n_steps} steps "
                  f"(max autocorrelation time {np.nanmax(res.autocorr_time):.1f}; need "
                  f"{res.tau_factor:g} tau): no posterior is reported. Increase --max-steps.",
                  file=sys.stderr)
        for w in res.warnings:
            print("WARNING: " + w, file=sys.stderr)
        return EXIT_NOT_CONVERGED
    print(f"posterior of {ids[0]} ({args.spectrum})")
    print(res.summary(cv_scatter=cv))
    for w in res.warnings:
        if "training range" in w:
            print(f"cannon-fast mcmc: warning: {w}", file=sys.stderr)
    if args.samples:
        from .._util import atomic_path
        with atomic_path(args.samples) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, samples=res.samples, log_prob=res.log_prob,
                         label_names=np.array(res.label_names))
    if args.corner:
        res.corner(path=args.corner, title=f"posterior of {ids[0]}")
        print(f"corner plot: {args.corner}")
    return 0


def _too_few_pixels(args, model, flux, ivar, star, notes):
    """Say so (one line, and --out's JSON with the flag) when a spectrum cannot be sampled."""
    from ..lab.mcmc import usable_pixels

    n_use, n_need = usable_pixels(model, flux, ivar)
    if n_use >= n_need:
        return False
    cont = [n for n in notes if n.startswith("continuum flags")]
    print(f"cannon-fast mcmc: {args.spectrum} ({star}): TOO_FEW_PIXELS: {n_use} usable pixels "
          f"of {model.n_pixels}, at least {n_need} needed"
          + (f" ({cont[0]})" if cont else "") + "; no posterior", file=sys.stderr)
    if args.output:
        from .._util import atomic_path
        with atomic_path(args.output) as tmp:
            with open(tmp, "w") as fh:
                json.dump(dict(spectrum=args.spectrum, star=star, model=args.model,
                               flags=["TOO_FEW_PIXELS"], n_usable_pixels=n_use,
                               n_pixels_needed=n_need, converged=False, notes=notes),
                          fh, indent=1)
    return True


def _movie(args):
    from ..lab.plots.movies import movie_metallicity, movie_rgb

    model = _read_model(args.model, args.backend)
    os.makedirs(args.out, exist_ok=True)
    mp4 = False if args.no_mp4 else "auto"
    said = set()
    todo = ("metallicity", "rgb") if args.kind == "both" else (args.kind,)
    for kind in todo:
        out = os.path.join(args.out, f"spectrum_vs_{'feh' if kind == 'metallicity' else 'rgb'}.gif")
        _refuse_existing(out, args.force)
        if kind == "metallicity":
            res = movie_metallicity(model, out, teff=args.teff, logg=args.logg,
                                    n_frames=args.frames, fps=args.fps, mp4=mp4)
        else:
            res = movie_rgb(model, out, isochrone=args.isochrone, n_frames=args.frames,
                            fps=args.fps, mp4=mp4, age_gyr=args.age)
        print(f"{kind}: {res.gif}" + (f", {res.mp4}" if res.mp4 else "") +
              f" ({res.n_frames} frames)")
        for n in res.notes:
            if n not in said:
                print("  " + n)
                said.add(n)
    return 0


def _isochrones(args):
    import shutil

    from ..lab.isochrones import read_mist, select_isochrone
    from ..lab.mist_web import fetch_mist
    from .lab import parse_fehs

    fehs = parse_fehs(args.feh, "--feh")
    if args.out:
        targets = [os.path.join(args.out, f"MIST_{args.age:g}Gyr_feh{f:+.2f}.iso") for f in fehs]
        for t in targets:
            _refuse_existing(t, args.force)
    for k, feh in enumerate(fehs):
        path = fetch_mist(args.age, feh, refresh=args.refresh)
        iso = select_isochrone(read_mist(path), age_gyr=args.age, feh=feh)
        teff = iso.teff_at([3.0, 2.0, 1.0])
        print(f"{iso.label}: {path}\n  RGB Teff at log g 3, 2, 1: "
              + ", ".join(f"{t:.0f}" for t in teff) + " K")
        if args.out:
            from .._util import atomic_path
            with atomic_path(targets[k]) as tmp:
                shutil.copyfile(path, tmp)
            print(f"  copied to {targets[k]}")
    return 0


def _binaries(args):
    from ..lab.binaries import binary_bias_study, fit_binaries

    if not args.spectra and not args.study:
        raise ValueError("give spectra to fit and/or --study")
    model = _read_model(args.model, args.backend)
    out = args.out
    if out:
        os.makedirs(out, exist_ok=True)
    if args.spectra:
        fl, iv, ids = [], [], []
        for path in args.spectra:
            f, v, i, notes = load_one_spectrum(path, model, args.continuum)
            fl.append(f)
            iv.append(v)
            ids += i
        res = fit_binaries(model, np.concatenate(fl), np.concatenate(iv),
                           light_ratio=args.light_ratio, bic_threshold=args.bic_threshold,
                           progress_bar=not args.quiet and None)
        t = res.to_table(ids=ids)
        for c in t.colnames:
            if t[c].dtype.kind == "f":
                t[c].format = ".4g"
        t[["ID", "CHI2_SINGLE", "CHI2_BINARY", "DELTA_CHI2", "DELTA_BIC", "LIGHT_RATIO", "DV",
           "IS_BINARY"]].pprint_all()
        print(f"{int(res.is_binary.sum())} of {len(res)} flagged as likely binaries "
              f"(BIC_single - BIC_binary > {args.bic_threshold:g}; "
              f"{res.n_params_binary} vs {res.n_params_single} parameters)")
        if out:
            path = os.path.join(out, "binary_fits.fits")
            _refuse_existing(path, args.force)
            t.write(path, overwrite=True)
            print(f"table: {path}")
    if args.study:
        from ..lab.plots.science import binary_bias_figure
        st = binary_bias_study(model, n_stars=args.n_stars, velocity=args.velocity, snr=args.snr,
                               seed=args.seed, source=args.source, detect=args.detect,
                               progress_bar=not args.quiet and None)
        t = st.to_table()
        for c in t.colnames:
            if t[c].dtype.kind == "f":
                t[c].format = ".4g"
        t.pprint_all()
        if out:
            fig_path = os.path.join(out, "binary_bias.png")
            tab_path = os.path.join(out, "binary_bias.fits")
            for p in (fig_path, tab_path):
                _refuse_existing(p, args.force)
            binary_bias_figure(st, fig_path)
            t.write(tab_path, overwrite=True)
            print(f"figure: {fig_path}\ntable: {tab_path}")
    return 0
