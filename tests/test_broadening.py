"""Rotation and Gaussian broadening on any grid (cannon_fast.core.broadening)."""
import numpy as np
import pytest

from cannon_fast.core import broadening as br
from cannon_fast.core.grid import PixelGrid
from cannon_fast.core.information import CallableModel

# Gray's kernel: variance [(1 - eps)/4 + (2 eps/3)/5] / (1 - eps/3) vsini^2 (0.225 at eps = 0.6)
GRAY_VARIANCE = {0.0: 0.25, 0.6: 0.225, 1.0: 0.2}


@pytest.mark.parametrize("eps", [0.0, 0.6, 1.0])
def test_rotation_kernel_has_unit_area_and_grays_variance(eps):
    """The analytic profile, and a delta line broadened on a fine grid, match Gray's moments."""
    x = np.linspace(-1, 1, 400001)
    g = br.rotation_profile(x * 40.0, 40.0, eps) * 40.0
    np.testing.assert_allclose(np.trapezoid(g, x), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.trapezoid(g * x * x, x), GRAY_VARIANCE[eps], atol=1e-6)
    grid = PixelGrid.log_uniform(15000.0, step=2e-6, n_pixels=4001)  # 1.38 km/s pixels
    dv = grid.pixel_velocity[0]
    delta = np.zeros(grid.n_pixels)
    delta[2000] = 1.0
    out = br.broaden(delta, grid, vsini=40.0, epsilon=eps)
    v = (np.arange(grid.n_pixels) - 2000) * dv
    np.testing.assert_allclose(out.sum(), 1.0, atol=1e-9)
    # the piecewise-linear interpolant adds a triangle of variance dv^2 / 6
    np.testing.assert_allclose((out * v * v).sum(), GRAY_VARIANCE[eps] * 1600 + dv ** 2 / 6,
                               rtol=1e-6)
    inner = np.abs(v) < 35.0
    np.testing.assert_allclose(out[inner] / dv, br.rotation_profile(v[inner], 40.0, eps),
                               rtol=0.02)


def test_gaussian_broadening_adds_its_variance_on_a_linear_grid():
    """On a grid uniform in lambda each pixel uses its own velocity width."""
    grid = PixelGrid.linear(4000.0, 8000.0, 20001)   # 15 -> 7.5 km/s pixels
    for centre in (4200.0, 7800.0):
        delta = np.zeros(grid.n_pixels)
        i = int(np.argmin(np.abs(grid.wavelength - centre)))
        delta[i] = 1.0
        out = br.broaden(delta, grid, sigma=20.0)
        v = br.SPEED_OF_LIGHT * np.log(grid.wavelength / grid.wavelength[i])
        dv = grid.pixel_velocity[i]
        np.testing.assert_allclose((out * v * v).sum(), 400.0 + dv ** 2 / 6, rtol=1e-3)


def test_narrow_kernels_are_the_identity_and_segments_are_not_crossed():
    """A vsini -> 0 returns the spectrum; a line near a chip end never leaks into the next chip."""
    grid = PixelGrid.log_uniform(15000.0, step=6e-6, n_pixels=600, segments=[(0, 300), (320, 600)])
    flux = np.ones(600)
    flux[297] = 0.2   # a line at the end of chip 1
    np.testing.assert_allclose(br.broaden(flux, grid, vsini=1e-9), flux)
    out = br.broaden(flux, grid, vsini=60.0)
    np.testing.assert_allclose(out[300:], 1.0, atol=1e-12)
    assert out[297] > 0.5 and out[285] < 1.0
    with pytest.raises(ValueError, match="spectra have 500 pixels, the grid 600"):
        br.broaden(np.ones(500), grid, vsini=10.0)


def _line_model(grid, seed=1):
    """Lines at random places whose depths follow two labels; LSF-width Gaussians."""
    rng = np.random.default_rng(seed)
    wave = grid.wavelength
    centres = rng.uniform(wave[5], wave[-5], 60)
    depth0 = rng.uniform(0.1, 0.6, 60)
    slope = rng.normal(0, 0.5, (60, 2))
    sig = centres / grid.resolution / 2.3548
    prof = np.exp(-0.5 * ((wave[None] - centres[:, None]) / sig[:, None]) ** 2)  # (K, P)

    def flux(labels):
        d = depth0 * np.clip(1 + labels @ slope.T, 0.05, 3)  # (N, K)
        return 1.0 - d @ prof

    return CallableModel(flux, ["A", "B"], [[-1, 1], [-1, 1]], batched=True, grid=grid)


