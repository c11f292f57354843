"""The core on any pixel grid: APOGEE's three, a JWST-like linear one and a LAMOST-like log one.

Spectra are Gaussian absorption lines at fixed wavelengths, as wide as each grid's
line-spread function, with depths quadratic in the labels: a quadratic Cannon is
then the exact model, so label errors must mean what they say on every grid.
"""
import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast.core.grid import SPEED_OF_LIGHT, PixelGrid

NAMES = ["TEFF", "LOGG", "FE_H"]
CENTRE = np.array([4800.0, 2.5, -0.2])
HALF_RANGE = np.array([600.0, 1.0, 0.5])

GRIDS = {
    "apStar 8575": PixelGrid.apstar,
    "ASPCAP 7514": lambda: PixelGrid.aspcap(7514),
    "ASPCAP 7214": lambda: PixelGrid.aspcap(7214),
    "JWST-like linear 8192": lambda: PixelGrid.linear(9000.0, 18000.0, 8192, resolution=2700.0),
    "LAMOST-like log": lambda: PixelGrid.log_uniform(3700.0, 9000.0, step=1e-4,
                                                     resolution=1800.0),
}


def _line_spectra(grid, labels, extra_var=0.0, seed=0):
    """Normalized spectra: 120 lines per grid, depths quadratic in the scaled labels.

    ``extra_var`` (N,) adds a Gaussian velocity variance, (km/s)², to every line
    (equal-area lines: broadening spreads a line without changing its strength).
    """
    rng = np.random.default_rng(seed)
    lo, hi = grid.wavelength[[0, -1]]
    centres = np.sort(rng.uniform(lo, hi, 120))
    coef = rng.normal(0, 1, (120, 10)) * np.array([1, .5, .5, .5, .2, .2, .2, .2, .2, .2])
    x = (labels - CENTRE) / HALF_RANGE
    n = len(x)
    iu = np.triu_indices(3)
    v = np.hstack([np.ones((n, 1)), x, (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]])
    depth = np.clip(0.15 * (1 + 0.4 * v @ coef.T / 2.5), 0.01, 0.6)  # (N, lines)
    r = grid.resolution if np.ndim(grid.resolution) == 0 else np.median(grid.resolution)
    lsf_var = (SPEED_OF_LIGHT / (r * 2.3548)) ** 2  # (km/s)²
    var = lsf_var + np.broadcast_to(np.asarray(extra_var, float), (n,))[:, None]  # (N, 1)
    flux = np.ones((n, grid.n_pixels))
    w = grid.wavelength
    for j, c in enumerate(centres):
        sig_w = c * np.sqrt(var) / SPEED_OF_LIGHT  # (N, 1) Angstrom
        near = np.abs(w - c) < 6 * c * np.sqrt(var.max()) / SPEED_OF_LIGHT
        amp = depth[:, j:j + 1] * np.sqrt(lsf_var / var)
        flux[:, near] -= amp * np.exp(-0.5 * ((w[near] - c) / sig_w) ** 2)
    return flux


def _survey(grid, n, seed, snr=100.0, extra_var=0.0):
    rng = np.random.default_rng(seed)
    labels = CENTRE + HALF_RANGE * rng.uniform(-1, 1, (n, 3))
    true = _line_spectra(grid, labels, extra_var)
    sigma = true / snr
    flux = true + rng.normal(size=true.shape) * sigma
    ivar = 1.0 / sigma ** 2
    ivar[:, ~grid.in_segment] = 0.0  # no data in the gaps between chips
    flux[:, ~grid.in_segment] = 1.0
    return labels, flux, ivar, true


@pytest.fixture(scope="module", params=list(GRIDS))
def trained(request):
    grid = GRIDS[request.param]()
    labels, flux, ivar, _ = _survey(grid, 1500, seed=1)
    model = CannonModel(NAMES, grid=grid).train(flux, ivar, labels)
    return request.param, grid, model


