"""SpectraStore: an on-disk, memory-mappable set of normalized spectra.

A store is a directory::

    index.json       format version, committed row count, label names, metadata
    wavelength.npy   (P,)    float64, vacuum Angstrom
    flux.npy         (N, P)  float32, normalized flux
    ivar.npy         (N, P)  float32, inverse variance (0 = no weight)
    labels.npy       (N, L)  float64 (NaN where unknown)
    label_errors.npy (N, L)  float64, the catalogue's 1-sigma label errors (NaN where unknown;
                             absent in stores written before it existed: read as NaN)
    ids.npy          (N,)    fixed-width unicode star identifiers
    flags.npy        (N,)    int64 per-star flag bits (e.g. continuum flags)

Every array is a plain ``.npy`` file (no pickle) that ``np.load(...,
mmap_mode="r")`` maps, so the model, the fitting and the survey runner can
share a survey larger than memory.  ``index.json`` is the commit record:
appending writes the new rows, then grows each ``.npy`` header, then replaces
``index.json`` atomically; a reader trusts only the rows ``index.json``
counts, so a writer killed mid-append leaves the store as it was.

A store built in several steps (``cannon-fast prepare``) is created with
``complete=False``: ``index.json`` then says ``"complete": false`` until the
writer calls :meth:`SpectraStore.mark_complete`, and opening such a store for
reading is an error, so an interrupted build is never used as if it held the
whole data set.  Stores without the key (made by :meth:`SpectraStore.create`
with the default, or before the key existed) are complete.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import numpy as np

from ._util import atomic_path

__all__ = ["SpectraStore"]

_FORMAT = "cannon_fast.SpectraStore"
_VERSION = 1
_HEADER = 256  # fixed .npy header size, so the row count can grow in place
_ROW_ARRAYS = ("flux", "ivar", "labels", "label_errors", "ids", "flags")


def _npy_header(dtype, shape):
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    body = ("{'descr': %r, 'fortran_order': False, 'shape': %r, }"
            % (descr, tuple(int(s) for s in shape))).encode("latin1")
    pad = _HEADER - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit the fixed .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER - 10) + body + b" " * pad + b"\n"


def _write_growable(path, arr):
    """Write ``arr`` as a .npy file whose header leaves room for more rows."""
    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as fh:
        fh.write(_npy_header(arr.dtype, arr.shape))
        fh.write(arr.tobytes())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


class SpectraStore:
    """A directory of normalized spectra, labels and IDs, memory-mapped on read.

    Parameters
    ----------
    path : str or os.PathLike
        The store directory (made by :meth:`create` or :meth:`write`).
    mode : {"r", "a"}
        ``"a"`` allows :meth:`append` and :meth:`update_meta`.

    Examples
    --------
    >>> store = SpectraStore.write("train.store", flux, ivar, wave, labels,   # doctest: +SKIP
    ...                            ["TEFF", "LOGG"], ids)
    >>> s = SpectraStore("train.store")                                      # doctest: +SKIP
    >>> s.flux[:100]     # (100, P) float32, read from disk on demand         # doctest: +SKIP
    """

    def __init__(self, path, mode="r"):
        self.path = os.fspath(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.mode = mode
        idx = os.path.join(self.path, "index.json")
        if not os.path.exists(idx):
            raise FileNotFoundError(f"{self.path}: not a SpectraStore (no index.json)")
        with open(idx) as fh:
            self._index = json.load(fh)
        if self._index.get("format") != _FORMAT:
            raise ValueError(f"{idx}: not a SpectraStore index")
        if self._index.get("version", 0) > _VERSION:
            raise ValueError(f"{idx}: store format version {self._index['version']} is newer than "
                             f"this cannon_fast ({_VERSION})")
        if mode == "r" and not self.complete:
            raise ValueError(f"{self.path}: incomplete: prepare was interrupted; rerun it")
        self._cache = {}

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path, wavelength, label_names=(), id_width=40, meta=None, overwrite=False,
               complete=True):
        """Create an empty store (atomically: a complete directory or nothing).

        Parameters
        ----------
        path : str or os.PathLike
        wavelength : array_like, shape (P,)
        label_names : sequence of str
        id_width : int
            Longest ID in characters.
        meta : dict, optional
            JSON-serializable metadata (cut report, continuum settings, ...).
        overwrite : bool
            Replace an existing store.
        complete : bool
            ``False`` marks the store incomplete until :meth:`mark_complete`:
            until then it opens only in append mode.

        Returns
        -------
        SpectraStore
            Opened in append mode.
        """
        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path}: already exists (use overwrite=True)")
        wave = np.ascontiguousarray(wavelength, dtype=np.float64)
        if wave.ndim != 1:
            raise ValueError(f"wavelength must be 1-D, got shape {wave.shape}")
        p = wave.size
        label_names = [str(x) for x in label_names]
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".part",
                               dir=parent)
        try:
            np.save(os.path.join(tmp, "wavelength.npy"), wave, allow_pickle=False)
            empties = {"flux": np.zeros((0, p), np.float32), "ivar": np.zeros((0, p), np.float32),
                       "labels": np.zeros((0, len(label_names)), np.float64),
                       "label_errors": np.zeros((0, len(label_names)), np.float64),
                       "ids": np.zeros(0, f"<U{int(id_width)}"), "flags": np.zeros(0, np.int64)}
            for k, a in empties.items():
                _write_growable(os.path.join(tmp, f"{k}.npy"), a)
            index = dict(format=_FORMAT, version=_VERSION, n_stars=0, n_pixels=p,
                         label_names=label_names, id_width=int(id_width), meta=meta or {})
            if not complete:
                index["complete"] = False
            with open(os.path.join(tmp, "index.json"), "w") as fh:
                json.dump(index, fh, indent=1, default=_json_default)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, mode="a")

    @classmethod
    def write(cls, path, flux, ivar, wavelength, labels=None, label_names=(), ids=None,
              flags=None, meta=None, overwrite=False, label_errors=None):
        """Create a store holding the given spectra.

        Parameters
        ----------
        path : str or os.PathLike
        flux, ivar : array_like, shape (N, P)
        wavelength : array_like, shape (P,)
        labels : array_like, shape (N, L), optional
        label_names : sequence of str
        ids : sequence of str, shape (N,), optional
        flags : array_like of int, shape (N,), optional
        meta : dict, optional
        overwrite : bool
        label_errors : array_like, shape (N, L), optional

        Returns
        -------
        SpectraStore
            Opened read-only.
        """
        width = 40
        if ids is not None and len(ids):
            width = max(width, max(len(str(x)) for x in ids))
        s = cls.create(path, wavelength, label_names, id_width=width, meta=meta,
                       overwrite=overwrite)
        s.append(flux, ivar, labels, ids, flags, label_errors=label_errors)
        return cls(path)

    # ------------------------------------------------------------------ appending
    def append(self, flux, ivar, labels=None, ids=None, flags=None, label_errors=None):
        """Append rows (a chunk of stars) and commit them.

        Parameters
        ----------
        flux, ivar : array_like, shape (n, P)
        labels : array_like, shape (n, L), optional
            NaN if omitted.
        ids : sequence of str, shape (n,), optional
            Empty strings if omitted.
        flags : array_like of int, shape (n,), optional
            Zeros if omitted.
        label_errors : array_like, shape (n, L), optional
            1-sigma errors of ``labels``; NaN if omitted.

        Returns
        -------
        int
            The total number of rows after the append.
        """
        if self.mode != "a":
            raise ValueError(f"{self.path}: store opened read-only; use mode='a' to append")
        flux = np.ascontiguousarray(np.atleast_2d(flux), dtype=np.float32)
        ivar = np.ascontiguousarray(np.atleast_2d(ivar), dtype=np.float32)
        n, p = flux.shape
        if p != self.n_pixels or ivar.shape != flux.shape:
            raise ValueError(f"{self.path}: appending flux {flux.shape} / ivar {ivar.shape}; the "
                             f"store has {self.n_pixels} pixels")
        if n == 0:   # e.g. a prepare chunk whose every file failed: nothing to commit
            return self.n_stars
        L = len(self.label_names)
        labels = (np.full((n, L), np.nan) if labels is None
                  else np.ascontiguousarray(labels, dtype=np.float64).reshape(n, -1))
        if labels.shape != (n, L):
            raise ValueError(f"{self.path}: labels shape {labels.shape}, expected ({n}, {L})")
        label_errors = (np.full((n, L), np.nan) if label_errors is None
                        else np.ascontiguousarray(label_errors, dtype=np.float64).reshape(n, -1))
        if label_errors.shape != (n, L):
            raise ValueError(f"{self.path}: label_errors shape {label_errors.shape}, expected "
                             f"({n}, {L})")
        width = int(self._index["id_width"])
        ids = np.asarray([""] * n if ids is None else [str(x) for x in ids])
        if ids.shape != (n,):
            raise ValueError(f"{self.path}: {ids.shape[0]} ids for {n} spectra")
        if n and max(len(x) for x in ids) > width:
            raise ValueError(f"{self.path}: an ID is longer than the store's {width} characters")
        ids = ids.astype(f"<U{width}")
        flags = (np.zeros(n, np.int64) if flags is None
                 else np.ascontiguousarray(flags, dtype=np.int64).reshape(n))
        old = int(self._index["n_stars"])
        new = old + n
        self._cache.clear()
        fn = os.path.join(self.path, "label_errors.npy")
        if not os.path.exists(fn):  # a store written before label errors were kept
            _write_growable(fn, np.full((old, L), np.nan))
        for name, arr in (("flux", flux), ("ivar", ivar), ("labels", labels),
                          ("label_errors", label_errors), ("ids", ids), ("flags", flags)):
            fn = os.path.join(self.path, f"{name}.npy")
            row = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
            with open(fn, "r+b") as fh:
                fh.truncate(_HEADER + old * row)   # drop rows of an interrupted append
                fh.seek(_HEADER + old * row)
                fh.write(arr.tobytes())
                fh.seek(0)
                fh.write(_npy_header(arr.dtype, (new,) + arr.shape[1:]))
                fh.flush()
                os.fsync(fh.fileno())
        self._index["n_stars"] = new
        self._write_index()
        return new

    def update_meta(self, **items):
        """Merge JSON-serializable items into the store's metadata (atomically)."""
        if self.mode != "a":
            raise ValueError(f"{self.path}: store opened read-only; use mode='a'")
        self._index["meta"].update(items)
        self._write_index()

    def mark_complete(self):
        """Mark a store created with ``complete=False`` as whole (atomically)."""
        if self.mode != "a":
            raise ValueError(f"{self.path}: store opened read-only; use mode='a'")
        self._index["complete"] = True
        self._write_index()

    def _write_index(self):
        with atomic_path(os.path.join(self.path, "index.json")) as tmp:
            with open(tmp, "w") as fh:
                json.dump(self._index, fh, indent=1, default=_json_default)

    # ------------------------------------------------------------------ reading
    def _array(self, name):
        a = self._cache.get(name)
        if a is None:
            fn = os.path.join(self.path, f"{name}.npy")
            if name == "label_errors" and not os.path.exists(fn):  # an older store
                a = np.full((self.n_stars, len(self.label_names)), np.nan)
                self._cache[name] = a
                return a
            try:
                a = np.load(fn, mmap_mode="r", allow_pickle=False)
            except ValueError:  # zero-size arrays cannot be memory-mapped
                a = np.load(fn, allow_pickle=False)
            n = self.n_stars
            if name in _ROW_ARRAYS:
                if a.shape[0] < n:
                    raise ValueError(f"{fn}: holds {a.shape[0]} rows, index.json commits {n}")
                a = a[:n]
            self._cache[name] = a
        return a

    @property
    def n_stars(self):
        """Committed number of spectra N."""
        return int(self._index["n_stars"])

    @property
    def complete(self):
        """False while a multi-step build (``complete=False``) is unfinished."""
        return bool(self._index.get("complete", True))

    @property
    def n_pixels(self):
        """Pixels per spectrum P."""
        return int(self._index["n_pixels"])

    @property
    def label_names(self):
        """Label names (L,)."""
        return list(self._index["label_names"])

    @property
    def meta(self):
        """Metadata dict (read from index.json)."""
        return self._index["meta"]

    @property
    def flux(self):
        """Normalized flux, (N, P) float32, memory-mapped."""
        return self._array("flux")

    @property
    def ivar(self):
        """Inverse variance, (N, P) float32, memory-mapped."""
        return self._array("ivar")

    @property
    def labels(self):
        """Labels, (N, L) float64."""
        return self._array("labels")

    @property
    def label_errors(self):
        """1-sigma label errors, (N, L) float64 (NaN where unknown)."""
        return self._array("label_errors")

    @property
    def ids(self):
        """Star IDs, (N,) str."""
        return self._array("ids")

    @property
    def flags(self):
        """Per-star flag bits, (N,) int64."""
        return self._array("flags")

    @property
    def wavelength(self):
        """Vacuum wavelengths, (P,) float64."""
        return self._array("wavelength")

    def __len__(self):
        return self.n_stars

    def __getitem__(self, rows):
        """Rows as in-memory arrays: dict with flux, ivar, labels, label_errors, ids, flags."""
        return {k: np.array(self._array(k)[rows]) for k in _ROW_ARRAYS}

    def __repr__(self):
        return (f"SpectraStore({self.path!r}: {self.n_stars} spectra x {self.n_pixels} pixels, "
                f"labels {self.label_names})")
