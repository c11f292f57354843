"""The survey's inputs: expand the arguments, describe the survey, read it chunk by chunk.

:func:`open_inputs` turns apStar files, lists and directories of them, a
SpectraStore or an ``.npz`` into a :class:`_Source` without reading any
spectrum; ``_Source.chunk(lo, hi)`` gives a small picklable reader whose
``read()`` returns the chunk's spectra (so a worker process or a Dask worker
reads its own chunk from the shared file system).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

__all__ = ["open_inputs"]


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
    # copy-on-write: the arrays are writeable (kernels compiled for writeable arrays take
    # them) and a write, if any, stays in this process's memory, never in the file
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


class _Arrays:
    """Rows ``lo:hi`` of an array input (npz or SpectraStore); light to pickle."""

    def __init__(self, kind, path, lo, hi, normalized, n_pixels, offset=0):
        self.kind, self.path, self.lo, self.hi = kind, path, lo, hi
        self.normalized, self.n_pixels = normalized, n_pixels
        self.offset = offset  # the survey's number of the file's first row

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
            from ..store import SpectraStore

            s = SpectraStore(self.path)
            flux = np.array(s.flux[lo:hi], dtype=np.float32)
            ivar = np.array(s.ivar[lo:hi], dtype=np.float32)
            ids = np.asarray(s.ids[lo:hi]).astype(str)
            bitmask = None
        else:
            arrays = _open_npz(self.path)
            flux = _rows(arrays["flux"], lo, hi, np.float32)
            ivar = _rows(arrays["ivar"], lo, hi, np.float32)
            bitmask = None if arrays.get("bitmask") is None else _rows(arrays["bitmask"], lo, hi)
            idk = arrays.get("ids")
            ids = (np.asarray(idk[lo:hi]).astype(str) if idk is not None
                   else np.full(n, "", dtype="<U1"))
        index = np.arange(lo, hi, dtype=np.int64) + self.offset
        ids = np.where(ids == "", np.char.add("row", index.astype(str)), ids)
        return dict(flux=flux, ivar=ivar, bitmask=bitmask, ids=ids, index=index,
                    visit=np.zeros(n, np.int16), reason=np.full(n, "", dtype=object),
                    normalized=self.normalized, extra={})


def _rows(a, lo, hi, dtype=None):
    """Rows ``lo:hi`` of an npz member, as a view of the file's mapping if they can be.

    A view of the memory-mapped file (copy-on-write) if the member has the wanted
    dtype (native order), else a copy in ``dtype``. The view saves the copy (a third
    of a raw chunk's read, mask and normalize); the chunk only reads its arrays (the
    normalization masks and writes new ones). The OS is asked to read the rows' pages
    ahead, so that a chunk prefetched in a thread still reads its file meanwhile.
    """
    rows = a[lo:hi]
    if (isinstance(a, np.memmap) and rows.dtype.isnative and rows.flags.c_contiguous
            and (dtype is None or rows.dtype == dtype)):
        _read_ahead(a, lo, hi)
        return np.asarray(rows)
    return np.array(rows, dtype=dtype or rows.dtype.newbyteorder("="))


def _read_ahead(m, lo, hi):
    """Ask the OS to read rows ``lo:hi`` of a memory-mapped member ahead (if it can)."""
    if not hasattr(os, "posix_fadvise") or m.filename is None:
        return
    row = m.dtype.itemsize * int(np.prod(m.shape[1:]))
    try:
        fd = os.open(m.filename, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, m.offset + lo * row, (hi - lo) * row, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class _ArrayParts:
    """Rows of a survey of several array files: one ``_Arrays`` per file the rows touch."""

    def __init__(self, parts):
        self.parts = parts
        self.normalized = parts[0].normalized
        self.n_pixels = parts[0].n_pixels

    @property
    def n_items(self):
        return sum(p.n_items for p in self.parts)

    def read(self):
        """The parts' chunk dicts joined (see ``_Arrays.read``)."""
        got = [p.read() for p in self.parts]
        if len(got) == 1:
            return got[0]
        out = dict(got[0])
        for k in ("flux", "ivar", "ids", "index", "visit", "reason"):
            out[k] = np.concatenate([g[k] for g in got])
        # all files have a bitmask or none (``_open_arrays``)
        out["bitmask"] = (None if got[0]["bitmask"] is None
                          else np.concatenate([g["bitmask"] for g in got]))
        return out


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

    def __init__(self, paths, lo, visits, release=None, bad_bits=None):
        self.paths, self.lo, self.visits, self.release = list(paths), lo, visits, release
        self.bad_bits = bad_bits
        self.normalized = False
        self.n_pixels = None

    @property
    def n_items(self):
        return len(self.paths)

    def read(self):
        """Read and mask the files (and visits); unreadable files keep a row with a reason."""
        rows = []
        for j, p in enumerate(self.paths):
            rows.extend(_apstar_rows(p, self.lo + j, self.visits, self.release, self.bad_bits))
        return _stack_rows(rows, self.visits)


