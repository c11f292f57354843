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
appends rows measured the same way (other fit options, continuum or masked bits are
refused), and a model with a different hash is refused.

With ``scheduler="dask"`` (a ``distributed.LocalCluster``), a scheduler
address or a ``distributed.Client``, the chunks become tasks: the model is
scattered to every worker once, each worker reads its own chunk from the
(shared) file system, and the driver commits the returned results exactly as
the single-process path does, so resuming works the same way.

The modules, one step each: :mod:`.inputs` (expand and open the inputs, read
them chunk by chunk), :mod:`.chunk` (mask, normalize and fit one chunk),
:mod:`.catalog` (the parts and their manifest, the merge, :func:`read_catalog`),
:mod:`.schedulers` (this process, a process pool, Dask) and :mod:`.run`
(:func:`label_survey`, the driver).
"""
from .catalog import SurveyError, read_catalog
from .chunk import ALL_FLAGS, SURVEY_FLAGS, process_chunk
from .inputs import open_inputs
from .run import DEFAULT_CHUNK_SIZE, SurveySummary, label_survey, model_hash, read_normalized

__all__ = ["SURVEY_FLAGS", "ALL_FLAGS", "DEFAULT_CHUNK_SIZE", "SurveyError", "SurveySummary",
           "model_hash", "open_inputs", "label_survey", "process_chunk", "read_catalog",
           "read_normalized"]
