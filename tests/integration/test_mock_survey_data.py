"""Mock survey end to end: cuts leave the generator's count; normalized spectra match the truth."""
import gc
import importlib.util
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from astropy.table import Table

from cannon_fast.cli import main
from cannon_fast.store import SpectraStore

pytestmark = pytest.mark.slow

ALLSTAR = "dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits"


@pytest.fixture(scope="module")
def survey(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mock300")
    run = subprocess.run([sys.executable, str(shared_dir / "tools" / "mock_survey.py"),
                          "--format", "sas", "--n-stars", "300", "--out", str(out),
                          "--workers", "2"], check=True, capture_output=True, text=True)
    line = re.search(r"cut breakdown \(catalogue\): (.*)", run.stdout).group(1)
    counts = {k: int(v) for k, v in (kv.split("=") for kv in line.split(", "))}
    return out, counts


@pytest.fixture(scope="module")
def mock_module(shared_dir):
    spec = importlib.util.spec_from_file_location("_mock_survey",
                                                  shared_dir / "tools" / "mock_survey.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _truth_normalized(ms, truth, rows):
    """Compute the generator's noiseless normalized spectra on the 8575 grid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)   # the generator leaves files open
        inp = ms.load_inputs(ms.DEFAULT_INPUTS)
        gc.collect()
    col = {c: np.asarray(truth[c][rows], float) for c in ("TEFF", "LOGG", "FE_H", "MG_FE",
                                                           "SI_FE")}
    deriv = np.column_stack([np.clip(col["TEFF"], 3900, 5300), np.clip(col["LOGG"], 0.8, 3.8),
                             np.clip(col["FE_H"], -2.3, 0.4), np.clip(col["MG_FE"], -0.1, 0.4)])
    f1 = ms.emulate(inp, np.asarray(truth["EMU_LABELS"][rows], float))
    f1 = f1 + ms.si_response(inp, deriv, np.clip(col["SI_FE"] - col["MG_FE"], -0.4, 0.4))
    out = np.ones((len(rows), ms.NPIX))
    out[:, ms.GRID_IDX] = f1
    return np.clip(out, 0.02, 1.3), ms.GRID_IDX


def test_cuts_and_normalization_match_truth(survey, mock_module, shared_dir, tmp_path, capsys):
    out, counts = survey
    cont = shared_dir / "data" / "real" / "lab2" / "cannon_continuum_apogee.npz"
    store_dir = tmp_path / "train.store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # corner/matplotlib chatter is not under test
        rc = main(["prepare", "--apstar", str(out / "dr17"), "--allstar", str(out / ALLSTAR),
                   "--continuum", str(cont), "--out", str(store_dir), "--workers", "2",
                   "--corner", str(tmp_path / "corner.png"), "-q"])
    text = capsys.readouterr().out
    assert rc == 0, text
    store = SpectraStore(store_dir)
    # the cut report: per-cut failures equal the generator's own breakdown, and what is left
    rep = store.meta["cut_report"]
    assert rep["kept"] == counts["pass_all"] == len(store)
    for line, key in (("missing_labels", "missing"), ("low_snr", "snr_lt_50"),
                      ("dwarf", "dwarf"), ("metal_poor", "metal_poor")):
        row = next(r for r in text.splitlines() if r.startswith(line))
        assert int(row.split()[-3]) == counts[key], (line, row)
    truth = Table.read(out / "truth.fits")
    tid = np.char.strip(np.asarray(truth["APOGEE_ID"]).astype(str))
    assert set(store.ids) == set(tid[np.asarray(truth["PASS_LAB_CUTS"], bool)])
    assert (tmp_path / "corner.png").stat().st_size > 10000
    # normalized spectra agree with the truth-normalized ones to the noise level
    pos = {s: i for i, s in enumerate(tid)}
    rows = np.array([pos[s] for s in store.ids])
    single = ~np.asarray(truth["IS_BINARY"][rows], bool)
    T, grid = _truth_normalized(mock_module, truth, rows[single])
    flux = np.asarray(store.flux[single], float)
    ivar = np.asarray(store.ivar[single], float)
    ing = np.zeros(flux.shape[1], bool)
    ing[grid] = True
    good = (ivar > 0) & ing
    chi = (flux - T) * np.sqrt(ivar)
    std_chi = np.array([chi[i, good[i]].std() for i in range(len(T))])
    med_chi = np.array([np.median(chi[i, good[i]]) for i in range(len(T))])
    res = np.where(good, flux - T, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        block = np.nanmax(np.abs(np.nanmedian(res[:, :8500].reshape(len(T), -1, 100), axis=2)),
                          axis=1)
    assert np.median(std_chi) < 1.12, np.median(std_chi)     # noise alone gives ~1.0
    assert np.percentile(std_chi, 90) < 1.6
    assert abs(np.median(med_chi)) < 0.15
    assert np.median(block) < 0.02                            # smooth systematics < 2 per cent
    # and not trivially: the raw (un-normalized) flux is nowhere near the truth
    assert np.median(np.abs(flux[good] - T[good])) < 0.01
