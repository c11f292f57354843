"""The lab pipeline on the realistic mock survey (../shared/tools/mock_survey.py) against its truth.

Issue 4 asks for the lab's targets (Teff scatter <= 30 K, [Fe/H] <= 0.02 dex, |bias| <= 5 K
and 0.005 dex against the TRUE labels) on the 3036-star survey. Measured (Dec 2026): 1876
stars kept, 938/937 split. Cross-validation inside the training set (against the catalogue
labels, never the truth) chooses the quadratic model + TEFF^3 + TEFF^4 + FE_H^3 built in
1/TEFF (theta = 5040/Teff), trained with the catalogue's label errors (labels
regression-calibrated under a Gaussian-mixture prior, error-weighted stars), and the label
fit with extra line broadening and the continuum refined against the model:
Teff -1.4 / 29.7 K, [Fe/H] 0.0046 / 0.0140 dex (bias / scatter). Both targets are met, with
little margin. How it got there (seed-0 split, Teff / [Fe/H] scatter):

- the same model in Teff rather than 1/Teff, broadened fit: 31.2 K / 0.0153 (the previous
  state); in 1/Teff: 30.4 K / 0.0152; the continuum refinement on top: 29.7 K / 0.0140.
  On three other random halves the two together take Teff 30.6 / 26.1 / 24.5 K to
  28.0 / 25.2 / 24.5 K and lower [Fe/H] on all three;
- without FE_H^3 32.4 K / 0.0175; the plain fit (no broadening) 34.1 K / 0.0198; without
  the label errors 38.0 K / 0.0206; the lab's quadratic alone 48.0 K / 0.0253 -- the same as
  TheCannon (Ho) on the same normalized spectra, 48.1 K -- and the peers reach 40-45 K on
  their own pipeline (PEERS.md section 2). The broadening term absorbs the mock's hidden
  macroturbulence (its fitted value correlates 0.57 with it), which otherwise reads as [Fe/H].

Where the floor is: a model trained on the TRUE labels scatters by 27.8 K (29.2 K before the
two changes): with the mock's effects on (macroturbulence spread, continuum perturbations,
sky and telluric residuals) even perfect training labels leave ~28 K. The catalogue's Teff is
offset by ~20 K per dex of [Fe/H], which no training removes. The 16 dwarfs/subgiants and 11
halo giants, 3 % of the stars, carry ~40 % of the squared Teff error: the training set is
thin there. Tried and not kept (Teff on the seed-0 split): full cubic terms (36.6 K),
training stars weighted by inverse label density (34.6-36.3 K), training labels refined by
combining the catalogue with out-of-fold spectroscopic labels (31.3-36.4 K), dropping
training stars whose catalogue and out-of-fold labels disagree (31.5-34.6 K), a ridge
penalty on the non-linear coefficients (31.2-40.1 K), the catalogue's label errors scaled
by 1.25-2 (31.8-43.6 K), the training spectra's continuum refined too (+0.4 K), and The
Payne's MLP as the forward model (40 K even when trained on the true labels). Measured but
not built: the model in ln(flux) as well (a further -1.0 K on the seed-0 split): it changes
what the model's flux means for every consumer (fits, MCMC, binaries, movies).
Run time of this file: ~3.5 min on 2 quiet cores (generation ~40-60 s, lab ~150 s), so CI
runs all 3036 stars; set CANNON_FAST_MOCK_STARS to use fewer. The ~7 GB archive tree is
written under pytest's tmp_path and removed afterwards.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

from cannon_fast.lab.pipeline import AUTO_MODELS, run_lab

#: Stars generated (the lab's 3036).
N_STARS = int(os.environ.get("CANNON_FAST_MOCK_STARS", 3036))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mock_lab(shared_dir, tmp_path_factory):
    tool = shared_dir / "tools" / "mock_survey.py"
    cont = shared_dir / "data" / "real" / "lab2" / "cannon_continuum_apogee.npz"
    if not tool.exists() or not cont.exists():
        pytest.skip(f"{tool} or {cont} missing")
    root = tmp_path_factory.mktemp("mock_survey")
    data = root / "mock"
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(tool), "--n-stars", str(N_STARS), "--format", "sas",
                        "--out", str(data), "--workers", "2"], check=True,
                       stdout=subprocess.DEVNULL)
        t_gen = time.perf_counter() - t0
        s = run_lab(data_dir=data, out_dir=root / "report", continuum=cont, extras=False,
                    show_progress=False, log=None)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    print(f"mock survey: {N_STARS} stars generated in {t_gen:.0f} s; lab {s['timings']}")
    yield s
    shutil.rmtree(root, ignore_errors=True)


def _numbers(s):
    v = s["validation"][s["primary_fit"]]["vs_true"]
    return {k: (round(v[k]["bias"], 4), round(v[k]["scatter"], 4)) for k in ("TEFF", "FE_H")}


def test_mock_survey_pipeline_runs_and_recovers_labels(mock_lab):
    s = mock_lab
    if N_STARS == 3036:
        assert s["cuts"]["n_kept"] == 1876  # the lab's own count (PEERS.md section 2)
    v = s["validation"][s["primary_fit"]]
    assert v["n_ok"] >= 0.9 * s["n_validation"]
    st = v["vs_true"]
    # regression guard, well below the peers' level (Ho 40 K / 0.024, AnniesLasso 45 K / 0.029)
    assert st["TEFF"]["scatter"] < 37 and abs(st["TEFF"]["bias"]) < 6, _numbers(s)
    assert st["FE_H"]["scatter"] < 0.022 and abs(st["FE_H"]["bias"]) < 0.006, _numbers(s)
    # the choice is made inside the training set and recorded; both fits are reported
    assert s["choice"]["model"] in [m + e for m in AUTO_MODELS for e in ("", ", label errors")]
    assert s["primary_fit"] == s["choice"]["test_step"] and set(s["validation"]) == {
        "debias", "plain", "broadened"}
    assert "trained_on_true_labels" in s["diagnostics"] and "teff_bins" in s["diagnostics"]
    # the population the training set covers well meets the lab's targets; the rare ones
    # (dwarfs/subgiants, halo giants) are where the remaining error is
    rows = {r["population"]: r for r in s["diagnostics"]["populations"]["rows"]}
    disk = rows["disk_giant"]
    assert disk["n"] > 0.7 * v["n_ok"], rows
    assert disk["TEFF"]["scatter"] < 30 and disk["FE_H"]["scatter"] < 0.02, rows
    rare = [r for name, r in rows.items() if name in ("dwarf", "halo_giant")]
    assert sum(r["TEFF"]["share_of_squared_error"] for r in rare) > 0.25, rows
    # SPARSE_TRAINING finds such stars without the truth: few, carrying far more than their
    # share of the error (measured: 2.2 % of the stars, 31 % of the squared Teff error, 40 %
    # of log g's, 24 % of [Fe/H]'s; the rest scatter by 25.0 K)
    sp = s["diagnostics"]["not_sparse_training"]
    frac = sp["n_flagged"] / v["n_ok"]
    share = sp["flagged_share_of_squared_error"]
    assert 0 < frac < 0.1 and all(share[n] > 4 * frac for n in ("TEFF", "LOGG", "FE_H")), sp
    assert sp["vs_true"]["TEFF"]["scatter"] < st["TEFF"]["scatter"] - 2, sp


def test_mock_survey_meets_the_lab_targets(mock_lab):
    t = mock_lab["validation"][mock_lab["primary_fit"]]["targets_vs_true"]
    assert t["all_met"], _numbers(mock_lab)


def test_mock_survey_errors_are_calibrated(mock_lab):
    """Lab step 12: the calibrated errors hold in every S/N bin against the truth.

    The calibration (5-fold CV in the training half, truth as the reference) is judged on
    the validation half. A few catastrophic fits where the training set is thin
    (SPARSE_TRAINING) can set a bin's standard deviation alone (measured: log g at S/N
    100-200, 1.59 with two such stars, 1.0 without), so the band is checked without the
    stars that carry a warning flag, and loosely with them.
    """
    pulls = mock_lab["validation"][mock_lab["primary_fit"]]["pulls"]["vs_true"]
    for name in ("TEFF", "LOGG", "FE_H"):
        for b, e in pulls[name].items():
            assert e["formal"] > 2 * e["calibrated"], (name, b, e)   # formal: 2.3-9.6
            assert 0.75 <= e["without_warned"] <= 1.3, (name, b, e)
            assert 0.75 <= e["calibrated"] <= 2.0, (name, b, e)
