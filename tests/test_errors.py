"""Calibrated label errors (core.errors): recovery of a known error law, round trips,
and the calibration of a model whose formal errors are known to be right or wrong."""
import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast.core.errors import ErrorModel, fit_error_model
from cannon_fast.testing import make_synthetic


def _draw(n, rng, scale=2.0, floor=30.0):
    """Held-out 'fits' whose errors follow scale * formal (+) floor."""
    labels = np.column_stack([rng.uniform(4000, 5200, n), rng.uniform(1, 3.5, n)])
    formal = np.column_stack([rng.uniform(3, 40, n), rng.uniform(0.005, 0.08, n)])
    true_sd = np.sqrt((scale * formal) ** 2 + np.array([floor, 0.05]) ** 2)
    fitted = labels + rng.normal(size=labels.shape) * true_sd
    return fitted, formal, labels, true_sd


def test_fit_error_model_recovers_a_known_error_law():
    rng = np.random.default_rng(1)
    fitted, formal, ref, true_sd = _draw(3000, rng)
    em = fit_error_model(fitted, formal, ref, ["TEFF", "LOGG"])
    # new stars: the calibrated errors match the true ones to a few per cent
    fitted2, formal2, ref2, true_sd2 = _draw(2000, rng)
    total = em.total(fitted2, formal2)
    assert np.median(np.abs(total / true_sd2 - 1)) < 0.08
    pulls = (fitted2 - ref2) / total
    assert np.all(np.abs(np.std(pulls, axis=0) - 1) < 0.06)
    # at the highest formal errors the noise part dominates, at the lowest the floor
    noise, floor = em.parts(fitted2, formal2)
    hi = formal2[:, 0] > 30
    assert np.median(noise[hi, 0] / floor[hi, 0]) > 1.5
    assert np.median(np.abs(floor[:, 0] / 30.0 - 1)) < 0.2


def test_reference_errors_are_not_counted_as_model_error():
    rng = np.random.default_rng(2)
    fitted, formal, truth, _ = _draw(3000, rng)
    ref_err = np.column_stack([np.full(3000, 50.0), np.full(3000, 0.1)])
    noisy_ref = truth + rng.normal(size=truth.shape) * ref_err
    em_truth = fit_error_model(fitted, formal, truth, ["TEFF", "LOGG"])
    em_ref = fit_error_model(fitted, formal, noisy_ref, ["TEFF", "LOGG"], reference_errors=ref_err)
    a, b = em_truth.total(fitted, formal), em_ref.total(fitted, formal)
    assert np.median(np.abs(b / a - 1)) < 0.1
    # ignoring the reference's errors inflates the errors
    em_naive = fit_error_model(fitted, formal, noisy_ref, ["TEFF", "LOGG"])
    assert np.median(em_naive.total(fitted, formal)[:, 0] / a[:, 0]) > 1.3


def test_error_model_record_round_trip_and_bad_records():
    rng = np.random.default_rng(3)
    fitted, formal, ref, _ = _draw(500, rng)
    em = fit_error_model(fitted, formal, ref, ["TEFF", "LOGG"], info=dict(reference="truth"))
    em2 = ErrorModel.from_dict(em.to_dict())
    assert np.array_equal(em.total(fitted, formal), em2.total(fitted, formal))
    assert em2.info["reference"] == "truth"
    bad = em.to_dict()
    bad["params"]["TEFF"]["floor"] = [0.0]
    with pytest.raises(ValueError, match="bad parameters for TEFF"):
        ErrorModel.from_dict(bad)
    with pytest.raises(ValueError, match="not an error-model record"):
        ErrorModel.from_dict({"label_names": ["TEFF"]})
    with pytest.raises(ValueError, match="usable held-out fits"):
        fit_error_model(fitted[:10], formal[:10], ref[:10], ["TEFF", "LOGG"])


@pytest.fixture(scope="module")
def calibrated():
    train = make_synthetic(n_stars=600, n_pix=300, seed=11, bad_frac=0.0, masked_pixel=False)
    m = CannonModel(train.label_names, grid=train.grid).train(train.flux, train.ivar,
                                                              train.labels)
    m.calibrate_errors(train.flux, train.ivar, train.labels, debias=False)
    test = make_synthetic(n_stars=400, n_pix=300, seed=12, bad_frac=0.0, masked_pixel=False,
                          coeffs=train.coeffs, s2_true=train.s2_true)
    return m, test


