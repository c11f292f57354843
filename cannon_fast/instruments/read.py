"""Spectra of any instrument from files, on a :class:`~cannon_fast.core.grid.PixelGrid`.

Three kinds of file are read:

* FITS with image HDUs ``FLUX`` and ``IVAR`` (or ``ERROR``/``SIGMA``), the
  wavelengths in an HDU ``WAVE`` (or ``WAVELENGTH``, ``LOGLAM``) or in the flux
  header (``CRVAL1``/``CDELT1`` linear or ``COEFF0``/``COEFF1`` log10, the
  SDSS/LAMOST conventions), and optionally a table HDU ``LABELS`` with one row
  per spectrum (an ID column and labels);
* ``.npz`` with arrays ``flux``, ``ivar`` (or ``error``/``sigma``),
  ``wavelength`` (or ``wave``), optionally ``ids`` and ``labels`` +
  ``label_names``;
* plain text tables, one file per star, with columns wavelength, flux, error
  (:func:`read_spectrum_tables`).

Wavelengths may be one array for all spectra, or one row per spectrum (for
example rest-frame grids); the spectra are then interpolated onto the
requested grid. Errors name the file and, where it is one star's fault, the star.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..core.grid import PixelGrid

__all__ = ["Spectra", "read_spectra", "read_spectrum_tables", "resample_spectra"]

_FLUX_NAMES = ("FLUX",)
_IVAR_NAMES = ("IVAR",)
_ERROR_NAMES = ("ERROR", "ERR", "SIGMA", "FLUX_ERR")
_WAVE_NAMES = ("WAVE", "WAVELENGTH", "LAMBDA")
_LOGLAM_NAMES = ("LOGLAM",)
_MASK_NAMES = ("BITMASK", "PIXMASK")
#: Columns that identify a spectrum, in the order they are preferred.
ID_COLUMNS = ("ID", "INDEX", "OBSID", "TARGETID", "OBJID", "APOGEE_ID", "STAR")


@dataclass
class Spectra:
    """Spectra of one instrument on one pixel grid.

    Attributes
    ----------
    flux, ivar : ndarray, (N, P)
        Flux and inverse variance (0 where a pixel has no data).
    grid : PixelGrid
    ids : ndarray of str, (N,)
        One identifier per spectrum (the row number when the file has none).
    table : dict of ndarray
        The file's per-spectrum columns (IDs, labels, S/N, ...), each (N,).
    path : str
    normalized : bool
        Whether the flux is continuum-normalized (by the file or by the reader).
    """

    flux: np.ndarray
    ivar: np.ndarray
    grid: PixelGrid
    ids: np.ndarray
    table: dict = field(default_factory=dict)
    path: str = ""
    normalized: bool = False

    def __len__(self):
        return self.flux.shape[0]

    def labels(self, names):
        """(N, L) float array of the table columns ``names``.

        Raises
        ------
        KeyError
            Naming the file and the columns it lacks.
        """
        missing = [n for n in names if n not in self.table]
        if missing:
            raise KeyError(f"{self.path}: no column(s) {', '.join(missing)} in its table "
                           f"(it has {', '.join(self.table) or 'none'})")
        return np.column_stack([np.asarray(self.table[n], float) for n in names])

    def subset(self, rows):
        """The spectra of ``rows`` (indices or a boolean mask), as a new :class:`Spectra`."""
        rows = np.asarray(rows)
        return Spectra(self.flux[rows], self.ivar[rows], self.grid, self.ids[rows],
                       {k: np.asarray(v)[rows] for k, v in self.table.items()}, self.path,
                       self.normalized)


# ----------------------------------------------------------------------------- public readers
def read_spectra(path, grid=None, *, resolution=None, id_column=None, normalize=False,
                 continuum_pixels=None, degree=2, dtype=np.float32, bad_pixels=None):
    """Read a FITS or ``.npz`` file of spectra onto a pixel grid.

    Parameters
    ----------
    path : str or os.PathLike
    grid : PixelGrid, optional
        The grid wanted. Default: the file's own wavelengths (a built-in APOGEE
        grid when they are one). When given and the file's wavelengths differ,
        the spectra are interpolated onto it (pixels outside the file's range
        get ``ivar = 0``).
    resolution : float or array_like, optional
        Resolving power for the file's own grid (FITS header ``RESOL``-like
        values are not parsed: pass it here).
    id_column : str, optional
        Table column that identifies each spectrum; default the first of
        ``ID_COLUMNS`` present, else the row number.
    normalize : bool
        Continuum-normalize per grid segment (Chebyshev of ``degree`` through
        ``continuum_pixels``, all pixels when None). Files whose header says
        ``FLUXNORM = T`` are left as they are.
    continuum_pixels : array_like of bool (P,) or indices, optional
    degree : int
    dtype : numpy dtype
        Float type of flux and ivar.
    bad_pixels : callable, optional
        ``bitmask (N, P) -> bool (N, P)``: pixels to mask (``ivar = 0``) before
        anything else, from the file's ``BITMASK``/``PIXMASK`` array (e.g.
        :func:`cannon_fast.apogee.bitmask.bad_pixel_mask`); the reader itself
        knows no instrument's bits. A file without one is an error.

    Returns
    -------
    Spectra

    Raises
    ------
    ValueError
        On a file without wavelengths whose pixel count matches no built-in grid,
        wavelengths not increasing (naming the star when they are per spectrum),
        arrays of mismatched shapes, or flux/ivar not finite where ivar > 0.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    ext = path.lower()
    if ext.endswith(".npz"):
        raw = _read_npz(path)
    elif ext.endswith((".fits", ".fit", ".fits.gz", ".fts")):
        raw = _read_fits(path)
    else:
        raise ValueError(f"{path}: not a FITS or .npz file (for one text table per star use "
                         "read_spectrum_tables)")
    if bad_pixels is not None:
        if raw.get("bitmask") is None:
            raise ValueError(f"{path}: bad_pixels given but the file has no BITMASK or PIXMASK")
        raw["bad"] = np.asarray(bad_pixels(np.asarray(raw["bitmask"])), bool)
    return _assemble(path, raw, grid, resolution, id_column, normalize, continuum_pixels,
                     degree, dtype)


