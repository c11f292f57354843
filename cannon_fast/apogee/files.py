"""APOGEE file readers: apStar spectra, the allStar catalogue, and the apStar pixel grid.

The grid's constants and index helpers live in :mod:`cannon_fast.core._apstar_grid`
(the core needs them without reading files) and are re-exported here.

apStar files (one per star) hold, in HDUs 1/2/3, the flux, its 1-sigma error
and the APOGEE_PIXMASK bitmask on a common log-lambda vacuum grid of 8575
pixels (``10**(CRVAL1 + CDELT1 * i)`` Angstrom, CRVAL1 = 4.179, CDELT1 = 6e-6).
Their row layout depends on the release and the number of visits:

======================  ===================  ==========================================
release                 one visit            N > 1 visits
======================  ===================  ==========================================
DR12-DR16 (r5-r12)      1-D image (P,)       (N + 2, P): combined (pixel weights),
                                             combined (global weights), visit 1..N
DR17                    (2, P): combined,    (N + 2, P), as above
                        then a row of zeros
======================  ===================  ==========================================

Combined spectra are in the barycentric rest frame; pixels not covered by
every visit are NaN (DR17) or 0 with a huge error (older releases).
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

try:  # fitsio is much faster; astropy is the fallback (documented in docs/api.md)
    import fitsio
except ImportError:  # pragma: no cover - exercised only where fitsio is missing
    fitsio = None

from ..core._apstar_grid import (CDELT1, CHIP_RANGES, CRVAL1, GRID_SEGMENTS, NPIX, chip_of_pixel,
                                 grid_indices, on_chip_mask, to_apstar_grid, wavelength_grid)
from .bitmask import DEFAULT_BAD_BITS, mask_spectra
from .._util import key_rows

__all__ = [
    "NPIX", "CRVAL1", "CDELT1", "CHIP_NAMES", "CHIP_RANGES", "GRID_SEGMENTS", "LAB_LABELS",
    "ApStar", "wavelength_grid", "on_chip_mask", "chip_of_pixel", "grid_indices",
    "to_apstar_grid", "parse_apstar_path", "fits_check", "apstar_filename", "release_of",
    "read_apstar",
    "read_allstar", "match_ids", "match_conflicts", "AMBIGUOUS_MATCH", "ALLSTAR_MISSING",
]

CHIP_NAMES = ("blue", "green", "red")
#: The labels of the modeling lab (Ness et al. 2015 used the first three).
LAB_LABELS = ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE")
#: How each release marks a label ASPCAP did not derive.
ALLSTAR_MISSING = {"dr17": "NaN", "dr16": -9999.0, "dr14": -9999.0, "dr13": -9999.0,
                   "dr12": -9999.0}

_RELEASE_OF_TAG = {"dr17": "dr17", "r12": "dr16", "r8": "dr14", "l31c": "dr14", "r6": "dr13",
                   "l30e": "dr13", "r5": "dr12", "v603": "dr12"}
_APSTAR_RE = re.compile(r"^apStar-([A-Za-z0-9.]+)-(.+?)\.fits(\.gz)?$")


@functools.lru_cache(maxsize=8)
def _grid(crval1, cdelt1, npix):
    """Return a cached read-only wavelength grid (shared by ApStar reads)."""
    w = wavelength_grid(crval1, cdelt1, npix)
    w.flags.writeable = False
    return w


def release_of(name):
    """Return the release ("dr17", "dr16", ...) an apStar/allStar file name implies, or None."""
    base = os.path.basename(os.fspath(name))
    m = re.match(r"^(?:apStar|allStar|aspcapStar)-([A-Za-z0-9]+)", base)
    if not m:
        return None
    return _RELEASE_OF_TAG.get(m.group(1).lower())


def apstar_filename(apogee_id, release="dr17"):
    """File name of a star's apStar file in a release ("dr17" or "dr16").

    Parameters
    ----------
    apogee_id : str
    release : {"dr17", "dr16"}

    Returns
    -------
    str
        ``apStar-dr17-<ID>.fits`` or ``apStar-r12-<ID>.fits``.
    """
    tag = {"dr17": "dr17", "dr16": "r12"}.get(str(release).lower())
    if tag is None:
        raise ValueError(f"unsupported release {release!r}: use 'dr17' or 'dr16'")
    return f"apStar-{tag}-{apogee_id}.fits"


def parse_apstar_path(path):
    """Split an apStar path into (release, apogee_id, telescope, field).

    The SAS tree is ``.../stars/<telescope>/<field>/apStar-<tag>-<ID>.fits``;
    telescope and field are None when the path does not follow it.
    """
    path = os.fspath(path)
    base = os.path.basename(path)
    m = _APSTAR_RE.match(base)
    if not m:
        raise ValueError(f"{path}: not an apStar file name (apStar-<release>-<ID>.fits)")
    release = _RELEASE_OF_TAG.get(m.group(1).lower())
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    telescope = fld = None
    if len(parts) >= 4 and parts[-4] == "stars":
        telescope, fld = parts[-3], parts[-2]
    return release, m.group(2), telescope, fld


@dataclass
class ApStar:
    """One apStar file: the combined spectrum, optionally the visits, and metadata.

    Attributes
    ----------
    flux, err : ndarray, shape (P,)
        Combined (pixel-weighted) spectrum and 1-sigma error, flux units of
        1e-17 erg/s/cm^2/Angstrom.
    pixmask : ndarray of int64, shape (P,)
        APOGEE_PIXMASK of the combined spectrum.
    wavelength : ndarray, shape (P,)
        Vacuum wavelengths in Angstrom.
    visit_flux, visit_err, visit_pixmask : ndarray, shape (V, P), or None
        Visit spectra (read only when asked for).
    meta : dict
        ``apogee_id``, ``telescope``, ``field``, ``nvisits``, ``snr``, ``vhelio``,
        ``ra``, ``dec``, ``release``, ``path``.
    header : dict
        The full primary header (only if read with ``full_header=True``).
    """

    flux: np.ndarray
    err: np.ndarray
    pixmask: np.ndarray
    wavelength: np.ndarray
    meta: dict
    visit_flux: np.ndarray | None = None
    visit_err: np.ndarray | None = None
    visit_pixmask: np.ndarray | None = None
    header: dict = field(default_factory=dict)

    @property
    def apogee_id(self):
        """The star's APOGEE (2MASS) identifier."""
        return self.meta["apogee_id"]

    def masked(self, bits=None, chips=True):
        """Return (flux, ivar, bad) of the combined spectrum with bad pixels weightless.

        Parameters
        ----------
        bits : iterable of str or int, optional
            PIXMASK bits that make a pixel bad (default bits 0-7 and 12).
        chips : bool
            Also mask the chip gaps.
        """
        return mask_spectra(self.flux, self.err, self.pixmask,
                            DEFAULT_BAD_BITS if bits is None else bits, chips)


