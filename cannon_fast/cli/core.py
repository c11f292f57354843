"""``cannon-fast train`` and ``cannon-fast fit``: the model on prepared spectra."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

DEFAULT_LABELS = "TEFF,LOGG,FE_H,MG_FE,SI_FE"


def register(sub, parent):
    """Add the ``train`` and ``fit`` subcommands."""
    p = sub.add_parser("train", parents=[parent], help="train a Cannon model on prepared spectra",
                       description="Train a polynomial Cannon model (with per-pixel s²) on "
                                   "normalized spectra with known labels.")
    p.add_argument("spectra", help="a SpectraStore directory (cannon-fast prepare) or an .npz "
                                   "with flux, ivar, labels, label_names (and wavelength, optional "
                                   "segments and resolution for a grid other than APOGEE's)")
    p.add_argument("--out", required=True, help="model file to write (.fits or .npz)")
    p.add_argument("--labels", default=None,
                   help=f"comma-separated label names (default: the store's, or {DEFAULT_LABELS})")
    p.add_argument("--order", type=int, default=2, help="polynomial order (default: 2)")
    p.add_argument("--extra-terms", default="", metavar="TERMS",
                   help="terms added to the polynomial, comma-separated, e.g. TEFF^3,TEFF^4")
    p.add_argument("--reciprocal", default="", metavar="LABELS",
                   help="labels the polynomial is built in the reciprocal of, comma-separated, "
                        "e.g. TEFF (a polynomial in theta = 5040/Teff)")
    p.add_argument("--rows", default=None, help="train on rows START:STOP of the input only")
    p.add_argument("--label-errors", action="store_true",
                   help="train with the labels' errors (errors-in-variables; the store's "
                        "<LABEL>_ERR from the allStar, or label_errors in an .npz)")
    p.add_argument("--no-calibrate-errors", action="store_true",
                   help="skip the error calibration: by default 5-fold cross-validation on "
                        "the training set learns a model-error term (against the training "
                        "labels and their errors) that fit and label add to the formal errors "
                        "(<LABEL>_ERR, with _ERR_FORMAL and _ERR_MODEL)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model file")
    p.set_defaults(func=_train)

    p = sub.add_parser("fit", parents=[parent], help="fit labels to spectra (stores, apStar files)",
                       description="Fit labels with a trained model (batched, de-biased by "
                                   "default) and write a FITS table of labels, errors, chi², "
                                   "flags. Prepared spectra (a SpectraStore, an .npz) are fitted "
                                   "as they are; apStar files are masked and continuum-"
                                   "normalized first with the model's recorded continuum, as "
                                   "`cannon-fast prepare --model` and `cannon-fast label` do. "
                                   "The model may be a Cannon or a Payne emulator (.npz).")
    add_model_and_inputs(p, "SPECTRA", "a SpectraStore directory or an .npz with flux, ivar; "
                                       "or apStar files, text files listing them, directories "
                                       "of them")
    p.add_argument("--out", required=True, help="output FITS table")
    add_continuum_options(p)
    p.add_argument("--rows", default=None, help="fit rows START:STOP of the input only")
    p.add_argument("--no-debias", action="store_true",
                   help="plain chi² fit (as other Cannon codes), errors (J^T W J)^-1")
    p.add_argument("--broadening", action="store_true",
                   help="also fit extra line broadening (a Gaussian velocity variance, "
                        "(km/s)², written as BROADENING); implies the plain chi² fit")
    p.add_argument("--refine-continuum", action="store_true",
                   help="fit, refine each spectrum's continuum against the model at its "
                        "labels (a cubic per chip/segment of the model's grid), and fit again")
    p.add_argument("--method", choices=("fast", "trf"), default="fast",
                   help="fast batched LM (default) or the scipy trf reference")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_fit)


def add_model_and_inputs(p, metavar, help_inputs):
    """``--model MODEL`` and the positional inputs (``MODEL INPUTS...`` still reads)."""
    p.add_argument("inputs", metavar=metavar, nargs="+",
                   help=help_inputs + " (the older form `MODEL " + metavar + "`, without "
                        "--model, still works)")
    p.add_argument("--model", default=None, help="model file (cannon-fast train)")


def add_continuum_options(p):
    """How raw spectra are masked and normalized (fit and label: one vocabulary)."""
    p.add_argument("--continuum", default=None, metavar="FILE",
                   help="continuum pixels for raw spectra (default: the model's record, or "
                        "pixels picked from the model)")
    p.add_argument("--degree", type=int, default=None,
                   help="continuum Chebyshev degree (default: the model's record, else 3)")
    p.add_argument("--bad-bits", default=None,
                   help="PIXMASK bits that mask a pixel, names or numbers, comma-separated "
                        "(default 0-7,12)")


def model_and_inputs(args):
    """(model path, inputs) of ``--model M INPUTS...`` or the older ``MODEL INPUTS...``."""
    if args.model is not None:
        return args.model, list(args.inputs)
    if len(args.inputs) < 2:
        raise ValueError(f"give the model with --model (got only {args.inputs[0]!r}: the "
                         "spectra, or the model without spectra?)")
    return args.inputs[0], list(args.inputs[1:])


def fit_options(args):
    """``model.fit`` options from the fit and label commands' flags."""
    return dict(debias=not (args.no_debias or args.broadening), broadening=args.broadening,
                refine_continuum=args.refine_continuum)


