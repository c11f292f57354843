"""The Data-Driven Payne: gradient prior, zero gradients off a label's lines, files (nn)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cannon_fast import fit_spectra  # noqa: E402
from cannon_fast.core.grid import PixelGrid  # noqa: E402
from cannon_fast.core.information import CallableModel  # noqa: E402
from cannon_fast.nn import PayneEmulator  # noqa: E402
from cannon_fast.nn.dd_payne import (DataDrivenPayne, GradientTemplate,  # noqa: E402
                                     train_dd_payne)

GRID = PixelGrid.log_uniform(5000.0, step=3e-5, n_pixels=100, resolution=5000.0, name="toy")
BOX = np.array([[4000.0, 6000.0], [-1.0, 0.5]])
NAMES = ["TEFF", "FE_H"]
W_A, W_B = slice(0, 50), slice(50, 100)  # TEFF's lines, FE_H's lines


def _model():
    """TEFF has lines only in the first half of the pixels, FE_H only in the second."""
    rng = np.random.default_rng(1)
    pix = np.arange(GRID.n_pixels)
    centres = np.r_[rng.uniform(3, 47, 5), rng.uniform(53, 97, 5)]
    prof = np.exp(-0.5 * ((pix[None] - centres[:, None]) / 1.5) ** 2)  # (10, P)

    def flux(labels):
        t = (labels[:, :1] - 5000.0) / 1000.0
        z = labels[:, 1:2]
        depth = np.hstack([np.repeat(0.3 + 0.15 * t + 0.05 * t ** 2, 5, axis=1),
                           np.repeat(0.25 * np.exp(0.8 * z), 5, axis=1)])
        return 1.0 - depth @ prof

    return CallableModel(flux, NAMES, BOX, batched=True, grid=GRID)


def _training_set(model, n=500, snr=100.0, seed=0):
    """Stars whose FE_H follows TEFF closely: a correlation the spectra do not have."""
    rng = np.random.default_rng(seed)
    teff = rng.uniform(4200.0, 5800.0, n)
    feh = -0.25 + 0.6 * (teff - 5000.0) / 1000.0 + rng.normal(0, 0.03, n)
    labels = np.column_stack([teff, feh])
    flux = model.predict(labels) + rng.normal(0, 1 / snr, (n, GRID.n_pixels))
    return flux, np.full_like(flux, snr ** 2), labels


@pytest.fixture(scope="module")
def trained():
    """The toy model, its template, and networks trained with and without the prior."""
    torch.set_num_threads(1)
    model = _model()
    ref = np.column_stack([np.linspace(4100, 5900, 7).repeat(7),
                           np.tile(np.linspace(-0.9, 0.4, 7), 7)])
    template = GradientTemplate.from_model(model, ref)
    flux, ivar, labels = _training_set(model)
    kw = dict(hidden=(32, 32), epochs=60, batch_size=64, learning_rate=1e-2, seed=0,
              progress=False, grid=GRID)
    with_prior = train_dd_payne(flux, ivar, labels, NAMES, template, strength=10.0, **kw)
    without = train_dd_payne(flux, ivar, labels, NAMES, None, **kw)
    return model, template, with_prior, without


def test_the_prior_pulls_the_gradient_spectra_toward_the_template(trained):
    """Both fit the data; only the prior's network has the model's gradient spectra."""
    model, template, with_prior, without = trained
    m_prior = with_prior.gradient_mismatch(template)
    m_plain = without.gradient_mismatch(template)
    assert np.all(m_prior < 0.15), m_prior
    assert m_plain[1] > 3 * m_prior[1], (m_plain, m_prior)  # FE_H's: confounded with TEFF
    # both reproduce the training stars' spectra to the noise (chi^2 per pixel ~ 1)
    for net in (with_prior, without):
        assert net.history["val_chi2"][net.history["best_epoch"]] < 1.3


def test_a_label_without_lines_in_a_window_gets_no_gradient_there(trained):
    """FE_H has no line among TEFF's pixels: the prior keeps its gradient there ~0."""
    _, _, with_prior, without = trained
    stars = np.array([[4500.0, 0.2], [5000.0, -0.5], [5500.0, -0.8]])  # off the correlation
    for net, limit in ((with_prior, 0.1), (without, None)):
        jac = net.gradient_spectra(stars)
        own = np.abs(jac[:, W_A, 0]).mean() * 1000.0  # per 1000 K
        leak = np.abs(jac[:, W_A, 1]).mean() * 1.0  # per dex, where FE_H has no line
        if limit is not None:
            assert leak < limit * own, (leak, own)
            prior_leak = leak
    assert leak > 2 * prior_leak  # the network without the prior reads TEFF's lines as FE_H


def test_fits_off_the_training_correlation(trained):
    """Stars off the correlation: the prior's network recovers both labels, the plain one not."""
    model, _, with_prior, without = trained
    rng = np.random.default_rng(5)
    truth = np.column_stack([rng.uniform(4400, 5600, 40), rng.uniform(-0.8, 0.3, 40)])
    flux = model.predict(truth) + rng.normal(0, 0.01, (40, GRID.n_pixels))
    ivar = np.full_like(flux, 1e4)
    err = {}
    for name, net in (("prior", with_prior), ("plain", without)):
        res = fit_spectra(net, flux, ivar)
        err[name] = np.sqrt(np.mean((res.labels - truth) ** 2, axis=0))
    assert err["prior"][1] < 0.05, err
    assert err["plain"][1] > 1.5 * err["prior"][1], err


