"""MCMC over one star's labels: likelihood, priors, convergence, warnings, the CLI."""
import json

import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast.core.fitting import FLAGS
from cannon_fast.lab.mcmc import (Prior, TrainingRangeWarning, log_likelihood_function, make_prior,
                                  parse_prior_args, sample_posterior)
from cannon_fast.testing import make_synthetic


@pytest.fixture(scope="module")
def tiny():
    """Build a 3-label model on 200 pixels and a few test spectra with the same truth."""
    tr = make_synthetic(n_stars=160, n_pix=200, n_labels=3, seed=11)
    model = CannonModel(tr.label_names).train(tr.flux, tr.ivar, tr.labels)
    te = make_synthetic(n_stars=4, n_pix=200, n_labels=3, seed=12, coeffs=tr.coeffs,
                        s2_true=tr.s2_true, snr=(150, 150))
    return model, tr, te


def test_quadratic_likelihood_matches_predict(tiny):
    model, _, te = tiny
    ivar = te.ivar[0].copy()
    ivar[5:9] = 0.0  # masked pixels are dropped by both paths
    flux = te.flux[0].copy()
    flux[5:9] = np.nan
    quad, n1 = log_likelihood_function(model, flux, ivar, method="quadratic")
    pred, n2 = log_likelihood_function(model, flux, ivar, method="predict")
    x = te.labels[:1] + np.array([[150.0, 0.2, -0.1], [0, 0, 0], [-300, 0.5, 0.2]])
    assert n1 == n2 == int(((ivar > 0) & (model.pixel_flags == 0)).sum())
    np.testing.assert_allclose(quad(x), pred(x), rtol=1e-9)
    # by hand: -chi²/2 with variance 1/ivar + s²
    good = (ivar > 0) & (model.pixel_flags == 0)
    r = flux[good] - model.predict(x[0])[good]
    want = -0.5 * np.sum(r * r / (1 / ivar[good] + model.s2[good]))
    np.testing.assert_allclose(quad(x[:1])[0], want, rtol=1e-10)


def test_flagged_model_pixels_are_dropped(tiny):
    model, _, te = tiny
    flags = model.pixel_flags.copy()
    try:
        model.pixel_flags[:20] = 1
        _, n = log_likelihood_function(model, te.flux[0], te.ivar[0])
    finally:
        model.pixel_flags[:] = flags
    assert n == int(((te.ivar[0] > 0) & (flags == 0)).sum()) - int(
        ((te.ivar[0][:20] > 0) & (flags[:20] == 0)).sum())


def test_default_prior_is_training_range(tiny):
    model, tr, _ = tiny
    pri = make_prior(model)
    np.testing.assert_allclose(pri.low, tr.labels.min(axis=0))
    np.testing.assert_allclose(pri.high, tr.labels.max(axis=0))
    assert all("Uniform" in s for s in pri.describe())
    inside = np.median(tr.labels, axis=0)
    outside = inside.copy()
    outside[0] = pri.high[0] + 1
    lp = pri.log_prob(np.stack([inside, outside]))
    assert lp[0] == 0 and lp[1] == -np.inf


