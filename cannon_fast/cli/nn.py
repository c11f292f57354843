"""``nn-train`` and ``nn-predict``: the neural networks from the command line (needs torch)."""
from __future__ import annotations

import os

import numpy as np

__all__ = ["register"]


def register(subparsers, parent):
    """Add ``nn-train`` and ``nn-predict`` to ``subparsers``."""
    p = subparsers.add_parser(
        "nn-train", parents=[parent], help="train the NN regressor or the Payne emulator",
        description="Train a spectrum->labels network (StarNet-style CNN or MLP, with "
                    "MC-dropout uncertainties) or, with --kind emulator, The Payne's "
                    "labels->spectrum MLP. Input: an .npz with flux, ivar, labels, "
                    "label_names, or a SpectraStore directory.")
    p.add_argument("input", help=".npz file or SpectraStore directory of normalized spectra")
    p.add_argument("--out", "-o", "--output", dest="output", required=True,
                   help="checkpoint to write (.pt; an .npz for --kind emulator)")
    p.add_argument("--kind", choices=("regressor", "emulator"), default="regressor")
    p.add_argument("--labels", nargs="+", help="train on these labels only (default: all)")
    p.add_argument("--arch", choices=("cnn", "mlp"), default="cnn")
    p.add_argument("--filters", nargs="+", type=int, default=[4, 16])
    p.add_argument("--kernel-size", nargs="+", type=int, default=[8])
    p.add_argument("--stride", nargs="+", type=int, default=[1])
    p.add_argument("--pool-size", nargs="+", type=int, default=[1, 4])
    p.add_argument("--hidden", nargs="+", type=int, default=None,
                   help="dense widths (default: 256 128; emulator: 300 300)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate")
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience (epochs)")
    p.add_argument("--split", nargs=3, type=float, default=[5, 1, 2], metavar=("TRAIN", "VAL",
                                                                                 "TEST"))
    p.add_argument("--loss-plot", default=None,
                   help="loss figure (default: the output name with .png)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="arithmetic of the regressor's layers: bfloat16 is faster on CPUs with "
                   "AVX-512 BF16 / AMX, slower elsewhere")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing checkpoint and loss plot")
    p.set_defaults(func=_train)

    q = subparsers.add_parser(
        "nn-predict", parents=[parent], help="predict labels with a trained NN regressor",
        description="Predict labels, MC-dropout + predicted errors and flags; writes a FITS "
                    "table.")
    q.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".npz file (flux, ivar) or SpectraStore directory of normalized "
                        "spectra; with --visits: apStar files or directories of them (the "
                        "older form `CHECKPOINT INPUT`, without --model, still works)")
    q.add_argument("--model", default=None, metavar="CHECKPOINT",
                   help="checkpoint written by nn-train")
    q.add_argument("--out", "-o", "--output", dest="output", required=True,
                   help="FITS table to write")
    q.add_argument("--visits", action="store_true",
                   help="apStar inputs: also predict every visit spectrum (VISIT 1..n; VISIT 0 "
                        "is the combined spectrum), and compare the visits' scatter with "
                        "their errors")
    q.add_argument("--continuum", default=None,
                   help="continuum pixels for the apStar spectra of --visits (the ones the "
                        "training spectra were normalized with)")
    q.add_argument("--astra", action="store_true",
                   help="astraAllStarAstroNN / astraAllVisitAstroNN-like columns: teff, e_teff, "
                        "..., result_flags, flag_warn, flag_bad")
    q.add_argument("--n-samples", type=int, default=30, help="MC-dropout samples")
    q.add_argument("--max-bad-fraction", type=float, default=0.3)
    q.add_argument("--device", default="auto")
    q.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="arithmetic of the layers at prediction")
    q.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                   help="overwrite an existing output table")
    q.set_defaults(func=_predict)
    _register_distance(subparsers, parent)


