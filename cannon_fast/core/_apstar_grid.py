"""Index helpers between the apStar grid and the gap-free ASPCAP grids.

Continuum-pixel lists and masks come on the 7214-, 7514- or 8575-pixel APOGEE
grids (``to_apstar_grid``, ``grid_indices``). The grids' numbers themselves are
:mod:`cannon_fast.core.grid`'s (one place); :mod:`cannon_fast.apogee.files`
re-exports these names under the apStar reader's old spellings.
"""
from __future__ import annotations

import numpy as np

from .grid import APSTAR_CDELT1 as CDELT1
from .grid import APSTAR_CHIPS as CHIP_RANGES
from .grid import APSTAR_CRVAL1 as CRVAL1
from .grid import APSTAR_NPIX as NPIX
from .grid import ASPCAP_SEGMENTS, segment_index

__all__ = ["NPIX", "CRVAL1", "CDELT1", "CHIP_RANGES", "GRID_SEGMENTS", "wavelength_grid",
           "grid_indices", "to_apstar_grid", "on_chip_mask", "chip_of_pixel"]

#: Segments of the 8575 grid that make up each gap-free grid (and the full grid itself).
GRID_SEGMENTS = {**ASPCAP_SEGMENTS, NPIX: ((0, NPIX),)}


def wavelength_grid(crval1=CRVAL1, cdelt1=CDELT1, npix=NPIX):
    """Vacuum wavelengths of the apStar log-lambda grid.

    Parameters
    ----------
    crval1, cdelt1 : float
        log10 of the first wavelength and the log10 step (header CRVAL1/CDELT1).
    npix : int
        Number of pixels (header NWAVE or NAXIS1).

    Returns
    -------
    ndarray, shape (P,)
        ``10 ** (crval1 + cdelt1 * i)`` in Angstrom (vacuum).
    """
    return 10.0 ** (float(crval1) + float(cdelt1) * np.arange(int(npix)))


def on_chip_mask():
    """Boolean (8575,) mask of the pixels inside :data:`CHIP_RANGES`."""
    m = np.zeros(NPIX, bool)
    for a, b in CHIP_RANGES:
        m[a:b] = True
    return m


def chip_of_pixel(chip_ranges=CHIP_RANGES, npix=NPIX):
    """Chip number (0 blue, 1 green, 2 red) of each pixel; -1 in the gaps.

    Returns
    -------
    ndarray of int64, shape (P,)
    """
    return segment_index(chip_ranges, npix)


def grid_indices(n):
    """Return the 8575-grid indices of the pixels of a gap-free grid of ``n`` pixels.

    Parameters
    ----------
    n : {7214, 7514, 8575}

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    if n not in GRID_SEGMENTS:
        raise ValueError(f"unknown APOGEE pixel grid of length {n}; known: "
                         + ", ".join(map(str, GRID_SEGMENTS)))
    return np.concatenate([np.arange(a, b) for a, b in GRID_SEGMENTS[n]])


def to_apstar_grid(values, grid=None):
    """Map a mask or index list on a 7214/7514/8575 grid to a (8575,) boolean mask.

    Parameters
    ----------
    values : array_like
        Either a boolean mask (its length names the grid) or integer indices.
    grid : {7214, 7514, 8575}, optional
        The grid of integer indices (required unless an index >= 7514 shows
        they can only be on the 8575 grid).

    Returns
    -------
    ndarray of bool, shape (8575,)
    """
    v = np.asarray(values)
    out = np.zeros(NPIX, bool)
    if v.dtype == bool:
        out[grid_indices(v.size)[v.ravel()]] = True
        return out
    if v.dtype.kind not in "iu":
        if v.dtype.kind == "f" and np.all(v == np.round(v)):
            v = v.astype(np.int64)
        else:
            raise ValueError(f"pixel indices must be integers, got dtype {v.dtype}")
    v = v.ravel().astype(np.int64)
    if grid is None:
        if v.size and v.max() >= 7514:
            grid = 8575
        else:
            raise ValueError("integer pixel indices are ambiguous (7214, 7514 or 8575 grid): "
                             "pass grid=")
    idx = grid_indices(grid)
    if v.size and (v.min() < 0 or v.max() >= grid):
        raise ValueError(f"pixel indices {v.min()}..{v.max()} fall outside the {grid}-pixel grid")
    out[idx[v]] = True
    return out
