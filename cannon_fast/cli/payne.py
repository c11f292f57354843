"""``information``, ``payne-train``, ``payne-calibrate``, ``gradient-template``, ``dd-payne-train``.

The Payne family's subcommands.

Fitting with an emulator file goes through ``cannon-fast fit --model EMULATOR.npz``.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["register", "read_forward_model"]


def register(subparsers, parent):
    """Add the Payne family's subcommands (see the module)."""
    p = subparsers.add_parser(
        "information", parents=[parent],
        help="Cramér–Rao bound of each label of a model at a star and S/N",
        description="The best precision any unbiased fit can reach with a model (a Cannon "
                    "model file or a Payne emulator .npz) for one star at the given continuum "
                    "S/N per pixel, and which pixels carry each label (figure with --out).")
    p.add_argument("--model", required=True, help="Cannon model file or Payne emulator .npz")
    p.add_argument("--star", nargs="+", type=float, required=True, metavar="VALUE",
                   help="the star's labels, in the model's label order")
    p.add_argument("--snr", nargs="+", type=float, default=[50.0, 100.0],
                   help="continuum S/N per pixel (default: 50 100)")
    p.add_argument("--ideal", action="store_true",
                   help="leave out the model's own variance s2 (a perfect model's bound)")
    p.add_argument("--out", default=None,
                   help="figure of each pixel's share of each label's variance, at the first S/N")
    p.add_argument("--force", action="store_true", help="overwrite an existing figure")
    p.set_defaults(func=_information)

    t = subparsers.add_parser(
        "gradient-template", parents=[parent],
        help="gradient spectra of a model at a label design (for dd-payne-train)",
        description="Differentiate a forward model file (e.g. The Payne trained on ab initio "
                    "spectra, or a Cannon model) at a Sobol design of label sets in a box: the "
                    "gradient template the Data-Driven Payne's prior ties its gradients to.")
    t.add_argument("--model", required=True, help="Payne emulator .npz or Cannon model file")
    t.add_argument("--out", required=True, help="template .npz to write")
    t.add_argument("--n", type=int, default=512, help="label sets (default: 512)")
    t.add_argument("--box", nargs="+", default=None, metavar="NAME=LO:HI",
                   help="the design's range of some labels (default: the model's box)")
    t.add_argument("--force", action="store_true", help="overwrite an existing template")
    t.set_defaults(func=_template)

    a = subparsers.add_parser(
        "payne-train", parents=[parent],
        help="train The Payne on ab initio model spectra, taken to an instrument",
        description="Train The Payne's MLP (Ting et al. 2019) on a set of model spectra: an "
                    ".npz with wavelength (W,), flux (N, W, continuum-normalized), labels "
                    "(N, L) and label_names (L,). The spectra are convolved with a Gaussian "
                    "LSF of the instrument's resolving power and resampled onto its pixels; a "
                    "seeded fraction is held out to measure the emulation error. Fit with "
                    "the result through `cannon-fast fit --model OUT`.")
    a.add_argument("input", help="model spectra .npz (wavelength, flux, labels, label_names)")
    a.add_argument("--grid", default="aspcap",
                   help="the instrument's pixels: aspcap (APOGEE's 7514 on-chip pixels, "
                        "the default), apstar (8575, gaps included), or a file of spectra "
                        "(.npz/FITS with wavelengths) on them")
    a.add_argument("--resolution", type=float, default=None,
                   help="resolving power of the LSF (default: the grid's; APOGEE 22,500)")
    a.add_argument("--air", action="store_true",
                   help="the model wavelengths are in air (converted to vacuum, APOGEE's)")
    a.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of the spectra held out for the emulation error (0.1)")
    a.add_argument("--hidden", nargs="+", type=int, default=[300, 300])
    a.add_argument("--epochs", type=int, default=300)
    a.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam)")
    a.add_argument("--out", required=True, help="emulator .npz to write")
    a.add_argument("--force", action="store_true", help="overwrite an existing emulator")
    a.set_defaults(func=_payne_train)

    c = subparsers.add_parser(
        "payne-calibrate", parents=[parent],
        help="teach a Payne emulator its misfit to real spectra from stars of known labels",
        description="An emulator of model spectra fits observed stars with a reduced chi² of "
                    "many and formal errors of a few K. On reference stars of known labels "
                    "(normalized as the stars it will fit) this learns its per-pixel model "
                    "variance s², POOR_FIT's reduced-chi² limit, a linear recalibration of "
                    "its labels and calibrated errors (<LABEL>_ERR with _ERR_FORMAL and "
                    "_ERR_MODEL), and writes the emulator with them; `cannon-fast fit --model "
                    "OUT` then applies them.")
    from .core import add_continuum_options, add_model_and_inputs

    add_model_and_inputs(c, "REFERENCE", "prepared spectra with labels (a SpectraStore or an "
                                         ".npz with flux, ivar, labels, label_names), or "
                                         "apStar files, text files listing them, directories "
                                         "of them (with --labels-from)")
    c.add_argument("--labels-from", default=None, metavar="TABLE",
                   help="FITS table of the reference labels for apStar inputs: APOGEE_ID and "
                        "a column per label of the emulator (an allStar, a mock's truth.fits); "
                        "<LABEL>_ERR columns are used as their errors when present")
    add_continuum_options(c)
    c.add_argument("--no-s2", action="store_true",
                   help="leave the model variance s² as it is (fits keep the full weight of "
                        "the lines the model misses; POOR_FIT's limit is then wide)")
    c.add_argument("--no-recalibration", action="store_true",
                   help="no linear recalibration of the labels")
    c.add_argument("--out", required=True, help="calibrated emulator .npz to write")
    c.add_argument("--force", action="store_true", help="overwrite an existing emulator")
    c.set_defaults(func=_payne_calibrate)

    d = subparsers.add_parser(
        "dd-payne-train", parents=[parent],
        help="train the Data-Driven Payne (gradient prior from a template)",
        description="Train The Payne's MLP on labelled normalized spectra (an .npz with flux, "
                    "ivar, labels, label_names, or a SpectraStore) with its gradient spectra "
                    "tied to a gradient template's (Xiang et al. 2019). Fit with it through "
                    "`cannon-fast fit --model OUT`.")
    d.add_argument("input", help=".npz or SpectraStore directory of normalized spectra")
    d.add_argument("--template", required=True, help="gradient template .npz "
                                                     "(cannon-fast gradient-template)")
    d.add_argument("--out", required=True, help="network .npz to write")
    d.add_argument("--labels", nargs="+", default=None, help="train on these labels only")
    d.add_argument("--strength", type=float, default=100.0,
                   help="weight of the gradient prior (0: none; default 100; lower it for a "
                        "template less like the data)")
    d.add_argument("--hidden", nargs="+", type=int, default=[300, 300])
    d.add_argument("--epochs", type=int, default=100)
    d.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one cycle)")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda")
    d.add_argument("--force", action="store_true", help="overwrite an existing network")
    d.set_defaults(func=_dd_train)