def test_gaussian_prior_and_specs(tiny):
    model, _, _ = tiny
    pri = make_prior(model, {"FE_H": ("normal", 0.0, 0.1), "TEFF": ("uniform", 4000, 5000)})
    assert pri.kinds == ["uniform", "uniform", "gaussian"]
    assert pri.low[0] == 4000 and pri.high[0] == 5000
    x = np.array([[4500, 2.0, 0.0], [4500, 2.0, 0.2]])
    lp = pri.log_prob(x)
    np.testing.assert_allclose(lp[0] - lp[1], 0.5 * 2.0 ** 2)
    assert "Normal(0, 0.1)" in pri.describe()[2]
    assert pri.to_dict()["FE_H"]["kind"] == "gaussian"
    assert parse_prior_args(["TEFF=uniform:4000:5000"]) == {"TEFF": ("uniform", 4000.0, 5000.0)}
    with pytest.raises(ValueError, match="unknown label"):
        make_prior(model, {"MG_FE": ("uniform", 0, 1)})
    with pytest.raises(ValueError, match="sigma > 0"):
        make_prior(model, {"FE_H": ("gaussian", 0, 0)})
    with pytest.raises(ValueError, match="low < high"):
        make_prior(model, {"TEFF": ("uniform", 5000, 4000)})
    with pytest.raises(ValueError, match="unknown prior kind"):
        make_prior(model, {"TEFF": ("cauchy", 5000, 40)})
    with pytest.raises(ValueError, match="LABEL=uniform"):
        parse_prior_args(["TEFF:4000"])
    assert isinstance(make_prior(model, pri), Prior)


def test_prior_is_enforced(tiny):
    model, _, te = tiny
    truth = te.labels[0]
    box = {"TEFF": ("uniform", truth[0] - 20, truth[0] + 20)}  # much narrower than the data
    res = sample_posterior(model, te.flux[0], te.ivar[0], prior=box, n_steps=3000, seed=1,
                           warn=False)
    assert res.samples[:, 0].min() >= truth[0] - 20
    assert res.samples[:, 0].max() <= truth[0] + 20
    assert res.prior["TEFF"]["support"] == [truth[0] - 20, truth[0] + 20]
    assert "TEFF ~ Uniform" in res.summary(allow_unconverged=True)


def test_unconverged_chain_is_refused(tiny):
    model, _, te = tiny
    res = sample_posterior(model, te.flux[1], te.ivar[1], n_steps=100, min_steps=50,
                           check_every=50, seed=0, warn=False)
    assert not res.converged
    assert any("not converged" in w for w in res.warnings)
    with pytest.raises(RuntimeError, match="did not converge"):
        res.check()
    with pytest.raises(RuntimeError, match="did not converge"):
        res.summary()
    assert res.summary(allow_unconverged=True).startswith("*** NOT CONVERGED")
    with pytest.raises(RuntimeError, match="did not converge"):
        sample_posterior(model, te.flux[1], te.ivar[1], n_steps=100, min_steps=50,
                         check_every=50, require_converged=True, warn=False)


def test_outside_training_range_warns(tiny):
    model, tr, _ = tiny
    hot = make_synthetic(n_stars=1, n_pix=200, n_labels=3, seed=5, coeffs=tr.coeffs,
                         s2_true=tr.s2_true, snr=(200, 200))
    lab = np.array([[model.training_labels[:, 0].max() + 250, 2.0, 0.0]])
    x = hot.scale_labels(lab)
    from cannon_fast.testing import _quad_design
    flux = 1.0 - _quad_design(x) @ tr.coeffs.T
    ivar = np.full_like(flux, 200.0 ** 2)
    with pytest.warns(TrainingRangeWarning, match="TEFF .* outside the training range"):
        res = sample_posterior(model, flux[0], ivar[0], n_steps=2000, seed=2)
    assert any("outside the training range" in w for w in res.warnings)
    # the walkers still respect the (training-range) prior
    assert res.samples[:, 0].max() <= model.training_labels[:, 0].max()
    # ... and pile against it: that is no converged result, whatever tau says
    assert any("TEFF's posterior is piled against the prior's edge" in w for w in res.warnings)
    assert not res.converged
    with pytest.raises(RuntimeError, match="did not converge"):
        res.summary()


def test_thin_part_of_the_training_set_is_noted(tiny):
    """A star whose chi² fit is flagged SPARSE_TRAINING gets a note in the posterior's warnings."""
    model, tr, _ = tiny
    far = np.median(tr.labels, axis=0) + 1.0 * model.label_scales  # a thin corner, in range
    assert np.all((far > tr.labels.min(axis=0)) & (far < tr.labels.max(axis=0)))
    flux = model.predict(far)
    res = sample_posterior(model, flux, np.full_like(flux, 150.0 ** 2), n_steps=300, seed=3,
                           require_converged=False)
    assert res.fit_flags & FLAGS["SPARSE_TRAINING"]
    assert any("SPARSE_TRAINING" in w for w in res.warnings)


