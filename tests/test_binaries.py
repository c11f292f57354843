"""Unresolved binaries: Doppler shift, composite model, single-vs-binary flags, bias study."""
import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast.lab.binaries import (binary_bias_study, composite_spectrum, doppler_shift,
                                  fit_binaries, pixel_grid, planck_ratio,
                                  secondary_for_light_ratio, velocity_to_pixels)
from cannon_fast.testing import make_synthetic


@pytest.fixture(scope="module")
def model():
    tr = make_synthetic(n_stars=250, n_pix=600, n_labels=3, seed=31)
    return CannonModel(tr.label_names).train(tr.flux, tr.ivar, tr.labels)


def test_doppler_shift_is_a_pixel_shift():
    assert velocity_to_pixels(299792.458 * np.log(10) * 6e-6) == pytest.approx(1.0)
    assert velocity_to_pixels(30.0) == pytest.approx(7.24, abs=0.01)
    f = np.ones(50)
    f[20] = 0.5
    v1 = 299792.458 * np.log(10) * 6e-6  # one pixel
    out = doppler_shift(f, 3 * v1)
    assert np.argmin(out) == 23 and out[23] == pytest.approx(0.5)
    assert out[:3].tolist() == [1.0, 1.0, 1.0]  # continuum shifted in
    np.testing.assert_allclose(doppler_shift(np.stack([f, f]), [0.0, -2 * v1])[1].argmin(), 18)
    pos, wave = pixel_grid(7514)
    assert pos[0] == 246 and wave[0] == pytest.approx(10 ** (4.179 + 6e-6 * 246))


def test_composite_and_planck():
    f1, f2 = np.full(10, 0.8), np.full(10, 0.5)
    np.testing.assert_allclose(composite_spectrum(f1, f2, 0.5), (0.8 + 0.25) / 1.5)
    assert planck_ratio(5000.0, 5000.0, 16000.0) == pytest.approx(1.0)
    assert planck_ratio(5500.0, 4500.0, 16000.0) > 1.0


def test_binary_flagged_single_not(model):
    rng = np.random.default_rng(1)
    l1 = np.array([4600.0, 2.2, -0.2])
    l2 = np.array([4900.0, 2.9, -0.2])
    f = model.predict(np.stack([l1, l2]))
    sigma = 0.01
    binary = composite_spectrum(f[0], f[1], 0.5, 30.0)
    flux = np.stack([binary, f[0]]) + sigma * rng.standard_normal((2, f.shape[1]))
    ivar = np.full_like(flux, sigma ** -2)
    res = fit_binaries(model, flux, ivar)
    assert res.is_binary.tolist() == [True, False]
    assert res.delta_chi2[0] > 500 and res.delta_bic[0] > 100
    assert res.delta_chi2[1] < 30
    assert res.fimp[0] > 0.2 and res.fimp[1] < 0.1
    assert res.light_ratio[0] == pytest.approx(0.5, abs=0.15)
    assert res.velocity[0] == pytest.approx(30.0, abs=4.0)
    assert res.primary_labels[0, 0] == pytest.approx(l1[0], abs=200)
    t = res.to_table(ids=["bin", "single"])
    assert {"DELTA_BIC", "FIMP", "IS_BINARY", "TEFF_2", "LOGG_2"} <= set(t.colnames)
    assert res.n_params_binary == 3 + 2 + 1 + 1


def test_physical_light_ratio_and_bad_inputs(model):
    f = model.predict(np.array([4600.0, 2.2, -0.2]))
    res = fit_binaries(model, f, np.full_like(f, 1e4), light_ratio="physical", dv_max=20)
    assert res.n_params_binary == 3 + 2 + 1 and not res.is_binary[0]
    with pytest.raises(ValueError, match="unknown labels"):
        fit_binaries(model, f, np.ones_like(f), free_secondary=("MG_FE",))
    with pytest.raises(ValueError, match="light_ratio must be"):
        fit_binaries(model, f, np.ones_like(f), light_ratio="guess")
    with pytest.raises(ValueError, match="pixels but the model has"):
        fit_binaries(model, f[:10], np.ones(10))


