"""The job: :func:`label_survey` and the schedulers that run its chunks."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time

import numpy as np

from .._util import atomic_path, progress
from ..core.fitting import INFORMATIONAL_FLAGS, _check_broadening
from . import catalog
from .catalog import (_FORMAT, _VERSION, SurveyError, _catalog_format, _catalog_meta,
                      _committed, _describe_difference, _merge, _part_path)
from .chunk import ALL_FLAGS, _fit_chunk, _grid_columns, _limit_threads, process_chunk
from .inputs import open_inputs

__all__ = ["DEFAULT_CHUNK_SIZE", "SurveySummary", "model_hash", "label_survey"]

#: Stars per chunk by default (a peak of about 0.85 GB on the 8575-pixel grid).
DEFAULT_CHUNK_SIZE = 2048


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



_WORKER_MODEL = None


def _pool_init(model, n_threads):
    """Initialize a process-pool worker: receive the model once, limit its threads."""
    global _WORKER_MODEL
    _WORKER_MODEL = model
    _limit_threads(n_threads)


def _pool_chunk(reader, options):
    """Process one chunk in a process-pool worker with the model it received at start."""
    return _fit_chunk(_WORKER_MODEL, reader.read(), options)




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
    from ..apogee.bitmask import DEFAULT_BAD_BITS, bit_value

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
        from ..core.continuum import model_continuum

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
            catalog._write_part(_part_path(parts, k), columns)
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
