"""``cannon-fast jwst``: the JWST project on a small synthetic catalogue, with tiny networks."""
import json

import fitsio
import numpy as np
import pytest

from cannon_fast import PixelGrid
from cannon_fast.cli import main
from cannon_fast.instruments import row_index_name
from cannon_fast.lab.jwst import spanning_stars

N_STARS, MISSING = 90, 37


def _lines(wave, labels, centres, seed):
    """Normalized flux: Gaussian lines whose depths are linear in the (scaled) labels."""
    rng = np.random.default_rng(seed)
    x = (labels - [4800.0, 2.5, -0.5]) / [700.0, 1.2, 0.6]
    coef = rng.normal(0, 0.08, (len(centres), 3))
    depth = np.clip(0.3 + x @ coef.T, 0.02, 0.8)                     # (N, lines)
    width = np.median(np.diff(wave)) * 2.0
    prof = np.exp(-0.5 * ((wave[None, :] - np.asarray(centres)[:, None]) / width) ** 2)
    return 1.0 - depth @ prof


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("jwst")
    rng = np.random.default_rng(0)
    labels = np.column_stack([rng.uniform(3900, 5600, N_STARS), rng.uniform(0.8, 4.5, N_STARS),
                              rng.uniform(-1.8, 0.3, N_STARS)])
    ids = np.array([f"2M{i:08d}+0000000" for i in range(N_STARS)])
    cat = np.zeros(N_STARS, dtype=[("APOGEE_ID", "U18"), ("TEFF", "f8"), ("LOGG", "f8"),
                                   ("FE_H", "f8"), ("MG_FE", "f8")])
    cat["APOGEE_ID"] = ids
    cat["TEFF"], cat["LOGG"], cat["FE_H"] = labels.T
    cat["MG_FE"] = 0.3 * (labels[:, 2] < -0.7) + rng.normal(0, 0.05, N_STARS)
    fitsio.write(str(d / "catalog.fits"), cat, clobber=True)
    # JWST-like: 400 px linear, all stars but one, named '<row>_00'
    rows = np.delete(np.arange(N_STARS), MISSING)
    wj = np.linspace(9000.0, 18000.0, 400)
    fj = _lines(wj, labels[rows], rng.uniform(9100, 17900, 40), 1)
    fj += rng.normal(0, 0.01, fj.shape)
    tab = np.zeros(len(rows), dtype=[("INDEX", "U9"), ("TEFF", "f8"), ("LOGG", "f8"),
                                     ("FE_H", "f8")])
    tab["INDEX"] = row_index_name(rows)
    tab["TEFF"], tab["LOGG"], tab["FE_H"] = labels[rows].T
    with fitsio.FITS(str(d / "jwst.fits"), "rw", clobber=True) as f:
        f.write(None, header={"FLUXNORM": True})
        f.write(fj.astype(np.float32), extname="FLUX")
        f.write(np.full(fj.shape, 1e4, np.float32), extname="IVAR")
        f.write(wj, extname="WAVE")
        f.write(tab, extname="LABELS")
    # APOGEE-like: the apStar grid, un-normalized (a sloped continuum), chip gaps at ivar 0
    grid = PixelGrid.apstar()
    wa = grid.wavelength
    fa = _lines(wa, labels, rng.uniform(15200, 16900, 60), 2)
    fa *= (100.0 + 0.01 * (wa - 16000.0))[None, :]
    ia = np.where(grid.in_segment, 1.0, 0.0)[None, :] * np.ones((N_STARS, 1))
    np.savez(d / "apogee.npz", flux=fa.astype(np.float32), ivar=ia.astype(np.float32),
             wavelength=wa, apogee_id=ids)
    return d, labels