def test_bad_inputs(tiny):
    model, _, te = tiny
    with pytest.raises(ValueError, match="pixels but the model has"):
        sample_posterior(model, te.flux[0, :100], te.ivar[0, :100])
    with pytest.raises(ValueError, match="n_walkers must be >="):
        sample_posterior(model, te.flux[0], te.ivar[0], n_walkers=4)
    with pytest.raises(ValueError, match="even"):
        sample_posterior(model, te.flux[0], te.ivar[0], n_walkers=33)
    with pytest.raises(ValueError, match="one spectrum"):
        sample_posterior(model, te.flux[:2], te.ivar[:2])
    with pytest.raises(ValueError, match="too few"):
        sample_posterior(model, te.flux[0], np.zeros_like(te.ivar[0]))


def test_cli_mcmc(tiny, tmp_path, capsys):
    from cannon_fast.cli import main
    model, _, te = tiny
    mpath = tmp_path / "model.npz"
    model.write(mpath)
    spec = tmp_path / "star.npz"
    np.savez(spec, flux=te.flux[2], ivar=te.ivar[2])
    out = tmp_path / "post.json"
    rc = main(["mcmc", str(spec), "--model", str(mpath), "--output", str(out), "--corner",
               str(tmp_path / "corner.png"), "--cv-scatter", "TEFF=30,LOGG=0.1,FE_H=0.03"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "TEFF ~ Uniform" in text and "sig_post" in text and "cv_scatter" in text
    assert json.loads(out.read_text())["converged"] is True
    assert (tmp_path / "corner.png").stat().st_size > 10000
    before = out.read_bytes()
    rc = main(["mcmc", str(spec), "--model", str(mpath), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == f"cannon-fast mcmc: error: {out} exists; pass --force to overwrite it\n"
    assert out.read_bytes() == before
    rc = main(["mcmc", str(spec), "--model", str(mpath), "--corner", str(tmp_path / "corner.png")])
    assert rc == 1 and "corner.png exists" in capsys.readouterr().err
    rc = main(["mcmc", str(spec), "--model", str(mpath), "--output", str(out), "--force"])
    assert rc == 0 and json.loads(out.read_text())["converged"] is True
    capsys.readouterr()
    rc = main(["mcmc", str(spec), "--model", str(mpath), "--max-steps", "100"])
    captured = capsys.readouterr()
    assert rc == 3
    assert "did NOT converge" in captured.err and "sig_post" not in captured.out
    rc = main(["mcmc", str(tmp_path / "missing.npz"), "--model", str(mpath)])
    assert rc == 1 and "no such file" in capsys.readouterr().err
    rc = main(["mcmc", str(tmp_path), "--model", str(mpath)])
    assert rc == 1 and f"{tmp_path} is a folder" in capsys.readouterr().err


def test_cli_reports_an_os_error_in_one_line(monkeypatch, capsys):
    """An unreadable file (any OSError) is one line naming the path, not a traceback."""
    from cannon_fast import cli
    from cannon_fast.cli import science

    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/star.fits")

    monkeypatch.setattr(science, "_mcmc", denied)
    rc = cli.main(["mcmc", "/data/star.fits", "--model", "m.npz"])
    assert rc == 1
    assert capsys.readouterr().err.strip() == \
        "cannon-fast mcmc: error: [Errno 13] Permission denied: '/data/star.fits'"


def test_cli_cv_scatter_from_a_report(tmp_path):
    from cannon_fast.cli.science import _parse_cv
    stats = {"TEFF": dict(scatter=21.5), "FE_H": dict(scatter=0.018), "LOGG": dict(scatter=None)}
    summary = dict(primary_fit="plain", validation=dict(
        plain=dict(vs_catalog=stats), debias=dict(vs_catalog={"TEFF": dict(scatter=99.0)})))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    want = {"TEFF": 21.5, "FE_H": 0.018}  # the report's primary fit, missing scatter left out
    assert _parse_cv(str(tmp_path)) == want == _parse_cv(str(tmp_path / "summary.json"))
    assert _parse_cv("TEFF=30, FE_H=0.02") == {"TEFF": 30.0, "FE_H": 0.02}
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="other.json: not a lab report"):
        _parse_cv(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="use LABEL=VALUE"):
        _parse_cv("TEFF:30")
    (tmp_path / "empty").mkdir()
    for missing in ("nope.json", "empty"):  # no such file; a folder without summary.json
        with pytest.raises(ValueError, match=f"{missing}: not a lab report.*FileNotFound"):
            _parse_cv(str(tmp_path / missing))


def test_generic_forward_model(tiny):
    """Any forward model with predict_with_jacobian (e.g. the NN emulator) can be sampled."""
    model, _, te = tiny

    class Wrapped:
        label_names = model.label_names
        label_bounds = model.label_bounds
        training_labels = model.training_labels
        s2 = model.s2

        def predict_with_jacobian(self, labels):
            return model.predict_with_jacobian(labels)

    res = sample_posterior(Wrapped(), te.flux[3], te.ivar[3], n_steps=4000, seed=3, warn=False)
    ref = sample_posterior(model, te.flux[3], te.ivar[3], n_steps=4000, seed=3, warn=False)
    assert res.converged and ref.converged
    assert np.all(np.abs(res.median - ref.median) < 0.5 * ref.sigma)
    np.testing.assert_allclose(res.sigma, ref.sigma, rtol=0.25)


def test_cli_names_the_file_in_the_way_of_an_output_folder(tmp_path, capsys):
    """An output path under an existing file: one line naming that file."""
    from cannon_fast import cli
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    rc = cli.main(["demo", "--out", str(blocker / "report")])
    err = capsys.readouterr().err.strip()
    why = "is a file, not a folder, so nothing can be written under it; choose another output path"
    assert rc == 1 and err.endswith(f"{blocker} {why}"), err
    # os.makedirs on the file itself (atomic writes make their folder so)
    made = FileExistsError(17, "File exists", str(blocker))
    assert cli._explain(made) == f"{blocker} {why}"
    assert cli._explain(FileExistsError("out.fits exists (use --force)")) == \
        "out.fits exists (use --force)"


def test_cli_mcmc_says_why_a_chain_at_the_prior_edge_is_no_result(tiny, tmp_path, capsys):
    """A star whose labels lie well beyond the prior (as the real K dwarf's log g beyond the
    training range): no posterior, and a message that a longer chain will not help."""
    from cannon_fast.cli import main
    from cannon_fast.testing import _quad_design
    model, tr, _ = tiny
    model.write(tmp_path / "model.npz")
    hot = make_synthetic(n_stars=1, n_pix=200, n_labels=3, seed=5, coeffs=tr.coeffs,
                         s2_true=tr.s2_true)
    lab = np.array([[model.training_labels[:, 0].max() + 250, 2.0, 0.0]])
    flux = 1.0 - _quad_design(hot.scale_labels(lab)) @ tr.coeffs.T
    np.savez(tmp_path / "star.npz", flux=flux[0], ivar=np.full(200, 200.0 ** 2))
    rc = main(["mcmc", str(tmp_path / "star.npz"), "--model", str(tmp_path / "model.npz"),
               "--max-steps", "2000"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "TEFF's posterior is piled against the prior's edge" in err.splitlines()[0]
    assert "A longer chain will not help" in err and "Increase --max-steps" not in err