def read_spectrum_tables(paths, grid=None, *, resolution=None, columns=(0, 1, 2),
                         error_kind="error", normalize=False, continuum_pixels=None, degree=2,
                         dtype=np.float32):
    """Read plain text tables, one star per file (wavelength, flux, error columns).

    The star's ID is the file name without its extension. Files on different
    wavelengths are interpolated onto ``grid`` (default: the first file's).

    Parameters
    ----------
    paths : sequence of str or os.PathLike
    grid : PixelGrid, optional
    resolution : float or array_like, optional
    columns : (int, int, int)
        Column numbers of wavelength (Angstrom), flux and its error.
    error_kind : {"error", "ivar"}
        Whether the third column is a 1-sigma error or an inverse variance.
    normalize, continuum_pixels, degree, dtype
        As for :func:`read_spectra`.

    Returns
    -------
    Spectra
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no spectrum tables given")
    if error_kind not in ("error", "ivar"):
        raise ValueError(f"error_kind must be 'error' or 'ivar', got {error_kind!r}")
    waves, fluxes, ivars, ids = [], [], [], []
    for p in paths:
        try:
            data = np.loadtxt(p, usecols=columns, ndmin=2, comments="#",
                              delimiter="," if p.lower().endswith(".csv") else None)
        except (ValueError, IndexError) as err:
            raise ValueError(f"{p}: cannot read columns {columns} as numbers: {err}") from None
        w, f, e = data.T
        waves.append(w)
        fluxes.append(f)
        with np.errstate(divide="ignore"):
            ivars.append(e if error_kind == "ivar" else np.where(e > 0, 1.0 / e ** 2, 0.0))
        ids.append(os.path.splitext(os.path.basename(p))[0])
    ids = np.array(ids)
    source = paths[0] if len(paths) == 1 else f"{os.path.dirname(paths[0]) or '.'}/"
    for w, star, p in zip(waves, ids, paths):
        _check_increasing(w, p, star)
    same = all(w.shape == waves[0].shape and np.allclose(w, waves[0], rtol=1e-10, atol=0)
               for w in waves)
    if same:
        raw = dict(flux=np.array(fluxes), ivar=np.array(ivars), wave=waves[0], table={},
                   ids=ids, fluxnorm=False)
        return _assemble(source, raw, grid, resolution, None, normalize, continuum_pixels,
                         degree, dtype)
    target = grid if grid is not None else _own_grid(waves[0], resolution, paths[0])
    flux = np.zeros((len(paths), target.n_pixels))
    ivar = np.zeros_like(flux)
    for i, (w, f, v) in enumerate(zip(waves, fluxes, ivars)):
        flux[i], ivar[i] = resample_spectra(w, f[None], v[None], target.wavelength)
    raw = dict(flux=flux, ivar=ivar, wave=target.wavelength, table={}, ids=ids, fluxnorm=False)
    return _assemble(source, raw, target, resolution, None, normalize, continuum_pixels,
                     degree, dtype)


def resample_spectra(wave, flux, ivar, new_wave):
    """Linearly interpolate spectra onto new wavelengths, carrying the variance along.

    A new pixel takes the flux interpolated between its two neighbours and the
    variance interpolated the same way; it gets ``ivar = 0`` outside the old
    range or when either neighbour has no data.

    Parameters
    ----------
    wave : array_like, (P,)
        Increasing wavelengths of ``flux``.
    flux, ivar : array_like, (N, P)
    new_wave : array_like, (Q,)

    Returns
    -------
    flux, ivar : ndarray, (N, Q)
    """
    wave = np.asarray(wave, float)
    flux = np.atleast_2d(np.asarray(flux, float))
    ivar = np.atleast_2d(np.asarray(ivar, float))
    new_wave = np.asarray(new_wave, float)
    j = np.clip(np.searchsorted(wave, new_wave) - 1, 0, wave.size - 2)
    t = (new_wave - wave[j]) / (wave[j + 1] - wave[j])
    inside = (new_wave >= wave[0]) & (new_wave <= wave[-1])
    good = (ivar > 0) & np.isfinite(flux)
    f0, f1 = np.where(good, flux, 0.0)[:, j], np.where(good, flux, 0.0)[:, j + 1]
    with np.errstate(divide="ignore"):
        var = np.where(good, 1.0 / np.where(good, ivar, 1.0), np.inf)
    out_f = (1 - t) * f0 + t * f1
    # the interpolated flux is a weighted sum: its variance is the same sum of squares
    out_v = (1 - t) ** 2 * var[:, j] + t ** 2 * var[:, j + 1]
    ok = inside & good[:, j] & good[:, j + 1]
    with np.errstate(divide="ignore"):
        out_i = np.where(ok, 1.0 / np.where(ok, out_v, 1.0), 0.0)
    return np.where(ok, out_f, 1.0), out_i


# ----------------------------------------------------------------------------- file formats
def _first(names, available):
    up = {a.upper(): a for a in available}
    for n in names:
        if n in up:
            return up[n]
    return None


def _read_npz(path):
    with np.load(path, allow_pickle=False) as d:
        keys = list(d.files)
        fk = _first(_FLUX_NAMES, keys)
        if fk is None:
            raise ValueError(f"{path}: no 'flux' array (it has {', '.join(keys)})")
        raw = dict(flux=d[fk], table={}, fluxnorm=None)
        ik, ek = _first(_IVAR_NAMES, keys), _first(_ERROR_NAMES, keys)
        if ik is not None:
            raw["ivar"] = d[ik]
        elif ek is not None:
            raw["error"] = d[ek]
        else:
            raise ValueError(f"{path}: no 'ivar' or 'error' array (it has {', '.join(keys)})")
        wk = _first(_WAVE_NAMES, keys)
        if wk is not None:
            raw["wave"] = d[wk]
        mk = _first(_MASK_NAMES, keys)
        if mk is not None:
            raw["bitmask"] = d[mk]
        for k in keys:  # every ID column is kept (e.g. OBSID and the APOGEE_ID to match by)
            if k.upper() in ID_COLUMNS or k.upper() == "IDS":
                raw["table"][k.upper()] = np.asarray(d[k]).astype(str)
        idk = _first(ID_COLUMNS + ("IDS",), keys)
        if idk is not None:
            raw["ids"] = raw["table"][idk.upper()]
        if "labels" in keys and "label_names" in keys:
            lab = np.atleast_2d(d["labels"])
            for j, n in enumerate(np.asarray(d["label_names"]).astype(str)):
                raw["table"][str(n)] = lab[:, j]
    return raw


def _read_fits(path):
    import fitsio

    raw = dict(table={}, fluxnorm=None)
    with fitsio.FITS(path) as f:
        names = [h.get_extname() for h in f]
        fk = _first(_FLUX_NAMES, names)
        if fk is None:
            raise ValueError(f"{path}: no FLUX HDU (HDUs: {', '.join(n or '-' for n in names)})")
        raw["flux"] = f[fk].read()
        head = f[fk].read_header()
        prim = f[0].read_header()
        raw["fluxnorm"] = prim.get("FLUXNORM", head.get("FLUXNORM"))
        ik, ek = _first(_IVAR_NAMES, names), _first(_ERROR_NAMES, names)
        if ik is not None:
            raw["ivar"] = f[ik].read()
        elif ek is not None:
            raw["error"] = f[ek].read()
        else:
            raise ValueError(f"{path}: no IVAR or ERROR HDU (HDUs: "
                             f"{', '.join(n or '-' for n in names)})")
        wk, lk = _first(_WAVE_NAMES, names), _first(_LOGLAM_NAMES, names)
        if wk is not None:
            raw["wave"] = f[wk].read()
        elif lk is not None:
            raw["wave"] = 10.0 ** f[lk].read()
        else:
            raw["wave"] = _wave_from_header(head, np.shape(raw["flux"])[-1])
        mk = _first(_MASK_NAMES, names)
        if mk is not None:
            raw["bitmask"] = f[mk].read()
        tk = _first(("LABELS", "TABLE", "CATALOG"), names)
        if tk is not None:
            tab = f[tk].read()
            for c in tab.dtype.names:
                col = tab[c]
                raw["table"][c] = np.char.strip(col.astype(str)) if col.dtype.kind in "SU" else col
    return raw


def _wave_from_header(head, n):
    """Wavelengths from a linear (CRVAL1/CDELT1) or log10 (COEFF0/COEFF1) header, or None."""
    if "COEFF0" in head and "COEFF1" in head:
        return 10.0 ** (float(head["COEFF0"]) + float(head["COEFF1"]) * np.arange(n))
    if "CRVAL1" in head and "CDELT1" in head:
        crpix = float(head.get("CRPIX1", 1.0))
        x = float(head["CRVAL1"]) + float(head["CDELT1"]) * (np.arange(n) + 1 - crpix)
        # SDSS writes log10 lambda into CRVAL1 with DC-FLAG = 1
        return 10.0 ** x if int(head.get("DC-FLAG", 0)) == 1 or x[-1] < 10 else x
    return None


# ----------------------------------------------------------------------------- assembly
def _check_increasing(wave, path, star=None):
    wave = np.asarray(wave, float)
    step = np.diff(wave)
    bad = np.flatnonzero(~(step > 0))
    if bad.size:
        i = int(bad[0])
        who = f" star {star}:" if star is not None else ""
        raise ValueError(f"{path}:{who} wavelengths must increase, but pixel {i + 1} "
                         f"({wave[i + 1]:.4f} A) does not follow pixel {i} ({wave[i]:.4f} A)")
    if not np.all(np.isfinite(wave)):
        who = f" star {star}:" if star is not None else ""
        raise ValueError(f"{path}:{who} wavelengths are not all finite")


def _own_grid(wave, resolution, path):
    _check_increasing(wave, path)
    return PixelGrid.from_wavelength(wave, resolution=resolution,
                                     name=os.path.basename(os.fspath(path)))


def _unknown_grid(path, n_pix):
    return ValueError(
        f"{path}: the {n_pix}-pixel spectra carry no wavelengths (no WAVE HDU or array, no "
        "CRVAL1/CDELT1 or COEFF0/COEFF1 header) and match no built-in grid (APOGEE 8575, "
        "7514 or 7214 pixels); pass grid=PixelGrid(...) for this instrument")


def _assemble(path, raw, grid, resolution, id_column, normalize, continuum_pixels, degree,
              dtype):
    flux = np.atleast_2d(np.asarray(raw["flux"], np.float64))
    n, p = flux.shape
    if "ivar" in raw:
        ivar = np.atleast_2d(np.asarray(raw["ivar"], np.float64))
    else:
        err = np.atleast_2d(np.asarray(raw["error"], np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            ivar = np.where(np.isfinite(err) & (err > 0), 1.0 / err ** 2, 0.0)
    if ivar.shape != flux.shape:
        raise ValueError(f"{path}: flux {flux.shape} and ivar/error {ivar.shape} differ in shape")
    if raw.get("bad") is not None:
        if raw["bad"].shape != flux.shape:
            raise ValueError(f"{path}: the bitmask {raw['bad'].shape} does not match the flux "
                             f"{flux.shape}")
        ivar = np.where(raw["bad"], 0.0, ivar)
    table = {k: np.asarray(v) for k, v in raw.get("table", {}).items()}
    for k, v in table.items():
        if len(v) != n:
            raise ValueError(f"{path}: column {k} has {len(v)} rows but there are {n} spectra")
    # IDs may repeat (repeat visits): the cross-match decides what a repeat means
    ids = _ids(raw, table, id_column, n, path)
    wave = raw.get("wave")
    if wave is None:
        own = grid if grid is not None and grid.n_pixels == p else PixelGrid.builtin(p)
        if own is None:
            raise _unknown_grid(path, p)
        wave = own.wavelength
    wave = np.asarray(wave, np.float64)
    if wave.ndim == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim == 2:  # one wavelength array per spectrum: interpolate each onto the grid
        if wave.shape != flux.shape:
            raise ValueError(f"{path}: per-spectrum wavelengths {wave.shape} do not match the "
                             f"flux {flux.shape}")
        for i in range(n):
            _check_increasing(wave[i], path, ids[i])
        target = grid if grid is not None else _own_grid(wave[0], resolution, path)
        out_f = np.empty((n, target.n_pixels))
        out_i = np.empty((n, target.n_pixels))
        for i in range(n):
            out_f[i], out_i[i] = resample_spectra(wave[i], flux[i], ivar[i], target.wavelength)
        flux, ivar, grid = out_f, out_i, target
    else:
        if wave.shape != (p,):
            raise ValueError(f"{path}: {wave.size} wavelengths for {p}-pixel spectra")
        own = _own_grid(wave, resolution, path)
        if grid is None:
            grid = own
        elif not (grid.n_pixels == p and np.allclose(grid.wavelength, wave, rtol=1e-9, atol=0)):
            flux, ivar = resample_spectra(wave, flux, ivar, grid.wavelength)
    bad = (ivar > 0) & ~np.isfinite(flux)
    if bad.any():
        from .._util import describe_bad
        raise ValueError(f"{path}: flux not finite where ivar > 0 in {describe_bad(bad)}")
    if np.any(~np.isfinite(ivar) | (ivar < 0)):
        from .._util import describe_bad
        raise ValueError(f"{path}: ivar negative or not finite in "
                         f"{describe_bad(~np.isfinite(ivar) | (ivar < 0))}")
    flux = np.where(ivar > 0, flux, 1.0)
    normalized = bool(raw.get("fluxnorm"))
    if normalize and not normalized:
        flux, ivar = _normalize(flux, ivar, grid, continuum_pixels, degree, path)
        normalized = True
    return Spectra(flux.astype(dtype), ivar.astype(dtype), grid, ids, table, path, normalized)


def _ids(raw, table, id_column, n, path):
    if id_column is not None:
        if id_column not in table:
            raise ValueError(f"{path}: no ID column {id_column!r} (columns: "
                             f"{', '.join(table) or 'none'})")
        col = table[id_column]
    elif raw.get("ids") is not None:
        col = raw["ids"]
    else:
        key = next((c for c in ID_COLUMNS if c in table), None)
        col = table[key] if key is not None else np.arange(n)
    return np.char.strip(np.asarray(col).astype(str))


def _normalize(flux, ivar, grid, continuum_pixels, degree, path):
    """Per-segment Chebyshev pseudo-continuum (the core's), through the given pixels."""
    from ..core.continuum import normalize

    cont = (grid.in_segment if continuum_pixels is None else continuum_pixels)
    try:
        res = normalize(flux, ivar, cont, degree=degree, segments=grid, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: continuum normalization failed: {err}") from None
    return res.flux, res.ivar
