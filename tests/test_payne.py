"""The Payne on model spectra: activations, grids, the training box, label designs (nn)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cannon_fast.core.grid import PixelGrid  # noqa: E402
from cannon_fast.core.information import CallableModel  # noqa: E402
from cannon_fast.nn import PayneEmulator  # noqa: E402
from cannon_fast.nn.ab_initio import (emulation_errors, label_design,  # noqa: E402
                                      train_on_model)
from cannon_fast.nn.emulator import _build_mlp  # noqa: E402

GRID = PixelGrid.log_uniform(5000.0, step=2e-5, n_pixels=120, resolution=5000.0, name="toy")
BOX = np.array([[4000.0, 6000.0], [-1.0, 0.5]])


def _toy_model():
    """Two labels, ten lines whose depths follow them smoothly: an 'ab initio grid'."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(GRID.wavelength[5], GRID.wavelength[-5], 10)
    prof = np.exp(-0.5 * ((GRID.wavelength[None] - centres[:, None]) / 0.6) ** 2)
    a, b = rng.uniform(0.2, 0.5, 10), rng.uniform(-0.3, 0.3, 10)

    def flux(labels):
        t = (labels[:, :1] - 5000.0) / 1000.0
        depth = a * np.exp(b * t + 0.5 * labels[:, 1:2])  # (N, 10)
        return 1.0 - depth @ prof

    return CallableModel(flux, ["TEFF", "FE_H"], BOX, batched=True, grid=GRID)


@pytest.mark.parametrize("activation", ["silu", "tanh"])
def test_smooth_activations_have_exact_jacobians_and_round_trip(activation, tmp_path):
    """SiLU / tanh networks: Jacobian = finite differences, file = torch, grid kept."""
    torch.manual_seed(0)
    net = _build_mlp(2, [16, 16], GRID.n_pixels, 0.01, dtype=torch.float64,
                     activation=activation)
    emu = PayneEmulator.from_torch(net, ["TEFF", "FE_H"], BOX[:, 0], BOX[:, 1], grid=GRID)
    assert emu.activation == activation
    labels = np.array([[4500.0, -0.3], [5800.0, 0.2]])
    flux, jac = emu.predict_with_jacobian(labels)
    h = np.array([1e-3, 1e-6])
    fd = np.stack([(emu.predict(labels + h[j] * np.eye(2)[j])
                    - emu.predict(labels - h[j] * np.eye(2)[j])) / (2 * h[j]) for j in range(2)],
                  axis=-1)
    np.testing.assert_allclose(jac, fd, rtol=1e-5, atol=1e-9 * np.abs(jac).max())
    emu.write(tmp_path / "e.npz")
    back = PayneEmulator.read(tmp_path / "e.npz", grid=GRID)
    assert back.grid == GRID and back.activation == activation
    x = (labels - BOX[:, 0]) / (BOX[:, 1] - BOX[:, 0]) - 0.5
    with torch.no_grad():
        np.testing.assert_allclose(back.predict(labels), net(torch.as_tensor(x)).numpy(),
                                   rtol=1e-12, atol=1e-13)


def test_an_emulator_refuses_another_grid_naming_both(tmp_path):
    """An emulator file of one grid is refused for spectra of another, both named."""
    torch.manual_seed(0)
    net = _build_mlp(2, [8], GRID.n_pixels, 0.01, dtype=torch.float64)
    PayneEmulator.from_torch(net, ["TEFF", "FE_H"], BOX[:, 0], BOX[:, 1],
                             grid=GRID).write(tmp_path / "e.npz")
    other = PixelGrid.log_uniform(5000.0, step=2.1e-5, n_pixels=120, resolution=5000.0,
                                  name="other")
    with pytest.raises(ValueError, match=r"trained on the grid <PixelGrid 'toy'.*are on "
                                         r"<PixelGrid 'other'"):
        PayneEmulator.read(tmp_path / "e.npz", grid=other)
    with pytest.raises(ValueError, match="has 120 pixels, the emulator 50"):
        PayneEmulator.from_torch(_build_mlp(2, [8], 50, 0.01, dtype=torch.float64),
                                 ["TEFF", "FE_H"], BOX[:, 0], BOX[:, 1], grid=GRID)


