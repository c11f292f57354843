"""The Dask backend: a LocalCluster of 2 worker processes, one of them killed mid-run."""
import os
import signal

import distributed
import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast import survey as sv
from cannon_fast.testing import make_synthetic

CHUNK = 100
N_CHUNKS = 24


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask")
    s = make_synthetic(n_stars=300 + N_CHUNKS * CHUNK, n_pix=300, n_labels=3, seed=5)
    model = CannonModel(s.label_names, backend="numba").train(s.flux[:300], s.ivar[:300],
                                                              s.labels[:300])
    np.savez(d / "survey.npz", flux=s.flux[300:].astype(np.float32),
             ivar=s.ivar[300:].astype(np.float32))
    sv.label_survey(model, d / "survey.npz", d / "ref.fits", chunk_size=CHUNK)
    return d, model, sv.read_catalog(d / "ref.fits")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def _same(ref, got):
    assert len(ref) == len(got)
    for name in ref.colnames:
        a, b = np.asarray(ref[name]), np.asarray(got[name])
        if a.dtype.kind == "f":
            assert a.tobytes() == b.tobytes(), name
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_dask_worker_killed_mid_run(job, client, tmp_path):
    d, model, ref = job
    pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    seen = []

    def kill_one_worker(k):  # called by the driver after each committed chunk
        seen.append(k)
        if len(seen) == 2:
            os.kill(victim, signal.SIGKILL)

    s = sv.label_survey(model, d / "survey.npz", tmp_path / "cat.fits", chunk_size=CHUNK,
                        scheduler=client, _on_commit=kill_one_worker)
    assert (s.n_read, s.n_chunks, s.n_failed) == (N_CHUNKS * CHUNK, N_CHUNKS, 0)
    assert sorted(seen) == list(range(N_CHUNKS))  # every chunk committed once
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.run(os.getpid).values()  # the nanny replaced the killed one
    _same(ref, sv.read_catalog(tmp_path / "cat.fits"))


@pytest.mark.slow
def test_dask_resumes_a_single_process_run(job, client, tmp_path, monkeypatch):
    d, model, ref = job
    out = tmp_path / "cat.fits"
    real = sv.catalog._write_part
    n = [0]

    def fail_after_five(path, columns):
        if n[0] == 5:
            raise OSError(28, "No space left on device", path)
        n[0] += 1
        real(path, columns)

    monkeypatch.setattr(sv.catalog, "_write_part", fail_after_five)
    with pytest.raises(sv.SurveyError, match="disk full"):
        sv.label_survey(model, d / "survey.npz", out, chunk_size=CHUNK)
    monkeypatch.undo()
    s = sv.label_survey(model, d / "survey.npz", out, chunk_size=CHUNK, scheduler=client)
    assert s.n_resumed == 5
    _same(ref, sv.read_catalog(out))
