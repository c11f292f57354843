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
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing checkpoint and loss plot")
    p.set_defaults(func=_train)

    q = subparsers.add_parser(
        "nn-predict", parents=[parent], help="predict labels with a trained NN regressor",
        description="Predict labels, MC-dropout + predicted errors and flags; writes a FITS "
                    "table.")
    q.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".npz file (flux, ivar) or SpectraStore directory (the older form "
                        "`CHECKPOINT INPUT`, without --model, still works)")
    q.add_argument("--model", default=None, metavar="CHECKPOINT",
                   help="checkpoint written by nn-train")
    q.add_argument("--out", "-o", "--output", dest="output", required=True,
                   help="FITS table to write")
    q.add_argument("--n-samples", type=int, default=30, help="MC-dropout samples")
    q.add_argument("--max-bad-fraction", type=float, default=0.3)
    q.add_argument("--device", default="auto")
    q.add_argument("--force", "--overwrite", dest="overwrite", action="store_true",
                   help="overwrite an existing output table")
    q.set_defaults(func=_predict)


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
                                   device=args.device, seed=args.seed)
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


def _predict(args):
    from ..nn import SpectrumRegressor

    _refuse_existing((args.output,), args.overwrite)
    from .core import model_and_inputs
    checkpoint, inputs = model_and_inputs(args)
    if len(inputs) != 1:
        raise ValueError(f"nn-predict reads one input (.npz or SpectraStore), got {inputs}")
    reg = SpectrumRegressor.load(checkpoint, device=args.device)
    flux, ivar, _, _, ids = _read_input(inputs[0], need_labels=False)
    res = reg.predict(flux, ivar, n_samples=args.n_samples, seed=args.seed,
                      max_bad_fraction=args.max_bad_fraction)
    table = res.to_table()
    table.add_column(np.asarray(ids).astype(str), name="ID", index=0)
    from .._util import atomic_path

    with atomic_path(args.output) as tmp:
        table.write(tmp, format="fits")
    print(f"{len(table)} spectra: {int(res.warn.sum())} with warnings, {int(res.bad.sum())} "
          f"bad; wrote {args.output}")
    return 0