def test_label_design_fills_the_box_evenly():
    """Sobol and LHS stay in the box, respect accept, and are more even than random draws."""
    from scipy.stats import qmc

    sob = label_design(BOX, 256, "sobol", seed=1)
    assert sob.shape == (256, 2)
    assert np.all((sob >= BOX[:, 0]) & (sob <= BOX[:, 1]))
    unit = lambda lab: (lab - BOX[:, 0]) / (BOX[:, 1] - BOX[:, 0])  # noqa: E731
    d_sob = qmc.discrepancy(unit(sob))
    d_rnd = qmc.discrepancy(unit(label_design(BOX, 256, "random", seed=1)))
    assert d_sob < 0.1 * d_rnd
    # a Latin hypercube has one point in each of the n strata of every label
    strata = np.floor(unit(label_design(BOX, 256, "lhs", seed=1)) * 256).astype(int)
    assert all(np.array_equal(np.sort(strata[:, j]), np.arange(256)) for j in range(2))
    hot_poor = label_design(BOX, 100, accept=lambda lab: lab[:, 0] > 5000)
    assert len(hot_poor) == 100 and hot_poor[:, 0].min() > 5000
    with pytest.raises(ValueError, match="method must be"):
        label_design(BOX, 10, "grid")


@pytest.fixture(scope="module")
def toy_payne():
    """The toy model and a Payne trained on 400 of its spectra."""
    model = _toy_model()
    return model, train_on_model(model, 400, hidden=(32, 32), epochs=150, learning_rate=3e-3,
                                 patience=40, batch_size=64, progress=False)


def test_payne_on_model_spectra_emulates_and_flags_its_box(toy_payne):
    """Trained on a model's spectra: small emulation error; fits stay in the box and say so."""
    from cannon_fast import fit_spectra

    model, emu = toy_payne
    np.testing.assert_allclose(emu.label_bounds, BOX)
    assert emu.grid == GRID
    held = label_design([[4100.0, 5900.0], [-0.9, 0.4]], 100, seed=9)
    err = emulation_errors(emu, model, held)
    assert err["median"] < 2e-3, err   # lines 0.2-0.9 deep
    # a star inside and one hotter than the box: the second is stopped at the edge, flagged
    truth = np.array([[5000.0, -0.2], [6600.0, -0.2]])
    flux = model.predict(truth)
    res = fit_spectra(emu, flux, np.full_like(flux, 1e4))
    assert res.labels[1, 0] <= 6000.0 + 1e-6
    outside = res.FLAGS["OUTSIDE_TRAINING"]
    assert not res.flags[0] & outside and res.flags[1] & outside
    assert abs(res.labels[0, 0] - 5000.0) < 20.0
    with pytest.raises(ValueError, match="outside the emulator's training box, e.g. "
                                         "TEFF=6600, FE_H=-0.2"):
        emu.predict(truth, strict=True)


def test_fast_fit_equals_the_generic_fit(toy_payne):
    """The low-rank quadratic-form fit finds the generic fit's labels, errors and chi²."""
    from cannon_fast import fit_spectra
    from cannon_fast.nn.fast_fit import fit_emulator, output_basis

    model, emu = toy_payne
    *_, k, err = output_basis(emu, rtol=1e-6)
    assert k <= 32 and err <= 1e-6
    rng = np.random.default_rng(4)
    truth = label_design([[4200.0, 5800.0], [-0.9, 0.4]], 40, seed=3)
    flux = model.predict(truth) + rng.standard_normal((40, GRID.n_pixels)) / 200.0
    ivar = np.full_like(flux, 4e4)
    ivar[3, :60] = 0.0   # a star with half its pixels masked
    fast = fit_emulator(emu, flux, ivar, rtol=1e-6)
    ref = fit_spectra(emu, flux, ivar)
    assert np.all(np.abs(fast.labels - ref.labels) < 0.05 * np.median(ref.errors, axis=0))
    np.testing.assert_allclose(fast.errors, ref.errors, rtol=1e-3)
    np.testing.assert_allclose(fast.chi2, ref.chi2, rtol=1e-4, atol=1e-6)
    assert fast.n_pixels[3] == GRID.n_pixels - 60


# ------------------------------------------------------------------- model spectra -> Payne
HIRES = np.arange(4985.0, 5030.0, 0.02)   # a synthetic code's wavelengths, around GRID


