"""Kill a real ``cannon-fast label`` process mid-run (SIGKILL, SIGINT) and resume it."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast import survey as sv
from cannon_fast.testing import make_synthetic

N_CHUNKS = 20
CHUNK = 100

# The job under test, slowed down after each commit so that the kill lands mid-run.
# Python leaves SIGINT ignored when it starts with SIGINT ignored, as every process started
# in the background of a non-interactive shell does; the runner restores Ctrl-C so that the
# SIGINT case does not depend on how pytest was launched.
RUNNER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from cannon_fast.survey import catalog
real = catalog._write_part
delay = float(sys.argv[1])
def slow(path, columns):
    real(path, columns)
    time.sleep(delay)
catalog._write_part = slow
from cannon_fast.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    s = make_synthetic(n_stars=300 + N_CHUNKS * CHUNK, n_pix=200, n_labels=3, seed=11)
    model = CannonModel(s.label_names, backend="numba").train(s.flux[:300], s.ivar[:300],
                                                              s.labels[:300])
    model.write(d / "model.npz")
    np.savez(d / "survey.npz", flux=s.flux[300:].astype(np.float32),
             ivar=s.ivar[300:].astype(np.float32))
    (d / "runner.py").write_text(RUNNER)
    ref = d / "ref.fits"
    sv.label_survey(CannonModel.read(d / "model.npz", backend="numba"), d / "survey.npz", ref,
                    chunk_size=CHUNK)
    return d, sv.read_catalog(ref)


def _run(d, out, delay):
    args = [sys.executable, str(d / "runner.py"), str(delay), "label", str(d / "model.npz"),
            str(d / "survey.npz"), "--out", str(out), "--chunk-size", str(CHUNK),
            "--backend", "numba"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, CANNON_FAST_PROGRESS="0"))


def _parts(out):
    try:
        return [f for f in os.listdir(f"{out}.parts") if f.startswith("chunk-")]
    except FileNotFoundError:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_identical_labels(job, tmp_path, sig):
    d, ref = job
    out = tmp_path / "cat.fits"
    proc = _run(d, out, 0.1)
    deadline = time.time() + 120
    while len(_parts(out)) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the job did not start committing chunks"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again to resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    committed = len(_parts(out))
    assert 3 <= committed < N_CHUNKS and not out.exists()
    proc = _run(d, out, 0.0)
    text, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"{N_CHUNKS} chunks ({committed} resumed)" in text
    assert f"read {N_CHUNKS * CHUNK} stars ({N_CHUNKS * CHUNK} spectra)" in text
    got = sv.read_catalog(out)
    assert len(got) == len(ref) and not os.path.exists(f"{out}.parts")
    for name in ref.colnames:
        a, b = np.asarray(ref[name]), np.asarray(got[name])
        if a.dtype.kind == "f":
            assert a.tobytes() == b.tobytes(), name  # byte-identical label columns
        else:
            np.testing.assert_array_equal(a, b)