def test_bias_study_and_figure(model, tmp_path):
    st = binary_bias_study(model, light_ratios=(0.0, 0.3, 0.8), n_stars=6, seed=2)
    assert st.bias.shape == (3, 3) and st.n_used[0] == 6
    assert np.all(np.isnan(st.detected))
    # a brighter companion pulls the single-star labels further from the primary
    assert abs(st.bias[2, 1]) > abs(st.bias[0, 1])
    assert len(st.to_table()) == 3
    from cannon_fast.lab.plots.science import binary_bias_figure
    binary_bias_figure(st, tmp_path / "bias.png")
    assert (tmp_path / "bias.png").stat().st_size > 5000


def test_secondary_has_the_light_ratio_asked_for(model):
    from cannon_fast.lab.isochrones import giant_branch
    gb = giant_branch({"TEFF": model.training_labels[:, 0], "LOGG": model.training_labels[:, 1],
                       "FE_H": model.training_labels[:, 2]}, feh_window=5)
    prim = np.array([4600.0, 2.0, 0.0])
    sec = secondary_for_light_ratio(prim, 1.0, gb, model.label_names)
    np.testing.assert_allclose(sec[:2], [4600.0, 2.0], atol=1e-6)
    sec = secondary_for_light_ratio(prim, 0.3, gb, model.label_names)
    assert sec[1] > 2.0 and sec[2] == 0.0
    # round trip: equal masses (R² ∝ 1/g) and black bodies at 16,000 Å give back 0.3 ...
    ratio = 10.0 ** (prim[1] - sec[1]) * planck_ratio(sec[0], prim[0], 16000.0)
    assert ratio == pytest.approx(0.3, rel=1e-3)
    # ... with the companion as far from the branch in Teff as the primary
    assert sec[0] - gb.teff(sec[1], feh=0.0) == pytest.approx(prim[0] - gb.teff(2.0, feh=0.0))
    assert secondary_for_light_ratio(prim, 0.3, gb, model.label_names, max_logg=sec[1] - 0.1) \
        is None
    assert secondary_for_light_ratio(prim, 1.5, gb, model.label_names) is None  # brighter


def test_analytic_jacobian(model):
    from scipy.optimize._numdiff import approx_derivative

    from cannon_fast.lab.binaries import _BinaryProblem
    f = model.predict(np.array([4600.0, 2.2, -0.2]))
    pos, wave = pixel_grid(model.n_pixels)
    prob = _BinaryProblem(model, f, np.full_like(f, 1e4), ["TEFF", "LOGG"], "free", pos, wave)
    p = np.array([0.1, -0.2, 0.3, 0.2, 0.1, 0.4, 23.3])
    num = approx_derivative(prob.resid, p, method="3-point")
    np.testing.assert_allclose(prob.jac(p), num, atol=1e-6 * np.abs(num).max())


def test_cli_binaries(model, tmp_path, capsys):
    from cannon_fast.cli import main
    mpath = tmp_path / "m.npz"
    model.write(mpath)
    f = model.predict(np.array([[4600.0, 2.2, -0.2], [4900.0, 2.9, -0.2]]))
    comp = composite_spectrum(f[0], f[1], 0.5, 30.0)
    spec = tmp_path / "s.npz"
    np.savez(spec, flux=np.stack([comp, f[0]]), ivar=np.full((2, f.shape[1]), 1e4),
             ids=np.array(["bin", "single"]))
    rc = main(["binaries", str(spec), "--model", str(mpath), "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert rc == 0 and "1 of 2 flagged" in out
    assert (tmp_path / "b" / "binary_fits.fits").exists()
    rc = main(["binaries", "--model", str(mpath)])
    assert rc == 1 and "give spectra" in capsys.readouterr().err
