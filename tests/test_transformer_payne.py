"""TransformerPayne: labels -> flux at any wavelength (cannon_fast.nn.transformer)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cannon_fast.core.grid import PixelGrid  # noqa: E402
from cannon_fast.nn.ab_initio import label_design  # noqa: E402
from cannon_fast.nn.transformer import TransformerPayne, train_transformer  # noqa: E402

GRID = PixelGrid.linear(5000.0, 5030.0, 61, resolution=5000.0, name="toy")
BOX = np.array([[4000.0, 6000.0], [-1.0, 0.5]])
CENTRES = np.array([5006.0, 5013.5, 5021.0])


def toy_flux(labels, wave):
    """Three lines (depths follow the labels) at any wavelengths: the 'model'."""
    labels = np.atleast_2d(labels)
    t = (labels[:, :1] - 5000.0) / 1000.0
    depth = np.array([0.3, 0.5, 0.4]) * np.exp(np.array([0.3, -0.2, 0.1]) * t
                                              + 0.4 * labels[:, 1:2])  # (N, 3)
    prof = np.exp(-0.5 * ((np.asarray(wave)[None] - CENTRES[:, None]) / 1.2) ** 2)
    return 1.0 - depth @ prof


@pytest.fixture(scope="module")
def trained():
    """A small TransformerPayne of the toy model (shared by the tests)."""
    labels = label_design(BOX, 256, seed=0)
    flux = toy_flux(labels, GRID.wavelength)
    return train_transformer(flux, labels, GRID.wavelength, ["TEFF", "FE_H"], box=BOX, grid=GRID,
                             d=16, heads=2, blocks=1, n_freq=12, steps=500, batch_spectra=32,
                             batch_wavelengths=32, learning_rate=5e-3, eval_every=100,
                             progress=False)


def test_emulates_on_and_off_the_training_grid(trained):
    """Held-out labels: small error at the grid's wavelengths and between them."""
    held = label_design([[4200.0, 5800.0], [-0.9, 0.4]], 32, seed=4)
    on = np.abs(trained.predict(held) - toy_flux(held, GRID.wavelength)).mean()
    between = GRID.wavelength[:-1] + 0.5 * np.diff(GRID.wavelength)  # never trained on
    off = np.abs(trained.predict(held, wavelength=between) - toy_flux(held, between)).mean()
    assert on < 0.02 and off < 0.02, (on, off)   # lines 0.2-0.7 deep
    with pytest.raises(ValueError, match="outside the range the emulator was trained on"):
        trained.predict(held, wavelength=[4990.0])


def test_fits_and_files(trained, tmp_path):
    """A forward model for fit_spectra; the file round-trips and refuses another grid."""
    from cannon_fast import fit_spectra

    truth = np.array([[4700.0, -0.3]])
    flux = toy_flux(truth, GRID.wavelength)
    res = fit_spectra(trained, flux, np.full_like(flux, 1e4))
    assert res.ok.all()
    assert abs(res.labels[0, 1] - truth[0, 1]) < 0.1
    trained.write(tmp_path / "tp.npz")
    back = TransformerPayne.read(tmp_path / "tp.npz", grid=GRID)
    np.testing.assert_allclose(back.predict(truth), trained.predict(truth), rtol=1e-12)
    np.testing.assert_allclose(back.label_bounds, BOX)
    other = PixelGrid.linear(5000.0, 5030.0, 121, resolution=5000.0, name="fine")
    with pytest.raises(ValueError, match="trained on the grid <PixelGrid 'toy'.*on <PixelGrid "
                                         "'fine'"):
        TransformerPayne.read(tmp_path / "tp.npz", grid=other)
    # the Jacobian is the derivative of predict
    f, jac = back.predict_with_jacobian(truth)
    h = 1e-3
    fd = (back.predict(truth + [0, h]) - back.predict(truth - [0, h])) / (2 * h)
    np.testing.assert_allclose(jac[0, :, 1], fd[0], atol=1e-6)


def test_calibrate_learns_the_misfit_and_keeps_it(trained, tmp_path):
    """The Payne's fit/calibrate (EmulatorFits): shifted 'real' stars, an honest fit, the file."""
    trained.write(tmp_path / "tp.npz")
    emu = TransformerPayne.read(tmp_path / "tp.npz")  # a copy to calibrate
    rng = np.random.default_rng(3)
    labels = label_design([[4300.0, 5700.0], [-0.8, 0.3]], 60, seed=4)
    shift = np.array([60.0, 0.05])  # the stars look like the model at labels + shift
    flux = toy_flux(labels + shift, GRID.wavelength) + rng.normal(0, 0.01, (60, GRID.n_pixels))
    ivar = np.full_like(flux, 1e4)
    raw = emu.fit(flux, ivar, n_starts=2)  # no s², no error model: formal x sqrt(chi2r)
    np.testing.assert_allclose(raw.errors, raw.formal_errors * np.sqrt(
        np.fmax(raw.reduced_chi2, 1))[:, None], rtol=1e-12)
    emu.calibrate(flux[:40], ivar[:40], labels[:40], n_rounds=1)
    res = emu.fit(flux[40:], ivar[40:], n_starts=2)
    before = np.median(raw.labels[40:] - labels[40:], axis=0)
    after = np.median(res.labels - labels[40:], axis=0)
    assert np.all(np.abs(after) < 0.5 * np.abs(before))  # the offset recalibrated away
    assert np.all(res.errors >= res.formal_errors - 1e-12)
    emu.write(tmp_path / "cal.npz")
    back = TransformerPayne.read(tmp_path / "cal.npz")
    assert back.calibrated and back.train_info == emu.train_info
    np.testing.assert_allclose(back.s2, emu.s2)
    np.testing.assert_allclose(back.fit(flux[40:45], ivar[40:45], n_starts=2).errors,
                               emu.fit(flux[40:45], ivar[40:45], n_starts=2).errors, rtol=1e-8)
