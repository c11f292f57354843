"""The ``cannon-fast`` command line: one subcommand per step of the workflow.

Each module in this package registers its own subcommands with
``register(subparsers, parent)``; they share the ``parent`` parser's options.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

__all__ = ["main", "build_parser"]

# one module per workflow step, in the order ``--help`` lists them
_COMMAND_MODULES = ("data", "core", "lab", "science", "nn", "payne", "instruments",
                    "survey")


def build_parser():
    """Build the argument parser with every subcommand."""
    from .. import __version__

    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--backend", default="auto", choices=("auto", "c", "numba", "numpy"),
                        help="kernel implementation (default: fastest available)")
    parent.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parent.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(
        prog="cannon-fast",
        description="Stellar labels from APOGEE spectra with The Cannon: "
                    "data to labels to figures.")
    parser.add_argument("--version", action="version", version=f"cannon-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f".{name}", __name__).register(sub, parent)
    return parser


def main(argv=None):
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .._util import quiet

    # -q silences the progress bars of this command only, leaving no state behind
    silence = quiet() if getattr(args, "quiet", False) else contextlib.nullcontext()
    try:
        with silence:
            return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as err:
        # OSError: missing, unreadable or wrong-kind paths; its message names the path
        print(f"cannon-fast {args.command}: error: {_explain(err)}", file=sys.stderr)
        return 1


def _explain(err):
    """The error's message; for a folder that cannot be made, the file in its way."""
    if isinstance(err, (FileExistsError, NotADirectoryError)) and err.filename:
        probe = os.path.abspath(os.fspath(err.filename))
        while probe != os.path.dirname(probe):
            if os.path.lexists(probe) and not os.path.isdir(probe):
                where = "" if probe == os.path.abspath(err.filename) else f"{err.filename}: "
                return (f"{where}{probe} is a file, not a folder, so nothing can be written "
                        "under it; choose another output path")
            probe = os.path.dirname(probe)
    return str(err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
