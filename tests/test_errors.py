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
    bad = em.to_dict()
    bad["params"]["LOGG"]["curvature"] = [0.1]
    with pytest.raises(ValueError, match="bad parameters for LOGG"):
        ErrorModel.from_dict(bad)
    with pytest.raises(ValueError, match="not an error-model record"):
        ErrorModel.from_dict({"label_names": ["TEFF"]})
    with pytest.raises(ValueError, match="usable held-out fits"):
        fit_error_model(fitted[:10], formal[:10], ref[:10], ["TEFF", "LOGG"])


def _draw_u_shaped(n, rng):
    """Held-out 'fits' whose model floor rises towards both ends of TEFF, at S/N 40-600.

    As a model misfits its coolest and hottest stars: at high S/N, where the floor is
    nearly all of the error, a floor monotone in the labels understates both ends.
    """
    labels = np.column_stack([rng.normal(4800, 300, n), rng.normal(2.6, 0.5, n)])
    snr = np.exp(rng.uniform(np.log(40), np.log(600), n))
    formal = np.column_stack([1500 / snr, 3.0 / snr])
    z = (labels[:, 0] - 4800) / 300
    floor = np.column_stack([25 * np.exp(0.2 * np.clip(z, -2, 2) ** 2), np.full(n, 0.05)])
    fitted = labels + rng.normal(size=labels.shape) * np.hypot(1.5 * formal, floor)
    return fitted, formal, labels, snr, np.abs(z)


def _pull_std_by_bin(em, fitted, formal, ref, snr, absz):
    """TEFF pull std per S/N bin (<100, 100-200, >200) x (bulk |z| < 1, ends |z| > 1.5)."""
    pulls = (fitted - ref)[:, 0] / em.total(fitted, formal)[:, 0]
    return np.array([[np.std(pulls[(snr >= lo) & (snr < hi) & part])
                      for part in (absz < 1, absz > 1.5)]
                     for lo, hi in ((0, 100), (100, 200), (200, np.inf))])


def test_floor_follows_a_misfit_rising_at_both_ends_of_a_label():
    """Calibrated pulls in every S/N bin, bulk and ends alike; without curvature not."""
    rng = np.random.default_rng(0)
    cal, new = _draw_u_shaped(6000, rng), _draw_u_shaped(6000, rng)
    em = fit_error_model(*cal[:3], ["TEFF", "LOGG"], curvature=True)
    std = _pull_std_by_bin(em, *new)
    assert np.all(np.abs(std - 1) < 0.15), std
    assert em.params["TEFF"]["curvature"][0] > 0.08
    # the log-linear floor alone fits the bulk and understates the ends, most where the
    # floor is all of the error
    flat = fit_error_model(*cal[:3], ["TEFF", "LOGG"])
    assert "curvature" not in flat.params["TEFF"]
    std_flat = _pull_std_by_bin(flat, *new)
    assert std_flat[2, 1] > 1.3 and np.all(std_flat[:, 1] > std[:, 1]), std_flat


def test_noise_part_keeps_at_least_the_formal_error():
    """The noise part stays at the formal error when the residuals are smaller.

    An ivar that overstates the noise: the noise part is not shrunk below the formal
    error, and a floor does not replace it.
    """
    rng = np.random.default_rng(5)
    labels = np.column_stack([rng.normal(4800, 300, 3000), rng.normal(2.6, 0.5, 3000)])
    formal = np.column_stack([rng.uniform(5, 40, 3000), rng.uniform(0.01, 0.08, 3000)])
    fitted = labels + rng.normal(size=labels.shape) * np.hypot(0.5 * formal, [10, 0.02])
    em = fit_error_model(fitted, formal, labels, ["TEFF", "LOGG"])
    assert all(em.params[n]["scale"] == pytest.approx(1.0) for n in ("TEFF", "LOGG"))
    noise, _ = em.parts(fitted, formal)
    near = np.abs(formal / [em.params[n]["sigma0"] for n in ("TEFF", "LOGG")] - 1) < 0.05
    assert np.allclose(noise[near], formal[near], rtol=0.05)


def test_records_without_curvature_still_give_a_log_linear_floor():
    """Error models written before the curvature load and give the errors they gave."""
    rng = np.random.default_rng(4)
    fitted, formal, ref, snr, _ = _draw_u_shaped(600, rng)
    d = fit_error_model(fitted, formal, ref, ["TEFF", "LOGG"], curvature=True).to_dict()
    for p in d["params"].values():
        p.pop("curvature")
    old = ErrorModel.from_dict(d)
    z = np.clip((fitted - old.center) / old.spread, -3, 3)
    for j, name in enumerate(["TEFF", "LOGG"]):
        p = d["params"][name]
        noise = p["scale"] * p["sigma0"] * (formal[:, j] / p["sigma0"]) ** p["power"]
        b = np.asarray(p["floor"])
        floor = np.exp(b[0] + np.clip(z @ b[1:], -np.log(4), np.log(4)))
        expect = np.fmax(np.hypot(noise, floor), formal[:, j])
        assert np.allclose(old.total(fitted, formal)[:, j], expect, rtol=1e-12)
    assert "curvature" not in old.to_dict()["params"]["TEFF"]


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



def test_cli_fit_writes_the_calibrated_errors(calibrated, tmp_path):
    """`cannon-fast fit` gives the errors `model.fit` and `label` give, with both parts."""
    from astropy.table import Table

    from cannon_fast.cli import main

    m, test = calibrated
    m.write(tmp_path / "m.npz")
    np.savez(tmp_path / "s.npz", flux=test.flux[:50], ivar=test.ivar[:50])
    for method in ("fast", "trf"):
        out = tmp_path / f"{method}.fits"
        assert main(["fit", str(tmp_path / "s.npz"), "--model", str(tmp_path / "m.npz"),
                     "--out", str(out), "--no-debias", "--method", method, "-q"]) == 0
        t = Table.read(out)
        formal = np.column_stack([t[n + "_ERR_FORMAL"] for n in m.label_names])
        total = np.column_stack([t[n + "_ERR"] for n in m.label_names])
        model_part = np.column_stack([t[n + "_ERR_MODEL"] for n in m.label_names])
        assert np.allclose(total ** 2, formal ** 2 + model_part ** 2)
        assert np.all(total >= formal) and np.any(model_part > 0)
    r = m.fit(test.flux[:50], test.ivar[:50], debias=False)
    assert np.allclose(np.column_stack([Table.read(tmp_path / "fast.fits")[n + "_ERR"]
                                        for n in m.label_names]), r.errors)

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