def _rows(text, n, path):
    """The slice of ``--rows START:STOP`` over ``n`` spectra; ValueError if it selects none."""
    if n == 0:
        raise ValueError(f"{path} holds no spectra")
    if text is None:
        return slice(0, n)
    start, colon, stop = text.partition(":")
    try:
        rows = slice(int(start) if start else 0, int(stop) if stop else n)
    except ValueError:
        colon = ""
    if not colon:
        raise ValueError(f"--rows {text}: expected START:STOP (integers, either may be left out)")
    if not len(range(n)[rows]):
        raise ValueError(f"--rows {text} selects no spectra ({path} holds {n}, rows 0:{n})")
    return rows


def read_spectra_file(path, need_labels=False):
    """Read flux, ivar, labels, label names and ids from a SpectraStore or an .npz.

    A store written by ``prepare`` also gives its ``continuum_pixels`` and
    ``continuum_degree`` (None otherwise). ``grid`` is the spectra's pixel grid
    when the input has wavelengths (an .npz's ``wavelength``, with optional
    ``segments`` (K, 2) and ``resolution``), else None.
    """
    if os.path.isdir(path):
        from ..store import SpectraStore
        store = SpectraStore(path)
        out = dict(flux=store.flux, ivar=store.ivar, labels=store.labels,
                   label_names=list(store.label_names), ids=store.ids,
                   label_errors=store.label_errors,
                   continuum_pixels=store.meta.get("continuum_pixels"),
                   continuum_degree=store.meta.get("continuum_degree"),
                   grid=_grid(store.wavelength, None, None, path))
    elif os.path.isfile(path) and path.lower().endswith((".fits", ".fit", ".fits.gz")):
        raise ValueError(f"{path} is a FITS file (an apStar spectrum?): train reads prepared "
                         "spectra with labels (a store from cannon-fast prepare, or an .npz); "
                         "fit and label read apStar files too")
    elif os.path.isfile(path):
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("flux", "ivar") if k not in f.files]
            if missing:
                raise ValueError(f"{path} lacks the array(s) {missing}")
            out = dict(flux=f["flux"], ivar=f["ivar"],
                       labels=f["labels"] if "labels" in f.files else None,
                       label_names=[str(x) for x in f["label_names"]]
                       if "label_names" in f.files else None,
                       ids=f["ids"] if "ids" in f.files else None,
                       label_errors=f["label_errors"] if "label_errors" in f.files else None,
                       continuum_pixels=None, continuum_degree=None,
                       grid=_grid(*(f[k] if k in f.files else None
                                    for k in ("wavelength", "segments", "resolution")), path))
    else:
        raise FileNotFoundError(f"no spectra at {path} (expected a SpectraStore directory or .npz)")
    if need_labels and out["labels"] is None:
        raise ValueError(f"{path} has no labels to train on")
    return out


def _grid(wavelength, segments, resolution, path):
    """The pixel grid of an input's wavelengths (None without them)."""
    if wavelength is None:
        return None
    from ..core.grid import PixelGrid
    try:
        return PixelGrid.from_wavelength(wavelength, segments=segments, resolution=resolution)
    except ValueError as err:
        raise ValueError(f"{path}: its wavelengths make no pixel grid: {err}") from None


