"""The lab pipeline on the realistic mock survey (../shared/tools/mock_survey.py) against its truth.

Issue 4 asks for the lab's targets (Teff scatter <= 30 K, [Fe/H] <= 0.02 dex, |bias| <= 5 K
and 0.005 dex against the TRUE labels) on the 3036-star survey. Measured (Dec 2026): 1876
stars kept, 938/937 split. Cross-validation inside the training set chooses the quadratic
model + TEFF^3 + TEFF^4 + FE_H^3 trained with the catalogue's label errors (labels
regression-calibrated under a Gaussian-mixture prior, error-weighted stars) and the label fit
with extra line broadening: Teff -1.8 / 31.2 K, [Fe/H] 0.0042 / 0.0153 dex (bias / scatter).
Without FE_H^3 -2.1 / 32.4 K, 0.0045 / 0.0175 (on three other random halves the [Fe/H]
scatter drops as well, 0.0170-0.0189 -> 0.0163-0.0179, Teff rises by 0-0.5 K);
without the broadening term (the plain fit) 34.1 K / 0.0198; with a single-Gaussian prior
32.6 K / 0.0178; without the label errors 38.0 K / 0.0206; the lab's quadratic alone 48.0 K /
0.0253 -- the same as TheCannon (Ho) on the same normalized spectra, 48.1 K -- and the peers
reach 40-45 K on their own pipeline (PEERS.md section 2). The broadening term absorbs the
mock's hidden macroturbulence (its fitted value correlates 0.57 with it), which otherwise
reads as [Fe/H].

So [Fe/H] meets its target and Teff does not: that test is a strict xfail. Where the Teff
error is (summary diagnostics "populations"): the disk giants and NGC 6791 members are well
inside 30 K; the 16 dwarfs/subgiants (hot, log g 3.3-3.9) and 11 halo giants, 3 % of the
stars, carry about 40 % of the squared Teff error. There the model is wrong, not the
optimizer: chi2 at the true labels is 1.1-2.8x that at the fitted ones, and a model trained on
the TRUE labels fails in the same corner. The result also depends on the split: the same
pipeline on three other random halves of these stars gives 24-30 K. Tried and not kept: full
cubic terms (36.6 K), training stars weighted by inverse label density (34.6-36.3 K), a
second model for the hot/metal-poor corner (30.0 K, but only with a region chosen by looking
at the validation stars; data-driven regions gave 35.6-36.7 K, models trained on the 300-500
training stars nearest each sparse-region star's first fit 34.7-37.1 K), training labels
refined by combining the catalogue with out-of-fold spectroscopic labels (35.3 K), the
catalogue's label errors scaled by 1.25-2 (its reported errors are ~0.7x the scatter of
catalogue - truth; 31.8-43.6 K), spectra re-normalized against the fitted model (-0.8 K),
persistence and Littrow-ghost pixels masked too (no change), and The Payne's MLP as the
forward model (40 K even when trained on the true labels). Where the floor is. The
catalogue's Teff is offset by ~20 K per dex of [Fe/H] (the halo giants' training labels read
~17 K cool), which no training removes. The disk giants' Teff scatter, 24 K even for a model
trained on the true labels, is 3x their formal errors at every S/N, and a cubic in the true
labels explains only half of its variance. A modified copy of the generator that switches
the mock's effects off one at a time gives (seed-0 split of each run's kept stars; disk giants,
model trained on the true labels): all on 24 K; without the macroturbulence spread, the
continuum perturbations, the sky and telluric residuals or 90 % of the noise, 21, 21, 19 and
20 K; all off 13 K. With all off and the catalogue's labels for training, the whole
validation set still scatters by 29.8 K: the target sits at the floor that the catalogue's
label noise sets. Measured but not built: the model as a polynomial in theta = 5040/Teff
(31.0 K with broadening), and in ln(flux) as well (29.8 K here, 25.3-29.3 K on the other
halves, [Fe/H] 0.0187): both change what the model's labels and flux mean in every consumer
(fits, priors, movies, binaries), and the gain is within the spread between halves.
Run time of this file: ~2.5 min on 2 quiet cores (generation ~40-60 s, lab ~45 s), so CI
runs all 3036 stars; set CANNON_FAST_MOCK_STARS to use fewer. The ~7 GB archive tree is
written under pytest's tmp_path and removed afterwards.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

from cannon_fast.pipeline import AUTO_MODELS, run_lab

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
    # share of the error (measured: 2.5 % of the stars, 24 % of the squared Teff error)
    sp = s["diagnostics"]["not_sparse_training"]
    frac = sp["n_flagged"] / v["n_ok"]
    assert 0 < frac < 0.1 and sp["flagged_share_of_squared_error"]["TEFF"] > 4 * frac, sp
    assert sp["vs_true"]["TEFF"]["scatter"] < st["TEFF"]["scatter"] - 2, sp


@pytest.mark.xfail(strict=True, reason="issue 4 Teff target not reached on the realistic mock "
                   "survey (Teff ~31.2 K vs 30 K; [Fe/H] 0.0153 meets 0.02): rare dwarfs, "
                   "subgiants and halo giants (3 % of the stars, ~40 % of the squared Teff "
                   "error); see the module docstring")
def test_mock_survey_meets_the_lab_targets(mock_lab):
    t = mock_lab["validation"][mock_lab["primary_fit"]]["targets_vs_true"]
    assert t["all_met"], _numbers(mock_lab)
