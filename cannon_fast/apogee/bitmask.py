"""APOGEE_PIXMASK decoding: bit names, boolean bad-pixel masks, and error inflation.

The apStar ``PIXMASK`` HDU holds one integer per pixel whose bits record what
went wrong there (sky subtraction, cosmic rays, persistence, ...).  The lab
(and most Cannon work on APOGEE) treats bits 0-7 and 12 as fatal: such a pixel
keeps its place in the spectrum but gets an infinite uncertainty (inverse
variance 0) so it carries no weight in any fit.  Pixels with a NaN or infinite
flux, a NaN/inf/zero/negative error, or outside the three detector chips are
bad as well, whatever their bits say.
"""
from __future__ import annotations

import numpy as np

from ..core._apstar_grid import NPIX, on_chip_mask

__all__ = [
    "ASPCAPFLAG_BITS", "STARFLAG_BITS", "ASTRONN_TRAINING_FLAGS", "flag_bit",
    "PIXMASK_BITS", "DEFAULT_BAD_BITS", "BAD_ERROR", "bit_value", "decode", "bad_pixel_mask",
    "quality_mask", "mask_spectra",
]

#: APOGEE_PIXMASK bit number for each name (SDSS data model, DR13-DR17).
PIXMASK_BITS = {
    "BADPIX": 0, "CRPIX": 1, "SATPIX": 2, "UNFIXABLE": 3, "BADDARK": 4, "BADFLAT": 5,
    "BADERR": 6, "NOSKY": 7, "LITTROW_GHOST": 8, "PERSIST_HIGH": 9, "PERSIST_MED": 10,
    "PERSIST_LOW": 11, "SIG_SKYLINE": 12, "SIG_TELLURIC": 13, "NOT_ENOUGH_PSF": 14,
}
_BIT_NAMES = {v: k for k, v in PIXMASK_BITS.items()}

#: APOGEE_ASPCAPFLAG bit numbers (DR17 data model).
ASPCAPFLAG_BITS = {
    "TEFF_WARN": 0, "LOGG_WARN": 1, "VMICRO_WARN": 2, "M_H_WARN": 3, "ALPHA_M_WARN": 4,
    "C_M_WARN": 5, "N_M_WARN": 6, "STAR_WARN": 7, "CHI2_WARN": 8, "COLORTE_WARN": 9,
    "ROTATION_WARN": 10, "SN_WARN": 11, "SPEC_HOLE_WARN": 12, "ATMOS_HOLE_WARN": 13,
    "VSINI_WARN": 14, "TEFF_BAD": 16, "LOGG_BAD": 17, "VMICRO_BAD": 18, "M_H_BAD": 19,
    "ALPHA_M_BAD": 20, "C_M_BAD": 21, "N_M_BAD": 22, "STAR_BAD": 23, "CHI2_BAD": 24,
    "COLORTE_BAD": 25, "ROTATION_BAD": 26, "SN_BAD": 27, "SPEC_HOLE_BAD": 28,
    "ATMOS_HOLE_BAD": 29, "VSINI_BAD": 30, "NO_ASPCAP_RESULT": 31, "MISSING_APSTAR": 32,
    "NO_GRID": 33, "BAD_FRAC_LOWSNR": 34, "BAD_FRAC_BADPIX": 35, "FERRE_FAIL": 36,
    "PROBLEM_TARGET": 40, "MULTIPLE_SUSPECT": 41,
}
#: APOGEE_STARFLAG bit numbers (DR17) of the flags this package meets; others by number.
STARFLAG_BITS = {
    "BAD_PIXELS": 0, "COMMISSIONING": 1, "BRIGHT_NEIGHBOR": 2, "VERY_BRIGHT_NEIGHBOR": 3,
    "LOW_SNR": 4, "PERSIST_HIGH": 9, "PERSIST_MED": 10, "PERSIST_LOW": 11,
    "SUSPECT_RV_COMBINATION": 16, "SUSPECT_BROAD_LINES": 17,
}
#: The ASPCAPFLAG bits Astra's AstroNN (DR17 training set) filtered on.
ASTRONN_TRAINING_FLAGS = ("M_H_BAD", "STAR_BAD", "NO_ASPCAP_RESULT", "MISSING_APSTAR",
                          "NO_GRID", "PROBLEM_TARGET")