def _train(args):
    from ..core.model import CannonModel
    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out} exists (use --force to overwrite)")
    data = read_spectra_file(args.spectra, need_labels=True)
    names = args.labels.split(",") if args.labels else (data["label_names"]
                                                        or DEFAULT_LABELS.split(","))
    columns = list(range(len(names)))
    if data["label_names"]:
        unknown = [n for n in names if n not in data["label_names"]]
        if unknown:
            raise ValueError(f"labels {unknown} are not in {args.spectra} "
                             f"(it has {data['label_names']})")
        columns = [data["label_names"].index(n) for n in names]
    rows = _rows(args.rows, len(data["flux"]), args.spectra)
    labels = np.asarray(data["labels"][rows])[:, columns]
    keep = np.all(np.isfinite(labels), axis=1)
    if not keep.all():
        print(f"dropping {int((~keep).sum())} star(s) with missing labels")
    errors = None
    if args.label_errors:
        if data["label_errors"] is None:
            raise ValueError(f"{args.spectra} has no label errors (--label-errors)")
        errors = np.asarray(data["label_errors"][rows], float)[:, columns][keep]
    t0 = time.perf_counter()
    model = CannonModel(names, order=args.order, backend=args.backend,
                        extra_terms=[t for t in args.extra_terms.split(",") if t.strip()],
                        reciprocal_labels=[n.strip() for n in args.reciprocal.split(",")
                                           if n.strip()], grid=data["grid"])
    flux, ivar = np.asarray(data["flux"][rows])[keep], np.asarray(data["ivar"][rows])[keep]
    model.train(flux, ivar, labels[keep], label_errors=errors)
    info = model.train_info
    calib_note = ""
    if not args.no_calibrate_errors:
        if len(flux) >= 50:
            model.calibrate_errors(flux, ivar, labels[keep], label_errors=errors)
            calib_note = "; errors calibrated by 5-fold cross-validation"
        else:
            calib_note = f"; errors not calibrated ({len(flux)} stars, need >= 50)"
    cont_note = ""
    if data["continuum_pixels"] is not None:  # later fits of raw spectra normalize the same way
        from ..core.continuum import DEFAULT_DEGREE, record_continuum
        from ..apogee.files import NPIX, to_apstar_grid
        mask = to_apstar_grid(np.asarray(data["continuum_pixels"], dtype=np.int64), grid=NPIX)
        record_continuum(model, mask, data["continuum_degree"] or DEFAULT_DEGREE)
        cont_note = f", the store's {len(data['continuum_pixels'])} continuum pixels recorded"
    model.write(args.out, overwrite=args.force)
    print(f"trained {model!r} in {time.perf_counter() - t0:.2f} s "
          f"({info['n_flagged_pixels']} flagged pixels{cont_note}{calib_note}); "
          f"wrote {args.out}")
    return 0


def _continuum_mismatch(model, data):
    """Why the spectra were normalized unlike the model's training set (None if alike).

    A store records the continuum pixels and degree it was normalized with, a model
    those of its training spectra; fitted with another pseudo-continuum, the lines
    sit at other depths and the labels move.
    """
    info = model.train_info or {}
    mine, theirs = info.get("continuum_pixels"), data.get("continuum_pixels")
    if mine is None or theirs is None or info.get("continuum_grid", "apStar") != "apStar":
        return None
    a, b = set(int(i) for i in mine), set(int(i) for i in theirs)
    deg_a, deg_b = info.get("continuum_degree"), data.get("continuum_degree")
    if a == b and (deg_a is None or deg_b is None or deg_a == deg_b):
        return None
    return (f"the spectra were normalized with {len(b)} continuum pixels (degree {deg_b}) but "
            f"the model was trained on spectra normalized with {len(a)} (degree {deg_a}), "
            f"{len(a & b)} in common: the labels will be biased; prepare the spectra with the "
            "model's continuum pixels")


def _is_prepared(inputs):
    """Whether the inputs are one SpectraStore or one .npz (else apStar files)."""
    return len(inputs) == 1 and (
        os.path.exists(os.path.join(inputs[0], "index.json"))
        or (inputs[0].lower().endswith(".npz") and not os.path.isdir(inputs[0])))


def _refuse_raw_options(inputs, args):
    """--continuum, --degree and --bad-bits normalize apStar files; prepared spectra are done."""
    if _is_prepared(inputs) and any(v is not None for v in (args.continuum, args.degree,
                                                            args.bad_bits)):
        raise ValueError(f"{inputs[0]} holds prepared spectra: --continuum, --degree and "
                         "--bad-bits apply to apStar files")


def _read_for_fit(model, inputs, args):
    """What ``fit`` fits: a store/npz as it is, apStar files masked and normalized."""
    if _is_prepared(inputs):
        return read_spectra_file(inputs[0])
    from ..survey import read_normalized

    r = read_normalized(model, inputs, continuum=args.continuum, degree=args.degree,
                        bad_bits=args.bad_bits,
                        log=None if args.quiet else lambda msg: print(msg, file=sys.stderr))
    bad = np.flatnonzero(r["reason"] != "")
    for i in bad[:20]:
        print(f"cannon-fast fit: skipped {r['ids'][i]}: {r['reason'][i]}", file=sys.stderr)
    if len(bad) > 20:
        print(f"cannon-fast fit: ... and {len(bad) - 20} more skipped", file=sys.stderr)
    if len(bad) == len(r["ids"]):
        raise ValueError(f"none of {r['describe']} could be read or normalized; the first: "
                         f"{r['reason'][bad[0]]}")
    keep = r["reason"] == ""
    return dict(flux=r["flux"][keep], ivar=r["ivar"][keep], ids=r["ids"][keep],
                continuum_pixels=None, continuum_degree=None)