def test_templates_from_a_callable_and_masked(trained):
    """A plain function gives the same gradients; masking zeroes the line-free pixels only."""
    model, template, _, _ = trained
    lab = template.labels[:3]
    plain = GradientTemplate.from_model(lambda x: model.predict(x), lab, label_names=NAMES)
    np.testing.assert_allclose(plain.gradients, template.gradients[:3], rtol=1e-3,
                               atol=1e-4 * np.abs(template.gradients).max())
    masked = template.masked(0.01)
    g, m = template.gradients, masked.gradients
    assert np.all((m == 0) | (m == g))
    assert np.all(m[:, W_A, 1] == 0)  # FE_H has no line among TEFF's pixels
    assert np.count_nonzero(m[:, W_B, 1]) > 0.2 * m[:, W_B, 1].size
    with pytest.raises(ValueError, match="label_names"):
        GradientTemplate.from_model(lambda x: model.predict(x), lab)


def test_files_round_trip_and_refuse_another_grid(trained, tmp_path):
    """Network and template files: same predictions and record; another grid refused."""
    _, template, with_prior, _ = trained
    with_prior.write(tmp_path / "dd.npz")
    back = DataDrivenPayne.read(tmp_path / "dd.npz", grid=GRID)
    lab = np.array([[4700.0, -0.2]])
    np.testing.assert_array_equal(back.predict(lab), with_prior.predict(lab))
    assert back.prior == with_prior.prior and back.prior["strength"] == 10.0
    assert isinstance(PayneEmulator.read(tmp_path / "dd.npz"), PayneEmulator)
    template.write(tmp_path / "t.npz")
    t2 = GradientTemplate.read(tmp_path / "t.npz", grid=GRID)
    np.testing.assert_array_equal(t2.gradients, template.gradients)
    other = PixelGrid.log_uniform(5100.0, step=3e-5, n_pixels=100, resolution=5000.0, name="B")
    for read in (lambda: DataDrivenPayne.read(tmp_path / "dd.npz", grid=other),
                 lambda: GradientTemplate.read(tmp_path / "t.npz", grid=other)):
        with pytest.raises(ValueError, match="'B'"):
            read()
    # a plain Payne file is not a Data-Driven Payne
    PayneEmulator.write(with_prior, tmp_path / "plain.npz")  # the subclass record goes too
    np.savez(tmp_path / "junk.npz", format=np.array("x"))
    with pytest.raises(ValueError, match="not a GradientTemplate"):
        GradientTemplate.read(tmp_path / "junk.npz")
    # a template of other labels / another pixel count is refused before training
    flux, ivar, labels = _training_set(_model(), n=20)
    with pytest.raises(ValueError, match="no LOGG"):
        train_dd_payne(flux, ivar, labels, ["TEFF", "LOGG"], template, epochs=1)


def test_command_line_chain(trained, tmp_path, capsys):
    """information, gradient-template, dd-payne-train and fit --model on emulator files."""
    from astropy.table import Table

    from cannon_fast.cli import main
    from cannon_fast.core.information import information_content

    model, _, with_prior, _ = trained
    net = tmp_path / "dd.npz"
    with_prior.write(net)
    assert main(["information", "--model", str(net), "--star", "5000", "-0.2",
                 "--snr", "50", "--ideal", "--out", str(tmp_path / "share.png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    row = [float(v) for v in printed[-2].split()]  # "S/N TEFF FE_H", the figure line last
    crb = information_content(with_prior, [5000.0, -0.2], snr=50.0, s2=0.0).crb
    np.testing.assert_allclose(row[1:], crb, rtol=1e-3)
    assert (tmp_path / "share.png").stat().st_size > 0
    # the trained network as a template, then a network trained under it from the CLI
    assert main(["gradient-template", "--model", str(net), "--n", "64",
                 "--out", str(tmp_path / "t.npz")]) == 0
    flux, ivar, labels = _training_set(model, n=200)
    np.savez(tmp_path / "train.npz", flux=flux, ivar=ivar, labels=labels,
             label_names=np.array(NAMES))
    args = ["dd-payne-train", str(tmp_path / "train.npz"), "--template", str(tmp_path / "t.npz"),
            "--out", str(tmp_path / "new.npz"), "--epochs", "3", "--hidden", "16", "-q"]
    assert main(args) == 0
    assert DataDrivenPayne.read(tmp_path / "new.npz").prior["n_points"] == 64
    assert main(args) == 1 and "--force" in capsys.readouterr().err
    # fit --model with the emulator file: labels back from noise-free spectra
    truth = np.array([[4600.0, -0.3], [5300.0, 0.1]])
    np.savez(tmp_path / "obs.npz", flux=model.predict(truth), ivar=np.full((2, 100), 1e4))
    assert main(["fit", "--model", str(net), str(tmp_path / "obs.npz"),
                 "--out", str(tmp_path / "fit.fits")]) == 0
    tab = Table.read(tmp_path / "fit.fits")
    np.testing.assert_allclose(tab["TEFF"], truth[:, 0], atol=60)
    np.testing.assert_allclose(tab["FE_H"], truth[:, 1], atol=0.05)
    assert main(["fit", "--model", str(net), str(tmp_path / "obs.npz"), "--broadening",
                 "--out", str(tmp_path / "fit2.fits")]) == 1
    assert "apply to Cannon models" in capsys.readouterr().err