def _pull_widths(result, truth):
    p = (result.labels - truth) / result.errors
    return 1.4826 * np.median(np.abs(p - np.median(p, axis=0)), axis=0)


def test_labels_and_errors_on_every_grid(trained):
    name, grid, model = trained
    labels, flux, ivar, _ = _survey(grid, 300, seed=2)
    res = model.fit(flux, ivar)
    assert res.ok.all(), name
    widths = _pull_widths(res, labels)
    assert np.all((widths > 0.8) & (widths < 1.25)), (name, widths)
    rms = np.sqrt(np.mean((res.labels - labels) ** 2, axis=0))
    assert np.all(rms < 0.05 * HALF_RANGE), (name, rms)
    # the plain fit leaves the model's own (training) error out of its errors
    plain = model.fit(flux, ivar, debias=False)
    assert np.all(_pull_widths(plain, labels) > widths), name


def test_refined_continuum_is_one_per_segment(trained):
    """A continuum error that jumps at every segment join is taken out segment by segment."""
    name, grid, model = trained
    labels, flux, ivar, _ = _survey(grid, 200, seed=3)
    tilt = np.ones(grid.n_pixels)
    for k, (a, b) in enumerate(grid.segments):
        t = np.linspace(-1, 1, b - a)
        tilt[a:b] = 1 + 0.02 * (-1) ** k * t + 0.01 * k  # its own slope and level
    bad_flux, bad_ivar = flux * tilt, ivar / tilt ** 2
    clean = model.fit(flux, ivar)
    plain = model.fit(bad_flux, bad_ivar)
    refined = model.fit(bad_flux, bad_ivar, refine_continuum=True)

    def rms(r):
        return np.sqrt(np.mean((r.labels - labels) ** 2, axis=0))

    assert np.all(rms(refined) < 1.25 * rms(clean)), (name, rms(clean), rms(refined))
    assert np.any(rms(plain) > 2 * rms(clean)), (name, rms(clean), rms(plain))
    assert np.median(refined.reduced_chi2) < 1.1 < np.median(plain.reduced_chi2), name


def test_broadening_in_the_grids_own_velocities(trained):
    """Extra Gaussian broadening reads as its velocity variance, none as ~0.

    20 km/s (400 (km/s)²) at R ~ 2000-3000; at APOGEE's R = 22,500, whose pixels
    are 4.1 km/s wide, 4 km/s (the first order holds up to ~2 pixel widths²).
    """
    name, grid, model = trained
    b_true = 16.0 if grid.resolution > 10000 else 400.0
    labels, flux, ivar, _ = _survey(grid, 200, seed=4)
    labels_b, flux_b, ivar_b, _ = _survey(grid, 200, seed=4, extra_var=b_true)
    none = model.fit(flux, ivar, debias=False, broadening=True)
    some = model.fit(flux_b, ivar_b, debias=False, broadening=True)
    assert none.ok.all() and some.ok.all(), name
    err = np.median(some.broadening_error)
    assert abs(np.median(none.broadening)) < max(0.05 * b_true, 0.3 * err), (
        name, np.median(none.broadening), err)
    assert abs(np.median(some.broadening) / b_true - 1) < 0.25, (
        name, np.median(some.broadening))
    # the labels of the broadened stars are nearly as right as a plain fit's of unbroadened
    # ones (the first order leaves a little), and far better than a plain fit's of the same
    widths = _pull_widths(some, labels_b)
    assert np.all(widths < 1.35 * _pull_widths(model.fit(flux, ivar, debias=False), labels))
    assert np.all(widths < _pull_widths(model.fit(flux_b, ivar_b, debias=False), labels_b))