def read_forward_model(path, backend="auto"):
    """A Payne emulator (.npz, needs torch installed) or a Cannon model file."""
    from .core import is_emulator_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    if is_emulator_file(path):
        from ..nn.emulator import PayneEmulator

        return PayneEmulator.read(path)
    from ..core.model import CannonModel

    return CannonModel.read(path, backend=backend)


def _refuse(path, force):
    if path and os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")


def _information(args):
    from ..core.information import information_content

    _refuse(args.out, args.force)
    model = read_forward_model(args.model, backend=args.backend)
    names = list(model.label_names)
    if len(args.star) != len(names):
        raise ValueError(f"--star has {len(args.star)} values; {args.model} has the labels "
                         f"{', '.join(names)}")
    s2 = 0.0 if args.ideal else None
    infos = [information_content(model, args.star, snr=s, s2=s2) for s in args.snr]
    print(f"Cramér–Rao bounds at {', '.join(f'{n}={v:g}' for n, v in zip(names, args.star))}"
          f" ({'perfect model' if args.ideal else 'with the model variance s2'}):")
    print("S/N  " + "  ".join(f"{n:>10s}" for n in names))
    for s, info in zip(args.snr, infos):
        print(f"{s:<5g}" + "  ".join(f"{v:10.4g}" for v in info.crb))
    if args.out:
        from ..lab.plots.information import pixel_share_figure

        grid = getattr(model, "grid", None)
        wave = grid.wavelength if grid is not None else np.arange(infos[0].share.shape[0])
        pixel_share_figure(wave, infos[0], path=args.out, flux=model.predict(
            np.asarray(args.star, float)[None])[0],
            title=f"{os.path.basename(args.model)}, S/N {args.snr[0]:g}: each pixel's share "
                  "of each label's variance")
        print(f"figure: {args.out}")
    return 0