def _register_distance(subparsers, parent):
    """``nn-dist-train`` and ``nn-dist-predict``: AstroNNDist-like distances."""
    p = subparsers.add_parser(
        "nn-dist-train", parents=[parent],
        help="train a spectrum -> Ks luminosity (distance) network on Gaia parallaxes",
        description="Train an AstroNNDist-like network: normalized spectrum -> fakemag = "
                    "parallax * 10^(0.2 (Ks - A_K)), with the loss in parallax space (negative "
                    "parallaxes kept), on the stars that pass the training cuts (each cut's "
                    "count is printed). Needs the allStar's GAIAEDR3_PARALLAX(_ERROR), K and "
                    "the extinction column; GAIAEDR3_RUWE and VSCATTER are cut on when present.")
    p.add_argument("input", help=".npz file (flux, ivar, ids) or SpectraStore directory")
    p.add_argument("--allstar", required=True, help="allStar catalogue (photometry, parallaxes)")
    p.add_argument("--out", "-o", dest="output", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--ak-column", default="AK_TARG", help="extinction column (default AK_TARG)")
    p.add_argument("--snr-min", type=float, default=200.0,
                   help="training S/N cut (default 200, Astra's)")
    p.add_argument("--ruwe-max", type=float, default=1.4)
    p.add_argument("--parallax-error-max", type=float, default=0.1, help="mas")
    p.add_argument("--arch", choices=("cnn", "mlp"), default="cnn")
    p.add_argument("--hidden", nargs="+", type=int, default=[256, 128], help="dense widths")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.set_defaults(func=_dist_train)

    q = subparsers.add_parser(
        "nn-dist-predict", parents=[parent],
        help="distances, parallaxes and absolute Ks from a trained distance network",
        description="Predict fakemag, absolute Ks, distance and parallax with errors, and "
                    "AstroNNDist's result_flags (FAKEMAG_UNRELIABLE, MISSING_PHOTOMETRY, "
                    "MISSING_EXTINCTION, NO_RESULT), flag_warn and flag_bad; writes a FITS table.")
    q.add_argument("checkpoint", help="checkpoint written by nn-dist-train")
    q.add_argument("input", help=".npz file (flux, ivar, ids) or SpectraStore directory")
    q.add_argument("--allstar", required=True, help="allStar catalogue (K, extinction)")
    q.add_argument("--out", "-o", dest="output", required=True, help="FITS table to write")
    q.add_argument("--ak-column", default="AK_TARG")
    q.add_argument("--n-samples", type=int, default=30, help="MC-dropout samples")
    q.add_argument("--device", default="auto")
    q.add_argument("--force", action="store_true", help="overwrite an existing table")
    q.set_defaults(func=_dist_predict)


def _read_input(path, need_labels):
    """flux, ivar, labels (or None), label_names, ids from an .npz or a SpectraStore."""
    if os.path.isdir(path):
        try:
            from ..store import SpectraStore
        except ImportError:  # pragma: no cover - the data layer is optional here
            raise ValueError(f"{path} is a directory but cannon_fast.store is unavailable")
        s = SpectraStore(path)
        labels = np.array(s.labels) if s.label_names else None
        return (np.array(s.flux), np.array(s.ivar), labels, list(s.label_names),
                np.array(s.ids))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with np.load(path, allow_pickle=False) as d:
        missing = [k for k in ("flux", "ivar") if k not in d.files]
        if need_labels:
            missing += [k for k in ("labels", "label_names") if k not in d.files]
        if missing:
            raise ValueError(f"{path} lacks {missing} (has {d.files})")
        labels = d["labels"] if "labels" in d.files else None
        names = [str(s) for s in d["label_names"]] if "label_names" in d.files else []
        ids = d["ids"] if "ids" in d.files else np.arange(len(d["flux"])).astype(str)
        return d["flux"], d["ivar"], labels, names, ids


def _refuse_existing(paths, force):
    """Refuse, before any work, to overwrite an existing output unless ``force``."""
    for path in paths:
        if path and os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")


def _train(args):
    from .. import nn

    plot = args.loss_plot or os.path.splitext(args.output)[0] + "_loss.png"
    _refuse_existing((args.output, plot), args.force)
    flux, ivar, labels, names, _ = _read_input(args.input, need_labels=True)
    if labels is None or not names:
        raise ValueError(f"{args.input} has no labels to train on")
    if args.labels:
        unknown = [n for n in args.labels if n not in names]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; the input has {names}")
        labels = np.asarray(labels)[:, [names.index(n) for n in args.labels]]
        names = list(args.labels)
    show = not args.quiet
    if args.kind == "emulator":
        emu = nn.train_emulator(flux, ivar, labels, names,
                                hidden=args.hidden or (300, 300), epochs=args.epochs,
                                batch_size=args.batch_size, learning_rate=args.lr,
                                patience=args.patience, seed=args.seed, device=args.device,
                                progress=show or None)
        emu.write(args.output)
        history = emu.history
        print(f"emulator: {emu.n_labels} labels -> {emu.n_pixels} pixels, "
              f"{history['n_epochs']} epochs, validation chi2/pixel "
              f"{min(history['val_loss']):.3g}; wrote {args.output}")
    else:
        reg = nn.SpectrumRegressor(names, args.arch, filters=args.filters,
                                   kernel_size=_one_or_all(args.kernel_size),
                                   stride=_one_or_all(args.stride),
                                   pool_size=_one_or_all(args.pool_size),
                                   hidden=args.hidden or (256, 128), dropout=args.dropout,
                                   device=args.device, seed=args.seed,
                                   precision=args.precision)
        reg.train(flux, labels, ivar, split=tuple(args.split), epochs=args.epochs,
                  batch_size=args.batch_size, learning_rate=args.lr, patience=args.patience,
                  progress=show or None)
        reg.save(args.output)
        history = reg.history
        print(f"regressor ({args.arch}, {reg.n_parameters} weights): {history['n_epochs']} "
              f"epochs, best validation loss {min(history['val_loss']):.3f} at epoch "
              f"{history['best_epoch'] + 1}; wrote {args.output}")
    from ..nn.evaluate import plot_loss

    plot_loss(history, plot)
    print(f"loss plot: {plot}")
    return 0


def _one_or_all(values):
    return values[0] if len(values) == 1 else values


def _read_visits(inputs, continuum):
    """Combined and visit spectra of apStar files, normalized: (flux, ivar, ids, columns)."""
    from ..core.continuum import load_continuum_pixels, normalize
    from ..survey.inputs import open_inputs

    if continuum is None:
        raise ValueError("--visits reads raw apStar spectra: give --continuum, the continuum "
                         "pixels the training spectra were normalized with")
    src = open_inputs(inputs, visits=True)
    rows = src.chunk(0, src.n_items).read()
    ns = normalize(rows["flux"], rows["ivar"], load_continuum_pixels(continuum))
    bad = [f"{r}" for r in rows["reason"] if r]
    for why in bad:
        print(f"skipped: {why}")
    cols = {"VISIT": rows["visit"]}
    cols.update(rows["extra"])
    return ns.flux, ns.ivar, rows["ids"], cols


def visit_scatter(labels, errors, ids, visit):
    """The visits' chi^2 about each star's weighted mean over its dof, pooled over stars.

    Close to 1 when the visit labels scatter as their errors say; below 1 when the
    errors are larger than the scatter (e.g. a model error shared by every visit).

    Parameters
    ----------
    labels, errors : ndarray, (N, L)
    ids, visit : ndarray, (N,)
        Star of each row, and its visit number (0, the combined spectrum, is left out).

    Returns
    -------
    ratio : ndarray, (L,)
    n_stars : int
        Stars with at least two usable visits.
    """
    chi, dof = [], 0
    for sid in np.unique(ids):
        k = (ids == sid) & (visit > 0) & np.all(np.isfinite(labels), axis=1)
        if k.sum() < 2:
            continue
        w = 1.0 / errors[k] ** 2
        mean = (w * labels[k]).sum(0) / w.sum(0)
        chi.append(((labels[k] - mean) ** 2 * w).sum(0))
        dof += int(k.sum()) - 1
    if not chi:
        return np.full(labels.shape[1], np.nan), 0
    return np.sum(chi, axis=0) / dof, len(chi)


def _predict(args):
    from ..nn import SpectrumRegressor

    _refuse_existing((args.output,), args.overwrite)
    from .core import model_and_inputs
    checkpoint, inputs = model_and_inputs(args)
    reg = SpectrumRegressor.load(checkpoint, device=args.device, precision=args.precision)
    extra = {}
    if args.visits:
        flux, ivar, ids, extra = _read_visits(inputs, args.continuum)
    elif len(inputs) != 1:
        raise ValueError(f"nn-predict reads one input (.npz or SpectraStore; several inputs "
                         f"need --visits), got {inputs}")
    else:
        flux, ivar, _, _, ids = _read_input(inputs[0], need_labels=False)
    res = reg.predict(flux, ivar, n_samples=args.n_samples, seed=args.seed,
                      max_bad_fraction=args.max_bad_fraction)
    table = res.to_astra_table() if args.astra else res.to_table()
    table.add_column(np.asarray(ids).astype(str), name="apogee_id" if args.astra else "ID",
                     index=0)
    for k, (name, col) in enumerate(extra.items()):
        table.add_column(col, name=name.lower() if args.astra else name, index=1 + k)
    if args.visits:
        ratio, n_multi = visit_scatter(res.labels, res.errors, np.asarray(ids), extra["VISIT"])
        print(f"visit scatter over the errors (chi2/dof, {n_multi} stars with >= 2 "
              "visits): " + ", ".join(f"{n} {r:.2f}" for n, r in zip(reg.label_names, ratio)))
    from .._util import atomic_path

    with atomic_path(args.output) as tmp:
        table.write(tmp, format="fits")
    print(f"{len(table)} spectra: {int(res.warn.sum())} with warnings, {int(res.bad.sum())} "
          f"bad; wrote {args.output}")
    return 0


def _column(rows, name):
    return np.asarray(rows[name], float) if name in rows.colnames else None


def _dist_train(args):
    from ..apogee.catalog import distance_training_cuts, read_distance_catalog, select
    from ..nn.distance import DistanceNetwork

    _refuse_existing((args.output,), args.force)
    flux, ivar, _, _, ids = _read_input(args.input, need_labels=False)
    rows, found = read_distance_catalog(args.allstar, ids, ak_column=args.ak_column)
    cuts = distance_training_cuts(rows.colnames, snr_min=args.snr_min, ruwe_max=args.ruwe_max,
                                  parallax_error_max=args.parallax_error_max,
                                  ak_column=args.ak_column)
    keep, report = select(rows, cuts=cuts, min_remaining=20)
    keep &= found
    print(f"{int((~found).sum())} of {len(found)} spectra not in {args.allstar}\n{report}")
    i = np.flatnonzero(keep)
    # the CNN as benchmarks/bench_nn.py runs it (StarNet's layout, first conv stride 3)
    arch = (dict(filters=(8, 16), kernel_size=(8, 8), stride=(3, 1), pool_size=(1, 4))
            if args.arch == "cnn" else {})
    net = DistanceNetwork(args.arch, hidden=args.hidden, device=args.device, seed=args.seed,
                          **arch)
    net.train(np.asarray(flux)[i], np.asarray(ivar)[i], _column(rows, "GAIAEDR3_PARALLAX")[i],
              _column(rows, "GAIAEDR3_PARALLAX_ERROR")[i], _column(rows, "K")[i],
              _column(rows, args.ak_column)[i],
              k_error=None if "K_ERR" not in rows.colnames else _column(rows, "K_ERR")[i],
              epochs=args.epochs, split=(5, 1, 0), batch_size=32, weight_decay=1e-4,
              patience=12, augment_noise=1.0, progress=not args.quiet or None)
    net.save(args.output)
    h = net.regressor.history
    print(f"distance network: {len(i)} training stars, {h['n_epochs']} epochs, best validation "
          f"loss {min(h['val_loss']):.3f}; wrote {args.output}")
    return 0


def _dist_predict(args):
    from ..apogee.catalog import read_distance_catalog
    from ..nn.distance import DistanceNetwork

    _refuse_existing((args.output,), args.force)
    net = DistanceNetwork.load(args.checkpoint, device=args.device)
    flux, ivar, _, _, ids = _read_input(args.input, need_labels=False)
    rows, found = read_distance_catalog(args.allstar, ids, ak_column=args.ak_column,
                                        parallax=False)
    res = net.predict(flux, ivar, _column(rows, "K"), _column(rows, args.ak_column),
                      k_error=_column(rows, "K_ERR"), n_samples=args.n_samples, seed=args.seed)
    table = res.to_table()
    table.add_column(np.asarray(ids).astype(str), name="apogee_id", index=0)
    from .._util import atomic_path

    with atomic_path(args.output) as tmp:
        table.write(tmp, format="fits")
    print(f"{len(table)} spectra ({int((~found).sum())} not in the catalogue): "
          f"{int(res.flag_warn.sum())} warn, {int(res.flag_bad.sum())} bad; wrote {args.output}")
    return 0
