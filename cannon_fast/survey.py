"""Survey-scale labeling: chunked, out-of-core, resumable; optionally on a Dask cluster.

:func:`label_survey` reads the input spectra in chunks of ``chunk_size`` stars,
masks and pseudo-continuum normalizes raw spectra (already-normalized
SpectraStores go straight to the fit), fits labels with the batched fast path
(:func:`cannon_fast.core.fitting.fit_cannon`) and commits each chunk's results as
one part file, written atomically (:func:`cannon_fast._util.atomic_path`)::

    CATALOG.parts/manifest.json      the job: model hash, inputs, chunk size, options
    CATALOG.parts/chunk-000000.npz   one committed chunk (plain arrays, no pickle)
    ...

A part file either exists complete or not at all, so a job killed at any
moment (SIGINT, SIGKILL, a full disk) loses at most the chunks in flight:
re-running the same command fits only the missing chunks.  When every chunk
is committed the parts are merged, in chunk order, into ``CATALOG`` (FITS via
fitsio, or Parquet), written atomically, and the parts directory is removed.
Each chunk is fitted exactly as in an uninterrupted run (same rows, same
batches), so a resumed catalog has byte-identical label columns.

Every input spectrum gives one catalogue row, also when it cannot be used: a
missing or corrupt file, a spectrum whose continuum cannot be fitted, or a
fit that fails keeps its row with NaN labels, a flag bit and a ``REASON``.

A catalogue records the hash of the model that made it (:func:`model_hash`)
and the jobs merged into it; labeling more inputs into an existing catalogue
appends rows, and a model with a different hash is refused.

With ``scheduler="dask"`` (a ``distributed.LocalCluster``), a scheduler
address or a ``distributed.Client``, the chunks become tasks: the model is
scattered to every worker once, each worker reads its own chunk from the
(shared) file system, and the driver commits the returned results exactly as
the single-process path does, so resuming works the same way.
"""
from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import json
import os
import shutil
import time

import numpy as np

from ._util import atomic_path, progress
from .core.fitting import FLAGS as _FIT_FLAG_BITS
from .core.fitting import INFORMATIONAL_FLAGS, _check_broadening

__all__ = ["SURVEY_FLAGS", "ALL_FLAGS", "DEFAULT_CHUNK_SIZE", "SurveyError", "SurveySummary",
           "model_hash", "open_inputs", "label_survey", "process_chunk", "read_catalog"]

#: Flag bits the survey runner adds to the fit's (``FitResult.FLAGS``, bits below 256) in the
#: catalogue's ``FLAGS`` column.
SURVEY_FLAGS = {"READ_FAILED": 256, "NORMALIZATION_FAILED": 512, "CONTINUUM_WARNING": 1024}
#: Stars per chunk by default (a peak of about 0.85 GB on the 8575-pixel grid).
DEFAULT_CHUNK_SIZE = 2048
#: Stars per call to the fit inside a chunk: a multiple of the fit's own batch (512), so
#: the batches and hence the results do not depend on this number.
_FIT_SLICE = 1024
_FORMAT = "cannon_fast.survey"
_VERSION = 1
#: Every bit of the catalogue's ``FLAGS`` column: the fit's, then the survey runner's.
ALL_FLAGS = {**_FIT_FLAG_BITS, **SURVEY_FLAGS}


class SurveyError(RuntimeError):
    """A survey job cannot start or continue (the message says why and what is kept)."""


