"""The job's files: committed parts and their manifest, the merged catalogue, read_catalog.

While a job runs, ``CATALOG.parts/`` holds ``manifest.json`` (the job) and one
``chunk-NNNNNN.npz`` per committed chunk, each written atomically. When every
chunk is committed they are merged, after the rows of earlier jobs, into
``CATALOG`` (FITS or Parquet), written atomically too.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil

import numpy as np

from .._util import atomic_path
from ..core.fitting import INFORMATIONAL_FLAGS
from .chunk import ALL_FLAGS

__all__ = ["SurveyError", "read_catalog"]

_FORMAT = "cannon_fast.survey"
_VERSION = 1


class SurveyError(RuntimeError):
    """A survey job cannot start or continue (the message says why and what is kept)."""


# --------------------------------------------------------------------------- parts
def _write_part(path, columns):
    """Write one chunk's columns to ``path`` atomically (tests replace this to fail)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **columns)


class _Parts:
    """A job's committed chunks: ``<out>.parts/``, its manifest and one file per chunk.

    Parameters
    ----------
    out : str
        The catalogue; the parts live in ``out + ".parts"``.
    n_chunks : int
        Chunks of the job.
    """

    def __init__(self, out, n_chunks):
        self.path = out + ".parts"
        self.n_chunks = n_chunks
        self.n_committed = 0  # for the message of a failed write

    def chunk_path(self, k):
        """The part file of chunk ``k``."""
        return os.path.join(self.path, f"chunk-{k:06d}.npz")

    def start(self, manifest):
        """Write the job's manifest, or check that the parts there belong to this job.

        Raises
        ------
        SurveyError
            The parts hold a partial run of another job (model, options or inputs).
        """
        manifest_path = os.path.join(self.path, "manifest.json")
        if not os.path.exists(manifest_path):
            os.makedirs(self.path, exist_ok=True)
            with atomic_path(manifest_path) as tmp:
                with open(tmp, "w") as fh:
                    json.dump(manifest, fh, indent=1)
            return
        with open(manifest_path) as fh:
            old = json.load(fh)
        if old.get("job_id") == manifest["job_id"]:
            return
        oj, job = old.get("job", {}), manifest["job"]
        if oj.get("model_hash") != job["model_hash"]:
            why = (f"it was started with model {oj.get('model_hash')}, this model is "
                   f"{job['model_hash']}")
        else:
            d = _describe_difference({k: v for k, v in oj.items() if k != "inputs"},
                                     {k: v for k, v in job.items() if k != "inputs"})
            if oj.get("inputs") != job["inputs"]:
                d = (d + "; " if d else "") + "the inputs differ"
            why = f"it was started with other options ({d})"
        raise SurveyError(f"{self.path} holds a partial run of another job: {why}. Re-run the "
                          f"original command to finish it, or delete {self.path}.")

    def committed(self):
        """Return the set of chunks already committed (and count them as committed)."""
        done = set()
        for p in glob.glob(os.path.join(self.path, "chunk-*.npz")):
            try:
                k = int(os.path.basename(p)[6:12])
            except ValueError:
                continue
            if k < self.n_chunks:
                done.add(k)
        self.n_committed = len(done)
        return done

    def commit(self, k, columns):
        """Write chunk ``k``'s columns atomically; a failed write raises SurveyError."""
        try:
            _write_part(self.chunk_path(k), columns)
        except OSError as err:
            full = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
            raise SurveyError(
                f"{full} while committing chunk {k} to {self.path} ({err.strerror or err}); "
                f"{self.n_committed} of {self.n_chunks} chunks are committed and kept there: "
                "free space and re-run the same command to resume") from err
        self.n_committed += 1

    def tally(self, label_names, n_read):
        """Count the rows of every part: (counts, the first 100 failures as (ID, REASON))."""
        counts = dict(n_read=n_read, n_spectra=0, n_fitted=0, n_flagged=0, n_failed=0)
        failures = []
        for k in range(self.n_chunks):
            p = self.chunk_path(k)
            if not os.path.exists(p):
                raise SurveyError(f"chunk {k} is missing from {self.path}; re-run to redo it")
            with np.load(p, allow_pickle=False) as d:
                lab = np.column_stack([d[name] for name in label_names])
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
        return counts, failures

    def merge_into(self, out, fmt, meta, existing):
        """Write the catalogue (earlier rows, then every chunk in order), then remove the parts.

        Raises
        ------
        SurveyError
            The catalogue could not be written; the parts are kept.
        """
        try:
            _merge(out, fmt, [self.chunk_path(k) for k in range(self.n_chunks)], meta, existing)
        except OSError as err:
            raise SurveyError(f"could not write the catalogue {out} ({err.strerror or err}); all "
                              f"{self.n_chunks} chunks stay committed in {self.path}: free space "
                              "and re-run the same command to merge them") from err
        self.remove()

    def remove(self):
        """Remove the parts directory (if there is one)."""
        if os.path.isdir(self.path):
            shutil.rmtree(self.path, ignore_errors=True)


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


