"""The ``.npz`` model files of the emulators (no pickle, no torch): format checks, grids."""
from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["open_npz", "grid_arrays", "grid_from_npz"]


def open_npz(path, fmt, version, what):
    """Open a cannon_fast ``.npz`` file, refusing another kind or format version.

    Parameters
    ----------
    path : str or os.PathLike
    fmt : str
        The ``format`` entry the file must have.
    version : int
        The ``format_version`` this cannon_fast reads.
    what : str
        The kind of file, for the messages (e.g. ``"PayneEmulator"``).

    Returns
    -------
    numpy.lib.npyio.NpzFile
        Open; use it in a ``with`` block.
    """
    path = os.fspath(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a {what} .npz file: {err}") from err
    if "format" not in data.files or str(data["format"]) != fmt:
        data.close()
        raise ValueError(f"{path} is not a {what} .npz file")
    if int(data["format_version"]) != version:
        found = int(data["format_version"])
        data.close()
        raise ValueError(f"{path} has {what} format version {found}, this cannon_fast reads "
                         f"{version}")
    return data


def grid_arrays(grid):
    """The ``grid_*`` entries that record a PixelGrid in a file ({} for None)."""
    if grid is None:
        return {}
    meta, arrays = grid.describe()
    out = {"grid_meta": np.array(json.dumps(meta))}
    out.update({f"grid_{k}": v for k, v in arrays.items()})
    return out


def grid_from_npz(data):
    """The PixelGrid recorded by :func:`grid_arrays` in an open file, or None."""
    if "grid_meta" not in data.files:
        return None
    from ..core.grid import PixelGrid

    return PixelGrid.from_description(
        json.loads(str(data["grid_meta"])),
        {k[5:]: data[k] for k in data.files if k.startswith("grid_") and k != "grid_meta"})