def _fit(args):
    from ..core.fitting import fit_spectra
    from ..core.model import CannonModel
    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out} exists (use --force to overwrite)")
    model_path, inputs = model_and_inputs(args)
    if is_emulator_file(model_path):
        return _fit_emulator(args, model_path, inputs)
    model = CannonModel.read(model_path, backend=args.backend)
    _refuse_raw_options(inputs, args)
    data = _read_for_fit(model, inputs, args)
    label = inputs[0] if len(inputs) == 1 else f"{len(inputs)} inputs"
    rows = _rows(args.rows, len(data["flux"]), label)
    t0 = time.perf_counter()
    if (args.broadening or args.refine_continuum) and args.method == "trf":
        raise ValueError("--broadening and --refine-continuum go with the fast method, not "
                         "--method trf")
    kwargs = {} if args.method == "trf" else fit_options(args)
    mismatch = _continuum_mismatch(model, data)
    if mismatch:
        print(f"cannon-fast fit: WARNING: {mismatch}", file=sys.stderr)
    result = fit_spectra(model, np.asarray(data["flux"][rows]), np.asarray(data["ivar"][rows]),
                         method=args.method, **kwargs)
    if model.error_model is not None:  # the calibrated errors, as model.fit and label give
        result = model.error_model.apply(result)
    dt = time.perf_counter() - t0
    ids = None if data["ids"] is None else np.asarray(data["ids"][rows])
    table = result.to_table(ids=ids)
    table.meta["MODEL"] = os.path.basename(model_path)
    table.meta["MODELHSH"] = model.training_hash
    if mismatch:
        table.meta["CONTMISM"] = "continuum pixels/degree differ from the model's training set"
    from .._util import atomic_path
    with atomic_path(args.out) as tmp:
        table.write(tmp, format="fits")
    n = len(result)
    print(f"fitted {n} spectra in {dt:.2f} s ({n / max(dt, 1e-9):.0f} stars/s); "
          f"{int((~result.ok).sum())} flagged as unusable; wrote {args.out}")
    return 0


def is_emulator_file(path):
    """True for a Payne emulator .npz (of any kind), read without pickle."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            return "format" in data.files and str(data["format"]) == "cannon_fast.PayneEmulator"
    except (OSError, ValueError):
        return False


def _fit_emulator(args, model_path, inputs):
    """``fit --model EMULATOR.npz``: a Payne or Data-Driven Payne on prepared or apStar spectra."""
    from ..nn.emulator import PayneEmulator
    cannon_only = [flag for flag, on in (("--no-debias", args.no_debias),
                                         ("--broadening", args.broadening),
                                         ("--refine-continuum", args.refine_continuum))
                   if on]
    if cannon_only:
        raise ValueError(f"{', '.join(cannon_only)} apply to Cannon models; {model_path} is a "
                         "Payne emulator")
    _refuse_raw_options(inputs, args)
    if _is_prepared(inputs):
        data = read_spectra_file(inputs[0])
        model = PayneEmulator.read(model_path, grid=data["grid"])
    else:  # apStar files: masked and normalized for the emulator's grid, as for a Cannon
        model = PayneEmulator.read(model_path)
        data = _read_for_fit(model, inputs, args)
    flux, ivar, ids = data["flux"], data["ivar"], data["ids"]
    label = inputs[0] if len(inputs) == 1 else f"{len(inputs)} inputs"
    rows = _rows(args.rows, len(flux), label)
    t0 = time.perf_counter()
    result = model.fit(np.asarray(flux[rows]), np.asarray(ivar[rows]),
                       method="fast" if args.method == "fast" else "generic",
                       progress_bar=not args.quiet or None)
    dt = time.perf_counter() - t0
    if not model.calibrated:
        print(f"cannon-fast fit: WARNING: {model_path} knows nothing of its misfit to real "
              "spectra: its errors are the formal ones times sqrt(reduced chi²) and nothing is "
              "POOR_FIT; calibrate it on stars of known labels (cannon-fast payne-calibrate)",
              file=sys.stderr)
    table = result.to_table(ids=None if ids is None else np.asarray(ids)[rows])
    table.meta["MODEL"] = os.path.basename(model_path)
    from .._util import atomic_path
    with atomic_path(args.out) as tmp:
        table.write(tmp, format="fits")
    n = len(result)
    print(f"fitted {n} spectra with the emulator in {dt:.2f} s ({n / max(dt, 1e-9):.0f} "
          f"stars/s); {int((~result.ok).sum())} flagged as unusable; wrote {args.out}")
    return 0