def _refuse_other_model(existing, out, model, model_hash):
    """Raise SurveyError if the catalogue ``out`` (its record ``existing``) is another model's."""
    if existing["model_hash"] == model_hash:
        return
    why = [f"it holds labels from model {existing['model_hash']}, this model is {model_hash}"]
    if existing.get("label_names") != list(model.label_names):
        why.append(f"labels {existing.get('label_names')} vs {list(model.label_names)}")
    if existing.get("n_pixels") != model.n_pixels:
        why.append(f"{existing.get('n_pixels')} vs {model.n_pixels} pixels")
    raise SurveyError(f"refusing to append to {out}: " + "; ".join(why)
                      + ". Write to another --out (or delete it).")


def _catalog_record(model, model_hash, job, existing):
    """The catalogue's record after this ``job``: model, flag bits, every job and the totals."""
    jobs = list(existing["jobs"]) if existing else []
    jobs.append(job)
    total = {k: sum(j["counts"][k] for j in jobs) for k in job["counts"]}
    return dict(format=_FORMAT, version=_VERSION, model_hash=model_hash,
                training_hash=getattr(model, "training_hash", None),
                label_names=list(model.label_names), n_pixels=int(model.n_pixels),
                flags=ALL_FLAGS, counts=total, jobs=jobs)


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


def _merge(out, fmt, paths, meta, existing):
    """Write old rows + every part (``paths``, in chunk order) to ``out`` atomically."""
    dtype = _table_dtype(out, fmt, paths, existing)

    def blocks():
        if existing is not None:
            yield from _existing_rows(out, fmt)
        for p in paths:
            yield _load_part(p)

    with atomic_path(out) as tmp:
        if fmt == "parquet":
            _write_parquet(tmp, blocks(), dtype, meta)
        else:
            _write_fits(tmp, blocks(), dtype, meta)


def _table_dtype(out, fmt, paths, existing):
    """The catalogue's rows: columns in first-seen order, each string as wide as its widest."""
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
    return np.dtype([(k, f"S{widths[k]}") if kinds[k].kind in "USO" else (k, kinds[k])
                     for k in names])


def _write_parquet(path, blocks, dtype, meta):
    """Write the blocks of columns as one Parquet table with the job record in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = None
    writer = None
    try:
        for cols in blocks:
            arr = _conform(cols, dtype)
            table = pa.table({k: (np.char.decode(arr[k], "ascii")
                                  if arr[k].dtype.kind == "S" else arr[k])
                              for k in dtype.names})
            if writer is None:
                schema = table.schema.with_metadata(
                    {b"cannon_fast": json.dumps(meta).encode()})
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(table.cast(schema))
    finally:
        if writer is not None:
            writer.close()


def _write_fits(path, blocks, dtype, meta):
    """Write the blocks of columns as the LABELS table, then the job record (JOBS, JSON)."""
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
    with fitsio.FITS(path, "rw", clobber=True) as fh:
        first = True
        for cols in blocks:
            arr = _conform(cols, dtype)
            if first:
                fh.write(arr, extname="LABELS", header=header)
                first = False
            else:
                fh[1].append(arr)
        fh.write(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), extname="JOBS")


def _describe_difference(old, new):
    """Name (at most four of) the keys whose values differ between two job records."""
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys
             if old.get(k) != new.get(k)]
    return "; ".join(diffs[:4])