def test_label_a_raw_survey_on_a_two_detector_grid(tmp_path):
    """``label_survey`` on raw .npz spectra of a grid with a detector gap (NIRSpec-like):
    normalized per detector with the model's recorded continuum pixels, then fitted."""
    from cannon_fast.core.continuum import (continuum_pixels_from_model, normalize,
                                            record_continuum)
    from cannon_fast.survey import label_survey, read_catalog

    grid = PixelGrid.linear(9000.0, 18000.0, 8192, segments=[(0, 4000), (4100, 8192)],
                            resolution=2700.0, name="two detectors")
    labels, flux, ivar, _ = _survey(grid, 1500, seed=5)
    model = CannonModel(NAMES, grid=grid).train(flux, ivar, labels)
    record_continuum(model, continuum_pixels_from_model(model))
    model.write(tmp_path / "m.fits")
    model = CannonModel.read(tmp_path / "m.fits")
    assert model.train_info["continuum_grid"] == "model"

    test_labels, norm_flux, norm_ivar, _ = _survey(grid, 150, seed=6)
    rng = np.random.default_rng(7)
    cont = np.ones_like(norm_flux)  # a response of its own per star and detector
    for a, b in grid.segments:
        t = np.linspace(-1, 1, b - a)
        cont[:, a:b] = (rng.uniform(500, 2000, (150, 1))
                        * (1 + rng.normal(0, 0.1, (150, 1)) * t + 0.05 * t ** 2))
    raw_flux, raw_ivar = norm_flux * cont, norm_ivar / cont ** 2
    np.savez(tmp_path / "raw.npz", flux=raw_flux, ivar=raw_ivar, normalized=False,
             ids=np.array([f"star{i}" for i in range(150)]))
    label_survey(model, tmp_path / "raw.npz", tmp_path / "cat.fits", chunk_size=64)
    cat = read_catalog(tmp_path / "cat.fits")
    got = np.column_stack([np.asarray(cat[n]) for n in NAMES])
    # the same as normalizing per detector by hand and fitting
    pixels = model.train_info["continuum_pixels"]
    ns = normalize(raw_flux, raw_ivar, pixels, segments=grid, dtype=np.float64)
    direct = model.fit(ns.flux, ns.ivar)
    errors = np.column_stack([np.asarray(cat[n + "_ERR"]) for n in NAMES])
    assert np.max(np.abs(got - direct.labels) / errors) < 1e-3
    widths = 1.4826 * np.median(np.abs((got - test_labels) / errors), axis=0)
    assert np.all((widths > 0.7) & (widths < 1.4)), widths


def test_continuum_pixels_found_per_segment():
    """Ness et al.'s iteration on raw spectra of a two-detector grid: pixels in each
    detector, at the true continuum, and normalization that recovers the true spectra."""
    from cannon_fast.core.continuum import find_continuum_pixels, normalize

    grid = PixelGrid.linear(9000.0, 18000.0, 8192, segments=[(0, 4000), (4100, 8192)],
                            resolution=2700.0)
    labels, flux, ivar, true = _survey(grid, 400, seed=8)
    rng = np.random.default_rng(9)
    cont = np.ones_like(flux)
    for a, b in grid.segments:
        t = np.linspace(-1, 1, b - a)
        cont[:, a:b] = rng.uniform(500, 2000, (400, 1)) * (1 + rng.normal(0, .1, (400, 1)) * t)
    pixels, history = find_continuum_pixels(
        flux * cont, ivar / cont ** 2, labels, lambda: CannonModel(NAMES, grid=grid),
        segments=grid)
    for a, b in grid.segments:
        assert pixels[a:b].sum() > 100
    assert not pixels[~grid.in_segment].any()
    # chosen pixels are continuum in the noise-free spectra (no line deeper than 1 %)
    assert np.median(1 - true[:, pixels].min(axis=0)) < 0.01
    ns = normalize(flux * cont, ivar / cont ** 2, pixels, segments=grid, dtype=np.float64)
    good = ns.ivar > 0
    assert np.median(np.abs(ns.flux - true)[good]) < 0.01
