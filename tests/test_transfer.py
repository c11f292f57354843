"""Label transfer to another survey's spectra, and the precision from repeat visits."""
import numpy as np
import pytest

from cannon_fast import PixelGrid
from cannon_fast.instruments import Spectra
from cannon_fast.lab.transfer import repeat_pulls, transfer_labels

NAMES = ("TEFF", "LOGG", "FE_H")


@pytest.fixture(scope="module")
def survey():
    """300 stars, 200 of them seen twice, with lines linear in the labels (S/N 50)."""
    rng = np.random.default_rng(4)
    n = 300
    truth = np.column_stack([rng.uniform(4000, 5600, n), rng.uniform(1.0, 4.0, n),
                             rng.uniform(-1.5, 0.3, n)])
    grid = PixelGrid.log_uniform(3700.0, step=1e-4, n_pixels=600)
    w = grid.wavelength
    centres = rng.uniform(w[5], w[-5], 80)
    prof = np.exp(-0.5 * ((w[None, :] - centres[:, None]) / (2.0 * np.median(np.diff(w)))) ** 2)
    coef = rng.normal(0, 0.08, (80, 3))
    x = (truth - [4800, 2.5, -0.6]) / [500, 0.9, 0.5]
    rows = np.concatenate([np.arange(n), rng.choice(n, 200, replace=False)])
    clean = 1.0 - (0.3 + x[rows] @ coef.T) @ prof          # exactly linear: order 1 is exact
    flux = clean + rng.normal(0, 0.02, clean.shape)
    ivar = np.full(flux.shape, 1 / 0.02 ** 2)
    ids = np.array([f"2M{r:06d}" for r in range(n)])
    spectra = Spectra(flux, ivar, grid, np.array([f"obs{i}" for i in range(len(rows))]),
                      {"APOGEE_ID": ids[rows]}, "lamost.fits", True)
    return ids, truth, spectra, rows


def test_transfer_labels_new_stars_and_repeat_visits_agree_with_errors(survey):
    ids, truth, spectra, rows = survey
    out = transfer_labels(ids, truth, spectra, spectra.table["APOGEE_ID"], NAMES,
                          train_fraction=0.5, seed=1, cannon_order=1)
    trained_stars = rows[out.train_rows]
    assert len(np.unique(trained_stars)) == len(out.train_rows) == 150
    assert not np.isin(rows[out.applied_rows], trained_stars).any()
    lab, ok = out.labels["cannon"][out.applied_rows], out.ok["cannon"][out.applied_rows]
    assert ok.mean() > 0.95
    d = lab[ok] - truth[rows[out.applied_rows]][ok]
    assert np.all(np.sqrt(np.mean(d ** 2, 0)) < 0.1 * truth.std(0))
    # the de-biased errors hold the model's training error, which both visits share: their
    # pulls are narrower than those of the plain fit's noise-only errors, which are right
    # (the model is exact here: no s², which visits would share too)
    shared = np.array(out.pulls["cannon"]["std"])
    plain = transfer_labels(ids, truth, spectra, spectra.table["APOGEE_ID"], NAMES,
                            train_fraction=0.5, seed=1, cannon_order=1, debias=False)
    p = plain.pulls["cannon"]
    seen_twice = np.unique(rows[300:])
    assert p["n_pairs"] == np.sum(~np.isin(seen_twice, trained_stars)) > 80
    assert np.all((np.array(p["std"]) > 0.8) & (np.array(p["std"]) < 1.25)), p
    assert np.all(shared < np.array(p["std"])), (shared, p["std"])