@dataclasses.dataclass
class SurveySummary:
    """What a :func:`label_survey` job did.

    Attributes
    ----------
    catalog : str
        The output catalogue.
    n_read : int
        Input stars (files or rows) read by this job.
    n_spectra : int
        Catalogue rows of this job (stars, plus visits with ``visits=True``).
    n_fitted : int
        Rows with finite labels.
    n_flagged : int
        Fitted rows with a flag bit set that marks a problem (see ``ALL_FLAGS``;
        ``fitting.INFORMATIONAL_FLAGS`` such as DEBIAS_CAPPED do not count).
    n_failed : int
        Rows without labels (unreadable, not normalizable, or the fit failed).
    n_chunks, n_resumed : int
        Chunks of the job, and how many were already committed when it started.
    catalog_rows : int
        Rows in the catalogue after the job (earlier jobs included).
    elapsed : float
        Wall-clock seconds of this call.
    failures : list of (str, str)
        (ID, reason) of failed rows (at most 100).
    already_done : bool
        The catalogue already held this job; nothing was fitted.
    """

    catalog: str
    n_read: int = 0
    n_spectra: int = 0
    n_fitted: int = 0
    n_flagged: int = 0
    n_failed: int = 0
    n_chunks: int = 0
    n_resumed: int = 0
    catalog_rows: int = 0
    elapsed: float = 0.0
    failures: list = dataclasses.field(default_factory=list)
    already_done: bool = False

    def report(self):
        """Return a few lines for humans: the counts and the first failures."""
        lines = []
        if self.already_done:
            lines.append(f"{self.catalog}: this job is already in the catalogue; nothing to do")
        rate = self.n_read / self.elapsed if self.elapsed > 0 else float("nan")
        lines.append(f"read {self.n_read} stars ({self.n_spectra} spectra): fitted "
                     f"{self.n_fitted}, flagged {self.n_flagged}, failed {self.n_failed}; "
                     f"{self.n_chunks} chunks ({self.n_resumed} resumed) in "
                     f"{self.elapsed:.1f} s ({rate:.0f} stars/s this run)")
        lines.append(f"catalogue {self.catalog}: {self.catalog_rows} rows")
        for sid, why in self.failures[:10]:
            lines.append(f"  failed: {sid}: {why}")
        if self.n_failed > 10:
            lines.append(f"  ... and {self.n_failed - 10} more failed (see the REASON column)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- model identity
def model_hash(model):
    """Return a 16-hex-digit hash of everything that determines a model's fitted labels.

    Label names, order, coefficients, scatter, their covariance, pixel flags,
    label scaling and training labels (which set the bounds and starting points).

    Parameters
    ----------
    model : CannonModel
        A trained model.

    Returns
    -------
    str
    """
    h = hashlib.sha256()
    h.update(json.dumps([list(model.label_names), int(model.order)]).encode())
    if getattr(model, "extra_terms", None):  # (absent from the hash of a plain polynomial)
        h.update(json.dumps(model.extra_terms).encode())
    if getattr(model, "reciprocal_labels", None):
        h.update(json.dumps(model.reciprocal_labels).encode())
    for name in ("theta", "s2", "theta_cov", "pixel_flags", "label_offsets", "label_scales",
                 "training_labels"):
        a = getattr(model, name, None)
        if a is None:
            raise ValueError(f"the model has no {name}: train it or read a trained model")
        a = np.ascontiguousarray(a)
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- inputs
def _npz_member(path, key):
    """Memory-map one array of an uncompressed ``.npz`` (np.savez) without loading it.

    Returns None if the member is compressed (then it must be read whole).
    """
    import zipfile

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(key + ".npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            fh.seek(start)
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    if fortran or dtype.hasobject:
        return None
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class _Arrays:
    """Rows ``lo:hi`` of an array input (npz or SpectraStore); light to pickle."""

    def __init__(self, kind, path, lo, hi, normalized, n_pixels):
        self.kind, self.path, self.lo, self.hi = kind, path, lo, hi
        self.normalized, self.n_pixels = normalized, n_pixels

    def __len__(self):
        return self.hi - self.lo

    @property
    def n_items(self):
        return self.hi - self.lo

    def read(self):
        """Read the rows: dict with flux, ivar (float32), bitmask, ids, index, ..."""
        lo, hi = self.lo, self.hi
        n = hi - lo
        if self.kind == "store":
            from .store import SpectraStore

            s = SpectraStore(self.path)
            flux = np.array(s.flux[lo:hi], dtype=np.float32)
            ivar = np.array(s.ivar[lo:hi], dtype=np.float32)
            ids = np.asarray(s.ids[lo:hi]).astype(str)
            bitmask = None
        else:
            arrays = _open_npz(self.path)
            flux = np.array(arrays["flux"][lo:hi], dtype=np.float32)
            ivar = np.array(arrays["ivar"][lo:hi], dtype=np.float32)
            bitmask = None if arrays.get("bitmask") is None else np.array(arrays["bitmask"][lo:hi])
            idk = arrays.get("ids")
            ids = (np.asarray(idk[lo:hi]).astype(str) if idk is not None
                   else np.full(n, "", dtype="<U1"))
        index = np.arange(lo, hi, dtype=np.int64)
        ids = np.where(ids == "", np.char.add("row", index.astype(str)), ids)
        return dict(flux=flux, ivar=ivar, bitmask=bitmask, ids=ids, index=index,
                    visit=np.zeros(n, np.int16), reason=np.full(n, "", dtype=object),
                    normalized=self.normalized, extra={})


def _open_npz(path):
    """flux, ivar, bitmask, ids of an npz, memory-mapped where the file allows it."""
    out = {}
    with np.load(path, allow_pickle=False) as d:
        keys = set(d.files)
        for k in ("flux", "ivar"):
            if k not in keys:
                raise ValueError(f"{path}: no '{k}' array (keys: {sorted(keys)}); an npz input "
                                 "needs flux and ivar (N, P), optionally ids and bitmask")
        id_key = next((k for k in ("ids", "apogee_id", "APOGEE_ID") if k in keys), None)
        for k, src in (("flux", "flux"), ("ivar", "ivar"), ("bitmask", "bitmask"),
                       ("ids", id_key)):
            if src is None or src not in keys:
                out[k] = None
                continue
            m = _npz_member(path, src)
            out[k] = m if m is not None else d[src]  # compressed member: read whole
        if "normalized" in keys:
            out["normalized"] = bool(d["normalized"])
    return out


class _ApStarFiles:
    """apStar files ``paths`` (global numbers ``lo``...); light to pickle."""

    def __init__(self, paths, lo, visits, release=None):
        self.paths, self.lo, self.visits, self.release = list(paths), lo, visits, release
        self.normalized = False
        self.n_pixels = None

    @property
    def n_items(self):
        return len(self.paths)

    def read(self):
        """Read and mask the files (and visits); unreadable files keep a row with a reason."""
        from .apogee.files import NPIX, parse_apstar_path, read_apstar
        from .apogee.bitmask import DEFAULT_BAD_BITS, mask_spectra

        rows = []
        for j, p in enumerate(self.paths):
            index = self.lo + j
            try:
                s = read_apstar(p, visits=self.visits, release=self.release,
                                full_header=self.visits)
                if s.flux.shape != (NPIX,):
                    raise ValueError(f"{p}: {s.flux.shape[-1]} pixels, expected the {NPIX}-pixel "
                                     "apStar grid")
                f, v, _ = mask_spectra(s.flux, s.err, s.pixmask, DEFAULT_BAD_BITS,
                                       dtype=np.float32)
                sid = str(s.apogee_id or os.path.basename(p))
                rows.append((f, v, sid, index, 0, "", dict(file=os.path.basename(p))))
                if self.visits:
                    vf, vv, _ = mask_spectra(s.visit_flux, s.visit_err, s.visit_pixmask,
                                             DEFAULT_BAD_BITS, dtype=np.float32)
                    hdr = s.header
                    for k in range(vf.shape[0]):
                        n = k + 1
                        rows.append((vf[k], vv[k], sid, index, n, "", dict(
                            file=os.path.basename(p), visit_file=str(hdr.get(f"SFILE{n}", "")),
                            visit_jd=float(hdr.get(f"JD{n}", np.nan) or np.nan),
                            visit_fiber=int(hdr.get(f"FIBER{n}", -1) or -1))))
            except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
                try:
                    sid = parse_apstar_path(p)[1]
                except ValueError:
                    sid = os.path.basename(os.fspath(p))
                why = str(err) if os.fspath(p) in str(err) else f"{p}: {err}"
                z = np.zeros(NPIX, np.float32)
                rows.append((z, z, sid, index, 0, why or type(err).__name__,
                             dict(file=os.path.basename(os.fspath(p)))))
        n = len(rows)
        out = dict(flux=np.stack([r[0] for r in rows]) if n else np.zeros((0, NPIX), np.float32),
                   ivar=np.stack([r[1] for r in rows]) if n else np.zeros((0, NPIX), np.float32),
                   bitmask=None, ids=np.array([r[2] for r in rows], dtype=str),
                   index=np.array([r[3] for r in rows], dtype=np.int64),
                   visit=np.array([r[4] for r in rows], dtype=np.int16),
                   reason=np.array([r[5] for r in rows], dtype=object), normalized=False,
                   needs_mask=False, extra={})
        out["extra"]["FILE"] = np.array([r[6]["file"] for r in rows], dtype=str)
        if self.visits:
            out["extra"]["VISIT_FILE"] = np.array([r[6].get("visit_file", "") for r in rows],
                                                  dtype=str)
            out["extra"]["VISIT_JD"] = np.array([r[6].get("visit_jd", np.nan) for r in rows],
                                                dtype=np.float64)
            out["extra"]["VISIT_FIBER"] = np.array([r[6].get("visit_fiber", -1) for r in rows],
                                                   dtype=np.int16)
        return out


class _Source:
    """An input survey: ``n_items`` stars, cut into chunks by :meth:`chunk`."""

    def __init__(self, kind, identity, n_items, n_pixels, normalized, describe, make_chunk):
        self.kind, self.identity, self.n_items = kind, identity, n_items
        self.n_pixels, self.normalized, self.describe = n_pixels, normalized, describe
        self._make_chunk = make_chunk

    def chunk(self, lo, hi):
        """Return the picklable reader of items ``lo:hi``."""
        return self._make_chunk(lo, hi)


def _looks_normalized(flux, ivar):
    with np.errstate(invalid="ignore"):
        good = (ivar > 0) & np.isfinite(flux)
    if not good.any():
        return True
    med = float(np.median(flux[good]))
    return 0.3 < med < 2.0


def _expand_inputs(inputs):
    """Input arguments -> ('arrays', kind, path) or ('apstar', [paths])."""
    from .apogee.prepare import find_apstar_files

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("no inputs given")
    arrays, paths = [], []
    for p in inputs:
        low = p.lower()
        if os.path.isdir(p):
            if os.path.exists(os.path.join(p, "index.json")):
                arrays.append(("store", p))
            else:
                found = find_apstar_files(p)
                if not found:
                    raise FileNotFoundError(f"{p}: no apStar-*.fits files in this directory")
                paths.extend(found)
        elif low.endswith(".npz"):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: no such npz file")
            arrays.append(("npz", p))
        elif low.endswith((".fits", ".fits.gz", ".fit")):
            paths.append(p)  # a missing file is recorded as a failed star, not an error
        elif os.path.isfile(p):
            base = os.path.dirname(os.path.abspath(p))
            with open(p) as fh:
                for line in fh:
                    line = line.split("#", 1)[0].strip()
                    if line:
                        paths.append(line if os.path.isabs(line) else os.path.join(base, line))
        else:
            raise FileNotFoundError(f"{p}: no such input (expected apStar files, a list of them, "
                                    "a directory, a SpectraStore or an .npz)")
    if arrays and (paths or len(arrays) > 1):
        raise ValueError("give either one SpectraStore or .npz, or any number of apStar files, "
                         "lists and directories; not a mixture")
    return arrays[0] if arrays else ("apstar", paths)


def open_inputs(inputs, visits=False, normalized=None, release=None):
    """Describe the input survey without reading its spectra.

    Parameters
    ----------
    inputs : str, os.PathLike or sequence of them
        apStar files, text files listing them (one per line, relative to the
        list's directory), directories searched for ``apStar-*.fits``; or one
        SpectraStore directory; or one ``.npz`` with ``flux``, ``ivar`` (N, P)
        and optionally ``ids`` (or ``apogee_id``), ``bitmask`` (APOGEE_PIXMASK)
        and ``normalized`` (bool).
    visits : bool
        Also label every visit spectrum of apStar files.
    normalized : bool, optional
        Whether npz spectra are already continuum-normalized; by default an npz
        with a ``bitmask`` is raw and otherwise the median flux decides.
        SpectraStores are normalized and apStar files raw.
    release : str, optional
        Expected apStar release layout (default: from each file name).

    Returns
    -------
    _Source
    """
    found = _expand_inputs(inputs)
    if found[0] == "apstar":
        # absolute, so that Dask workers with another working directory find them
        paths = [os.path.abspath(p) for p in found[1]]
        if not paths:
            raise ValueError("no apStar files in the inputs")
        if normalized:
            raise ValueError("apStar files hold raw spectra; they are always normalized here")
        h = hashlib.sha256("\n".join(os.path.abspath(p) for p in paths).encode()).hexdigest()
        ident = dict(kind="apstar", n=len(paths), paths_sha256=h[:32], visits=bool(visits),
                     release=release)
        return _Source("apstar", ident, len(paths), 8575, False,
                       f"{len(paths)} apStar files",
                       lambda lo, hi: _ApStarFiles(paths[lo:hi], lo, visits, release))
    if visits:
        raise ValueError("visit spectra (--visits) are only available from apStar files; "
                         f"{found[1]} holds one spectrum per star")
    kind, path = found
    path = apath = os.path.abspath(path)
    if kind == "store":
        from .store import SpectraStore

        s = SpectraStore(path)
        n, p = s.n_stars, s.n_pixels
        if normalized is False:
            raise ValueError(f"{path}: a SpectraStore holds normalized spectra")
        norm = True
        ident = dict(kind="store", path=apath, n=n, p=p)
    else:
        arrays = _open_npz(path)
        flux, ivar = arrays["flux"], arrays["ivar"]
        if flux.ndim != 2 or ivar.shape != flux.shape:
            raise ValueError(f"{path}: flux {flux.shape} and ivar {ivar.shape} must be (N, P)")
        n, p = flux.shape
        if arrays["bitmask"] is not None and arrays["bitmask"].shape != flux.shape:
            raise ValueError(f"{path}: bitmask {arrays['bitmask'].shape} != flux {flux.shape}")
        if arrays["ids"] is not None and len(arrays["ids"]) != n:
            raise ValueError(f"{path}: {len(arrays['ids'])} ids for {n} spectra")
        norm = normalized
        if norm is None:
            norm = arrays.get("normalized")
        if norm is None:
            norm = (arrays["bitmask"] is None
                    and _looks_normalized(np.asarray(flux[:64]), np.asarray(ivar[:64])))
        st = os.stat(path)
        ident = dict(kind="npz", path=apath, n=n, p=p, size=st.st_size, mtime_ns=st.st_mtime_ns)
    ident["normalized"] = bool(norm)
    return _Source(kind, ident, n, p, bool(norm), f"{path} ({n} spectra x {p} pixels)",
                   lambda lo, hi: _Arrays(kind, path, lo, hi, bool(norm), p))


# --------------------------------------------------------------------------- one chunk
def _mask_raw(flux, ivar, bitmask, bits, segments=None):
    """Zero the weight (in place) of bad pixels of raw (flux, ivar) with PIXMASK bits.

    The same pixels as :func:`cannon_fast.apogee.bitmask.quality_mask` (flagged
    bits, non-finite flux or ivar, ivar <= 0, off-chip), from ivar instead
    of the error. ``segments`` (another grid's pixel ranges) marks the pixels
    outside them as off-chip.
    """
    from .apogee.files import NPIX, on_chip_mask

    with np.errstate(invalid="ignore"):
        bad = ~(ivar > 0) | ~np.isfinite(ivar) | ~np.isfinite(flux)
    if bitmask is not None:
        if bitmask.dtype.kind in "iu" and 0 <= bits <= np.iinfo(bitmask.dtype).max:
            bad |= (bitmask & bitmask.dtype.type(bits)) != 0  # no int64 copy of the chunk
        else:
            bad |= (np.asarray(bitmask).astype(np.int64) & bits) != 0
    if segments is not None:
        inside = np.zeros(flux.shape[1], bool)
        for a, b in segments:
            inside[a:b] = True
        bad |= ~inside[None, :]
    elif flux.shape[1] == NPIX:
        bad |= ~on_chip_mask()[None, :]
    flux[bad] = 0.0
    ivar[bad] = 0.0
    return bad


def _grid_columns(n_in, n_model):
    """Columns of input spectra that make the model's pixel grid (None = all)."""
    from .apogee.files import GRID_SEGMENTS, NPIX, grid_indices

    if n_in == n_model:
        return None
    if n_in == NPIX and n_model in GRID_SEGMENTS:
        return grid_indices(n_model)
    raise ValueError(f"the model was trained on {n_model} pixels but the input spectra have "
                     f"{n_in}: they must be on the model's pixel grid (or on the 8575-pixel "
                     "apStar grid for a 7214/7514-pixel model)")


def process_chunk(model, reader, options):
    """Read, mask, normalize and fit one chunk; return its catalogue columns.

    Parameters
    ----------
    model : CannonModel
    reader : object
        ``reader.read()`` returns the chunk's spectra (from ``_Source.chunk``).
    options : dict
        ``continuum_pixels`` ((8575,) bool, for raw spectra), ``degree``,
        ``bad_bits``, ``backend``, ``fit`` (keyword arguments of ``model.fit``),
        ``model_hash``, ``n_threads`` (numba threads, e.g. 1 on a Dask worker).

    Returns
    -------
    dict of str -> ndarray
        One entry per catalogue column, all of the chunk's length.
    """
    if options.get("n_threads"):
        _limit_threads(int(options["n_threads"]))
    return _fit_chunk(model, reader.read(), options)


def _limit_threads(n):
    """Use ``n`` threads in the numba, C/OpenMP (and, if threadpoolctl is there, BLAS) kernels.

    One single-threaded worker process per core beats threads inside one
    process: much of a chunk's work (copies, masks, the LM fits) is serial.
    """
    import numba

    from .core import backends

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if getattr(backends, "_ccannon", None) is not None and hasattr(backends._ccannon,
                                                                   "set_num_threads"):
        backends._ccannon.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return
    threadpool_limits(n)


_WORKER_MODEL = None


def _pool_init(model, n_threads):
    """Initialize a process-pool worker: receive the model once, limit its threads."""
    global _WORKER_MODEL
    _WORKER_MODEL = model
    _limit_threads(n_threads)


def _pool_chunk(reader, options):
    """Process one chunk in a process-pool worker with the model it received at start."""
    return _fit_chunk(_WORKER_MODEL, reader.read(), options)


def _fit_chunk(model, d, options):
    """Mask, normalize and fit the spectra ``reader.read()`` gave (see process_chunk)."""
    # pop, so that the raw arrays are freed once normalized (``d`` lives on in the caller)
    flux, ivar, bitmask = d.pop("flux"), d.pop("ivar"), d.pop("bitmask")
    n = flux.shape[0]
    flags = np.zeros(n, np.int64)
    cflags = np.zeros(n, np.int64)
    reason = d["reason"]
    flags[reason != ""] |= SURVEY_FLAGS["READ_FAILED"]
    if not d["normalized"]:
        from .core.continuum import normalize

        segments = options.get("segments")
        if d.get("needs_mask", True):  # apStar files are masked as they are read
            _mask_raw(flux, ivar, bitmask, options["bad_bits"], segments)
        ns = normalize(flux, ivar, options["continuum_pixels"], degree=options["degree"],
                       segments=segments, backend=options.get("backend", "auto"))
        del flux, ivar, bitmask
        flux, ivar = ns.flux, ns.ivar
        cflags = ns.flags.astype(np.int64)
        dead = (ns.chip_status != 0).all(axis=1) & (reason == "")
        for i in np.flatnonzero(dead):
            reason[i] = "continuum normalization failed on every chip"
        flags[dead] |= SURVEY_FLAGS["NORMALIZATION_FAILED"]
        flags[(cflags != 0) & ~dead & (reason == "")] |= SURVEY_FLAGS["CONTINUUM_WARNING"]
    cols = _grid_columns(flux.shape[1], model.n_pixels)
    usable = (flags & (SURVEY_FLAGS["READ_FAILED"] | SURVEY_FLAGS["NORMALIZATION_FAILED"])) == 0
    L = model.n_labels
    labels = np.full((n, L), np.nan)
    cov = np.full((n, L, L), np.nan)
    chi2 = np.full(n, np.nan)
    rchi2 = np.full(n, np.nan)
    npix = np.zeros(n, np.int64)
    iters = np.zeros(n, np.int64)
    fitflags = np.zeros(n, np.int64)
    fit_kw = dict(options.get("fit") or {})
    fit_kw.setdefault("progress_bar", False)
    with_broadening = bool(fit_kw.get("broadening"))
    broad = np.full((n, 2), np.nan)  # BROADENING and its error, with broadening=True
    # fit the whole chunk in slices that are multiples of the fit's own batches, so the
    # float64 copies it makes stay small and the results do not depend on the slicing
    for a in range(0, n, _FIT_SLICE):
        b = min(a + _FIT_SLICE, n)
        f = flux[a:b] if cols is None else flux[a:b][:, cols]
        v = ivar[a:b] if cols is None else ivar[a:b][:, cols]
        # a pixel with non-finite values carries no weight (instead of failing the chunk)
        with np.errstate(invalid="ignore"):
            ok = usable[a:b, None] & np.isfinite(f) & np.isfinite(v) & (v > 0)
        f = np.where(ok, f, 1.0)
        v = np.where(ok, v, 0.0)
        try:
            results = [(a, b, model.fit(f, v, **fit_kw))]
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            results = []  # isolate the star(s) that break the fit; keep the others
            for i in range(b - a):
                try:
                    results.append((a + i, a + i + 1, model.fit(f[i:i + 1], v[i:i + 1],
                                                                **fit_kw)))
                except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
                    fitflags[a + i] = _FIT_FLAG_BITS["FAILED"]
                    reason[a + i] = f"fit raised {type(err).__name__}: {err}"
        for lo, hi, r in results:
            labels[lo:hi], cov[lo:hi], chi2[lo:hi], rchi2[lo:hi] = r.labels, r.covariance, \
                r.chi2, r.reduced_chi2
            npix[lo:hi], iters[lo:hi], fitflags[lo:hi] = r.n_pixels, r.iterations, r.flags
            if with_broadening:
                broad[lo:hi] = np.column_stack([r.broadening, r.broadening_error])
    fitflags[~usable] = 0
    labels[~usable] = np.nan
    cov[~usable] = np.nan
    broad[~usable] = np.nan
    chi2[~usable] = rchi2[~usable] = np.nan
    flags |= fitflags
    nolab = usable & ~np.all(np.isfinite(labels), axis=1) & (reason == "")
    for i in np.flatnonzero(nolab):
        names = [k for k, bit in _FIT_FLAG_BITS.items() if fitflags[i] & bit]
        reason[i] = "fit failed (" + (", ".join(names) or "no finite labels") + \
            f"; {int(npix[i])} usable pixels)"
    out = {"ID": np.asarray(d["ids"]).astype(str), "INDEX": d["index"], "VISIT": d["visit"]}
    out.update(d["extra"])
    for i, name in enumerate(model.label_names):
        out[name] = labels[:, i]
    for i, name in enumerate(model.label_names):
        with np.errstate(invalid="ignore"):
            dg = cov[:, i, i]
            out[name + "_ERR"] = np.sqrt(np.where(dg > 0, dg, np.nan))
    for i in range(L):
        for j in range(i + 1, L):
            out[f"COV_{model.label_names[i]}_{model.label_names[j]}"] = cov[:, i, j]
    if with_broadening:
        out.update(BROADENING=broad[:, 0], BROADENING_ERR=broad[:, 1])
    out.update(CHI2=chi2, REDUCED_CHI2=rchi2, N_PIXELS=npix.astype(np.int32),
               ITERATIONS=iters.astype(np.int32), FLAGS=flags.astype(np.int32),
               CONTINUUM_FLAGS=cflags.astype(np.int32),
               REASON=np.array([str(x) for x in reason], dtype=str),
               MODEL_HASH=np.full(n, options["model_hash"]))
    for k, a in out.items():
        if a.dtype.kind == "U" and a.dtype.itemsize == 0:
            out[k] = a.astype("<U1")
    return out


# --------------------------------------------------------------------------- committing
def _write_part(path, columns):
    """Write one chunk's columns to ``path`` atomically (tests replace this to fail)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **columns)


def _part_path(parts, k):
    return os.path.join(parts, f"chunk-{k:06d}.npz")


def _committed(parts, n_chunks):
    done = set()
    for p in glob.glob(os.path.join(parts, "chunk-*.npz")):
        try:
            k = int(os.path.basename(p)[6:12])
        except ValueError:
            continue
        if k < n_chunks:
            done.add(k)
    return done


def _load_part(path):
    with np.load(path, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


# --------------------------------------------------------------------------- catalogue files
def _catalog_format(path, fmt):
    if fmt is None:
        fmt = "parquet" if os.fspath(path).lower().endswith((".parquet", ".pq")) else "fits"
    if fmt not in ("fits", "parquet"):
        raise ValueError(f"unknown catalogue format {fmt!r}: use 'fits' or 'parquet'")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("Parquet output needs pyarrow (pip install 'cannon_fast[parquet]'); "
                             "use --format fits") from None
    return fmt


def _catalog_meta(path, fmt):
    """Return the job record of an existing catalogue (dict), or None if there is none."""
    if not os.path.exists(path):
        return None
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            md = pq.ParquetFile(path).schema_arrow.metadata or {}
            raw = md.get(b"cannon_fast")
            meta = json.loads(raw.decode()) if raw else None
            n_rows = pq.ParquetFile(path).metadata.num_rows
        else:
            import fitsio

            with fitsio.FITS(path) as fh:
                hdr = fh[1].read_header()
                n_rows = fh[1].get_nrows()
                meta = json.loads(fh["JOBS"].read().tobytes().decode()) if "JOBS" in fh else None
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise SurveyError(f"{path} exists but is not a readable {fmt} catalogue ({err}); "
                          "refusing to overwrite it: choose another --out") from None
    if not meta or meta.get("format") != _FORMAT:
        raise SurveyError(f"{path} exists but was not written by cannon-fast label; refusing "
                          "to overwrite it: choose another --out")
    meta["n_rows"] = int(n_rows)
    if fmt == "fits":
        meta["header_hash"] = hdr.get("MODELHSH")
    return meta


def read_catalog(path):
    """Read a catalogue written by :func:`label_survey` as an astropy Table.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    astropy.table.Table
        ``meta["cannon_fast"]`` holds the job record (model hash, jobs, counts).
    """
    from astropy.table import Table

    path = os.fspath(path)
    fmt = _catalog_format(path, None)
    meta = _catalog_meta(path, fmt)
    if meta is None:
        raise FileNotFoundError(f"{path}: no such catalogue")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        t = Table({k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()})
    else:
        import fitsio

        data = fitsio.read(path, ext=1)
        t = Table()
        for name in data.dtype.names:
            col = data[name]
            t[name] = np.char.decode(col, "ascii") if col.dtype.kind == "S" else col
    t.meta["cannon_fast"] = meta
    return t


def _existing_rows(path, fmt, block=65536):
    """Yield the rows of an existing catalogue as dicts of columns, in blocks."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=block):
            yield {k: np.asarray(v) for k, v in batch.to_pydict().items()}
    else:
        import fitsio

        with fitsio.FITS(path) as fh:
            n = fh[1].get_nrows()
            for a in range(0, n, block):
                data = fh[1][a:min(a + block, n)]
                yield {k: (np.char.decode(data[k], "ascii") if data[k].dtype.kind == "S"
                           else np.asarray(data[k])) for k in data.dtype.names}


def _conform(cols, dtype):
    """Columns -> structured array of ``dtype`` (missing columns get blank values)."""
    n = len(next(iter(cols.values())))
    out = np.zeros(n, dtype)
    for name in dtype.names:
        kind = dtype[name].kind
        if name in cols:
            a = np.asarray(cols[name])
            out[name] = np.char.encode(a.astype(str), "ascii", "replace") if kind == "S" else a
        elif kind == "f":
            out[name] = np.nan
        elif name == "VISIT_FIBER":
            out[name] = -1
    return out


def _merge(out, fmt, parts_dir, n_chunks, meta, existing):
    """Write old rows + every part, in chunk order, to ``out`` atomically."""
    paths = [_part_path(parts_dir, k) for k in range(n_chunks)]
    # the table layout: columns in first-seen order, widest string of each column
    names, kinds, widths = [], {}, {}
    for p in paths:
        with np.load(p, allow_pickle=False) as d:
            for k in d.files:
                a = d[k]
                if k not in kinds:
                    names.append(k)
                    kinds[k] = a.dtype
                if a.dtype.kind in "US":
                    w = max([1] + [len(x) for x in a.astype(str)])
                    widths[k] = max(widths.get(k, 1), w)
    if existing is not None:
        for block in _existing_rows(out, fmt):
            for k, a in block.items():
                if k not in kinds:
                    names.append(k)
                    kinds[k] = a.dtype
                if a.dtype.kind in "USO":
                    w = max([1] + [len(str(x)) for x in a])
                    widths[k] = max(widths.get(k, 1), w)
    dtype = np.dtype([(k, f"S{widths[k]}") if kinds[k].kind in "USO" else (k, kinds[k])
                      for k in names])

    def blocks():
        if existing is not None:
            yield from _existing_rows(out, fmt)
        for p in paths:
            yield _load_part(p)

    with atomic_path(out) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = None
            writer = None
            try:
                for cols in blocks():
                    arr = _conform(cols, dtype)
                    table = pa.table({k: (np.char.decode(arr[k], "ascii")
                                          if arr[k].dtype.kind == "S" else arr[k])
                                      for k in dtype.names})
                    if writer is None:
                        schema = table.schema.with_metadata(
                            {b"cannon_fast": json.dumps(meta).encode()})
                        writer = pq.ParquetWriter(tmp, schema)
                    writer.write_table(table.cast(schema))
            finally:
                if writer is not None:
                    writer.close()
        else:
            import fitsio

            header = [dict(name="MODELHSH", value=meta["model_hash"], comment="cannon_fast "
                           "model hash"), dict(name="NLABELS", value=len(meta["label_names"])),
                      dict(name="NPIXELS", value=int(meta["n_pixels"])),
                      dict(name="NREAD", value=int(meta["counts"]["n_read"])),
                      dict(name="NFITTED", value=int(meta["counts"]["n_fitted"])),
                      dict(name="NFLAGGED", value=int(meta["counts"]["n_flagged"])),
                      dict(name="NFAILED", value=int(meta["counts"]["n_failed"]))]
            for i, name in enumerate(meta["label_names"]):
                header.append(dict(name=f"LABEL{i + 1}", value=name))
            for name, bit in ALL_FLAGS.items():
                header.append(dict(name=f"FLAG{bit}", value=name))
            with fitsio.FITS(tmp, "rw", clobber=True) as fh:
                first = True
                for cols in blocks():
                    arr = _conform(cols, dtype)
                    if first:
                        fh.write(arr, extname="LABELS", header=header)
                        first = False
                    else:
                        fh[1].append(arr)
                fh.write(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                         extname="JOBS")


# --------------------------------------------------------------------------- the job
def _describe_difference(old, new):
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys
             if old.get(k) != new.get(k)]
    return "; ".join(diffs[:4])


def _start_dask(scheduler, n_workers):
    """(client, owned objects, threads per worker) for a scheduler spec."""
    try:
        import distributed
    except ImportError:
        raise ValueError("the Dask backend needs dask[distributed] "
                         "(pip install 'cannon_fast[dask]')") from None
    if isinstance(scheduler, distributed.Client):
        return scheduler, [], None
    if scheduler == "dask":
        n = int(n_workers or os.cpu_count() or 1)
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        return client, [client, cluster], 1
    client = distributed.Client(scheduler)
    return client, [client], None


def label_survey(model, inputs, out, chunk_size=DEFAULT_CHUNK_SIZE, visits=False,
                 scheduler=None, n_workers=None, fmt=None, continuum_pixels=None, degree=None,
                 bad_bits=None, normalized=None, release=None, fit_options=None,
                 show_progress=None, log=None, _on_commit=None):
    """Label a whole survey, chunk by chunk, into one catalogue (resumable).

    Parameters
    ----------
    model : CannonModel
        A trained model (``CannonModel.read``).
    inputs : str, os.PathLike or sequence of them
        See :func:`open_inputs`.
    out : str or os.PathLike
        The catalogue (``.fits``, or ``.parquet``); ``out + ".parts"`` holds
        the committed chunks while the job runs.
    chunk_size : int
        Stars read, normalized and fitted at a time.  Peak memory is about
        ``chunk_size * P * 40`` bytes plus 0.15 GB (``docs/measurements.md``),
        whatever the number of stars.  Fixed for a job: resuming with another
        value is refused.
    visits : bool
        Also label every visit of apStar files (``VISIT`` = 1...; 0 is the
        combined spectrum), with the visit's ``VISIT_FILE``, ``VISIT_JD``
        and ``VISIT_FIBER``.
    scheduler : None, "processes", "dask", str or distributed.Client
        None runs in this process; ``"processes"`` in a pool of ``n_workers``
        single-threaded worker processes on this machine (no Dask needed);
        ``"dask"`` starts a ``LocalCluster`` of ``n_workers`` single-threaded
        processes; any other string is the address of a running
        ``distributed`` scheduler.  The driver commits every chunk itself in
        all cases, so a job started one way can be resumed another.
    n_workers : int, optional
        Workers of the process pool or local cluster (default: the number of CPUs).
    fmt : {"fits", "parquet"}, optional
        Default: from the suffix of ``out``.
    continuum_pixels : array_like, str or os.PathLike, optional
        For raw spectra (apStar files, raw npz): see
        :func:`cannon_fast.core.continuum.load_continuum_pixels`; default the
        model's record, else pixels picked from the model
        (:func:`cannon_fast.core.continuum.model_continuum`).
    degree : int, optional
        Continuum Chebyshev degree (default: the model's record, else 3).
    bad_bits : iterable of str or int, optional
        APOGEE_PIXMASK bits that mask a pixel (default bits 0-7 and 12).
    normalized : bool, optional
        See :func:`open_inputs`.
    release : str, optional
        Expected apStar layout.
    fit_options : dict, optional
        Keyword arguments of ``model.fit`` (e.g. ``debias``, ``n_starts``).
    show_progress : bool, optional
        Progress bar with stars/s and time left (default: on a terminal).
    log : callable, optional
        Called with one-line messages (e.g. ``print``).

    Returns
    -------
    SurveySummary

    Raises
    ------
    SurveyError
        The catalogue or a partial run belongs to another model or job, or a
        write failed (e.g. a full disk); what was committed is kept.
    ValueError
        Bad inputs: the model's pixel grid does not match the spectra, ...
    """
    from .apogee.bitmask import DEFAULT_BAD_BITS, bit_value

    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    out = os.fspath(out)
    fmt = _catalog_format(out, fmt)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not getattr(model, "is_trained", False):
        raise ValueError("the model is not trained")
    fit_options = dict(fit_options or {})
    # fit_cannon would refuse every chunk (each star recorded as failed): refuse once, first
    _check_broadening(fit_options.get("debias", True), fit_options.get("broadening", False))
    mh = model_hash(model)
    source = open_inputs(inputs, visits=visits, normalized=normalized, release=release)
    _grid_columns(source.n_pixels, model.n_pixels)  # refuse a wrong grid before any work
    options = dict(model_hash=mh, degree=None, bad_bits=bit_value(
        DEFAULT_BAD_BITS if bad_bits is None else bad_bits), fit=dict(fit_options or {}),
        backend=model.backend)
    if not source.normalized:
        from .core.continuum import model_continuum

        if source.n_pixels == 8575:
            segments = None  # the apStar chips
        elif source.n_pixels == model.n_pixels and model.grid is not None:
            segments = [list(seg) for seg in model.grid.segments]
        else:
            raise ValueError(f"{source.describe}: raw (un-normalized) spectra must be on the "
                             "8575-pixel apStar grid or on the model's own grid (with its "
                             "segments) to be continuum-normalized; if they are already "
                             "normalized, say so (normalized=True, --normalized)")
        cont, recorded_degree, cont_source = model_continuum(model, continuum_pixels)
        if cont.size != source.n_pixels:
            raise ValueError(f"{source.describe}: the model's continuum pixels are on a "
                             f"{cont.size}-pixel grid, the spectra have {source.n_pixels}")
        options.update(continuum_pixels=cont, segments=segments,
                       degree=recorded_degree if degree is None else int(degree))
        log(f"continuum pixels: {cont_source}")
    if source.n_items == 0:
        raise ValueError(f"no spectra in the inputs ({source.describe})")
    job = dict(model_hash=mh, inputs=source.identity, chunk_size=chunk_size,
               backend=model.backend,
               degree=options["degree"], bad_bits=options["bad_bits"], fit=options["fit"],
               continuum=(hashlib.sha256(np.packbits(options["continuum_pixels"]).tobytes())
                          .hexdigest()[:16] if "continuum_pixels" in options else None))
    job_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    n_items = source.n_items
    n_chunks = -(-n_items // chunk_size)
    parts = out + ".parts"
    summary = SurveySummary(catalog=out, n_chunks=n_chunks)

    existing = _catalog_meta(out, fmt)
    if existing is not None:
        if existing["model_hash"] != mh:
            why = [f"it holds labels from model {existing['model_hash']}, this model is {mh}"]
            if existing.get("label_names") != list(model.label_names):
                why.append(f"labels {existing.get('label_names')} vs {list(model.label_names)}")
            if existing.get("n_pixels") != model.n_pixels:
                why.append(f"{existing.get('n_pixels')} vs {model.n_pixels} pixels")
            raise SurveyError(f"refusing to append to {out}: " + "; ".join(why)
                              + ". Write to another --out (or delete it).")
        if job_id in [j["job_id"] for j in existing["jobs"]]:
            if os.path.isdir(parts):  # merged, then killed before cleaning up
                shutil.rmtree(parts, ignore_errors=True)
            rec = next(j for j in existing["jobs"] if j["job_id"] == job_id)
            summary.__dict__.update({k: rec["counts"][k] for k in
                                     ("n_read", "n_spectra", "n_fitted", "n_flagged", "n_failed")})
            summary.n_resumed = n_chunks
            summary.catalog_rows = existing["n_rows"]
            summary.already_done = True
            summary.elapsed = time.perf_counter() - t0
            return summary

    manifest_path = os.path.join(parts, "manifest.json")
    manifest = dict(format=_FORMAT, version=_VERSION, job_id=job_id, job=job,
                    n_items=n_items, n_chunks=n_chunks, label_names=list(model.label_names),
                    n_pixels=int(model.n_pixels))
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            old = json.load(fh)
        if old.get("job_id") != job_id:
            oj = old.get("job", {})
            if oj.get("model_hash") != mh:
                why = (f"it was started with model {oj.get('model_hash')}, this model is {mh}")
            else:
                d = _describe_difference({k: v for k, v in oj.items() if k != "inputs"},
                                         {k: v for k, v in job.items() if k != "inputs"})
                if oj.get("inputs") != job["inputs"]:
                    d = (d + "; " if d else "") + "the inputs differ"
                why = f"it was started with other options ({d})"
            raise SurveyError(f"{parts} holds a partial run of another job: {why}. Re-run the "
                              f"original command to finish it, or delete {parts}.")
    else:
        os.makedirs(parts, exist_ok=True)
        with atomic_path(manifest_path) as tmp:
            with open(tmp, "w") as fh:
                json.dump(manifest, fh, indent=1)

    done = _committed(parts, n_chunks)
    summary.n_resumed = len(done)
    pending = [k for k in range(n_chunks) if k not in done]
    bounds = [(k * chunk_size, min((k + 1) * chunk_size, n_items)) for k in range(n_chunks)]
    if done:
        log(f"resuming: {len(done)} of {n_chunks} chunks already committed in {parts}")
    log(f"labeling {source.describe} in {n_chunks} chunks of {chunk_size} "
        f"({'raw: masking + continuum normalization' if not source.normalized else 'normalized'})")

    n_committed = [len(done)]

    def commit(k, columns):
        try:
            _write_part(_part_path(parts, k), columns)
        except OSError as err:
            full = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
            raise SurveyError(
                f"{full} while committing chunk {k} to {parts} ({err.strerror or err}); "
                f"{n_committed[0]} of {n_chunks} chunks are committed and kept there: free "
                "space and re-run the same command to resume") from err
        n_committed[0] += 1
        if _on_commit is not None:
            _on_commit(k)

    done_items = sum(bounds[k][1] - bounds[k][0] for k in done)
    bar = progress(total=n_items, initial=done_items, desc="labeling", unit="star",
                   disable=None if show_progress is None else not show_progress)
    try:
        if scheduler is None:
            # read the next chunk in a thread while this one is normalized and fitted
            # (the copies and the numba/BLAS kernels release the GIL)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                nxt = pool.submit(source.chunk(*bounds[pending[0]]).read) if pending else None
                for i, k in enumerate(pending):
                    data = nxt.result()
                    if i + 1 < len(pending):
                        nxt = pool.submit(source.chunk(*bounds[pending[i + 1]]).read)
                    commit(k, _fit_chunk(model, data, options))
                    del data
                    bar.update(bounds[k][1] - bounds[k][0])
        elif scheduler == "processes":
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            n = int(n_workers or os.cpu_count() or 1)
            todo = iter(pending)
            with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"),
                                     initializer=_pool_init, initargs=(model, 1)) as pool:
                running = {}

                def submit_next():
                    k = next(todo, None)
                    if k is not None:
                        running[pool.submit(_pool_chunk, source.chunk(*bounds[k]),
                                            options)] = k

                for _ in range(2 * n):  # a bounded number of chunks in flight
                    submit_next()
                try:
                    while running:
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            k = running.pop(fut)
                            commit(k, fut.result())
                            bar.update(bounds[k][1] - bounds[k][0])
                            submit_next()
                except BaseException:
                    for fut in running:
                        fut.cancel()
                    raise
        else:
            client, owned, threads = _start_dask(scheduler, n_workers)
            try:
                from distributed import as_completed

                opts = dict(options, n_threads=threads)
                model_f = client.scatter(model, broadcast=True)
                futures = [client.submit(process_chunk, model_f, source.chunk(*bounds[k]), opts,
                                         key=f"cannon-fast-chunk-{job_id}-{k:06d}", retries=2)
                           for k in pending]
                index = {f.key: k for f, k in zip(futures, pending)}
                for fut, cols in as_completed(futures, with_results=True):
                    k = index[fut.key]
                    commit(k, cols)
                    fut.release()
                    bar.update(bounds[k][1] - bounds[k][0])
            finally:
                for obj in owned:
                    obj.close()
    finally:
        bar.close()

    # every chunk is committed: merge (old rows first, then the chunks in order)
    counts = dict(n_read=n_items, n_spectra=0, n_fitted=0, n_flagged=0, n_failed=0)
    failures = []
    for k in range(n_chunks):
        p = _part_path(parts, k)
        if not os.path.exists(p):
            raise SurveyError(f"chunk {k} is missing from {parts}; re-run to redo it")
        with np.load(p, allow_pickle=False) as d:
            lab = np.column_stack([d[name] for name in model.label_names])
            fl = d["FLAGS"]
            fitted = np.all(np.isfinite(lab), axis=1)
            counts["n_spectra"] += len(fl)
            counts["n_fitted"] += int(fitted.sum())
            counts["n_flagged"] += int(np.sum(fitted & ((fl & ~INFORMATIONAL_FLAGS) != 0)))
            counts["n_failed"] += int(np.sum(~fitted))
            if len(failures) < 100 and (~fitted).any():
                ids, why = d["ID"], d["REASON"]
                for i in np.flatnonzero(~fitted)[:100 - len(failures)]:
                    failures.append((str(ids[i]), str(why[i])))
    jobs = list(existing["jobs"]) if existing else []
    jobs.append(dict(job_id=job_id, counts=counts, inputs=source.identity,
                     chunk_size=chunk_size, finished=time.strftime("%Y-%m-%dT%H:%M:%S")))
    total = {k: sum(j["counts"][k] for j in jobs) for k in counts}
    meta = dict(format=_FORMAT, version=_VERSION, model_hash=mh,
                training_hash=getattr(model, "training_hash", None),
                label_names=list(model.label_names), n_pixels=int(model.n_pixels),
                flags=ALL_FLAGS, counts=total, jobs=jobs)
    try:
        _merge(out, fmt, parts, n_chunks, meta, existing)
    except OSError as err:
        raise SurveyError(f"could not write the catalogue {out} ({err.strerror or err}); all "
                          f"{n_chunks} chunks stay committed in {parts}: free space and re-run "
                          "the same command to merge them") from err
    shutil.rmtree(parts, ignore_errors=True)
    summary.__dict__.update(counts)
    summary.failures = failures
    summary.catalog_rows = (existing["n_rows"] if existing else 0) + counts["n_spectra"]
    summary.elapsed = time.perf_counter() - t0
    return summary

