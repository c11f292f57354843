"""Fisher information and Cramér–Rao bounds (cannon_fast.core.information)."""
import numpy as np
import pytest

from cannon_fast.core.information import (CallableModel, bound_vs_snr, information_content,
                                          finite_difference_jacobian)

SIGMA, STEP = 0.8, 0.1  # line width and pixel step, Angstrom
WAVE = np.arange(-20.0, 20.0 + STEP / 2, STEP)


def line(labels):
    """One Gaussian absorption line: labels (depth, centre)."""
    depth, centre = labels[..., :1], labels[..., 1:]
    return 1.0 - depth * np.exp(-0.5 * ((WAVE - centre) / SIGMA) ** 2)


def test_gaussian_line_bounds_match_the_analytic_integrals():
    """Depth and centre of one Gaussian line: the bounds of the continuous integrals."""
    # F_AA = S^2 sum g^2 = S^2 sqrt(pi) sigma / step; F_cc = S^2 A^2 sqrt(pi) / (2 sigma step);
    # F_Ac = 0 by symmetry
    snr, depth = 50.0, 0.4
    info = information_content(line, [depth, 0.0], snr=snr, label_names=["A", "C"])
    crb_a = 1.0 / (snr * np.sqrt(np.sqrt(np.pi) * SIGMA / STEP))
    crb_c = 1.0 / (snr * depth * np.sqrt(np.sqrt(np.pi) / (2 * SIGMA * STEP)))
    np.testing.assert_allclose(info.crb, [crb_a, crb_c], rtol=1e-4)
    np.testing.assert_allclose(info.crb, info.crb_fixed, rtol=1e-4)   # uncorrelated
    np.testing.assert_allclose(info.share.sum(axis=0), 1.0, rtol=1e-10)
    # depth is told by the line core, the centre by its flanks
    core = np.abs(WAVE) < 0.2
    assert info.share[core, 0].sum() > 5 * info.share[core, 1].sum()
    assert np.abs(WAVE[info.top_pixels("C", 4)]).min() > 0.5


def test_bound_scales_with_snr_and_s2_floors_it():
    """A perfect model's bound goes as 1/S/N; a model variance sets a floor."""
    crb = bound_vs_snr(line, [0.4, 0.0], [10, 100, 1000], label_names=["A", "C"])
    np.testing.assert_allclose(crb[0] / crb[1], 10.0, rtol=1e-10)
    np.testing.assert_allclose(crb[1] / crb[2], 10.0, rtol=1e-10)
    floored = bound_vs_snr(line, [0.4, 0.0], [1e6], s2=1e-4, label_names=["A", "C"])
    ideal = information_content(line, [0.4, 0.0], snr=100.0, s2=0.0)  # sigma 1e-2 = sqrt(1e-4)
    np.testing.assert_allclose(floored[0], ideal.crb, rtol=1e-6)


def test_fits_scatter_at_the_bound():
    """Maximum-likelihood fits of noisy spectra scatter as the CRB says (linear-ish model)."""
    from cannon_fast import fit_spectra

    model = CallableModel(line, ["A", "C"], [[0.05, 0.9], [-2.0, 2.0]], batched=True)
    truth = np.array([0.4, 0.3])
    snr = 40.0
    rng = np.random.default_rng(3)
    n = 300
    flux = line(truth)[None] + rng.standard_normal((n, WAVE.size)) / snr
    ivar = np.full_like(flux, snr ** 2)
    res = fit_spectra(model, flux, ivar)
    assert res.ok.all()
    info = information_content(model, truth, snr=snr)
    scatter = res.labels.std(axis=0)
    # the standard error of a std from 300 draws is 4 %
    np.testing.assert_allclose(scatter, info.crb, rtol=0.15)
    np.testing.assert_allclose(np.median(res.errors, axis=0), info.crb, rtol=0.02)


def test_analytic_jacobian_and_finite_differences_agree():
    """A Cannon model's own Jacobian and finite differences of its predict give one bound."""
    from cannon_fast import CannonModel
    from cannon_fast.testing import make_synthetic

    synthetic = make_synthetic(n_stars=64, n_pix=200, n_labels=3, seed=0)

    model = CannonModel(synthetic.label_names, order=2).train(synthetic.flux, synthetic.ivar,
                                                              synthetic.labels)
    star = synthetic.labels[3]
    a = information_content(model, star, snr=100.0, s2=0.0)
    b = information_content(model.predict, star, snr=100.0, s2=0.0,
                            label_names=synthetic.label_names)
    np.testing.assert_allclose(a.crb, b.crb, rtol=1e-4)
    assert a.label_names == list(synthetic.label_names)
    # the model's s2 raises the bound
    c = information_content(model, star, snr=100.0)
    assert np.all(c.crb >= a.crb)


def test_degenerate_labels_give_nan_and_bad_noise_is_refused():
    """Labels the spectrum cannot tell apart have no bound; bad noise is an error."""
    def twin(labels):  # only the sum of the two labels matters
        return 1.0 - (labels[0] + labels[1]) * np.exp(-0.5 * (WAVE / SIGMA) ** 2)

    info = information_content(twin, [0.2, 0.2], snr=100.0)
    assert np.all(np.isnan(info.crb))
    assert np.all(np.isfinite(info.crb_fixed))
    with pytest.raises(ValueError, match="exactly one of snr"):
        information_content(line, [0.4, 0.0])
    with pytest.raises(ValueError, match="ivar must be finite"):
        information_content(line, [0.4, 0.0], ivar=-np.ones(WAVE.size))


def test_finite_difference_jacobian_of_a_quadratic_is_exact():
    """Central differences are exact for a quadratic."""
    a = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])

    def f(x):
        return a @ x + x[0] ** 2

    flux, jac = finite_difference_jacobian(f, [1.0, 2.0], [0.1, 0.1])
    np.testing.assert_allclose(jac, a + np.array([[2.0, 0.0]] * 3), atol=1e-12)


def test_figures_draw_one_panel_per_label(tmp_path):
    """The bound-vs-S/N and pixel-share figures: one panel per label, the bounds drawn."""
    pytest.importorskip("matplotlib")
    from cannon_fast.lab.plots.information import bound_vs_snr_figure, pixel_share_figure

    snrs = [10, 30, 100]
    crb = bound_vs_snr(line, [0.4, 0.0], snrs, label_names=["A", "C"])
    fig = bound_vs_snr_figure(snrs, {"narrow": crb, "twice": 2 * crb}, ["A", "C"],
                              path=tmp_path / "crb.png")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    np.testing.assert_allclose(fig.axes[1].lines[1].get_ydata(), 2 * crb[:, 1])
    info = information_content(line, [0.4, 0.0], snr=50.0, label_names=["A", "C"])
    fig = pixel_share_figure(WAVE, info, path=tmp_path / "share.png", flux=line(info.labels))
    assert len(fig.axes) == 3
    assert (tmp_path / "crb.png").read_bytes()[:4] == b"\x89PNG"
