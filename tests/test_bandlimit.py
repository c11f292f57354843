"""Band-limited theta (``train(band_limit=True)``, ``core.bandlimit``) on an oversampled grid.

The truth is a quadratic model whose every coefficient is a sum of lines as wide as the
LSF (what an instrument's spectra can hold); the training noise is white. Band-limiting
must keep that truth (noise-free training) and remove a large part of the noise, with
``theta_cov`` shrunk to the noise that is left.
"""
import numpy as np
import pytest

from cannon_fast import CannonModel, PixelGrid
from cannon_fast.core.bandlimit import band_limit_theta, band_limit_windows

NAMES = ["TEFF", "LOGG"]
R = 3000.0


def _grid(resolution=R):
    # 0.7 A pixels at 10000-11400 A: FWHM = lambda / R = 3.3-3.8 A, ~5 pixels
    return PixelGrid.linear(10000.0, 11400.0, 2001, resolution=resolution, name="test")


def _truth(grid, seed=0):
    """(P, 6) theta of the quadratic in (Teff, log g) scaled labels: lines of the LSF's width."""
    rng = np.random.default_rng(seed)
    w = grid.wavelength
    sigma = w / R / (2 * np.sqrt(2 * np.log(2)))
    theta = np.zeros((len(w), 6))
    theta[:, 0] = 1.0
    for centre in rng.uniform(w[0], w[-1], 120):
        shape = np.exp(-0.5 * ((w - centre) / sigma) ** 2)
        theta += shape[:, None] * rng.normal(0, [0.15, 0.05, 0.04, 0.02, 0.02, 0.02])
    return theta


def _labels(n, rng):
    return np.column_stack([rng.uniform(4000, 5500, n), rng.uniform(1.0, 3.5, n)])


def _spectra(model_theta, labels, snr, rng):
    """Flux of the true model at labels (scaled as a model trained on them scales) + noise."""
    m = CannonModel(NAMES, order=2)
    m.label_offsets = np.median(labels, axis=0)
    m.label_scales = np.ptp(labels, axis=0)
    from cannon_fast.core import vectorizer as vz
    v = vz.label_vector(m.scale_labels(labels), m.exponents)
    flux = v @ model_theta.T
    ivar = np.full(flux.shape, snr ** 2)
    return flux + rng.standard_normal(flux.shape) / snr, ivar


@pytest.fixture(scope="module")
def trained():
    """Per-pixel and band-limited models of one noisy training set, and the true theta."""
    rng = np.random.default_rng(1)
    grid = _grid()
    truth = _truth(grid)
    labels = _labels(150, rng)
    flux, ivar = _spectra(truth, labels, 30.0, rng)
    plain = CannonModel(NAMES, order=2, grid=grid).train(flux, ivar, labels)
    limited = CannonModel(NAMES, order=2, grid=grid).train(flux, ivar, labels, band_limit=True)
    # the true theta in the trained models' own label scaling
    m = CannonModel(NAMES, order=2, grid=grid).train(
        _spectra(truth, labels, 1e6, rng)[0], np.full(flux.shape, 1e12), labels)
    return dict(grid=grid, plain=plain, limited=limited, truth=m.theta, labels=labels,
                flux=flux, ivar=ivar)


def test_band_limit_keeps_a_noise_free_model(trained):
    """The filter passes what the LSF lets through: a noise-free model barely changes."""
    grid, truth = trained["grid"], trained["truth"]
    smooth, factor = band_limit_theta(truth, grid, np.ones(grid.n_pixels, bool))
    signal = truth - np.median(truth, axis=0)       # the lines, without the continuum
    err = smooth - truth
    # lines exactly as wide as the LSF (the narrowest it leaves): ~1 % of each term's
    # lines in rms, < 2 % of the deepest line anywhere
    assert np.all(np.sqrt(np.mean(err ** 2, 0)) < 0.015 * np.sqrt(np.mean(signal ** 2, 0)))
    assert np.abs(err).max() < 0.02 * np.abs(signal).max()
    assert np.all((factor > 0.1) & (factor < 1.0))


def test_band_limit_removes_training_noise(trained):
    """Coefficient errors shrink by more than a third; theta_cov says how large they are."""
    truth, plain, limited = trained["truth"], trained["plain"], trained["limited"]
    err_plain = plain.theta - truth
    err_limited = limited.theta - truth
    rms_plain = np.sqrt(np.mean(err_plain[:, 1:] ** 2))
    rms_limited = np.sqrt(np.mean(err_limited[:, 1:] ** 2))
    assert rms_limited < 0.67 * rms_plain
    # the stored covariance's diagonal against the errors actually left (independent noise)
    from cannon_fast.core import vectorizer as vz
    T = limited.n_terms
    diag = np.array([np.diag(vz.unpack_symmetric(c, T)) for c in limited.theta_cov])
    ratio = np.mean(err_limited ** 2 / diag, axis=0)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    assert limited.train_info["band_limit"]["order"] == 6
    assert "band_limit" not in plain.train_info