def _apstar_rows(p, index, visits, release, bad_bits=None):
    """The rows of one apStar file: (flux, ivar, ID, index, visit, reason, extra) each.

    The combined spectrum, then with ``visits`` every visit; a file that cannot
    be read gives one zero-weight row whose reason says why.
    """
    from ..apogee.bitmask import DEFAULT_BAD_BITS, mask_spectra
    from ..apogee.files import NPIX, parse_apstar_path, read_apstar

    bits = DEFAULT_BAD_BITS if bad_bits is None else bad_bits
    rows = []
    try:
        s = read_apstar(p, visits=visits, release=release, full_header=visits)
        if s.flux.shape != (NPIX,):
            raise ValueError(f"{p}: {s.flux.shape[-1]} pixels, expected the {NPIX}-pixel "
                             "apStar grid")
        f, v, _ = mask_spectra(s.flux, s.err, s.pixmask, bits, dtype=np.float32)
        sid = str(s.apogee_id or os.path.basename(p))
        rows.append((f, v, sid, index, 0, "", dict(file=os.path.basename(p))))
        if visits:
            vf, vv, _ = mask_spectra(s.visit_flux, s.visit_err, s.visit_pixmask,
                                     bits, dtype=np.float32)
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
    return rows


def _stack_rows(rows, visits):
    """The chunk dict of :meth:`_ApStarFiles.read` from the rows of its files."""
    from ..apogee.files import NPIX

    n = len(rows)
    out = dict(flux=np.stack([r[0] for r in rows]) if n else np.zeros((0, NPIX), np.float32),
               ivar=np.stack([r[1] for r in rows]) if n else np.zeros((0, NPIX), np.float32),
               bitmask=None, ids=np.array([r[2] for r in rows], dtype=str),
               index=np.array([r[3] for r in rows], dtype=np.int64),
               visit=np.array([r[4] for r in rows], dtype=np.int16),
               reason=np.array([r[5] for r in rows], dtype=object), normalized=False,
               needs_mask=False, extra={})
    out["extra"]["FILE"] = np.array([r[6]["file"] for r in rows], dtype=str)
    if visits:
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
    from ..apogee.prepare import find_apstar_files

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
    if arrays and paths:
        raise ValueError("give either SpectraStores or .npz files, or any number of apStar "
                         "files, lists and directories; not a mixture")
    seen = {}
    for _, p in arrays:  # the same stars twice would be labeled twice
        real = os.path.realpath(p)
        if real in seen:
            raise ValueError(f"{p} is given twice (as {seen[real]} too)")
        seen[real] = p
    return ("arrays", arrays) if arrays else ("apstar", paths)


def open_inputs(inputs, visits=False, normalized=None, release=None, bad_bits=None):
    """Describe the input survey without reading its spectra.

    Parameters
    ----------
    inputs : str, os.PathLike or sequence of them
        apStar files, text files listing them (one per line, relative to the
        list's directory), directories searched for ``apStar-*.fits``; or
        SpectraStore directories and ``.npz`` files with ``flux``, ``ivar`` (N, P)
        and optionally ``ids`` (or ``apogee_id``), ``bitmask`` (APOGEE_PIXMASK)
        and ``normalized`` (bool): several are one survey, read in the given
        order (one pixel grid, all raw or all normalized).
    visits : bool
        Also label every visit spectrum of apStar files.
    normalized : bool, optional
        Whether npz spectra are already continuum-normalized; by default an npz
        with a ``bitmask`` is raw and otherwise the median flux decides.
        SpectraStores are normalized and apStar files raw.
    release : str, optional
        Expected apStar release layout (default: from each file name).
    bad_bits : iterable of str or int, or int, optional
        PIXMASK bits that mask a pixel of apStar files (default bits 0-7 and 12).

    Returns
    -------
    _Source
    """
    found = _expand_inputs(inputs)
    if found[0] == "apstar":
        return _open_apstar(found[1], visits, normalized, release, bad_bits)
    if visits:
        raise ValueError("visit spectra (--visits) are only available from apStar files; "
                         f"{found[1][0][1]} holds one spectrum per star")
    return _open_arrays(found[1], normalized)


