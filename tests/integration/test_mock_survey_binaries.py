"""The lab on a mock survey with 30 % unresolved binaries, against its truth.

``../shared/tools/mock_survey.py --binary-fraction 0.3``: SB2-like binaries whose secondary
is shifted per visit (relative semi-amplitude K_REL, H-band flux ratio FLUX_RATIO_H). The
lab screens every star (core.binaries), leaves the flagged training stars out, and reports
singles and flagged stars apart; its error calibration and its step-10 diagnosis are
judged here by the truth. Measured numbers: docs/lab.md (steps 10, 12 and 15).
"""
import os
import shutil
import subprocess
import sys

import pytest

from cannon_fast.lab.pipeline import run_lab

N_STARS = int(os.environ.get("CANNON_FAST_MOCK_STARS", 3036))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary_lab(shared_dir, tmp_path_factory):
    tool = shared_dir / "tools" / "mock_survey.py"
    cont = shared_dir / "data" / "real" / "lab2" / "cannon_continuum_apogee.npz"
    if not tool.exists() or not cont.exists():
        pytest.skip(f"{tool} or {cont} missing")
    root = tmp_path_factory.mktemp("mock_binaries")
    data = root / "mock"
    try:
        subprocess.run([sys.executable, str(tool), "--n-stars", str(N_STARS), "--format", "sas",
                        "--out", str(data), "--workers", "2", "--seed", "11",
                        "--binary-fraction", "0.3"], check=True, stdout=subprocess.DEVNULL)
        s = run_lab(data_dir=data, out_dir=root / "report", continuum=cont, extras=False,
                    show_progress=False, log=None, n_outliers=20)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    yield s
    shutil.rmtree(root, ignore_errors=True)


def test_binaries_are_found_and_left_out_of_training(binary_lab):
    b = binary_lab["binaries"]
    t = b["validation"]["truth"]
    assert b["training"]["n_flagged"] > 0
    # the bright, fast ones (flux ratio > 0.3, K_rel > 15 km/s) are found; singles are not
    assert t["n_bright_fast_flagged"] >= 0.8 * t["n_bright_fast"], t
    assert t["n_singles_flagged"] <= 0.03 * t["n_singles"], t
    # most flagged stars are true binaries (the flag means something)
    assert t["n_binaries_flagged"] >= 0.8 * b["validation"]["n_flagged"], t


def test_singles_and_corrected_primaries_against_the_truth(binary_lab):
    v = binary_lab["binaries"]["validation"]
    singles = v["true_singles_vs_true"]
    # the issue's targets: singles' Teff <= 30 K and [Fe/H] <= 0.02 dex against the truth
    assert singles["TEFF"]["scatter"] <= 30 and singles["FE_H"]["scatter"] <= 0.02, singles
    # the composite fit's primaries (secondaries from the survey's own dwarfs, the lowest
    # chi2 of several starts): within 2x the singles' rms, the issue's target (measured
    # 1.35x / 1.84x / 1.53x with the continuous secondary, 1.38x / 1.97x / 1.56x without;
    # log g has the least room, see docs/lab.md step 15)
    assert binary_lab["binaries"]["secondary_model"]["n_stars"] >= 50
    comp, one = v["flagged_composite_fit_vs_true"], v["flagged_single_fit_vs_true"]
    for n in ("TEFF", "LOGG", "FE_H"):
        assert comp[n]["rms"] <= 2.0 * singles[n]["rms"], (n, comp[n], singles[n])
    for n in ("TEFF", "LOGG", "FE_H"):
        assert comp[n]["rms"] < 0.6 * one[n]["rms"], (n, comp[n], one[n])


def test_step10_diagnosis_from_the_data_agrees_with_the_truth(binary_lab):
    """Outliers the data call binaries are binaries; those it blames on the catalogue are."""
    outl = binary_lab["outliers"]
    binary_said = [o for o in outl if o["main_reason_from_data"].startswith("a likely binary")]
    catalog_said = [o for o in outl if "catalogue label is the likely culprit"
                    in o["main_reason_from_data"]]
    assert binary_said or catalog_said, [o["main_reason_from_data"] for o in outl]
    if binary_said:
        truly = [o for o in binary_said if "true (injected) binary" in o["diagnosis"]]
        assert len(truly) >= 2 / 3 * len(binary_said), [o["diagnosis"] for o in binary_said]
    if catalog_said:
        cat_worse = [o for o in catalog_said
                     if abs(o["catalog_minus_true"]) > abs(o["fit_minus_true"])]
        assert len(cat_worse) >= 2 / 3 * len(catalog_said), [
            (o["catalog_minus_true"], o["fit_minus_true"]) for o in catalog_said]


def test_calibrated_errors_hold_for_the_stars_the_screen_passes(binary_lab):
    pulls = binary_lab["binaries"]["validation"]["pulls_unflagged_vs_true"]
    for name in ("TEFF", "LOGG", "FE_H"):
        for b, e in pulls[name].items():
            if e["n"] >= 50:
                # unflagged (weak) binaries stay in training and widen the floor a little
                assert 0.7 <= e["calibrated"] <= 1.3, (name, b, e)
                assert e["formal"] > 1.5 * e["calibrated"], (name, b, e)
