"""The job: :func:`label_survey`, a short driver of the other modules.

It checks the arguments, describes the inputs (:mod:`.inputs`), fixes the
job's options and identity, checks the catalogue and the parts of an earlier
run (:mod:`.catalog`), runs the chunks still to do (:mod:`.schedulers`,
:mod:`.chunk`), committing each, and merges the catalogue.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from .._util import progress
from ..core.fitting import _check_broadening
from .catalog import (_FORMAT, _VERSION, SurveyError, _catalog_format, _catalog_meta,
                      _catalog_record, _Parts, _refuse_other_model)
from .chunk import _grid_columns, _normalized
from .inputs import open_inputs
from .schedulers import run_chunks

__all__ = ["DEFAULT_CHUNK_SIZE", "SurveySummary", "model_hash", "label_survey",
           "read_normalized"]

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
        ``fitting.INFORMATIONAL_FLAGS`` such as SPARSE_TRAINING do not count).
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
    label scaling and training labels (which set the bounds and starting points),
    and the error calibration when there is one.

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
    if getattr(model, "error_model", None) is not None:   # it sets the errors written
        h.update(json.dumps(model.error_model.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]




def label_survey(model, inputs, out, chunk_size=DEFAULT_CHUNK_SIZE, visits=False,
                 scheduler=None, workers=None, format=None, continuum=None, degree=None,
                 bad_bits=None, normalized=None, release=None, debias=True, broadening=False,
                 refine_continuum=False, backend=None, fit_options=None, binaries=False,
                 show_progress=None, log=None, force=False, n_workers=None, fmt=None,
                 continuum_pixels=None, _on_commit=None):
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
    workers : int, optional
        Workers of the process pool or local cluster (default: the number of CPUs).
    format : {"fits", "parquet"}, optional
        Default: from the suffix of ``out``.
    continuum : array_like, str or os.PathLike, optional
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
    debias, broadening, refine_continuum : bool
        The label fit, as ``model.fit`` takes them (``broadening`` needs
        ``debias=False``).
    backend : str, optional
        Kernels of the normalization and the fit (default: the model's).
    fit_options : dict, optional
        Other keyword arguments of ``model.fit`` (e.g. ``n_starts``).
    binaries : bool or CannonModel
        Screen every star for an unresolved companion (``core.binaries``) and add
        the BINARY_* columns (flag, Δχ², light share, velocity, secondary TEFF/LOGG,
        the composite fit's primary labels). A model (of dwarfs, on the same pixels)
        instead of True makes the secondaries of the composite fits
        (``screen_binaries(secondary_model=)``).
    show_progress : bool, optional
        Progress bar with stars/s and time left (default: on a terminal).
    log : callable, optional
        Called with one-line messages (e.g. ``print``).
    force : bool
        Replace an existing catalogue with this job's rows alone (the old one
        stays until the new one is written) instead of refusing a catalogue
        that holds these inputs labeled by another job, or another model's labels.
    n_workers, fmt, continuum_pixels
        The older names of ``workers``, ``format`` and ``continuum``.

    The keywords are those of ``cannon-fast label`` (``--chunk-size``,
    ``--workers``, ``--format``, ``--continuum``, ``--no-debias``, ``--backend``,
    ...), with dashes as underscores.

    Returns
    -------
    SurveySummary

    Raises
    ------
    SurveyError
        The catalogue or a partial run belongs to another model or job (the
        catalogue already holds these inputs labeled with other options), or a
        write failed (e.g. a full disk); what was committed is kept.  The
        identical job again is not an error: it resumes, or does nothing.
    ValueError
        Bad inputs: the model's pixel grid does not match the spectra, ...
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: None)
    out = os.fspath(out)
    workers = _renamed("workers", workers, "n_workers", n_workers)
    fmt = _catalog_format(out, _renamed("format", format, "fmt", fmt))
    continuum = _renamed("continuum", continuum, "continuum_pixels", continuum_pixels)
    fit_options = _fit_keywords(fit_options, debias=debias, broadening=broadening,
                                refine_continuum=refine_continuum)
    # the kernels are the job's (recorded once), not a fit option
    backend = _renamed("backend", backend, "fit_options['backend']",
                       fit_options.pop("backend", None)) or model.backend
    chunk_size, fit_options = _check_arguments(model, chunk_size, fit_options)
    mh = model_hash(model)
    source = open_inputs(inputs, visits=visits, normalized=normalized, release=release,
                         bad_bits=bad_bits)
    _grid_columns(source.n_pixels, model.n_pixels)  # refuse a wrong grid before any work
    options = _chunk_options(model, mh, source, fit_options, continuum, degree, bad_bits, log,
                             backend)
    options["binaries"] = binaries is not False and binaries is not None
    if options["binaries"] and binaries is not True:   # a model for the secondaries
        from ..core.binaries import check_secondary_model
        check_secondary_model(model, binaries)
        options["secondary_model"] = binaries
    if source.n_items == 0:
        raise ValueError(f"no spectra in the inputs ({source.describe})")
    job, job_id = _job_identity(mh, source, chunk_size, options["backend"], options)
    n_items = source.n_items
    n_chunks = -(-n_items // chunk_size)
    bounds = [(k * chunk_size, min((k + 1) * chunk_size, n_items)) for k in range(n_chunks)]
    parts = _Parts(out, n_chunks)
    summary = SurveySummary(catalog=out, n_chunks=n_chunks)

    existing = _catalog_meta(out, fmt)   # refuses a file that is no cannon-fast catalogue
    if existing is not None and force:
        log(f"--force: {out} will be replaced by this job's rows once they are all written")
        existing = None
    if existing is not None:
        _refuse_other_model(existing, out, model, mh)
        record = next((j for j in existing["jobs"] if j["job_id"] == job_id), None)
        if record is None:  # the same job recorded before its options were spelled out?
            record = _refuse_other_job(existing, out, job, job_id)
        if record is not None:
            parts.remove()  # merged, then killed before cleaning up
            return _already_done(summary, record, existing, t0)

    parts.start(dict(format=_FORMAT, version=_VERSION, job_id=job_id, job=job,
                     n_items=n_items, n_chunks=n_chunks, label_names=list(model.label_names),
                     n_pixels=int(model.n_pixels)))
    done = parts.committed()
    summary.n_resumed = len(done)
    if done:
        log(f"resuming: {len(done)} of {n_chunks} chunks already committed in {parts.path}")
    log(f"labeling {source.describe} in {n_chunks} chunks of {chunk_size} "
        f"({'raw: masking + continuum normalization' if not source.normalized else 'normalized'})")
    pending = [k for k in range(n_chunks) if k not in done]
    bar = progress(total=n_items, initial=sum(bounds[k][1] - bounds[k][0] for k in done),
                   desc="labeling", unit="star",
                   disable=None if show_progress is None else not show_progress)

    def commit(k, columns):
        parts.commit(k, columns)
        if _on_commit is not None:
            _on_commit(k)
        bar.update(bounds[k][1] - bounds[k][0])

    try:
        run_chunks(model, ((k, source.chunk(*bounds[k])) for k in pending), options, commit,
                   scheduler=scheduler, n_workers=workers, name=f"cannon-fast-chunk-{job_id}")
    finally:
        bar.close()

    # every chunk is committed: merge (old rows first, then the chunks in order)
    counts, failures = parts.tally(model.label_names, n_items)
    record = dict(job_id=job_id, counts=counts, inputs=source.identity, chunk_size=chunk_size,
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"), job=job)
    parts.merge_into(out, fmt, _catalog_record(model, mh, record, existing), existing)
    summary.__dict__.update(counts)
    summary.failures = failures
    summary.catalog_rows = (existing["n_rows"] if existing else 0) + counts["n_spectra"]
    summary.elapsed = time.perf_counter() - t0
    return summary


def _renamed(name, value, old_name, old_value):
    """The value of a keyword given by its name or its older one (not both)."""
    if old_value is None:
        return value
    if value is not None:
        raise TypeError(f"give {name}= or its older name {old_name}=, not both")
    return old_value


def _fit_keywords(fit_options, **given):
    """``fit_options`` with the fit keywords given by name; refuse the two disagreeing."""
    out = dict(fit_options or {})
    for key, value in given.items():
        if key in out and value != _FIT_DEFAULTS[key] and out[key] != value:
            raise TypeError(f"{key}={value!r} and fit_options={{{key!r}: {out[key]!r}}} "
                            "disagree")
        out.setdefault(key, value)
    return out


def read_normalized(model, inputs, continuum=None, degree=None, bad_bits=None, normalized=None,
                    release=None, log=None):
    """All spectra of ``inputs``, masked and normalized for ``model`` as a label job does it.

    The in-memory counterpart of :func:`label_survey` for ``cannon-fast fit``:
    apStar files (paths, lists, directories) are masked and continuum-normalized
    with the model's recorded continuum (as ``cannon-fast prepare --model`` does),
    stores and normalized npz files are read as they are.

    Parameters
    ----------
    model : CannonModel or PayneEmulator
        Any forward model on the spectra's grid; without a continuum record or
        ``continuum``, its pixels are picked from the model.
    inputs, continuum, degree, bad_bits, normalized, release
        As for :func:`label_survey`.
    log : callable, optional

    Returns
    -------
    dict
        ``flux``, ``ivar`` (N, P of the model's grid), ``ids`` (N,), ``reason``
        (N,) object: why a row cannot be fitted ("" if it can), ``describe``.
    """
    source = open_inputs(inputs, normalized=normalized, release=release, bad_bits=bad_bits)
    if source.n_items == 0:
        raise ValueError(f"no spectra in the inputs ({source.describe})")
    cols = _grid_columns(source.n_pixels, model.n_pixels)
    options = _chunk_options(model, "", source, {}, continuum, degree, bad_bits,
                             log or (lambda msg: None))
    d = source.chunk(0, source.n_items).read()
    flux, ivar, _ = _normalized(d, options, np.zeros(len(d["reason"]), np.int64))
    if cols is not None:
        flux, ivar = flux[:, cols], ivar[:, cols]
    return dict(flux=flux, ivar=ivar, ids=d["ids"], reason=d["reason"],
                describe=source.describe)


def _check_arguments(model, chunk_size, fit_options):
    """Refuse what would fail every chunk; return ``chunk_size`` (int), ``fit_options`` (dict)."""
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not getattr(model, "is_trained", False):
        raise ValueError("the model is not trained")
    fit_options = {**_FIT_DEFAULTS, **(fit_options or {})}
    # fit_cannon would refuse every chunk (each star recorded as failed): refuse once, first
    _check_broadening(fit_options.get("debias", True), fit_options.get("broadening", False))
    return chunk_size, fit_options


def _chunk_options(model, mh, source, fit_options, continuum_pixels, degree, bad_bits, log,
                   backend=None):
    """The options of every chunk (see process_chunk): for raw spectra, their continuum too."""
    from ..apogee.bitmask import DEFAULT_BAD_BITS, bit_value

    options = dict(model_hash=mh, degree=None, bad_bits=bit_value(
        DEFAULT_BAD_BITS if bad_bits is None else bad_bits), fit=dict(fit_options or {}),
        backend=backend or getattr(model, "backend", "auto"))  # an emulator has none
    if source.normalized:
        return options
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
    return options


def _job_identity(mh, source, chunk_size, backend, options):
    """The job (all that makes its labels: model, inputs, options) and its 16-hex-digit id."""
    job = dict(model_hash=mh, inputs=source.identity, chunk_size=chunk_size, backend=backend,
               degree=options["degree"], bad_bits=options["bad_bits"], fit=options["fit"],
               continuum=(hashlib.sha256(np.packbits(options["continuum_pixels"]).tobytes())
                          .hexdigest()[:16] if "continuum_pixels" in options else None))
    if options.get("binaries"):   # only when asked: older jobs keep their ids
        from ..core.binaries import SCREEN_VERSION

        sec = options.get("secondary_model")
        job["binaries"] = True if sec is None else model_hash(sec)
        job["binary_screen"] = SCREEN_VERSION
    job_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    return job, job_id


#: The label fit's choices a job always records (the ``model.fit`` defaults where not given),
#: so that the API's defaults and the command line's make the same job.
_FIT_DEFAULTS = dict(debias=True, broadening=False, refine_continuum=False)


def _flat(job):
    """A job's options as one flat dict (``fit`` spelled out), without its inputs."""
    out = {k: v for k, v in job.items() if k not in ("inputs", "fit")}
    out.update({f"fit.{k}": v for k, v in {**_FIT_DEFAULTS, **(job.get("fit") or {})}.items()})
    return out


#: Job options that change how labels are measured: a catalogue holds one setting of each.
#: (The chunk size and the backend change only the rounding.)
_METHOD_OPTIONS = ("degree", "bad_bits", "continuum", "binaries", "binary_screen")


def _method(job):
    """The options of a job (flat) that make its labels mean something else."""
    flat = _flat(job)
    return {k: v for k, v in flat.items() if k in _METHOD_OPTIONS or k.startswith("fit.")}


def _refuse_other_job(existing, out, job, job_id):
    """Raise SurveyError if ``out`` would hold rows of one model made in different ways.

    The same inputs again with other options would add a second set of rows for
    the same stars under the same MODEL_HASH; other inputs may be appended, but
    only measured the same way (fit options, continuum, masked bits), so that one
    catalogue is one method. Returns the record of the same job made before its
    options were spelled out in full (None if there is none).
    """
    for old in existing["jobs"]:
        if old.get("inputs") != job["inputs"]:
            if "job" in old and _method(old["job"]) != _method(job):
                then, now = _method(old["job"]), _method(job)
                diffs = [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                         for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
                raise SurveyError(
                    f"{out} holds labels measured with other options ({'; '.join(diffs[:4])}); "
                    "refusing to append rows measured another way. Use the same options, "
                    "write to another --out, or pass --force to replace the catalogue.")
            continue
        if "job" in old:
            then, now = _flat(old["job"]), _flat(job)
            diffs = [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                     for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
            if not diffs:
                return old
            what = "; ".join(diffs[:4])
        elif old.get("chunk_size") != job["chunk_size"]:
            what = f"chunk_size: {old.get('chunk_size')!r} then, {job['chunk_size']!r} now"
        else:
            what = f"job {old['job_id']} then, {job_id} now"
        raise SurveyError(
            f"{out} already holds these inputs labeled with other options ({what}); "
            "refusing to add a second set of rows for the same stars. Write to another --out, "
            "or pass --force to replace the catalogue (once the new one is written).")
    return None


def _already_done(summary, record, existing, t0):
    """The summary of a job the catalogue already holds (its ``record``): nothing to fit."""
    summary.__dict__.update({k: record["counts"][k] for k in
                             ("n_read", "n_spectra", "n_fitted", "n_flagged", "n_failed")})
    summary.n_resumed = summary.n_chunks
    summary.catalog_rows = existing["n_rows"]
    summary.already_done = True
    summary.elapsed = time.perf_counter() - t0
    return summary