def _open_arrays(arrays, normalized):
    """The ``_Source`` of one or several npz files / SpectraStores, read in the given order."""
    files = []
    for kind, path in arrays:
        path = os.path.abspath(path)
        describe = _describe_store if kind == "store" else _describe_npz
        n, p, norm, ident, masked = describe(path, normalized)
        ident["normalized"] = bool(norm)
        if files and (p, norm) != (files[0][3], files[0][4]):
            raise ValueError(f"{path} ({n} x {p}, {'normalized' if norm else 'raw'}) does not go "
                             f"with {files[0][1]} ({files[0][3]} pixels, "
                             f"{'normalized' if files[0][4] else 'raw'}): one survey, one grid")
        if files and masked != files[0][6]:  # one survey, masked one way
            raise ValueError(f"{path} {'has' if masked else 'has no'} bitmask and "
                             f"{files[0][1]} {'has' if files[0][6] else 'has none'}: give the "
                             "files of one survey the same arrays")
        files.append((kind, path, n, p, bool(norm), ident, masked))
    kind, path, n, p, norm, ident, _ = files[0]
    if len(files) == 1:  # the identity a one-file job always had (its catalogues resume)
        return _Source(kind, ident, n, p, norm, f"{path} ({n} spectra x {p} pixels)",
                       lambda lo, hi: _Arrays(kind, path, lo, hi, norm, p))
    starts = np.cumsum([0] + [f[2] for f in files])

    def make_chunk(lo, hi):
        parts = []
        for (k, fpath, *_), a, b in zip(files, starts[:-1], starts[1:]):
            if lo < b and hi > a:
                parts.append(_Arrays(k, fpath, max(lo, a) - a, min(hi, b) - a, norm, p,
                                     offset=int(a)))
        return _ArrayParts(parts)

    total = int(starts[-1])
    return _Source("arrays", dict(kind="arrays", parts=[f[5] for f in files]), total, p, norm,
                   f"{len(files)} array files, {files[0][1]} ... ({total} spectra x {p} pixels)",
                   make_chunk)


def _open_apstar(paths, visits, normalized, release, bad_bits=None):
    """The _Source of apStar files (raw spectra on the 8575-pixel grid)."""
    # absolute, so that Dask workers with another working directory find them
    paths = [os.path.abspath(p) for p in paths]
    if not paths:
        raise ValueError("no apStar files in the inputs")
    if normalized:
        raise ValueError("apStar files hold raw spectra; they are always normalized here")
    h = hashlib.sha256("\n".join(os.path.abspath(p) for p in paths).encode()).hexdigest()
    ident = dict(kind="apstar", n=len(paths), paths_sha256=h[:32], visits=bool(visits),
                 release=release)
    return _Source("apstar", ident, len(paths), 8575, False, f"{len(paths)} apStar files",
                   lambda lo, hi: _ApStarFiles(paths[lo:hi], lo, visits, release, bad_bits))


def _describe_store(path, normalized):
    """(N, P, normalized, identity, has a bitmask) of a SpectraStore (normalized, no mask)."""
    from ..store import SpectraStore

    s = SpectraStore(path)
    n, p = s.n_stars, s.n_pixels
    if normalized is False:
        raise ValueError(f"{path}: a SpectraStore holds normalized spectra")
    return n, p, True, dict(kind="store", path=path, n=n, p=p), False


def _describe_npz(path, normalized):
    """(N, P, normalized, identity, has a bitmask) of an npz, checking its arrays' shapes."""
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
    return n, p, norm, dict(kind="npz", path=path, n=n, p=p, size=st.st_size,
                            mtime_ns=st.st_mtime_ns), arrays["bitmask"] is not None
