"""Error calibration of the NN regressor: reference labels with errors of their own."""
import numpy as np
import pytest
import torch

from cannon_fast.nn import (SpectrumRegressor, calibration_fraction, calibration_scale,
                            three_cornered_hat)
from cannon_fast.testing import make_synthetic


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_three_cornered_hat_recovers_independent_scatters():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(20000, 2))
    sig = np.array([[0.1, 1.0], [0.2, 0.5], [0.3, 0.2]])
    a, b, c = (t + s * rng.normal(size=t.shape) for s in sig)
    np.testing.assert_allclose(three_cornered_hat(a, b, c), sig, rtol=0.03, atol=0.02)
    # errors shared by a and b make them look better and c worse
    common = 0.2 * rng.normal(size=t.shape)
    out = three_cornered_hat(a + common, b + common, c)
    assert np.all(out[2] > 1.1 * sig[2]) and np.all(out[0] < sig[0] + 0.01)
    a[:5, 0] = np.nan  # skipped, not propagated
    assert np.all(np.isfinite(three_cornered_hat(a, b, c)))


@pytest.mark.parametrize("method", ["coverage", "variance"])
def test_calibration_scale_subtracts_the_reference_errors(method):
    rng = np.random.default_rng(2)
    n = 20000
    t = rng.normal(size=(n, 2))
    raw = np.full((n, 2), 0.1) * rng.uniform(0.5, 1.5, size=(n, 1))
    pred = t + 2.0 * raw * rng.normal(size=(n, 2))     # errors 2x too small
    e = np.full((n, 2), 0.15)
    ref = t + e * rng.normal(size=(n, 2))               # a catalogue with its own errors
    s = calibration_scale(pred, raw, ref, e, method=method)
    np.testing.assert_allclose(s, 2.0, rtol=0.06)
    assert abs(calibration_fraction(pred, s * raw, t) - 0.683).max() < 0.02
    # taking the reference as exact blames its scatter on the predictions
    assert np.all(calibration_scale(pred, raw, ref, method=method) > 2.3)
    # under-stated reference errors do the same (the mock survey's case)
    assert np.all(calibration_scale(pred, raw, ref, e / 1.5, method=method) > 2.15)


def test_calibration_scale_bad_method():
    with pytest.raises(ValueError, match="method"):
        calibration_scale(np.zeros((20, 1)), np.ones((20, 1)), np.zeros((20, 1)),
                          method="magic")


def test_calibrate_sets_the_error_scale_and_ema_is_checked():
    data = make_synthetic(n_stars=300, n_pix=80, n_labels=2, seed=5)
    reg = SpectrumRegressor(data.label_names, arch="mlp", hidden=(32, 16), seed=0)
    with pytest.raises(ValueError, match="ema_decay"):
        reg.train(data.flux, data.labels, data.ivar, ema_decay=1.0)
    reg.train(data.flux, data.labels, data.ivar, epochs=15, batch_size=16,
              learning_rate=2e-3, progress=False)
    te = reg.split["test"]
    f, iv, y = data.flux[te], data.ivar[te], data.labels[te]
    s = reg.calibrate(f, y, iv)
    np.testing.assert_array_equal(s, reg.error_scale)
    res = reg.predict(f, iv, n_samples=20)
    assert abs(calibration_fraction(res.labels, res.errors, y) - 0.683).max() < 2.0 / len(te)
    # the same labels declared noisy leave less scatter to the network
    noisy = reg.calibrate(f, y, iv, label_errors=np.full(y.shape, 0.5) * np.std(y, 0),
                          method="variance")
    assert np.all(noisy < s)