def flag_bit(name):
    """``(column, bit)`` of a catalogue flag: a name of either table, or ``COLUMN:bit``.

    Parameters
    ----------
    name : str
        ``"STAR_BAD"`` (ASPCAPFLAG), ``"BRIGHT_NEIGHBOR"`` (STARFLAG), or an
        explicit ``"ASPCAPFLAG:23"`` / ``"STARFLAG:BRIGHT_NEIGHBOR"``.

    Returns
    -------
    (str, int)
        ``("ASPCAPFLAG", 23)`` etc.

    Raises
    ------
    ValueError
        For an unknown name or column.
    """
    text = str(name).strip().upper()
    tables = {"ASPCAPFLAG": ASPCAPFLAG_BITS, "STARFLAG": STARFLAG_BITS}
    if ":" in text:
        column, bit = (t.strip() for t in text.split(":", 1))
        if column not in tables:
            raise ValueError(f"unknown flag column {column!r} in {name!r}; use ASPCAPFLAG or "
                             "STARFLAG")
        if bit.isdigit() and 0 <= int(bit) < 64:
            return column, int(bit)
        if bit in tables[column]:
            return column, tables[column][bit]
        raise ValueError(f"unknown {column} bit {bit!r}; known: {', '.join(tables[column])}")
    for column, table in tables.items():
        if text in table:
            return column, table[text]
    raise ValueError(f"unknown flag name {name!r}: not an ASPCAPFLAG ({', '.join(ASPCAPFLAG_BITS)})"
                     f" or STARFLAG ({', '.join(STARFLAG_BITS)}) bit; write COLUMN:bit for "
                     "others")


#: Bits that mark a pixel bad by default: 0-7 (detector/reduction failures) and 12 (sky line).
DEFAULT_BAD_BITS = ("BADPIX", "CRPIX", "SATPIX", "UNFIXABLE", "BADDARK", "BADFLAT", "BADERR",
                    "NOSKY", "SIG_SKYLINE")

#: The error given to bad pixels by :func:`mask_spectra` when errors (not ivar) are wanted.
BAD_ERROR = 1e10


def bit_value(bits=DEFAULT_BAD_BITS):
    """Combine bit names and/or bit numbers into one integer mask.

    Parameters
    ----------
    bits : iterable of str or int, or int
        Names from :data:`PIXMASK_BITS` (case-insensitive) or bit numbers 0-14.
        A bare int is taken as an already-combined mask value.

    Returns
    -------
    int
        ``sum(1 << bit)`` over the distinct bits.

    Raises
    ------
    ValueError
        For an unknown name or a bit number outside 0-14.
    """
    if isinstance(bits, (int, np.integer)):
        if bits < 0 or bits >= 1 << 15:
            raise ValueError(f"PIXMASK value {bits} is outside 0..{(1 << 15) - 1}")
        return int(bits)
    if isinstance(bits, str):
        bits = [b.strip() for b in bits.split(",") if b.strip()]
    value = 0
    for b in bits:
        if isinstance(b, str) and b.strip().lstrip("-").isdigit():
            b = int(b)
        if isinstance(b, (int, np.integer)):
            if not 0 <= b <= 14:
                raise ValueError(f"APOGEE_PIXMASK bit {b} is not one of 0-14")
            value |= 1 << int(b)
        else:
            key = str(b).strip().upper()
            if key not in PIXMASK_BITS:
                raise ValueError(f"unknown APOGEE_PIXMASK bit name {b!r}; known: "
                                 + ", ".join(PIXMASK_BITS))
            value |= 1 << PIXMASK_BITS[key]
    return value