def test_band_limit_fits_labels_better(trained):
    """Test stars at S/N 200 (training noise matters most): smaller label errors."""
    rng = np.random.default_rng(7)
    labels = _labels(200, rng)
    m = CannonModel(NAMES, order=2, grid=trained["grid"])
    m.label_offsets = trained["plain"].label_offsets
    m.label_scales = trained["plain"].label_scales
    from cannon_fast.core import vectorizer as vz
    flux = vz.label_vector(m.scale_labels(labels), m.exponents) @ trained["truth"].T
    flux = flux + rng.standard_normal(flux.shape) / 200.0
    ivar = np.full(flux.shape, 200.0 ** 2)
    rms = {k: np.sqrt(np.mean((trained[k].fit(flux, ivar, debias=False).labels - labels) ** 2,
                              axis=0)) for k in ("plain", "limited")}
    assert np.all(rms["limited"] < 0.9 * rms["plain"]), rms


def test_band_limit_respects_segments_and_flags():
    """Degree-6 polynomials along pixels pass exactly, ends and chip gaps included.

    Nothing is smoothed across a gap or a flagged pixel, which stays as it is.
    """
    w = np.concatenate([np.linspace(10000, 10500, 400), np.linspace(10600, 11100, 400)])
    grid = PixelGrid(w, segments=[(0, 400), (400, 800)], resolution=R)
    t = np.linspace(-1, 1, 400)
    col = np.concatenate([1 + 0.3 * t ** 6 - 0.2 * t, 5 + 0.1 * t ** 3])  # a step at the gap
    noise = np.random.default_rng(3).standard_normal((800, 20))
    theta = np.column_stack([col, noise])
    usable = np.ones(800, bool)
    usable[200] = False
    theta[200] = 99.0
    out, factor = band_limit_theta(theta, grid, usable)
    keep = np.arange(800) != 200
    np.testing.assert_allclose(out[keep, 0], col[keep], atol=1e-9)
    assert np.all(out[200] == 99.0) and factor[200] == 1.0
    # white noise shrinks to the variance factor the function reports (theta_cov's scaling)
    left = np.mean(out[keep, 1:] ** 2, axis=1)
    assert 0.85 < np.mean(left) / np.mean(factor[keep]) < 1.15
    assert np.mean(factor[keep]) < 0.7


def test_band_limit_needs_a_resolution():
    """A grid without a resolving power is refused, before training, with the fix."""
    grid = PixelGrid.linear(10000.0, 11000.0, 300)
    with pytest.raises(ValueError, match="resolving power"):
        band_limit_windows(grid)
    rng = np.random.default_rng(0)
    flux = 1 + 0.01 * rng.standard_normal((40, 300))
    with pytest.raises(ValueError, match="band_limit=True needs the grid's resolving power"):
        CannonModel(NAMES, order=2, grid=grid).train(flux, np.ones_like(flux) * 1e4,
                                                     _labels(40, rng), band_limit=True)


def test_band_limit_windows_follow_the_lsf():
    """2.5 FWHM, odd, at least order + 3 pixels; wider where the LSF is wider in pixels."""
    win = band_limit_windows(_grid())
    assert np.all(win % 2 == 1) and win.min() >= 9
    fwhm_px = (_grid().wavelength / R) / 0.7
    assert np.all(np.abs(win - 2.5 * fwhm_px) <= 2.0)
    assert win[-1] >= win[0]


def test_band_limit_survives_write_and_calibration(trained, tmp_path, monkeypatch):
    """The file keeps train_info's record; calibrate_errors trains its fold models the same way."""
    limited = trained["limited"]
    limited.write(tmp_path / "m.npz")
    back = CannonModel.read(tmp_path / "m.npz")
    assert back.train_info["band_limit"] == limited.train_info["band_limit"]
    np.testing.assert_array_equal(back.theta, limited.theta)
    seen = []
    train = CannonModel.train

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("band_limit", False))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(CannonModel, "train", spy)
    back.calibrate_errors(trained["flux"], trained["ivar"], trained["labels"], n_folds=3,
                          debias=False)
    assert seen == [True, True, True]