def _hires_spectra(labels):
    """Ten narrow lines (0.1 A) whose depths follow the labels, at high resolution."""
    rng = np.random.default_rng(4)
    centres = rng.uniform(GRID.wavelength[5], GRID.wavelength[-5], 10)
    prof = np.exp(-0.5 * ((HIRES[None] - centres[:, None]) / 0.1) ** 2)
    a, b = rng.uniform(0.3, 0.6, 10), rng.uniform(-0.3, 0.3, 10)
    t = (labels[:, :1] - 5000.0) / 1000.0
    return 1.0 - (a * np.exp(b * t + 0.5 * labels[:, 1:2])) @ prof


def test_degrade_spectra_broadens_a_line_by_the_lsf_and_keeps_its_strength():
    """A Gaussian line of sigma s0 comes out with sigma sqrt(s0^2 + s_lsf^2), same area."""
    from cannon_fast.nn.ab_initio import degrade_spectra
    s0, centre = 0.1, 5006.0
    flux = 1.0 - 0.5 * np.exp(-0.5 * ((HIRES - centre) / s0) ** 2)
    out = degrade_spectra(HIRES, flux[None], GRID)[0]
    s_lsf = centre / 5000.0 / (2 * np.sqrt(2 * np.log(2)))
    depth = 1.0 - out
    step = np.gradient(GRID.wavelength)
    area = np.sum(depth * step)
    width = np.sqrt(np.sum(depth * step * (GRID.wavelength - centre) ** 2) / area)
    np.testing.assert_allclose(area, 0.5 * s0 * np.sqrt(2 * np.pi), rtol=0.01)
    np.testing.assert_allclose(width, np.hypot(s0, s_lsf), rtol=0.02)
    with pytest.raises(ValueError, match="needs input from"):
        degrade_spectra(HIRES[HIRES > 5003.0], flux[None, HIRES > 5003.0], GRID)


def test_payne_train_cli_from_model_spectra(tmp_path, capsys):
    """payne-train: model spectra -> LSF + grid -> The Payne, with a held-out error."""
    from cannon_fast.cli import main
    from cannon_fast.nn.ab_initio import degrade_spectra
    labels = label_design(BOX, 440, seed=3)
    np.savez(tmp_path / "models.npz", wavelength=HIRES, flux=_hires_spectra(labels),
             labels=labels, label_names=np.array(["TEFF", "FE_H"]))
    np.savez(tmp_path / "grid.npz", wavelength=GRID.wavelength,
             flux=np.ones((1, GRID.n_pixels)), ivar=np.ones((1, GRID.n_pixels)))
    out = tmp_path / "payne.npz"
    base = ["payne-train", str(tmp_path / "models.npz"), "--grid", str(tmp_path / "grid.npz"),
            "--resolution", "5000", "--out", str(out), "-q"]
    assert main(base + ["--hidden", "32", "32", "--epochs", "150", "--lr", "3e-3"]) == 0
    text = capsys.readouterr().out
    assert "44 spectra" in text and "396 model spectra" in text
    median = float(text.split("median ")[1].split(",")[0])
    emu = PayneEmulator.read(out)
    held = label_design([[4100.0, 5900.0], [-0.9, 0.4]], 50, seed=11)
    truth = degrade_spectra(HIRES, _hires_spectra(held), emu.grid, resolution=5000.0)
    err = np.abs(emu.predict(held) - truth)
    assert np.median(err) < 3e-3 and median < 3e-3  # lines 0.3-0.9 deep before the LSF
    assert main(base) == 1   # exists, no --force
    assert "exists" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", wavelength=HIRES, flux=_hires_spectra(labels[:3]))
    assert main(["payne-train", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "x.npz")]) == 1
    assert "missing labels, label_names" in capsys.readouterr().err
    np.savez(tmp_path / "short.npz", wavelength=HIRES[:-5], flux=_hires_spectra(labels[:3]),
             labels=labels[:3], label_names=np.array(["TEFF", "FE_H"]))
    assert main(["payne-train", str(tmp_path / "short.npz"), "--out", str(tmp_path / "x.npz")]) == 1
    assert "do not agree" in capsys.readouterr().err
    assert main(["payne-train", str(tmp_path / "models.npz"), "--grid", "nope",
                 "--out", str(tmp_path / "x.npz")]) == 1
    assert "--grid nope: not apstar, aspcap or an existing file" in capsys.readouterr().err
    # the default APOGEE grid is far outside these 5,000 A spectra: the file is named
    assert main(["payne-train", str(tmp_path / "models.npz"), "--out", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert "models.npz" in err and "the input covers 4985.00-5029.98 A" in err
    assert not (tmp_path / "x.npz").exists()