def decode(value):
    """Return the names of the bits set in one PIXMASK value.

    Parameters
    ----------
    value : int
        A PIXMASK value.

    Returns
    -------
    list of str
        Names in bit order, e.g. ``decode(4097) == ["BADPIX", "SIG_SKYLINE"]``.
        Bits above 14 are reported as ``"BIT<n>"``.
    """
    value = int(value)
    names = []
    bit = 0
    while value >> bit:
        if (value >> bit) & 1:
            names.append(_BIT_NAMES.get(bit, f"BIT{bit}"))
        bit += 1
    return names


def bad_pixel_mask(pixmask, bits=DEFAULT_BAD_BITS):
    """Boolean mask of pixels with any of ``bits`` set.

    Parameters
    ----------
    pixmask : array_like of int, shape (..., P)
        APOGEE_PIXMASK values.
    bits : iterable of str or int, or int
        Bits that make a pixel bad (see :func:`bit_value`).

    Returns
    -------
    ndarray of bool, shape (..., P)
    """
    pm = np.asarray(pixmask)
    if pm.dtype.kind not in "iub":
        if pm.dtype.kind == "f" and np.all(np.isfinite(pm)) and np.all(pm == np.round(pm)):
            pm = pm.astype(np.int64)
        else:
            raise ValueError(f"PIXMASK must hold integers, got dtype {pm.dtype}")
    return (pm.astype(np.int64, copy=False) & bit_value(bits)) != 0


def quality_mask(flux, err, pixmask=None, bits=DEFAULT_BAD_BITS, chips=True):
    """All bad pixels: flagged bits, non-finite flux/error, error <= 0, chip gaps.

    Parameters
    ----------
    flux, err : array_like, shape (..., P)
        Flux and its 1-sigma uncertainty (not inverse variance).
    pixmask : array_like of int, shape (..., P), optional
        APOGEE_PIXMASK; ``None`` skips the bit test.
    bits : iterable of str or int, or int
        Bits that make a pixel bad.
    chips : bool
        If true and P is the apStar grid (8575), pixels outside the three chips
        (:data:`cannon_fast.apogee.files.CHIP_RANGES`) are bad too.

    Returns
    -------
    ndarray of bool, shape (..., P)
        True where the pixel must carry no weight.
    """
    flux = np.asarray(flux)
    err = np.asarray(err)
    if flux.shape != err.shape:
        raise ValueError(f"flux {flux.shape} and error {err.shape} shapes differ")
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(flux) | ~np.isfinite(err) | ~(err > 0)
    if pixmask is not None:
        pm = np.asarray(pixmask)
        if pm.shape != flux.shape:
            raise ValueError(f"PIXMASK {pm.shape} and flux {flux.shape} shapes differ")
        bad |= bad_pixel_mask(pm, bits)
    if chips:
        if flux.shape[-1] == NPIX:
            bad |= ~on_chip_mask()
    return bad


def mask_spectra(flux, err, pixmask=None, bits=DEFAULT_BAD_BITS, chips=True, dtype=np.float64):
    """Turn flux, error and PIXMASK into (flux, ivar) with bad pixels weightless.

    Bad pixels (see :func:`quality_mask`) get ``ivar = 0`` -- an infinite
    error -- and ``flux = 0`` so no NaN reaches a kernel.

    Parameters
    ----------
    flux, err : array_like, shape (..., P)
    pixmask : array_like of int, shape (..., P), optional
    bits : iterable of str or int, or int
    chips : bool
    dtype : numpy dtype
        Output float type.

    Returns
    -------
    flux, ivar : ndarray, shape (..., P)
    bad : ndarray of bool, shape (..., P)
    """
    bad = quality_mask(flux, err, pixmask, bits, chips)
    f = np.where(bad, 0.0, flux).astype(dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e = np.where(bad, 1.0, err).astype(np.float64, copy=False)
        ivar = np.where(bad, 0.0, 1.0 / (e * e)).astype(dtype, copy=False)
    return f, ivar, bad