_META_KEYS = {"OBJID": "apogee_id", "APOGEE_ID": "apogee_id", "TELESCOP": "telescope",
              "TELESCOPE": "telescope", "FIELD": "field", "NVISITS": "nvisits", "SNR": "snr",
              "VHELIO": "vhelio", "RA": "ra", "DEC": "dec", "CRVAL1": "crval1",
              "CDELT1": "cdelt1", "NWAVE": "nwave"}


def _meta_from_header(hdr):
    meta = {}
    for key, name in _META_KEYS.items():
        if key in hdr and name not in meta:
            v = hdr[key]
            if isinstance(v, str):
                v = v.strip()
            meta[name] = v
    return meta


def _open_error(path, err):
    return ValueError(f"{path}: cannot read as a FITS file ({type(err).__name__}: {err}); "
                      "truncated or corrupt download?")


_BLOCK = 2880
_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _card_value(raw):
    """Value of a FITS card from the bytes after ``= `` (str, bool, int or float)."""
    s = raw.decode("ascii", "replace").strip()
    if s.startswith("'"):
        out, i = [], 1
        while i < len(s):
            c = s[i]
            if c == "'":
                if i + 1 < len(s) and s[i + 1] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(c)
            i += 1
        return "".join(out).rstrip()
    v = s.split("/", 1)[0].strip()
    if v == "T":
        return True
    if v == "F":
        return False
    try:
        return int(v)
    except ValueError:
        try:
            return float(v.replace("D", "E"))
        except ValueError:
            return v


_END_CARD = b"END" + b" " * 77