def _instrument_grid(spec, resolution):
    """``--grid``: a built-in APOGEE grid by name, else the grid of a file of spectra."""
    from ..core.grid import PixelGrid

    named = {"apstar": PixelGrid.apstar, "aspcap": PixelGrid.aspcap}
    if spec.lower() in named:
        return named[spec.lower()]()
    if not os.path.exists(spec):
        raise FileNotFoundError(f"--grid {spec}: not apstar, aspcap or an existing file of "
                                "spectra")
    from ..instruments import read_spectra

    return read_spectra(spec, resolution=resolution).grid


def _read_model_spectra(path):
    """The arrays of a model-spectra .npz, checked, with the names of what is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: model spectra file not found")
    need = ("wavelength", "flux", "labels", "label_names")
    with np.load(path, allow_pickle=False) as d:
        missing = [k for k in need if k not in d.files]
        if missing:
            raise ValueError(f"{path}: model spectra need {', '.join(need)}; missing "
                             f"{', '.join(missing)} (it has {', '.join(d.files)})")
        wave, flux = np.asarray(d["wavelength"], float), np.asarray(d["flux"], float)
        labels = np.atleast_2d(np.asarray(d["labels"], float))
        names = [str(n) for n in np.atleast_1d(d["label_names"])]
    if flux.ndim != 2 or flux.shape[1] != wave.size or labels.shape != (flux.shape[0],
                                                                         len(names)):
        raise ValueError(f"{path}: flux {flux.shape}, wavelength {wave.shape}, labels "
                         f"{labels.shape} and {len(names)} label names do not agree "
                         "(expected (N, W), (W,), (N, L), L)")
    return wave, flux, labels, names


def _payne_train(args):
    from ..nn.ab_initio import degrade_spectra, train_on_spectra

    _refuse(args.out, args.force)
    wave, flux, labels, names = _read_model_spectra(args.input)
    if args.air:
        from ..apogee.lines import air_to_vacuum

        wave = air_to_vacuum(wave)
    grid = _instrument_grid(args.grid, args.resolution)
    try:
        degraded = degrade_spectra(wave, flux, grid, resolution=args.resolution)
    except ValueError as err:
        raise ValueError(f"{args.input}: {err}") from None
    emu, errors = train_on_spectra(degraded, labels, names, grid, holdout=args.holdout,
                                   seed=args.seed, hidden=tuple(args.hidden),
                                   epochs=args.epochs, learning_rate=args.lr,
                                   progress=not args.quiet or None)
    emu.write(args.out)
    print(f"The Payne: {len(names)} labels ({', '.join(names)}) -> {emu.n_pixels} pixels of "
          f"{grid!r}, trained on {flux.shape[0] - (0 if errors is None else errors['n'])} "
          "model spectra")
    if errors is not None:
        print(f"held-out emulation error ({errors['n']} spectra): median {errors['median']:.2e},"
              f" mean {errors['mae']:.2e}, 99th percentile {errors['p99']:.2e}")
    print(f"wrote {args.out}")
    return 0


def _parse_box(items, names, default):
    box = np.array(default, dtype=float)
    for item in items or ():
        name, eq, rng = item.partition("=")
        lo, colon, hi = rng.partition(":")
        if not eq or not colon or name not in names:
            raise ValueError(f"--box {item!r}: expected NAME=LO:HI with NAME one of "
                             f"{', '.join(names)}")
        box[names.index(name)] = float(lo), float(hi)
    return box


def _template(args):
    from ..nn.ab_initio import label_design
    from ..nn.dd_payne import GradientTemplate

    _refuse(args.out, args.force)
    model = read_forward_model(args.model, backend=args.backend)
    names = list(model.label_names)
    default = (np.column_stack([model.x_min, model.x_max]) if hasattr(model, "x_min")
               else model.label_bounds)
    box = _parse_box(args.box, names, default)
    labels = label_design(box, args.n, seed=args.seed)
    tpl = GradientTemplate.from_model(model, labels, source=os.path.basename(args.model))
    tpl.write(args.out)
    print(f"gradient template: {tpl.n_points} label sets x {tpl.n_pixels} pixels x "
          f"{', '.join(names)}; wrote {args.out}")
    return 0


def _dd_train(args):
    from ..nn.dd_payne import GradientTemplate, train_dd_payne
    from .core import read_spectra_file

    _refuse(args.out, args.force)
    data = read_spectra_file(args.input, need_labels=True)
    flux, ivar, labels, names = (data["flux"], data["ivar"], data["labels"],
                                 list(data["label_names"] or []))
    if labels is None or not names:
        raise ValueError(f"{args.input} has no labels to train on")
    if args.labels:
        unknown = [n for n in args.labels if n not in names]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; {args.input} has {names}")
        labels = np.asarray(labels)[:, [names.index(n) for n in args.labels]]
        names = list(args.labels)
    template = GradientTemplate.read(args.template, grid=data["grid"])
    net = train_dd_payne(flux, ivar, labels, names, template, strength=args.strength,
                         grid=data["grid"],
                         hidden=tuple(args.hidden), epochs=args.epochs,
                         learning_rate=args.lr, seed=args.seed, device=args.device,
                         progress=not args.quiet or None)
    net.write(args.out)
    h = net.history
    print(f"Data-Driven Payne: {net.n_labels} labels -> {net.n_pixels} pixels, "
          f"{net.prior['n_train']} training spectra, validation chi2/pixel "
          f"{h['val_chi2'][h['best_epoch']]:.3g}, gradient mismatch to the template "
          + ", ".join(f"{n} {m:.2f}" for n, m in zip(names, net.gradient_mismatch(template)))
          + f"; wrote {args.out}")
    return 0


def _payne_calibrate(args):
    from ..nn.emulator import PayneEmulator
    from .core import model_and_inputs

    _refuse(args.out, args.force)
    model_path, inputs = model_and_inputs(args)
    emu = PayneEmulator.read(model_path)
    flux, ivar, labels, errors, what = _reference_stars(args, emu, inputs)
    names = list(emu.label_names)
    inside = ~emu.outside_training(labels)
    if (~inside).any():
        print(f"payne-calibrate: leaving out {int((~inside).sum())} reference star(s) whose "
              "labels are outside the emulator's training box")
    if inside.sum() < 50:
        raise ValueError(f"{what}: {int(inside.sum())} reference stars inside the emulator's "
                         "training box; need >= 50 to calibrate it")
    em = emu.calibrate(flux[inside], ivar[inside], labels[inside],
                       label_errors=None if errors is None else errors[inside],
                       n_rounds=0 if args.no_s2 else 2, linear=not args.no_recalibration)
    emu.write(args.out)
    cal = emu.train_info["calibration"]
    total = em.total(labels[inside], np.zeros_like(labels[inside]))
    print(f"calibrated {model_path} on {cal['n_used']} of {len(flux)} reference stars "
          f"({what}): median reduced chi² {cal['median_reduced_chi2_before']:.2f} -> "
          f"{cal['median_reduced_chi2_after']:.2f}, POOR_FIT above "
          f"{emu.train_info['poor_fit_reduced_chi2']:.2f}; model-error floor (median) "
          + ", ".join(f"{n} {v:.3g}" for n, v in zip(names, np.median(total, axis=0)))
          + f"; wrote {args.out}")
    return 0


def _reference_stars(args, emu, inputs):
    """flux, ivar, labels (in the emulator's order), errors or None, and a description."""
    from .core import _is_prepared, _read_for_fit, _refuse_raw_options, read_spectra_file

    names = list(emu.label_names)
    if _is_prepared(inputs):
        _refuse_raw_options(inputs, args)
        if args.labels_from:
            raise ValueError("--labels-from goes with apStar inputs; prepared spectra carry "
                             "their labels")
        data = read_spectra_file(inputs[0], need_labels=True)
        emu.check_grid(data["grid"], what=f"the spectra of {inputs[0]}")  # as fit does
        missing = [n for n in names if n not in (data["label_names"] or [])]
        if missing:
            raise ValueError(f"{inputs[0]} has no label(s) {missing} of the emulator "
                             f"(it has {data['label_names']})")
        cols = [data["label_names"].index(n) for n in names]
        labels = np.asarray(data["labels"], float)[:, cols]
        errors = (None if data["label_errors"] is None
                  else np.asarray(data["label_errors"], float)[:, cols])
        flux, ivar, what = np.asarray(data["flux"]), np.asarray(data["ivar"]), inputs[0]
    else:
        if not args.labels_from:
            raise ValueError("apStar reference stars need their labels: --labels-from TABLE "
                             "(APOGEE_ID and a column per label)")
        data = _read_for_fit(emu, inputs, args)
        labels, errors = _labels_by_id(args.labels_from, data["ids"], names)
        flux, ivar = data["flux"], data["ivar"]
        what = f"{len(flux)} apStar files, labels from {args.labels_from}"
    keep = np.all(np.isfinite(labels), axis=1)
    if not keep.all():
        print(f"payne-calibrate: leaving out {int((~keep).sum())} reference star(s) without "
              "all the labels")
    errors = None if errors is None else np.where(np.isfinite(errors), errors, 0.0)[keep]
    return flux[keep], ivar[keep], labels[keep], errors, what


def _labels_by_id(path, ids, names):
    """The ``names`` columns (and ``_ERR`` ones, or None) of a FITS table, by APOGEE_ID.

    Matched as every allStar reader here matches (``apogee.files.match_ids``: a repeated
    ID takes its highest-S/N row; rows that then disagree in the labels give no match).
    """
    from astropy.table import Table

    from ..apogee.files import AMBIGUOUS_MATCH, match_ids

    if not os.path.exists(path):
        raise FileNotFoundError(f"--labels-from {path}: no such file")
    table = Table.read(path)
    need = ["APOGEE_ID"] + names
    missing = [n for n in need if n not in table.colnames]
    if missing:
        raise ValueError(f"--labels-from {path} lacks the column(s) {missing}")
    ids = np.char.strip(np.asarray(ids).astype(str))
    rows = match_ids(table, ids, labels=names)
    if (rows < 0).all():
        raise ValueError(f"--labels-from {path}: none of the {len(ids)} stars is in it, e.g. "
                         f"{ids[0]}")
    for code, why in ((-1, "not in"), (AMBIGUOUS_MATCH, "with rows that disagree in")):
        if (rows == code).any():
            print(f"payne-calibrate: {int((rows == code).sum())} star(s) {why} {path}, e.g. "
                  f"{ids[np.argmax(rows == code)]}: left out")

    def column(name):
        col = np.asarray(table[name], float)[np.maximum(rows, 0)]
        return np.where(rows >= 0, col, np.nan)

    labels = np.column_stack([column(n) for n in names])
    has_err = all(n + "_ERR" in table.colnames for n in names)
    errors = np.column_stack([column(n + "_ERR") for n in names]) if has_err else None
    return labels, errors
