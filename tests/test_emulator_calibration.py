"""An emulator of ideal spectra taught its misfit to "observed" ones (``PayneEmulator.calibrate``).

The observed stars are the emulator's spectra at shifted labels (a systematic offset,
as an ab initio model has against real stars) plus a label-dependent misfit from
another network and noise; the reference stars are independent of the judged ones.
"""
import numpy as np
import pytest

from cannon_fast.core.fitting import FLAGS
from cannon_fast.nn.emulator import PayneEmulator

NAMES = ["TEFF", "LOGG", "FE_H"]
LO, HI = np.array([4000.0, 1.0, -1.0]), np.array([5500.0, 3.5, 0.4])
SHIFT = np.array([80.0, 0.1, -0.05])  # observed star at labels L looks like the model at L + SHIFT
NOISE = 0.01


def _network(seed, n_pix, amplitude):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, 1.5, (24, 3)), rng.normal(0, 0.4, (24, 24)),
               rng.normal(0, amplitude, (n_pix, 24))]
    biases = [rng.normal(0, 0.3, 24), rng.normal(0, 0.3, 24), np.full(n_pix, 1.0)]
    return PayneEmulator(weights, biases, NAMES, LO, HI, activation="tanh")


def _observed(n, seed, n_pix=300):
    """Model, its ideal spectra's labels, and "observed" flux, ivar of n stars."""
    model = _network(0, n_pix, 0.05)
    misfit = _network(1, n_pix, 0.004)
    rng = np.random.default_rng(seed)
    labels = LO + (HI - LO) * (0.1 + 0.8 * rng.random((n, 3)))
    flux = (model.predict(labels + SHIFT) + misfit.predict(labels) - 1.0
            + rng.normal(0, NOISE, (n, n_pix)))
    ivar = np.full((n, n_pix), NOISE ** -2)
    model.training_labels = LO + (HI - LO) * rng.random((300, 3))
    model.s2 = np.zeros(n_pix)  # as payne-train leaves it: model spectra are noise-free
    return model, labels, flux, ivar


@pytest.fixture(scope="module")
def calibrated():
    model, ref_labels, ref_flux, ref_ivar = _observed(400, seed=1)
    raw = model.fit(ref_flux[:300], ref_ivar[:300])
    model.calibrate(ref_flux, ref_ivar, ref_labels)
    _, labels, flux, ivar = _observed(400, seed=2)
    return model, raw, labels, flux, ivar


def test_uncalibrated_errors_scale_with_the_misfit(calibrated):
    model, raw, *_ = calibrated
    # s² all 0 and no error model: formal errors times sqrt(max(1, reduced chi²))
    assert raw.formal_errors is not None
    ratio = np.sqrt(np.fmax(raw.reduced_chi2, 1.0))[:, None]
    np.testing.assert_allclose(raw.errors, raw.formal_errors * ratio, rtol=1e-12)
    assert np.median(raw.reduced_chi2) > 1.5  # the misfit is there ...
    assert not (raw.flags & FLAGS["POOR_FIT"]).any()  # ... and uncalibrated, nothing is judged


def test_calibrated_fits_are_unbiased_with_honest_errors(calibrated):
    model, _, labels, flux, ivar = calibrated
    info = model.train_info
    assert info["calibration"]["median_reduced_chi2_before"] > 1.5
    assert 0.7 < info["calibration"]["median_reduced_chi2_after"] < 1.3
    res = model.fit(flux, ivar)
    good = res.ok & ~res.warn
    assert good.mean() > 0.9
    resid = res.labels[good] - labels[good]
    pulls = resid / res.errors[good]
    # the shift is recalibrated away (uncalibrated it is the whole offset) ...
    raw = model.fit(flux, ivar, calibrated_errors=False, recalibrate_labels=False)
    raw_offset = np.median(raw.labels[good] - labels[good], axis=0)
    assert np.all(np.abs(raw_offset) > 0.5 * np.abs(SHIFT))
    assert np.all(np.abs(np.median(resid, axis=0)) < 0.25 * np.abs(SHIFT))
    # ... and the errors describe what is left
    assert np.all((np.std(pulls, axis=0) > 0.75) & (np.std(pulls, axis=0) < 1.3))
    assert np.all(res.formal_errors[good] <= res.errors[good] + 1e-12)


