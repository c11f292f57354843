"""``cannon-fast label``: label a whole survey with a trained model, resumably."""
from __future__ import annotations

import sys

__all__ = ["register"]


def register(subparsers, parent):
    """Add the ``label`` subcommand.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
    parent : argparse.ArgumentParser
        Shared options (``--backend``, ``--seed``, ``--quiet``).
    """
    from ..survey import DEFAULT_CHUNK_SIZE
    from .core import add_continuum_options, add_model_and_inputs

    p = subparsers.add_parser(
        "label", parents=[parent],
        help="label a survey (apStar files, a SpectraStore or an .npz) into a catalogue",
        description="Fit labels to every spectrum of a survey with a trained model, chunk by "
                    "chunk: raw spectra are masked and continuum-normalized first, normalized "
                    "SpectraStores go straight to the fit. Each chunk is committed atomically, "
                    "so an interrupted job (Ctrl-C, kill, full disk) continues where it stopped "
                    "when the same command is run again; the catalogue is written when every "
                    "chunk is done. Stars that cannot be read, normalized or fitted keep a row "
                    "with NaN labels, a flag and a REASON.")
    add_model_and_inputs(p, "INPUTS", "apStar files, text files listing them, directories of "
                                      "them; or SpectraStore directories / .npz files with "
                                      "flux, ivar (N, P) and optionally ids, bitmask (several: "
                                      "one survey, in the given order)")
    p.add_argument("--out", required=True, metavar="CATALOG",
                   help="output catalogue (.fits, or .parquet); other inputs are appended to it "
                        "if it was made by the same model with the same fit options; the same "
                        "command again resumes "
                        "or does nothing")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="N",
                   help=f"stars per chunk (default {DEFAULT_CHUNK_SIZE}); memory is bounded by "
                        "it: about N x P x 40 bytes + 0.15 GB, i.e. ~0.85 GB for the default "
                        "on the 8575-pixel grid, whatever the survey size. Keep it when "
                        "resuming")
    p.add_argument("--visits", action="store_true",
                   help="also label every visit spectrum of apStar files (VISIT 1..n, with "
                        "VISIT_FILE, VISIT_JD, VISIT_FIBER; VISIT 0 is the combined spectrum)")
    p.add_argument("--scheduler", default=None, metavar="processes|dask|ADDRESS",
                   help="default: one process. 'processes': a pool of single-threaded worker "
                        "processes on this machine (fastest here, no Dask needed); 'dask': a "
                        "Dask LocalCluster; anything else: the address of a running "
                        "distributed scheduler (e.g. tcp://host:8786; needs cannon_fast[dask])")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for 'processes' or 'dask' (default: CPU count)")
    p.add_argument("--format", choices=("fits", "parquet"), default=None,
                   help="catalogue format (default: from the --out suffix; fits)")
    add_continuum_options(p)
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--raw", dest="normalized", action="store_const", const=False,
                      default=None, help="the npz spectra are raw: normalize them")
    norm.add_argument("--normalized", dest="normalized", action="store_const", const=True,
                      help="the npz spectra are already normalized")
    p.add_argument("--no-debias", action="store_true",
                   help="plain chi2 fits (see cannon-fast fit)")
    p.add_argument("--broadening", action="store_true",
                   help="also fit extra line broadening (BROADENING, (km/s)²; see "
                        "cannon-fast fit); implies plain chi2 fits")
    p.add_argument("--refine-continuum", action="store_true",
                   help="refine each continuum against the model and fit again (see "
                        "cannon-fast fit)")
    p.add_argument("--binaries", action="store_true",
                   help="screen every star for an unresolved companion: BINARY_FLAG, "
                        "BINARY_DELTA_CHI2, BINARY_LIGHT_WEIGHT, BINARY_VELOCITY, BINARY_TEFF2/"
                        "LOGG2 and the composite fit's primary labels BINARY_PRIMARY_<LABEL>")
    p.add_argument("--secondary-model", metavar="MODEL",
                   help="implies --binaries: a model of dwarfs on the same pixels (cannon-fast "
                        "train on a store prepared with --logg-max 9 --teff-max 99999 ...) "
                        "that makes the secondaries of the composite fits; the companions of "
                        "giants are mostly dwarfs, which a giants' model cannot make")
    p.add_argument("--force", action="store_true",
                   help="replace an existing catalogue with this job's rows (the old one "
                        "stays until the new one is written) instead of refusing one that "
                        "holds these inputs labeled with other options, or another model's")
    p.set_defaults(func=_label)


def _label(args):
    from ..core.model import CannonModel
    from ..survey import SurveyError, label_survey
    from .core import fit_options, model_and_inputs

    model_path, inputs = model_and_inputs(args)
    model = CannonModel.read(model_path, backend=args.backend)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    binaries = args.binaries
    if args.secondary_model:   # implies --binaries
        binaries = CannonModel.read(args.secondary_model, backend=args.backend)
    try:
        summary = label_survey(
            model, inputs, args.out, chunk_size=args.chunk_size, visits=args.visits,
            scheduler=args.scheduler, workers=args.workers, format=args.format,
            continuum=args.continuum, degree=args.degree,
            bad_bits=args.bad_bits, normalized=args.normalized, **fit_options(args),
            binaries=binaries, log=say, force=args.force)
    except KeyboardInterrupt:
        print(f"cannon-fast label: interrupted; the committed chunks are kept in "
              f"{args.out}.parts: run the same command again to resume", file=sys.stderr)
        return 130
    except SurveyError as err:
        print(f"cannon-fast label: error: {err}", file=sys.stderr)
        return 1
    print(summary.report())
    return 0