def test_transfer_with_band_limited_cannon(survey):
    """band_limit=True trains the Cannon as ``train(band_limit=True)`` does; needs a resolution."""
    from cannon_fast import CannonModel

    ids, truth, spectra, rows = survey
    # the lines are ~4.7 pixels wide: R ~ 920 on this grid
    sharp = Spectra(spectra.flux, spectra.ivar,
                    PixelGrid(spectra.grid.wavelength, resolution=920.0), spectra.ids,
                    spectra.table, spectra.path, True)
    out = transfer_labels(ids, truth, sharp, sharp.table["APOGEE_ID"], NAMES,
                          train_fraction=0.2, seed=1, cannon_order=1, band_limit=True)
    tr = out.train_rows
    fits = {bl: CannonModel(NAMES, order=1, grid=sharp.grid).train(
        sharp.flux[tr], sharp.ivar[tr], truth[rows[tr]], band_limit=bl).fit(sharp.flux,
                                                                           sharp.ivar)
        for bl in (False, True)}
    np.testing.assert_allclose(out.labels["cannon"], fits[True].labels, rtol=1e-10)
    assert np.abs(fits[True].labels - fits[False].labels).max(0)[0] > 0.1  # K: not a no-op
    with pytest.raises(ValueError, match="resolving power"):
        transfer_labels(ids, truth, spectra, spectra.table["APOGEE_ID"], NAMES,
                        cannon_order=1, band_limit=True)


def test_repeat_pulls_by_hand():
    keys = np.array(["a", "b", "a", "c", "b", "b"])
    labels = np.array([[1.0], [2.0], [3.0], [0.0], [2.0], [9.0]])
    errors = np.array([[1.0], [1.0], [1.0], [1.0], [3.0], [1.0]])
    p = repeat_pulls(keys, labels, errors)
    assert p["n_pairs"] == 2                         # a: rows 0, 2; b: rows 1, 4 (third unused)
    pulls = np.array([-2 / np.sqrt(2), 0.0])
    assert p["std"][0] == pytest.approx(np.std(pulls))
    assert p["rms_difference"][0] == pytest.approx(np.sqrt((4 + 0) / 2))


def test_transfer_without_common_stars_is_an_error(survey):
    ids, truth, spectra, _ = survey
    with pytest.raises(ValueError, match="apogee and lamost have no star in common"):
        transfer_labels(np.char.add(ids, "x"), truth, spectra, spectra.table["APOGEE_ID"],
                        NAMES, names=("apogee", "lamost"))


def test_transfer_command_writes_a_table(survey, tmp_path, capsys):
    import fitsio

    from cannon_fast.cli import main

    ids, truth, spectra, rows = survey
    cat = np.zeros(len(ids), dtype=[("APOGEE_ID", "U8"), ("TEFF", "f8"), ("LOGG", "f8"),
                                    ("FE_H", "f8")])
    cat["APOGEE_ID"] = ids
    cat["TEFF"], cat["LOGG"], cat["FE_H"] = truth.T
    fitsio.write(str(tmp_path / "cat.fits"), cat)
    np.savez(tmp_path / "sp.npz", flux=spectra.flux, ivar=spectra.ivar,
             wavelength=spectra.grid.wavelength, obsid=spectra.ids,
             apogee_id=spectra.table["APOGEE_ID"])
    argv = ["transfer", "--catalog", str(tmp_path / "cat.fits"), "--spectra",
            str(tmp_path / "sp.npz"), "--out", str(tmp_path / "t.fits"), "--cannon-order", "1",
            "-q"]
    assert main(argv) == 0
    assert "repeat pairs; pull std TEFF" in capsys.readouterr().out
    t = fitsio.read(str(tmp_path / "t.fits"))
    assert len(t) == len(rows) and t["TRAINED_ON"].sum() == 150
    new = ~t["TRAINED_ON"].astype(bool)
    d = t["LOGG_CANNON"][new] - truth[rows[new], 1]
    assert np.sqrt(np.mean(d ** 2)) < 0.1 * truth[:, 1].std()
    assert main(argv) == 1 and "--force" in capsys.readouterr().err
    argv[argv.index(str(tmp_path / "t.fits"))] = str(tmp_path / "u.fits")
    assert main(argv + ["--band-limit"]) == 1
    assert "sp.npz: --band-limit needs --resolution" in capsys.readouterr().err