def test_spanning_stars_reach_the_edges():
    lab = np.random.default_rng(1).normal(size=(500, 3))
    rows = spanning_stars(lab, 10)
    assert len(set(rows.tolist())) == 10
    assert np.all(np.diff(lab[rows, 0]) >= 0)
    # farthest-point sampling reaches further out than ten random stars, in every label
    for j in range(3):
        assert np.ptp(lab[rows, j]) > 0.6 * np.ptp(lab[:, j])


def test_jwst_command_writes_the_students_report(project, capsys):
    d, labels = project
    out = d / "report"
    argv = ["jwst", "--catalog", str(d / "catalog.fits"), "--jwst", str(d / "jwst.fits"),
            "--apogee", str(d / "apogee.npz"), "--out", str(out), "-q", "--filters", "2,4",
            "--kernel-size", "5", "--pool-size", "1,4", "--hidden", "16,8", "--epochs", "3",
            "--batch-size", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"in the catalogue only: row {MISSING} (2M{MISSING:08d}+0000000)" in printed
    s = json.loads((out / "summary.json").read_text())
    m = s["jwst_match"]
    assert m["n_matched"] == N_STARS - 1 and m["n_only_a"] == 1 and m["n_only_b"] == 0
    assert m["only_a"][0]["row"] == MISSING
    assert m["only_a"][0]["TEFF"] == pytest.approx(labels[MISSING, 0])
    assert m["n_disagree"] == 0
    # the APOGEE chip gaps, found from the data, are where the apStar chips end
    w = PixelGrid.apstar().wavelength
    gaps = s["spectra"]["apogee"]["gaps"]
    assert gaps == [[pytest.approx(w[3273]), pytest.approx(w[3585])],
                    [pytest.approx(w[6079]), pytest.approx(w[6344])]]
    assert s["spectra"]["jwst"]["n_pixels"] == 400
    assert s["spectra"]["jwst"]["wavelength_range"] == [9000.0, 18000.0]
    shown = [x["row"] for x in s["shown_stars"]]
    assert len(set(shown)) == 10 and MISSING not in shown
    comp = s["comparison"]
    assert comp["split"]["n_train"] + comp["split"]["n_validation"] + comp["split"]["n_test"] \
        == N_STARS - 1
    # the Cannon learns these linear lines: errors well below the labels' spread
    for j, n in enumerate(["TEFF", "LOGG", "FE_H"]):
        assert comp["cannon"]["metrics"][n]["rmse"] < 0.25 * labels[:, j].std()
    st = comp["starnet"]
    assert st["n_parameters"] == sum(r["n_parameters"] for r in st["layers"])
    assert st["n_epochs"] <= 3 and len(st["val_loss"]) == st["n_epochs"]
    for f in ("catalog_logg_teff", "catalog_feh", "catalog_mgfe_feh", "catalog_corner",
              "apogee_ten_stars", "apogee_jwst_full", "apogee_jwst_zoom", "cannon_predictions",
              "starnet_loss", "starnet_predictions"):
        assert (out / f"{f}.png").exists(), f
    page = (out / "report.html").read_text()
    assert "JWST report" in page and "StarNet" in page and "starnet_predictions.png" in page
    # an existing report is kept unless --force; `cannon-fast report` rebuilds its page
    assert main(argv) == 1
    assert "--force" in capsys.readouterr().err
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert "StarNet" in (out / "report.html").read_text()


def test_jwst_command_errors_name_the_file(project, tmp_path, capsys):
    d, _ = project
    other = np.zeros(3, dtype=[("INDEX", "U9"), ("TEFF", "f8"), ("LOGG", "f8"), ("FE_H", "f8")])
    other["INDEX"] = row_index_name([500000, 500001, 500002])   # rows the catalogue lacks
    with fitsio.FITS(str(tmp_path / "other.fits"), "rw", clobber=True) as f:
        f.write(np.ones((3, 50), np.float32), extname="FLUX")
        f.write(np.ones((3, 50), np.float32), extname="IVAR")
        f.write(np.linspace(9000, 9100, 50), extname="WAVE")
        f.write(other, extname="LABELS")
    assert main(["jwst", "--catalog", str(d / "catalog.fits"), "--jwst",
                 str(tmp_path / "other.fits"), "--out",
                 str(tmp_path / "r"), "--no-nn", "-q"]) == 1
    err = capsys.readouterr().err
    assert "catalog.fits and other.fits have no star in common" in err


def test_jwst_cannon_band_limited(project, tmp_path, capsys):
    """--band-limit: the Cannon with band-limited theta; without --resolution, a clear error."""
    d, labels = project
    base = ["jwst", "--catalog", str(d / "catalog.fits"), "--jwst", str(d / "jwst.fits"),
            "--no-nn", "-q", "--n-show", "3"]
    assert main(base + ["--out", str(tmp_path / "a"), "--band-limit"]) == 1
    assert "jwst.fits: band-limiting the Cannon needs the spectra's resolving power" \
        in capsys.readouterr().err
    # the fixture's lines are ~5 pixels (~110 A) wide: R ~ 100 on this coarse grid
    assert main(base + ["--out", str(tmp_path / "b"), "--band-limit", "--resolution", "100"]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    c = s["comparison"]["cannon"]
    assert c["band_limit"] is True
    for j, n in enumerate(["TEFF", "LOGG", "FE_H"]):
        assert c["metrics"][n]["rmse"] < 0.25 * labels[:, j].std()


def test_jwst_starnet_on_cannon_spectra(project, tmp_path, capsys):
    """--cannon-spectra N: StarNet also on N spectra of the report's Cannon, reported apart.

    Same test stars as the Cannon's and the plain StarNet's; trained on the observed
    training stars plus N Cannon spectra, validated and calibrated on the observed
    validation stars; no dropout, a cosine learning rate run to the last epoch.
    """
    from cannon_fast.nn._common import split_indices

    d, labels = project
    base = ["jwst", "--catalog", str(d / "catalog.fits"), "--jwst", str(d / "jwst.fits"), "-q",
            "--n-show", "3", "--filters", "2,4", "--kernel-size", "5", "--pool-size", "1,4",
            "--hidden", "16,8", "--epochs", "4", "--batch-size", "16"]
    assert main(base + ["--out", str(tmp_path / "x"), "--no-nn", "--cannon-spectra", "5"]) == 1
    assert "cannon_spectra trains a network" in capsys.readouterr().err
    out = tmp_path / "r"
    assert main(base + ["--out", str(out), "--cannon-spectra", "300",
                        "--precision", "bfloat16"]) == 0
    assert "StarNet+Cannon (learnt from the Cannon) RMSE" in capsys.readouterr().out
    comp = json.loads((out / "summary.json").read_text())["comparison"]
    sc, st = comp["starnet_cannon"], comp["starnet"]
    _, va, te = split_indices(N_STARS - 1, (5, 1, 2), 0)
    assert sc["cannon_spectra"] == 300 and sc["n_observed_train"] == comp["split"]["n_train"]
    assert sc["n_calibration_stars"] == len(va) and sc["n_test"] == st["n_test"] == len(te)
    assert sc["architecture"]["dropout"] == 0.0 and st["architecture"]["dropout"] == 0.1
    assert sc["training"]["lr_schedule"] == "cosine" and sc["n_epochs"] == 4
    assert sc["precision"] == st["precision"] == "bfloat16"
    for n in ("TEFF", "LOGG", "FE_H"):
        assert comp["starnet_cannon_over_cannon_rmse"][n] == pytest.approx(
            sc["metrics"][n]["rmse"] / comp["cannon"]["metrics"][n]["rmse"])
        assert 0 <= sc["within_1sigma"][n] <= 1 and sc["pull_std"][n] > 0
    assert (out / "starnet_cannon_predictions.png").exists()
    page = (out / "report.html").read_text()
    assert "StarNet+Cannon" in page and "spectra generated by the Cannon above" in page