def test_poor_fit_marks_a_spectrum_the_model_does_not_describe(calibrated):
    model, _, labels, flux, ivar = calibrated
    res = model.fit(flux, ivar)
    assert (res.flags & FLAGS["POOR_FIT"]).mean() < 0.03  # not every star
    odd = flux[:5] + 0.05 * np.sin(np.arange(flux.shape[1]) / 3.0)  # lines the model lacks
    assert (model.fit(odd, ivar[:5]).flags & FLAGS["POOR_FIT"]).all()


def test_calibration_survives_the_file(calibrated, tmp_path):
    model, _, labels, flux, ivar = calibrated
    model.write(tmp_path / "cal.npz")
    back = PayneEmulator.read(tmp_path / "cal.npz")
    assert back.calibrated and back.train_info == model.train_info
    a, b = model.fit(flux[:20], ivar[:20]), back.fit(flux[:20], ivar[:20])
    np.testing.assert_allclose(b.labels, a.labels, rtol=1e-10)
    np.testing.assert_allclose(b.errors, a.errors, rtol=1e-10)


def test_payne_calibrate_cli(calibrated, tmp_path, capsys):
    from cannon_fast.cli import main

    model, _, labels, flux, ivar = calibrated
    plain = PayneEmulator(model.weights, model.biases, NAMES, LO, HI, activation="tanh",
                          training_labels=model.training_labels, s2=np.zeros(model.n_pixels))
    plain.write(tmp_path / "emu.npz")
    np.savez(tmp_path / "ref.npz", flux=flux, ivar=ivar, labels=labels,
             label_names=np.array(NAMES))
    assert main(["payne-calibrate", "--model", str(tmp_path / "emu.npz"),
                 str(tmp_path / "ref.npz"), "--out", str(tmp_path / "cal.npz")]) == 0
    assert "POOR_FIT above" in capsys.readouterr().out
    assert main(["fit", "--model", str(tmp_path / "cal.npz"), str(tmp_path / "ref.npz"),
                 "--out", str(tmp_path / "fit.fits")]) == 0
    from astropy.table import Table

    t = Table.read(tmp_path / "fit.fits")
    assert {"TEFF_ERR_FORMAL", "TEFF_ERR_MODEL"} <= set(t.colnames)
    assert np.all(t["TEFF_ERR"] >= t["TEFF_ERR_FORMAL"])
    ok = ~t["FLAG_BAD"]
    pulls = (np.asarray(t["TEFF"]) - labels[:, 0])[ok] / np.asarray(t["TEFF_ERR"])[ok]
    assert abs(np.median(pulls)) < 0.3 and 0.75 < np.std(pulls) < 1.3
    # the uncalibrated emulator's fit says what its errors are
    assert main(["fit", "--model", str(tmp_path / "emu.npz"), str(tmp_path / "ref.npz"),
                 "--out", str(tmp_path / "raw.fits")]) == 0
    assert "payne-calibrate" in capsys.readouterr().err
    # bad input: a reference without the emulator's labels, an apStar set without labels
    np.savez(tmp_path / "nolab.npz", flux=flux, ivar=ivar, labels=labels[:, :2],
             label_names=np.array(NAMES[:2]))
    assert main(["payne-calibrate", "--model", str(tmp_path / "emu.npz"),
                 str(tmp_path / "nolab.npz"), "--out", str(tmp_path / "x.npz")]) != 0
    assert "nolab.npz has no label(s) ['FE_H'] of the emulator" in capsys.readouterr().err
    assert main(["payne-calibrate", "--model", str(tmp_path / "emu.npz"),
                 str(tmp_path / "ref.npz"), "--out", str(tmp_path / "cal.npz")]) != 0
    assert "exists" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_payne_calibrate_bad_inputs(calibrated, tmp_path, capsys):
    """Each refusal names what is wrong: grid, labels, too few stars, the label table."""
    from cannon_fast.cli import main
    from cannon_fast.cli.payne import _labels_by_id
    from cannon_fast.core.grid import PixelGrid

    model, _, labels, flux, ivar = calibrated
    grid = PixelGrid.linear(15100.0, 15400.0, model.n_pixels, name="emu")
    plain = PayneEmulator(model.weights, model.biases, NAMES, LO, HI, activation="tanh",
                          training_labels=model.training_labels, grid=grid)
    plain.write(tmp_path / "emu.npz")
    emu = str(tmp_path / "emu.npz")

    def run(*argv):
        code = main(["payne-calibrate", "--model", emu, *map(str, argv), "--out",
                     str(tmp_path / "out.npz")])
        return code, capsys.readouterr().err

    # spectra of another grid, as `fit` refuses them
    np.savez(tmp_path / "other.npz", flux=flux, ivar=ivar, labels=labels,
             label_names=np.array(NAMES), wavelength=grid.wavelength + 5.0)
    code, err = run(tmp_path / "other.npz")
    assert code != 0 and "trained on the grid" in err and "other.npz" in err
    # too few reference stars inside the box
    np.savez(tmp_path / "few.npz", flux=flux[:40], ivar=ivar[:40], labels=labels[:40],
             label_names=np.array(NAMES), wavelength=grid.wavelength)
    code, err = run(tmp_path / "few.npz")
    assert code != 0 and "40 reference stars inside the emulator's training box" in err
    # --labels-from goes with apStar files; apStar files need it
    code, err = run(tmp_path / "few.npz", "--labels-from", tmp_path / "t.fits")
    assert code != 0 and "--labels-from goes with apStar inputs" in err
    code, err = run(tmp_path / "apStar-dr17-2M00000000+0000000.fits")
    assert code != 0 and "need their labels: --labels-from TABLE" in err
    assert not (tmp_path / "out.npz").exists()

    # the label table: missing file and columns, no star in it, repeated IDs
    from astropy.table import Table

    with pytest.raises(FileNotFoundError, match="no such file"):
        _labels_by_id(str(tmp_path / "none.fits"), ["A"], NAMES)
    Table({"APOGEE_ID": ["A", "B"], "TEFF": [4500.0, 4600.0]}).write(tmp_path / "t.fits")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['LOGG', 'FE_H'\]"):
        _labels_by_id(str(tmp_path / "t.fits"), ["A"], NAMES)
    t = Table({"APOGEE_ID": ["A", "B", "B", "C", "C"], "TEFF": [4500.0, 4600, 4600, 4700, 4800],
               "LOGG": [2.0, 2.1, 2.1, 2.2, 2.2], "FE_H": [0.0, 0.1, 0.1, 0.2, 0.2],
               "SNR": [50.0, 80, 60, 70, 70]})
    t.write(tmp_path / "lab.fits")
    with pytest.raises(ValueError, match="none of the 1 stars is in it, e.g. Z"):
        _labels_by_id(str(tmp_path / "lab.fits"), ["Z"], NAMES)
    got, err = _labels_by_id(str(tmp_path / "lab.fits"), ["A ", "B", "C", "Z"], NAMES)
    assert err is None
    np.testing.assert_array_equal(got[:2], [[4500.0, 2.0, 0.0], [4600.0, 2.1, 0.1]])
    assert np.isnan(got[2:]).all()  # C's rows disagree in TEFF at equal S/N; Z is absent
    out = capsys.readouterr().out
    assert "1 star(s) not in" in out and "1 star(s) with rows that disagree in" in out