class _Cards:
    """Keyword -> raw value bytes of one FITS header, parsed lazily (only what is asked)."""

    __slots__ = ("_h", "_pos")

    def __init__(self, h):
        self._h = h
        self._pos = {h[j:j + 8]: j for j in range(0, len(h), 80)}

    def raw(self, key):
        j = self._pos.get(key.encode("ascii").ljust(8))
        if j is None or self._h[j + 8:j + 10] != b"= ":
            return None
        return self._h[j + 10:j + 80]

    def __contains__(self, key):
        return self.raw(key) is not None

    def __getitem__(self, key):
        v = self.raw(key)
        if v is None:
            raise KeyError(key)
        return _card_value(v)

    def get(self, key, default=None):
        v = self.raw(key)
        return default if v is None else _card_value(v)

    def to_dict(self):
        out = {}
        for k in self._pos:
            name = k.rstrip().decode("ascii", "replace")
            if name and name not in out and name in self:
                out[name] = self[name]
        return out


#: Sizes beyond this (256 TiB) in a header are corruption, not data: refused before use.
_MAX_FITS_BYTES = 2**48


def _check_sizes(path, k, bitpix, naxis, dims, pcount, gcount):
    """Refuse header sizes no real FITS file has (ValueError naming the file).

    Python ints keep the products exact; an axis of 2**62 (whose int64 pixel
    count wraps to 0) or a negative one is refused here, while a plausible size
    the file is too short for is left to the truncation check.
    """
    if bitpix not in _BITPIX:
        raise ValueError(f"{path}: HDU {k} has BITPIX = {bitpix}, not a FITS data type: "
                         "corrupt header")
    if not 0 <= naxis <= 999:
        raise ValueError(f"{path}: HDU {k} has NAXIS = {naxis} (FITS allows 0-999): "
                         "corrupt header")
    for j, d in enumerate(dims, 1):
        if not 0 <= d <= _MAX_FITS_BYTES:
            raise ValueError(f"{path}: HDU {k} has NAXIS{j} = {d}, an impossible size: "
                             "corrupt header")
    if not 0 <= pcount <= _MAX_FITS_BYTES or not 0 <= gcount <= _MAX_FITS_BYTES:
        raise ValueError(f"{path}: HDU {k} has PCOUNT = {pcount}, GCOUNT = {gcount}, an "
                         "impossible size: corrupt header")
    nbytes = abs(bitpix) // 8 * gcount * (pcount + math.prod(dims)) if naxis else 0
    if nbytes > _MAX_FITS_BYTES:
        raise ValueError(f"{path}: HDU {k} declares {nbytes} bytes of data ("
                         f"NAXISn = {', '.join(map(str, dims))}), an impossible size: "
                         "corrupt header")
    return nbytes