def test_calibration_of_an_exact_model_keeps_errors_honest(calibrated):
    """The synthetic model is exact and its noise as stated: calibrated pulls stay ~1."""
    m, test = calibrated
    r = m.fit(test.flux, test.ivar, debias=False)
    assert r.formal_errors is not None
    pulls = (r.labels - test.labels)[r.ok] / r.errors[r.ok]
    assert np.all(np.abs(np.std(pulls, axis=0) - 1) < 0.2)
    # both parts are kept and add up in quadrature
    assert np.allclose(r.errors ** 2, r.formal_errors ** 2 + r.model_errors ** 2)
    t = r.to_table()
    assert {"TEFF_ERR_FORMAL", "TEFF_ERR_MODEL"} <= set(t.colnames)
    # the covariance's diagonal is the calibrated variance, its correlations the fit's
    assert np.allclose(np.sqrt(np.diagonal(r.covariance, axis1=1, axis2=2))[r.ok],
                       r.errors[r.ok])
    raw = m.fit(test.flux, test.ivar, debias=False, calibrated_errors=False)
    assert raw.formal_errors is None
    assert np.array_equal(raw.errors, r.formal_errors)


def _correlated(spectra, seed, width=4):
    """The same stars with pixel-correlated noise of the stated per-pixel sigma.

    Like resampled, combined spectra: the ivar is right per pixel but neighbours
    share their noise, so the formal errors are too small.
    """
    rng = np.random.default_rng(seed)
    sigma = 1 / np.sqrt(np.where(spectra.ivar > 0, spectra.ivar, np.inf))
    white = rng.normal(size=(spectra.flux.shape[0], spectra.flux.shape[1] + width - 1))
    kernel = np.ones(width) / np.sqrt(width)
    noise = np.stack([np.convolve(w, kernel, mode="valid") for w in white])
    return spectra.true_flux + sigma * noise


def test_calibration_corrects_correlated_noise():
    """Noise shared by neighbouring pixels: formal errors too small, calibrated ones right."""
    kw = dict(n_pix=300, bad_frac=0.0, masked_pixel=False, intrinsic_frac=0.0)
    train = make_synthetic(n_stars=600, seed=21, **kw)
    test = make_synthetic(n_stars=400, seed=22, coeffs=train.coeffs, s2_true=train.s2_true,
                          **kw)
    f_train, f_test = _correlated(train, 1), _correlated(test, 2)
    m = CannonModel(train.label_names, grid=train.grid).train(f_train, train.ivar, train.labels)
    m.calibrate_errors(f_train, train.ivar, train.labels, debias=False)
    r = m.fit(f_test, test.ivar, debias=False)
    formal_pulls = np.std(((r.labels - test.labels) / r.formal_errors)[r.ok], axis=0)
    pulls = np.std(((r.labels - test.labels) / r.errors)[r.ok], axis=0)
    assert np.all(formal_pulls > 1.1)
    assert np.all(np.abs(pulls - 1) < 0.2)


def test_error_model_travels_with_the_model_file(calibrated, tmp_path):
    m, test = calibrated
    for name in ("m.fits", "m.npz"):
        m.write(tmp_path / name)
        m2 = CannonModel.read(tmp_path / name)
        assert m2.error_model is not None
        a = m.fit(test.flux[:20], test.ivar[:20], debias=False)
        b = m2.fit(test.flux[:20], test.ivar[:20], debias=False)
        assert np.allclose(a.errors, b.errors, equal_nan=True)
    # training again drops the calibration: it belonged to the old training
    m3 = CannonModel.read(tmp_path / "m.npz")
    train = make_synthetic(n_stars=200, n_pix=300, seed=5, bad_frac=0.0, masked_pixel=False)
    m3.train(train.flux, train.ivar, train.labels)
    assert m3.error_model is None


def test_calibration_refuses_what_it_cannot_do(calibrated):
    m, test = calibrated
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        m.calibrate_errors(test.flux[:30], test.ivar[:30], test.labels[:30])
    r = m.fit(test.flux[:5], test.ivar[:5], debias=False, calibrated_errors=False)
    r.label_names = ["A", "B", "C"]
    with pytest.raises(ValueError, match="error model for labels"):
        m.error_model.apply(r)