def test_vsini_recovered_with_unbiased_labels():
    """Fits of rotated spectra at S/N 100 get vsini within 10 % and the labels right."""
    from cannon_fast import fit_spectra

    grid = PixelGrid.log_uniform(15500.0, step=6e-6, n_pixels=3000, resolution=22500.0)
    base = _line_model(grid)
    model = br.BroadenedForwardModel(base, vsini_max=250.0)
    rng = np.random.default_rng(7)
    vsini = np.array([10.0, 30.0, 80.0, 150.0])
    labels = np.array([[0.2, -0.3], [-0.4, 0.1], [0.5, 0.5], [0.0, -0.6]])
    truth = np.column_stack([labels, vsini])
    flux = model.predict(truth) + rng.standard_normal((4, grid.n_pixels)) / 100.0
    res = fit_spectra(model, flux, np.full_like(flux, 1e4))
    assert res.ok.all()
    np.testing.assert_allclose(res.labels[:, 2], vsini, rtol=0.1)
    # errors are honest: every label within 4 sigma of the truth
    assert np.all(np.abs(res.labels - truth) < 4 * res.errors)
    # the numerical Jacobian of the rotation column matches the model's
    f0 = model.predict(truth[2:3] + [0, 0, 0.5])[0] - model.predict(truth[2:3] - [0, 0, 0.5])[0]
    _, jac = model.predict_with_jacobian(truth[2:3])
    np.testing.assert_allclose(jac[0, :, 2], f0 / 1.0, atol=1e-6)


def test_gaussian_nuisance_is_fitted_with_rotation():
    """VBROAD (Gaussian) and VSINI together: a turbulent, slowly rotating star."""
    from cannon_fast import fit_spectra

    grid = PixelGrid.log_uniform(15500.0, step=6e-6, n_pixels=3000, resolution=22500.0)
    model = br.BroadenedForwardModel(_line_model(grid), vsini_max=200.0, gaussian=True)
    truth = np.array([[0.1, 0.2, 40.0, 8.0]])
    flux = model.predict(truth) + np.random.default_rng(2).standard_normal((1, 3000)) / 200.0
    res = fit_spectra(model, flux, np.full_like(flux, 4e4))
    assert res.label_names == ["A", "B", "VSINI", "VBROAD"]
    np.testing.assert_allclose(res.labels[0, 2:], [40.0, 8.0], rtol=0.15)


def test_lsf_matrix_conserves_flux_and_refuses_short_input():
    """The Gaussian LSF matrix: rows sum to 1, a line's depth falls as R drops."""
    fine = np.arange(5000.0, 5100.0, 0.01)
    flux = 1 - 0.8 * np.exp(-0.5 * ((fine - 5050.0) / 0.02) ** 2)
    out_wave = np.linspace(5010.0, 5090.0, 801)
    m = br.lsf_matrix(fine, out_wave, 2000.0)
    np.testing.assert_allclose(np.asarray(m.sum(axis=1)).ravel(), 1.0, rtol=1e-12)
    low = m @ flux
    # equivalent width is conserved by the convolution
    np.testing.assert_allclose(np.sum(1 - low) * 0.1, np.sum(1 - flux) * 0.01, rtol=1e-3)
    with pytest.raises(ValueError, match="the input covers 5000.00-5099.99 A"):
        br.lsf_matrix(fine, np.linspace(5000.0, 5090.0, 10), 2000.0)


def test_log_grid_convolution_equals_the_banded_matrix():
    """The one-row convolution of log-uniform grids is the general banded matrix."""
    grid = PixelGrid.log_uniform(15000.0, step=6e-6, n_pixels=900, segments=[(0, 400), (450, 900)])
    flux = 1 - 0.5 * np.exp(-0.5 * ((np.arange(900) % 97 - 48) / 2.0) ** 2)
    fast = br.broaden(flux, grid, vsini=70.0)
    idx, w = br.broadening_matrix(grid, lambda u: br.rotation_second_integral(u, 70.0), 70.0)
    np.testing.assert_allclose(fast, np.einsum("pk,pk->p", flux[idx], w), atol=1e-12)


def test_a_cannon_model_takes_rotation_too():
    """Any forward model: a CannonModel with a grid, rotated spectra, VSINI and labels fitted."""
    from cannon_fast import CannonModel, fit_spectra
    from cannon_fast.testing import make_synthetic

    syn = make_synthetic(n_stars=200, n_pix=400, n_labels=3, seed=2)
    grid = PixelGrid.log_uniform(15500.0, step=6e-6, n_pixels=400, resolution=22500.0)
    model = CannonModel(syn.label_names, order=2, grid=grid).train(syn.true_flux,
                                                                  np.full_like(syn.flux, 1e6),
                                                                  syn.labels)
    rot = br.BroadenedForwardModel(model, vsini_max=100.0)
    truth = np.column_stack([syn.labels[:3], [15.0, 40.0, 80.0]])
    flux = rot.predict(truth)
    res = fit_spectra(rot, flux, np.full_like(flux, 1e6))
    np.testing.assert_allclose(res.labels[:, 3], truth[:, 3], rtol=0.02)
    assert np.all(np.abs(res.labels[:, :3] - truth[:, :3]) < 0.01 * np.ptp(syn.labels, axis=0))