def _scan_fits(path, fd, size, max_hdus=None):
    """Walk the HDUs of an open FITS file (``os.pread`` on ``fd``) without reading data.

    Returns a list of (cards, data_offset, data_nbytes), for at most
    ``max_hdus`` HDUs.  Raises ValueError naming the file when the structure is
    broken or the file is shorter than its headers say.
    """
    if size == 0:
        raise ValueError(f"{path}: empty file")
    if not re.match(rb"SIMPLE  =\s*T", os.pread(fd, 80, 0)):
        raise ValueError(f"{path}: not a FITS file (no SIMPLE = T card)")
    hdus = []
    pos = 0
    while pos < size and (max_hdus is None or len(hdus) < max_hdus):
        h = b""
        nread = 2 * _BLOCK
        while True:
            chunk = os.pread(fd, nread, pos + len(h))
            if not chunk:
                raise ValueError(f"{path}: truncated FITS file (header of HDU {len(hdus)} "
                                 f"starting at byte {pos} has no END card)")
            start = max(0, len(h) - 80)
            h += chunk
            i = h.find(_END_CARD, start)
            while i >= 0 and i % 80:
                i = h.find(_END_CARD, i + 1)
            if i >= 0:
                break
            nread = 8 * _BLOCK
        cards = _Cards(h[:i])
        data = pos + -(-(i + 80) // _BLOCK) * _BLOCK
        try:
            bitpix = int(cards["BITPIX"])
            naxis = int(cards["NAXIS"])
            dims = [int(cards[f"NAXIS{k}"]) for k in range(1, naxis + 1)]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: HDU {len(hdus)} header lacks or garbles "
                             f"{err.args[0] if err.args else err}") from None
        try:
            pcount = int(cards.get("PCOUNT", 0))
            gcount = int(cards.get("GCOUNT", 1))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: HDU {len(hdus)} header garbles PCOUNT or GCOUNT") from None
        nbytes = _check_sizes(path, len(hdus), bitpix, naxis, dims, pcount, gcount)
        if data + nbytes > size:
            raise ValueError(f"{path}: truncated FITS file: HDU {len(hdus)} needs "
                             f"{data + nbytes} bytes, the file has {size}")
        hdus.append((cards, data, nbytes))
        pos = data + -(-nbytes // _BLOCK) * _BLOCK
    return hdus


def fits_check(path):
    """Check that a file is a complete FITS file (every header and data unit present).

    Reads only the headers, so it is cheap even for large files.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    int
        The number of HDUs.

    Raises
    ------
    ValueError
        Naming the file and what is broken (not FITS, truncated, ...).
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, 2, 0) == b"\x1f\x8b":
            raise ValueError(f"{path}: gzip-compressed; cannot check its FITS structure")
        return len(_scan_fits(path, fd, size))
    finally:
        os.close(fd)


def _image(path, fd, hdu, rows):
    """Read an image HDU (all rows, or the first row if ``rows == 1``) as native dtype."""
    cards, off, nbytes = hdu
    bitpix = cards["BITPIX"]
    naxis = cards["NAXIS"]
    if bitpix not in _BITPIX or naxis not in (1, 2):
        raise ValueError(f"{path}: expected a 1-D or 2-D image, found NAXIS = {naxis}, "
                         f"BITPIX = {bitpix}")
    dims = [int(cards[f"NAXIS{k}"]) for k in range(1, naxis + 1)][::-1]  # C order
    dt = np.dtype(_BITPIX[bitpix])
    count = math.prod(dims) if rows is None or naxis == 1 else int(dims[1])
    raw = os.pread(fd, count * dt.itemsize, off)
    a = np.frombuffer(raw, dtype=dt).astype(dt.newbyteorder("="))
    if rows is None and naxis == 2:
        a = a.reshape(dims)
    bscale = cards.get("BSCALE", 1)
    bzero = cards.get("BZERO", 0)
    if bscale != 1 or bzero != 0:
        if dt.kind in "iu" and bscale == 1 and float(bzero).is_integer():
            a = a.astype(np.int64) + int(bzero)
        else:
            a = a * float(bscale) + float(bzero)
    return a, tuple(dims)


def _read_raw(path, visits, full_header):
    """Read header and HDUs 1-3 of an apStar file; returns arrays as stored.

    A small FITS walker (``os.pread`` of the four headers and the wanted rows,
    cards parsed lazily) is several times faster than fitsio's header
    parsing, which dominates the cost of reading one apStar file.
    Gzip-compressed files go through fitsio (or astropy when fitsio is missing).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if os.pread(fd, 2, 0) == b"\x1f\x8b":
            return _read_raw_library(path, visits, full_header)
        hdus = _scan_fits(path, fd, size)  # all HDUs: a truncated tail means a bad download
        if len(hdus) < 4:
            raise ValueError(f"{path}: has {len(hdus)} HDUs; an apStar file needs at least 4 "
                             "(header, flux, error, PIXMASK): missing HDU")
        out = []
        dims = None
        for ext in (1, 2, 3):
            a, d = _image(path, fd, hdus[ext], None if visits else 1)
            if dims is not None and d != dims:
                raise ValueError(f"{path}: HDU {ext} has shape {d}, HDU 1 has {dims}")
            dims = d
            out.append(a)
    finally:
        os.close(fd)
    cards = hdus[0][0]
    meta = {}
    for key, name in _META_KEYS.items():
        if name not in meta:
            v = cards.get(key)
            if v is not None:
                meta[name] = v.strip() if isinstance(v, str) else v
    header = cards.to_dict() if full_header else {}
    return meta, header, dims, out


def _read_raw_library(path, visits, full_header):
    """Fallback reader through fitsio or astropy (used for compressed files)."""
    if fitsio is not None:
        try:
            fh = fitsio.FITS(path)
        except (OSError, ValueError) as err:
            raise _open_error(path, err) from None
        with fh:
            if len(fh) < 4:
                raise ValueError(f"{path}: has {len(fh)} HDUs; an apStar file needs at least 4 "
                                 "(header, flux, error, PIXMASK): missing HDU")
            try:
                hdr = fh[0].read_header()
                arrs = [fh[k].read() for k in (1, 2, 3)]
            except OSError as err:
                raise _open_error(path, err) from None
            meta = _meta_from_header(hdr)
            header = {k: hdr[k] for k in hdr.keys()} if full_header else {}
    else:  # pragma: no cover
        from astropy.io import fits

        try:
            with fits.open(path, memmap=False) as hl:
                if len(hl) < 4:
                    raise ValueError(f"{path}: has {len(hl)} HDUs; an apStar file needs at "
                                     "least 4 (header, flux, error, PIXMASK): missing HDU")
                hdr = hl[0].header
                arrs = [np.asarray(hl[k].data) for k in (1, 2, 3)]
                meta = _meta_from_header(hdr)
                header = dict(hdr) if full_header else {}
        except OSError as err:
            raise _open_error(path, err) from None
    dims = arrs[0].shape
    if len(dims) == 2 and not visits:
        arrs = [a[0] for a in arrs]
    return meta, header, tuple(dims), arrs


def read_apstar(path, visits=False, release=None, full_header=False):
    """Read an apStar file: combined spectrum, error, PIXMASK, metadata (and visits).

    Parameters
    ----------
    path : str or os.PathLike
    visits : bool
        Also read each visit's spectrum into ``visit_flux/err/pixmask``.
    release : {"dr17", "dr16", "dr14", ...}, optional
        The release the file should follow; defaults to the one its name
        implies.  A file whose row layout does not match raises ValueError.
    full_header : bool
        Keep the whole primary header in ``ApStar.header``.

    Returns
    -------
    ApStar

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming the file, for an unreadable/truncated FITS file, a missing HDU,
        or a row layout that fits neither the release nor NVISITS.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: apStar file not found")
    file_release = release_of(path)
    release = (release or file_release)
    release = release.lower() if release else None
    meta, header, dims, (flux, err, pixmask) = _read_raw(path, visits, full_header)
    # fitsio reports dims as (rows, columns)
    npix = int(dims[-1])
    nvis = int(meta.get("nvisits", 1) or 1)
    if len(dims) == 1:
        layout_rows = 1
        if release == "dr17":
            raise ValueError(f"{path}: 1-D apStar images (DR12-16 single-visit layout) but release "
                             "dr17 was expected (DR17 files have >= 2 rows): wrong release layout?")
        if nvis != 1:
            raise ValueError(f"{path}: 1-D apStar images but NVISITS = {nvis}: inconsistent layout")
    else:
        layout_rows = int(dims[0])
        ok = layout_rows == nvis + 2 if nvis > 1 else layout_rows in (1, 2)
        if not ok:
            raise ValueError(f"{path}: {layout_rows} spectrum rows do not fit NVISITS = {nvis} "
                             f"(expected {nvis + 2 if nvis > 1 else '1 or 2'}): wrong layout")
        if release in ("dr16", "dr14", "dr13", "dr12") and nvis == 1 and layout_rows == 2:
            raise ValueError(f"{path}: two-row single-visit apStar (DR17 layout) but release "
                             f"{release} was expected: wrong release layout?")
    wave = _grid(float(meta.get("crval1", CRVAL1)), float(meta.get("cdelt1", CDELT1)), npix)
    if "nwave" in meta and int(meta["nwave"]) != npix:
        raise ValueError(f"{path}: NWAVE = {meta['nwave']} but the images have {npix} pixels")
    rel, pid, tel, fld = (None, None, None, None)
    try:
        rel, pid, tel, fld = parse_apstar_path(path)
    except ValueError:
        pass
    meta.setdefault("apogee_id", pid)
    if tel is not None:
        meta.setdefault("telescope", tel)
    meta.setdefault("telescope", None)
    meta.setdefault("field", fld)
    meta["nvisits"] = nvis
    meta["release"] = release
    meta["path"] = path
    meta["layout_rows"] = layout_rows
    for k in ("crval1", "cdelt1", "nwave"):
        meta.pop(k, None)
    vf = ve = vm = None
    if visits:
        flux2, err2, pm2 = (np.atleast_2d(a) for a in (flux, err, pixmask))
        if layout_rows >= 3:
            vf, ve, vm = flux2[2:], err2[2:], pm2[2:]
        else:  # a single visit: the combined row is that visit
            vf, ve, vm = flux2[:1], err2[:1], pm2[:1]
        flux, err, pixmask = flux2[0], err2[0], pm2[0]
    return ApStar(flux=np.asarray(flux), err=np.asarray(err),
                  pixmask=np.asarray(pixmask).astype(np.int64, copy=False), wavelength=wave,
                  meta=meta, visit_flux=vf, visit_err=ve,
                  visit_pixmask=None if vm is None else vm.astype(np.int64, copy=False),
                  header=header)


def _strip(col):
    col = np.asarray(col)
    if col.dtype.kind == "S":
        return np.char.strip(np.char.decode(col, "ascii", errors="replace"))
    if col.dtype.kind == "U":
        return np.char.strip(col)
    return col


def read_allstar(path, columns=None, rows=None, labels=LAB_LABELS, release=None, ext=1,
                 optional=()):
    """Read the needed columns (and rows) of an allStar catalogue.

    Only the requested columns are read (fitsio ``columns=``, ``rows=``), so a
    several-GB DR17 catalogue costs a few hundred MB at most.  Missing labels
    become NaN whatever the release's convention (DR17 writes NaN, DR12-16
    write -9999): any float value <= -9998 is taken as missing.

    Parameters
    ----------
    path : str or os.PathLike
    columns : sequence of str, optional
        Columns to read; default APOGEE_ID, TELESCOPE, FIELD, SNR, ``labels``
        and their ``<label>_ERR`` columns (those only where the file has them).
        Columns named here must exist, except TELESCOPE/FIELD, which are
        optional cross-match keys.
    rows : array_like of int, optional
        Row numbers to read (all by default).
    labels : sequence of str
        Label columns added to the default ``columns``.
    release : str, optional
        Release ("dr17", "dr16", ...); inferred from the file name if omitted.
    ext : int
        The table HDU.
    optional : sequence of str
        Columns read when the file has them and skipped silently otherwise.

    Returns
    -------
    astropy.table.Table
        String columns decoded and stripped; ``meta["release"]`` and ``meta["path"]``.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file and the missing columns.
    """
    from astropy.table import Table

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: allStar catalogue not found")
    optional = ({"TELESCOPE", "FIELD"} | {f"{c}_ERR".upper() for c in labels}
                | {c.upper() for c in optional})
    if columns is None:  # the labels' errors are read when the catalogue has them
        columns = (["APOGEE_ID", "TELESCOPE", "FIELD", "SNR"] + list(labels)
                   + [f"{c}_ERR" for c in labels])
    columns = [c.upper() for c in columns] + sorted(optional - {"TELESCOPE", "FIELD"}
                                                    - {f"{c}_ERR".upper() for c in labels})
    columns = list(dict.fromkeys(columns))
    release = (release or release_of(path) or "unknown").lower()
    try:
        if fitsio is not None:
            with fitsio.FITS(path) as fh:
                if len(fh) <= ext:
                    raise ValueError(f"{path}: no table HDU {ext} (the file has {len(fh)} HDUs)")
                have = [c.upper() for c in fh[ext].get_colnames()]
                missing = [c for c in columns if c not in have and c not in optional]
                if missing:
                    raise ValueError(f"{path}: allStar lacks column(s) {', '.join(missing)} "
                                     f"(has {len(have)} columns, e.g. {', '.join(have[:8])})")
                use = [c for c in columns if c in have]
                data = fh[ext].read(columns=use, rows=rows)
        else:  # pragma: no cover
            from astropy.io import fits
            with fits.open(path, memmap=True) as hl:
                d = hl[ext].data
                have = [c.upper() for c in d.columns.names]
                missing = [c for c in columns if c not in have and c not in optional]
                if missing:
                    raise ValueError(f"{path}: allStar lacks column(s) {', '.join(missing)}")
                use = [c for c in columns if c in have]
                sel = slice(None) if rows is None else np.asarray(rows)
                data = {c: np.array(d[c][sel]) for c in use}
    except OSError as err:
        raise _open_error(path, err) from None
    t = Table()
    for c in use:
        col = _strip(data[c])
        if col.dtype.kind == "f":
            col = col.astype(col.dtype.newbyteorder("="), copy=True)
            with np.errstate(invalid="ignore"):
                col[col <= -9998.0] = np.nan
        t[c] = col
    t.meta["release"] = release
    t.meta["path"] = path
    return t


#: ``match_ids`` row of a star whose repeated catalogue rows tie and disagree in a label.
AMBIGUOUS_MATCH = -2


def match_ids(catalog, apogee_ids, telescopes=None, fields=None, labels=None):
    """Row of ``catalog`` for each star, by APOGEE_ID (+ TELESCOPE/FIELD where IDs repeat).

    When an ID occurs more than once (a star observed from both telescopes or in
    several fields), the rows whose TELESCOPE and FIELD agree with the star's are
    preferred; any remaining tie goes to the highest SNR. Rows still tied after
    that (the same SNR, or no SNR column) that disagree in one of ``labels``
    give no match: which of them is right cannot be told, and taking the first
    would pick one star's labels silently.

    Parameters
    ----------
    catalog : astropy.table.Table or mapping
        With an APOGEE_ID column, optionally TELESCOPE, FIELD, SNR.
    apogee_ids : sequence of str, shape (N,)
    telescopes, fields : sequence of str or None, shape (N,), optional
    labels : sequence of str, optional
        Catalogue columns that tied rows must agree in (NaN equals NaN).

    Returns
    -------
    ndarray of int64, shape (N,)
        Catalogue row, -1 where the ID is absent, ``AMBIGUOUS_MATCH`` (-2)
        where tied rows disagree in ``labels`` (:func:`match_conflicts` says how).
    """
    cat_ids = np.asarray(catalog["APOGEE_ID"]).astype(str)
    names = catalog.colnames if hasattr(catalog, "colnames") else list(catalog.keys())
    ctel = np.asarray(catalog["TELESCOPE"]).astype(str) if "TELESCOPE" in names else None
    cfld = np.asarray(catalog["FIELD"]).astype(str) if "FIELD" in names else None
    csnr = np.asarray(catalog["SNR"], float) if "SNR" in names else None
    clab = [np.asarray(catalog[c], float) for c in (labels or ()) if c in names]
    q = np.asarray(apogee_ids).astype(str)
    order, lo, hi = key_rows(cat_ids, q)
    out = np.full(len(q), -1, np.int64)
    for i in range(len(q)):
        n = hi[i] - lo[i]
        if n == 0:
            continue
        cand = order[lo[i]:hi[i]]
        if n > 1:
            for key, col in ((telescopes, ctel), (fields, cfld)):
                if key is not None and col is not None and key[i] is not None:
                    sub = cand[col[cand] == str(key[i])]
                    if len(sub):
                        cand = sub
            if len(cand) > 1 and csnr is not None:
                s = np.nan_to_num(csnr[cand], nan=-np.inf)
                cand = cand[s == s.max()]
            if len(cand) > 1 and any(_disagree(col[cand]) for col in clab):
                out[i] = AMBIGUOUS_MATCH
                continue
        out[i] = cand[0]
    return out


def _disagree(values):
    """Whether the values differ (NaN equal to NaN)."""
    nan = np.isnan(values)
    return bool(nan.any() and not nan.all()) or len(set(values[~nan].tolist())) > 1


def match_conflicts(catalog, apogee_id, labels):
    """Say how the catalogue rows of ``apogee_id`` disagree in ``labels`` (one line)."""
    names = catalog.colnames if hasattr(catalog, "colnames") else list(catalog.keys())
    rows = np.flatnonzero(np.asarray(catalog["APOGEE_ID"]).astype(str) == str(apogee_id))
    diffs = []
    for c in labels:
        if c in names:
            v = np.asarray(catalog[c], float)[rows]
            if _disagree(v):
                diffs.append(f"{c} " + " vs ".join(f"{x:g}" for x in v))
    return (f"star {apogee_id} has {len(rows)} allStar rows (rows {', '.join(map(str, rows))}) "
            f"that tie on TELESCOPE/FIELD/SNR and disagree ({'; '.join(diffs)}): "
            "ambiguous, left out")
