"""Tests of cannon_fast.nn: tiny networks, few epochs, small seeded synthetic data."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from cannon_fast.nn import (NNResult, PayneEmulator, SpectrumRegressor, calibration_fraction,
                            comparison_table, label_metrics, train_emulator)
from cannon_fast.nn.evaluate import plot_loss, plot_predictions
from cannon_fast.nn.regressor import STARNET_TRAINING, format_layer_summary, masked_gaussian_nll
from cannon_fast.store import SpectraStore
from cannon_fast.testing import make_synthetic

MLP = dict(arch="mlp", hidden=(64, 32), dropout=0.1)
CNN = dict(arch="cnn", filters=(4, 8), kernel_size=5, stride=1, pool_size=(2, 2),
           hidden=(32, 16), dropout=0.1)
FIT = dict(epochs=60, batch_size=16, learning_rate=2e-3, patience=15, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny networks: thread synchronisation would cost more than it saves, and on a
    # shared, loaded machine spinning OpenMP threads slow every step down 20x
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_stars=400, n_pix=120, n_labels=3, seed=3)


@pytest.fixture(scope="module")
def mlp(data):
    return SpectrumRegressor(data.label_names, seed=0, **MLP).train(
        data.flux, data.labels, data.ivar, **FIT)


def _rmse(pred, true):
    return np.sqrt(np.nanmean((pred - true) ** 2, axis=0))


# ---------------------------------------------------------------------- import hygiene
def test_import_cannon_fast_does_not_import_torch():
    code = "import sys, cannon_fast, cannon_fast.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_missing_torch_gives_install_hint():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import cannon_fast.nn\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "pip install cannon_fast[nn]" in out.stdout


# ---------------------------------------------------------------------- training
def test_mlp_loss_falls_and_labels_move_toward_truth(data, mlp):
    h = mlp.history
    assert h["train_loss"][-1] < h["train_loss"][0] - 0.5
    # a constant prediction with unit variance scores 0.5 (standardized labels)
    assert min(h["val_loss"]) < min(0.0, h["val_loss"][0] - 0.3)
    assert len(h["train_loss"]) == len(h["val_loss"]) == h["n_epochs"]
    te = mlp.split["test"]
    res = mlp.predict(data.flux[te], data.ivar[te])
    # far better than predicting the mean label
    assert np.all(_rmse(res.labels, data.labels[te]) < 0.6 * data.labels[te].std(axis=0))


def test_default_split_is_5_1_2_and_seeded(data, mlp):
    sizes = [len(mlp.split[k]) for k in ("train", "val", "test")]
    assert sizes == [250, 50, 100]
    all_idx = np.concatenate([mlp.split[k] for k in ("train", "val", "test")])
    assert_array_equal(np.sort(all_idx), np.arange(len(data.flux)))


def test_starnet_default_matches_fabbro_et_al_parameter_count():
    """The default CNN is StarNet: 8,406,327 weights at 8192 pixels, plus the variance outputs."""
    reg = SpectrumRegressor(["TEFF", "LOGG", "FE_H"])
    rows = reg.layer_summary(8192)
    shapes = [(r["layer"], r["output_shape"]) for r in rows if r["layer"] != "ReLU"]
    assert shapes == [("Conv1d", (4, 8185)), ("Conv1d", (16, 8178)), ("MaxPool1d", (16, 2044)),
                      ("Flatten", (32704,)), ("Linear", (256,)), ("Dropout", (256,)),
                      ("Linear", (128,)), ("Dropout", (128,)), ("Linear", (6,))]
    total = sum(r["n_parameters"] for r in rows)
    # StarNet's last layer has 3 outputs (128 * 3 + 3 weights); ours adds 3 log-variances
    assert total - (128 * 3 + 3) == 8_406_327
    assert format_layer_summary(rows).splitlines()[-1].split()[-1] == f"{total:,d}"
    assert STARNET_TRAINING == dict(epochs=20, batch_size=64, learning_rate=1e-3, patience=5,
                                    min_delta=1e-3)
    small = SpectrumRegressor(["A"], **CNN).layer_summary(120)
    assert small[-1]["output_shape"] == (2,)


def test_cnn_trains_on_any_pixel_count(data):
    d = make_synthetic(n_stars=300, n_pix=97, n_labels=2, seed=5)
    reg = SpectrumRegressor(d.label_names, seed=1, **CNN).train(
        d.flux, d.labels, d.ivar, **FIT)
    assert reg.n_pixels == 97
    assert reg.history["val_loss"][-1] < reg.history["val_loss"][0]
    te = reg.split["test"]
    res = reg.predict(d.flux[te], d.ivar[te])
    assert np.all(_rmse(res.labels, d.labels[te]) < 0.7 * d.labels[te].std(axis=0))


def test_training_is_deterministic_with_a_seed(data):
    kw = dict(FIT, epochs=3)
    a = SpectrumRegressor(data.label_names, seed=7, **CNN).train(data.flux, data.labels,
                                                                 data.ivar, **kw)
    b = SpectrumRegressor(data.label_names, seed=7, **CNN).train(data.flux, data.labels,
                                                                 data.ivar, **kw)
    c = SpectrumRegressor(data.label_names, seed=8, **CNN).train(data.flux, data.labels,
                                                                 data.ivar, **kw)
    assert a.history["train_loss"] == b.history["train_loss"]
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k])
    assert a.history["train_loss"] != c.history["train_loss"]
    # noise augmentation is seeded too
    kw.update(augment_noise=1.0)
    d = SpectrumRegressor(data.label_names, seed=7, **CNN).train(data.flux, data.labels,
                                                                 data.ivar, **kw)
    e = SpectrumRegressor(data.label_names, seed=7, **CNN).train(data.flux, data.labels,
                                                                 data.ivar, **kw)
    assert d.history["train_loss"] == e.history["train_loss"] != a.history["train_loss"]
    ra = a.predict(data.flux[:20], data.ivar[:20], n_samples=10)
    rb = b.predict(data.flux[:20], data.ivar[:20], n_samples=10)
    assert_array_equal(ra.labels, rb.labels)
    assert_array_equal(ra.errors, rb.errors)


def test_training_does_not_change_global_torch_state(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SpectrumRegressor(data.label_names, seed=0, **MLP).train(
        data.flux, data.labels, data.ivar, **dict(FIT, epochs=1))
    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------------- missing labels
def test_masked_loss_ignores_missing_labels():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(6, 3, generator=g, requires_grad=True)
    logv = torch.randn(6, 3, generator=g, requires_grad=True)
    target = torch.randn(6, 3, generator=g)
    target[0, 1] = float("nan")
    target[4, :2] = float("nan")
    loss = masked_gaussian_nll(mean, logv, target)
    loss.backward()
    missing = torch.isnan(target)
    assert torch.all(mean.grad[missing] == 0) and torch.all(logv.grad[missing] == 0)
    assert torch.all(mean.grad[~missing] != 0)
    # the loss is the mean over the present labels only
    m, v, t = mean.detach()[~missing], logv.detach()[~missing], target[~missing]
    expected = 0.5 * (v + (t - m) ** 2 / torch.exp(v))
    assert torch.allclose(loss, expected.mean())
    # a label error adds variance: the same residual costs less
    lv = torch.full((6, 3), 0.5)
    assert masked_gaussian_nll(mean, logv, torch.nan_to_num(target), lv) < \
        masked_gaussian_nll(mean, logv, torch.nan_to_num(target))


def test_stars_with_missing_labels_are_kept(data):
    labels = data.labels.copy()
    rng = np.random.default_rng(0)
    labels[rng.random(labels.shape) < 0.25] = np.nan
    labels[:5, 0] = -9999.0  # the release's marker
    labels[np.all(np.isnan(labels) | (labels == -9999.0), axis=1), 2] = 0.0  # keep >= 1 label
    reg = SpectrumRegressor(data.label_names, seed=0, **MLP).train(
        data.flux, labels, data.ivar, **dict(FIT, epochs=25))
    assert len(reg.split["train"]) == 250  # no star dropped
    # -9999 is not a value: the standardization ignores it
    assert reg.label_offsets[0] > 3000
    te = reg.split["test"]
    res = reg.predict(data.flux[te], data.ivar[te])
    assert np.all(_rmse(res.labels, data.labels[te]) < 0.6 * data.labels[te].std(axis=0))


def test_star_with_every_label_missing_is_an_error(data):
    labels = data.labels.copy()
    labels[7] = np.nan
    labels[9] = -9999.0
    with pytest.raises(ValueError, match="every label is missing for star 7.*star 9"):
        SpectrumRegressor(data.label_names, **MLP).train(data.flux, labels, data.ivar)


# ---------------------------------------------------------------------- uncertainties
def test_mc_dropout_errors(data, mlp):
    te = mlp.split["test"]
    res = mlp.predict(data.flux[te], data.ivar[te], n_samples=30)
    assert np.all(res.model_errors > 0)
    assert np.all(res.predictive_errors > 0)
    assert_allclose(res.errors, np.hypot(res.model_errors, res.predictive_errors))
    # calibrated-ish: a Gaussian puts 68 % inside 1 sigma
    frac = calibration_fraction(res.labels, res.errors, data.labels[te])
    assert np.all((frac > 0.45) & (frac < 0.95)), frac
    # errors track the actual residuals: bigger predicted error, bigger residual
    resid = np.abs(res.labels - data.labels[te])
    assert np.all(resid.mean(0) < 2.5 * res.errors.mean(0))
    assert np.all(resid.mean(0) > 0.2 * res.errors.mean(0))
    one = mlp.predict(data.flux[te], data.ivar[te], n_samples=1)
    assert np.all(one.model_errors == 0)
    assert_allclose(one.errors, one.predictive_errors)


def test_mc_head_samples_what_torch_dropout_does():
    from cannon_fast.nn.regressor import _dropout_mask, _mc_head

    torch.manual_seed(3)
    p = 0.1
    m = _dropout_mask((1000, 1000), p, torch.float32, "cpu")
    values = torch.unique(m)
    assert_allclose(values.numpy(), [0.0, 1.0 / (1.0 - p)], rtol=1e-6)
    kept = (m > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * np.sqrt(p * (1 - p) / m.numel())
    # masks of one draw are independent across rows and columns: no repeating pattern
    rows = (m > 0).double()
    assert abs(torch.corrcoef(rows[:, :2].T)[0, 1].item()) < 0.1
    # the head's output samples have torch's dropout mean and spread
    head = torch.nn.Sequential(torch.nn.Dropout(p), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Dropout(p), torch.nn.Linear(32, 3))
    z = torch.rand(1, 64).repeat(20000, 1)
    with torch.inference_mode():
        ours = _mc_head(head, z, True)
        head.train()
        theirs = head(z)
        head.eval()
        off, plain = _mc_head(head, z[:1], False), head(z[:1])
    ours, theirs = ours.numpy(), theirs.numpy()
    assert_allclose(ours.mean(0), theirs.mean(0), atol=5 * theirs.std(0).max() / 141)
    assert_allclose(ours.std(0), theirs.std(0), rtol=0.05)
    assert_array_equal(off.numpy(), plain.numpy())


def test_flags(data, mlp):
    flux, ivar = data.flux[:6].copy(), data.ivar[:6].copy()
    ivar[0, :90] = 0.0  # 75 % masked
    flux[0, :90] = np.nan
    res = mlp.predict(flux, ivar, uncertain_thresholds={"TEFF": 1e6, "LOGG": 1e6, "FE_H": 1e6})
    assert res.flag_names(0) == ["NO_RESULT"] and np.all(np.isnan(res.labels[0]))
    assert res.bad[0] and not res.bad[1:].any()
    assert res.bad_pixel_fraction[0] == pytest.approx(0.75, abs=0.02)
    tiny = mlp.predict(flux[1:], ivar[1:], uncertain_thresholds={"TEFF": 1e-3})
    assert tiny.uncertain[:, 0].all() and tiny.bad.all()
    assert all("UNCERTAIN_TEFF" in tiny.flag_names(i) for i in range(5))
    t = res.to_table()
    assert {"TEFF", "TEFF_ERR", "NN_FLAGS", "NN_BAD"} <= set(t.colnames)
    with pytest.raises(ValueError, match="unknown labels"):
        mlp.predict(flux, ivar, uncertain_thresholds={"VSINI": 1.0})
    assert NNResult.FLAGS["NO_RESULT"] == 1 << 11


def test_result_flags_follow_astras_rules(data, mlp):
    """UNCERTAIN_LOGG/TEFF/FE_H bits 0/1/2, NO_RESULT bit 11, flag_warn and flag_bad."""
    import copy

    reg = copy.copy(mlp)  # errors scaled so that each rule splits these stars
    reg.error_scale = mlp.error_scale * np.array([2.0, 0.6, 0.5])
    res = reg.predict(data.flux, data.ivar, n_samples=10)
    lab, err = res.labels, res.errors
    logg = (err[:, 1] > 0.2) & (np.abs(err[:, 1] / lab[:, 1]) > 0.075)
    teff = err[:, 0] > 300
    feh = np.abs(err[:, 2] / lab[:, 2]) > 0.12
    assert all(0 < r.sum() < len(r) for r in (logg, teff, feh))
    for bit, rule in ((0, logg), (1, teff), (2, feh)):
        assert_array_equal((res.flags >> bit) & 1 == 1, rule)
    assert_array_equal(res.bad, teff | (logg & feh))
    assert_array_equal(res.warn, res.flags != 0)


# ---------------------------------------------------------------------- bad input
def test_pixel_count_mismatch_is_an_error(data, mlp):
    with pytest.raises(ValueError, match="119 pixels but the model was trained on 120"):
        mlp.predict(data.flux[:3, :119], data.ivar[:3, :119])
    with pytest.raises(ValueError, match="ivar has shape"):
        mlp.predict(data.flux[:3], data.ivar[:3, :100])


def test_nan_pixels(data, mlp):
    flux = data.flux[:4].copy()
    flux[2, 10:13] = np.nan
    with pytest.raises(ValueError, match="NaN/inf at unmasked pixels: star 2 .*10-12"):
        mlp.predict(flux, data.ivar[:4])
    with pytest.raises(ValueError, match="pass ivar"):
        mlp.predict(flux)
    ivar = data.ivar[:4].copy()
    ivar[2, 10:13] = 0.0
    res = mlp.predict(flux, ivar)
    assert np.all(np.isfinite(res.labels))
    with pytest.raises(ValueError, match="NaN/inf"):
        SpectrumRegressor(data.label_names, **MLP).train(flux, data.labels[:4], data.ivar[:4])


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="arch"):
        SpectrumRegressor(["A"], arch="transformer")
    with pytest.raises(ValueError, match="shrink"):
        SpectrumRegressor(data.label_names, **dict(CNN, kernel_size=200)).train(
            data.flux, data.labels, data.ivar, epochs=1)
    with pytest.raises(ValueError, match="augment_noise needs ivar"):
        SpectrumRegressor(data.label_names, **MLP).train(data.flux, data.labels,
                                                         augment_noise=1.0)
    with pytest.raises(RuntimeError, match="not trained"):
        SpectrumRegressor(["A"]).predict(np.ones((2, 5)))


def test_bfloat16_layers_predict_what_float32_does(data, mlp, tmp_path):
    """precision="bfloat16": labels close to float32's with the same weights, and it learns.

    bfloat16 keeps 8 bits of mantissa: the labels move by a small fraction of their spread.
    """
    with pytest.raises(ValueError, match="precision"):
        SpectrumRegressor(["A"], precision="float16")
    path = tmp_path / "reg.pt"
    mlp.save(path)
    bf = SpectrumRegressor.load(path, precision="bfloat16")
    a = mlp.predict(data.flux, data.ivar, n_samples=1)
    b = bf.predict(data.flux, data.ivar, n_samples=1)
    assert a.labels.dtype == b.labels.dtype == np.float64
    spread = np.std(data.labels, axis=0)
    assert np.all(np.nanmax(np.abs(a.labels - b.labels), axis=0) < 0.05 * spread)
    assert not np.array_equal(a.labels, b.labels)  # it did run in bfloat16
    trained = SpectrumRegressor(data.label_names, seed=0, precision="bfloat16", **MLP).train(
        data.flux, data.labels, data.ivar, **FIT)
    te = mlp.split["test"]
    r32 = _rmse(mlp.predict(data.flux[te], data.ivar[te]).labels, data.labels[te])
    r16 = _rmse(trained.predict(data.flux[te], data.ivar[te]).labels, data.labels[te])
    assert np.all(r16 < 1.3 * r32 + 0.02 * spread)


@pytest.mark.parametrize("stride, pool, n_pix", [(1, 4, 8192), (1, 3, 101), (2, 4, 97),
                                                  (3, 2, 50)])
def test_strided_conv_max_pool_is_conv_then_max_pool(stride, pool, n_pix):
    """The inference form of conv + max-pool gives the plain layers' values and length."""
    from cannon_fast.nn.regressor import _conv_max_pool
    torch.manual_seed(1)
    conv = torch.nn.Conv1d(4, 5, 8, stride=stride)
    x = torch.randn(3, 4, n_pix)
    with torch.no_grad():
        plain = torch.max_pool1d(conv(x), pool)
        strided = _conv_max_pool(conv, x, pool)
    assert strided.shape == plain.shape
    assert_allclose(strided.numpy(), plain.numpy(), rtol=0, atol=1e-5)


def test_bfloat16_cnn_inference_path_matches_training_path():
    """The CNN's bfloat16 inference (strided conv + pool) gives what its training form gives."""
    from cannon_fast.nn.regressor import _make_config, _Net
    cfg = _make_config("cnn", 300, 2, (4, 16), 8, 1, (1, 4), (32, 16), 0.1)
    torch.manual_seed(2)
    net = _Net(cfg).eval()
    x = 1.0 + 0.05 * torch.randn(5, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = net._convolve(x[:, None]).float()
        with torch.enable_grad():
            plain = net._convolve(x[:, None]).float()
    assert fast.shape == plain.shape
    # both are bfloat16 convolutions; only the summation order may differ
    assert_allclose(fast.numpy(), plain.detach().numpy(), rtol=2e-2, atol=2e-2)


def test_cosine_schedule_falls_to_zero_at_the_last_epoch_and_learns(data, mlp):
    """lr_schedule="cosine": the rate per epoch is the half cosine's, and the network learns."""
    with pytest.raises(ValueError, match="lr_schedule"):
        SpectrumRegressor(data.label_names, **MLP).train(data.flux, data.labels, data.ivar,
                                                         epochs=1, lr_schedule="step")
    fit = dict(FIT, epochs=30, patience=30)
    reg = SpectrumRegressor(data.label_names, seed=0, **MLP).train(
        data.flux, data.labels, data.ivar, lr_schedule="cosine", **fit)
    h = reg.history
    assert h["n_epochs"] == 30
    # recorded after each epoch, i.e. after (k + 1) / 30 of the steps
    expected = fit["learning_rate"] * 0.5 * (1 + np.cos(np.pi * np.arange(1, 31) / 30))
    assert np.allclose(h["lr"], expected, rtol=1e-6, atol=1e-12)
    te = mlp.split["test"]
    r_plateau = _rmse(mlp.predict(data.flux[te], data.ivar[te]).labels, data.labels[te])
    r_cosine = _rmse(reg.predict(data.flux[te], data.ivar[te]).labels, data.labels[te])
    assert np.all(r_cosine < 1.3 * r_plateau)


def test_given_split_and_errors_calibrated_on_observed_stars_only(data):
    """split= given rows; calibrate_on= keeps synthetic spectra out of the error scale.

    Half the stars play "observed" ones, whose labels carry a scatter the spectra do not
    show (a model's misfit to real stars), half "synthetic" ones with exact labels. Errors
    calibrated on the whole validation split (mostly exact labels) are too small for held-out
    observed stars; calibrated on its observed stars only they cover about 68 % of them.
    """
    rng = np.random.default_rng(1)
    obs = np.arange(400) < 200
    labels = data.labels + obs[:, None] * data.labels.std(0) * rng.standard_normal(
        data.labels.shape)
    split = dict(train=np.r_[0:110, 200:360], val=np.r_[110:140, 360:400], test=np.r_[140:200])
    fit = dict(FIT, epochs=40, split=split)
    on_obs = SpectrumRegressor(data.label_names, seed=0, **MLP).train(
        data.flux, labels, data.ivar, calibrate_on=obs, **fit)
    assert all(np.array_equal(on_obs.split[k], np.sort(v)) for k, v in split.items())
    scale = on_obs.error_scale.copy()
    # the same as calibrating afterwards on the observed validation stars
    assert_allclose(on_obs.calibrate(data.flux[110:140], labels[110:140], data.ivar[110:140]),
                    scale, rtol=1e-12)
    te = split["test"]
    within_obs = calibration_fraction(*(lambda r: (r.labels, r.errors))(
        on_obs.predict(data.flux[te], data.ivar[te])), labels[te])
    on_all = on_obs.calibrate(data.flux[split["val"]], labels[split["val"]],
                              data.ivar[split["val"]])
    within_all = calibration_fraction(*(lambda r: (r.labels, r.errors))(
        on_obs.predict(data.flux[te], data.ivar[te])), labels[te])
    assert np.all(scale > 1.1 * on_all), (scale, on_all)
    assert 0.55 < within_obs.mean() < 0.85, within_obs
    assert within_all.mean() < within_obs.mean() - 0.1, (within_all, within_obs)
    reg = SpectrumRegressor(data.label_names, **MLP)
    for bad, match in ((dict(train=[0, 1], val=[1, 2]), "overlap"),
                       (dict(train=[0, 1], val=[400]), "outside"),
                       (dict(train=[0, 1]), "'train' and 'val'"),
                       (dict(train=[0, 1], val=[]), "must not be empty")):
        with pytest.raises(ValueError, match=match):
            reg.train(data.flux, labels, data.ivar, split=bad, epochs=1, progress=False)
    with pytest.raises(ValueError, match="calibrate_on has shape"):
        reg.train(data.flux, labels, data.ivar, calibrate_on=obs[:10], epochs=1, progress=False)
    with pytest.raises(ValueError, match="only 5 validation stars"):
        reg.train(data.flux, labels, data.ivar, split=dict(split, val=np.r_[135:140, 360:400]),
                  calibrate_on=obs, epochs=1, progress=False)


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_exact(data, mlp, tmp_path):
    path = tmp_path / "reg.pt"
    mlp.save(path)
    raw = torch.load(path, weights_only=True)  # no arbitrary pickle needed
    assert raw["config"]["arch"] == "mlp" and raw["format_version"] == 1
    back = SpectrumRegressor.load(path)
    for k, v in mlp.net.state_dict().items():
        assert torch.equal(v, back.net.state_dict()[k])
    a = mlp.predict(data.flux[:30], data.ivar[:30], seed=3)
    b = back.predict(data.flux[:30], data.ivar[:30], seed=3)
    assert_array_equal(a.labels, b.labels)
    assert_array_equal(a.errors, b.errors)
    assert back.history["train_loss"] == mlp.history["train_loss"]
    assert_array_equal(back.split["test"], mlp.split["test"])


def test_wrong_checkpoint_is_a_clear_error(data, mlp, tmp_path):
    path = tmp_path / "reg.pt"
    mlp.save(path)
    with pytest.raises(ValueError, match="holds a 'mlp' regressor, not 'cnn'"):
        SpectrumRegressor.load(path, arch="cnn")
    ck = torch.load(path, weights_only=True)
    for change, match in ((dict(format_version=99), "format version 99"),
                          (dict(kind="emulator"), "holds a 'emulator' network"),
                          (dict(format="something"), "not a cannon_fast.nn checkpoint")):
        bad = dict(ck, **change)
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=match):
            SpectrumRegressor.load(tmp_path / "bad.pt")
    # weights of another architecture under this config
    other = dict(ck, config=dict(ck["config"], hidden=[64, 16]))
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit the stored architecture"):
        SpectrumRegressor.load(tmp_path / "other.pt")
    np.savez(tmp_path / "junk.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="not a readable cannon_fast.nn checkpoint"):
        SpectrumRegressor.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        SpectrumRegressor.load(tmp_path / "none.pt")


# ---------------------------------------------------------------------- emulator
def _random_emulator(n_labels=3, hidden=(16, 12), n_pix=40, dtype=torch.float64, seed=0):
    from cannon_fast.nn.emulator import _build_mlp

    torch.manual_seed(seed)
    net = _build_mlp(n_labels, hidden, n_pix, 0.01, dtype=dtype)
    lo = np.array([3800.0, 0.5, -1.0])[:n_labels]
    hi = np.array([5700.0, 4.0, 0.5])[:n_labels]
    return net, PayneEmulator.from_torch(net, ["TEFF", "LOGG", "FE_H"][:n_labels], lo, hi)


def test_emulator_jacobian_matches_finite_differences():
    _, emu = _random_emulator()
    rng = np.random.default_rng(1)
    labels = emu.x_min + (emu.x_max - emu.x_min) * rng.random((5, 3))
    flux, jac = emu.predict_with_jacobian(labels)
    assert flux.shape == (5, 40) and jac.shape == (5, 40, 3)
    assert_allclose(flux, emu.predict(labels))
    h = 1e-6 * (emu.x_max - emu.x_min)
    fd = np.stack([(emu.predict(labels + h[j] * np.eye(3)[j])
                    - emu.predict(labels - h[j] * np.eye(3)[j])) / (2 * h[j])
                   for j in range(3)], axis=-1)
    assert_allclose(jac, fd, rtol=1e-5, atol=1e-9 * np.abs(jac).max())


def test_emulator_export_round_trip_matches_torch(tmp_path):
    net, emu = _random_emulator()
    emu.s2 = np.linspace(0, 1e-4, 40)
    emu.write(tmp_path / "emu.npz")
    back = PayneEmulator.read(tmp_path / "emu.npz")
    labels = np.array([[4500.0, 2.5, -0.2], [5200.0, 3.1, 0.1]])
    x = (labels - emu.x_min) / (emu.x_max - emu.x_min) - 0.5
    with torch.no_grad():
        expected = net(torch.as_tensor(x)).numpy()
    assert_allclose(back.predict(labels), expected, rtol=1e-12, atol=1e-13)
    assert_allclose(back.predict(labels[0]), expected[0], rtol=1e-12, atol=1e-13)
    assert back.label_names == emu.label_names
    assert_array_equal(back.s2, emu.s2)
    assert_array_equal(back.label_bounds, emu.label_bounds)
    with torch.no_grad():
        again = back.to_torch(torch.float64)(torch.as_tensor(x)).numpy()
    assert_allclose(again, expected, rtol=1e-12, atol=1e-13)
    # float32 torch output agrees to float32 precision
    net32, emu32 = _random_emulator(dtype=torch.float32)
    with torch.no_grad():
        out32 = net32(torch.as_tensor(x, dtype=torch.float32)).numpy()
    assert_allclose(emu32.predict(labels), out32, rtol=1e-5, atol=1e-6)


def test_emulator_file_errors(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="not a PayneEmulator"):
        PayneEmulator.read(tmp_path / "x.npz")
    _, emu = _random_emulator()
    with pytest.raises(ValueError, match=r"labels must be \(N, 3\)"):
        emu.predict(np.ones((2, 4)))
    with pytest.raises(ValueError, match="Sequential"):
        PayneEmulator.from_torch(torch.nn.Sequential(torch.nn.Linear(3, 4)), ["a"] * 3,
                                 [0] * 3, [1] * 3)


@pytest.fixture(scope="module")
def emulator(data):
    return train_emulator(data.flux, data.ivar, data.labels, data.label_names, hidden=(32, 32),
                          epochs=400, batch_size=64, learning_rate=3e-3, patience=20, seed=0,
                          progress=False)


def test_emulator_learns_the_spectra(data, emulator):
    h = emulator.history
    # chi^2 per pixel: from far above to about the noise level (1 + the intrinsic scatter)
    assert h["val_loss"][h["best_epoch"]] < min(1.5, 0.3 * h["val_loss"][0])
    assert emulator.n_pixels == 120 and emulator.label_names == data.label_names
    # held-out stars: closer to the noise-free truth than the noise itself
    va = h["val_index"]
    err = np.abs(emulator.predict(data.labels[va]) - data.true_flux[va])[:, :-1]
    noise = 1.0 / np.sqrt(data.ivar[va][:, :-1][data.ivar[va][:, :-1] > 0])
    assert np.median(err) < 0.5 * np.median(noise)
    assert emulator.pixel_flags[-1] == 1 and not emulator.pixel_flags[:-1].any()
    assert emulator.s2.shape == (120,) and np.all(emulator.s2 >= 0)
    _, jac = emulator.predict_with_jacobian(data.labels[:2])
    assert np.all(np.isfinite(jac))


def test_emulator_needs_complete_labels(data):
    labels = data.labels.copy()
    labels[3, 1] = np.nan
    with pytest.raises(ValueError, match="complete labels.*star 3"):
        train_emulator(data.flux, data.ivar, labels, data.label_names, epochs=1)


def test_emulator_as_forward_model_in_fit_spectra(data, emulator):
    from cannon_fast.core import fitting

    test = make_synthetic(n_stars=20, n_pix=120, n_labels=3, seed=11, coeffs=data.coeffs,
                          s2_true=data.s2_true)
    res = fitting.fit_spectra(emulator, test.flux, test.ivar)
    assert res.labels.shape == (20, 3) and np.all(res.ok)
    # the labels come from the spectra: far better than the training labels' scatter
    assert np.all(_rmse(res.labels, test.labels) < 0.6 * data.labels.std(axis=0))
    # the emulator's flagged pixel (the last, masked in every training star) is left out
    usable = (test.ivar > 0) & (emulator.pixel_flags == 0)
    assert_array_equal(res.n_pixels, usable.sum(axis=1))
    assert np.all(res.errors > 0) and np.all(np.isfinite(res.errors))


# ---------------------------------------------------------------------- evaluation + CLI
def test_label_metrics_by_hand(tmp_path):
    true = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, np.nan]])
    pred = np.array([[1.5, 10.0], [2.5, 22.0], [2.0, 30.0], [4.0, 5.0]])
    m = label_metrics(pred, true, ["a", "b"])
    assert m["a"]["bias"] == pytest.approx(0.0)
    assert m["a"]["rmse"] == pytest.approx(np.sqrt(1.5 / 4))
    assert m["a"]["mae"] == pytest.approx(0.5)
    assert m["a"]["r2"] == pytest.approx(1 - 1.5 / 5.0)
    assert m["b"]["n"] == 3 and m["b"]["bias"] == pytest.approx(2 / 3)
    frac = calibration_fraction(pred, np.full_like(pred, 0.6), true)
    assert_allclose(frac, [0.75, 2 / 3])
    t = comparison_table(true, {"NN": pred, "Cannon": true}, ["a", "b"],
                         costs={"NN": {"train_s": 3.0, "infer_per_s": 100.0}})
    assert list(t["method"]) == ["NN", "Cannon"] and t["a_rmse"][1] == 0.0
    plot_predictions(pred[:3], true[:3], ["a", "b"], errors=np.ones((3, 2)),
                     path=tmp_path / "p.png")
    plot_loss({"train_loss": [3, 2, 1], "val_loss": [3, 2.5, 2], "best_epoch": 2},
              tmp_path / "l.png")
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "l.png").stat().st_size > 0


def test_cli_train_and_predict(data, tmp_path):
    from astropy.table import Table

    from cannon_fast.cli import main

    npz = tmp_path / "train.npz"
    np.savez(npz, flux=data.flux, ivar=data.ivar, labels=data.labels,
             label_names=np.array(data.label_names))
    ck = tmp_path / "reg.pt"
    assert main(["nn-train", str(npz), "-o", str(ck), "--arch", "mlp", "--hidden", "32", "16",
                 "--epochs", "5", "-q"]) == 0
    assert ck.exists() and (tmp_path / "reg_loss.png").exists()
    out = tmp_path / "labels.fits"
    assert main(["nn-predict", str(ck), str(npz), "-o", str(out), "--n-samples", "5",
                 "-q"]) == 0
    t = Table.read(out)
    assert len(t) == len(data.flux) and "LOGG_ERR" in t.colnames
    assert main(["nn-predict", str(ck), str(npz), "-o", str(out), "-q"]) == 1  # exists
    out2 = tmp_path / "labels2.fits"   # --model, as in fit, label, mcmc
    assert main(["nn-predict", "--model", str(ck), str(npz), "--out", str(out2), "-q"]) == 0
    assert len(Table.read(out2)) == len(t)
    out3 = tmp_path / "labels_bf16.fits"
    assert main(["nn-predict", str(ck), str(npz), "-o", str(out3), "--n-samples", "1",
                 "--precision", "bfloat16", "-q"]) == 0
    assert main(["nn-predict", str(ck), str(npz), "-o", str(out2), "--n-samples", "1",
                 "--force", "-q"]) == 0
    t16, t32 = Table.read(out3), Table.read(out2)
    for name in data.label_names:
        d = np.asarray(t16[name]) - np.asarray(t32[name])
        assert 0 < np.abs(d).max() < 0.05 * np.ptp(data.labels[:, data.label_names.index(name)])
    emu = tmp_path / "emu.npz"
    assert main(["nn-train", str(npz), "-o", str(emu), "--kind", "emulator", "--hidden", "16",
                 "16", "--epochs", "5", "-q"]) == 0
    assert PayneEmulator.read(emu).n_pixels == data.flux.shape[1]
    assert main(["nn-train", str(npz), "-o", str(ck), "--labels", "VSINI", "-q",
                 "--force"]) == 1


def test_cli_train_refuses_to_overwrite(data, tmp_path, capsys):
    """nn-train keeps an existing checkpoint (and loss plot) unless --force, before training."""
    from cannon_fast.cli import main

    npz = tmp_path / "train.npz"
    np.savez(npz, flux=data.flux, ivar=data.ivar, labels=data.labels,
             label_names=np.array(data.label_names))
    ck = tmp_path / "reg.pt"
    ck.write_bytes(b"a week of training")
    args = ["nn-train", str(npz), "-o", str(ck), "--arch", "mlp", "--hidden", "8",
            "--epochs", "1", "-q"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == f"cannon-fast nn-train: error: {ck} exists; pass --force to overwrite it\n"
    assert ck.read_bytes() == b"a week of training"
    ck.unlink()
    (tmp_path / "reg_loss.png").write_bytes(b"plot")
    assert main(args) == 1 and "reg_loss.png exists" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0 and SpectrumRegressor.load(ck)


def test_cli_reads_a_spectra_store(data, tmp_path):
    from cannon_fast.cli import main

    path = tmp_path / "train.store"
    SpectraStore.write(path, data.flux, data.ivar, np.arange(120.0), data.labels,
                       list(data.label_names))
    ck = tmp_path / "reg.pt"
    assert main(["nn-train", str(path), "-o", str(ck), "--arch", "mlp", "--hidden", "16",
                 "--epochs", "2", "-q"]) == 0
    assert SpectrumRegressor.load(ck).label_names == data.label_names
    assert os.path.exists(tmp_path / "reg_loss.png")


def test_visit_scatter_measures_errors_against_the_scatter():
    """chi2/dof of visits about their mean: ~1 for right errors, ~1/4 for doubled ones."""
    from cannon_fast.cli.nn import visit_scatter

    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(300), 5).astype(str)
    visit = np.tile(np.arange(5), 300)  # visit 0 (combined) is left out
    err = np.full((1500, 2), [50.0, 0.1])
    lab = np.array([4800.0, 2.5]) + err * rng.standard_normal((1500, 2))
    ratio, n = visit_scatter(lab, err, ids, visit)
    assert n == 300 and np.allclose(ratio, 1.0, atol=0.12)
    ratio2, _ = visit_scatter(lab, 2 * err, ids, visit)
    np.testing.assert_allclose(ratio2, ratio / 4)


def test_cli_predict_visits_of_apstar_files(tmp_path, capsys):
    """nn-predict --visits: the combined spectrum as visit 0, then each visit; astra columns."""
    import fitsio
    from astropy.table import Table

    from cannon_fast.apogee.files import NPIX, on_chip_mask
    from cannon_fast.cli import main
    from cannon_fast.core.continuum import normalize

    rng = np.random.default_rng(4)
    pix = np.arange(NPIX)
    shape = np.sin(pix / 37.0) * 0.05
    cont = on_chip_mask() & (pix % 9 == 0)
    lab = rng.uniform(0, 1, 120)
    raw = 1000 * (1 + np.outer(lab, shape) * ~cont)
    raw_ivar = np.where(on_chip_mask(), 1.0 / 4.0, 0.0) * np.ones_like(raw)
    ns = normalize(raw + rng.normal(0, 2, raw.shape) * on_chip_mask(), raw_ivar, cont)
    npz = tmp_path / "train.npz"
    np.savez(npz, flux=ns.flux, ivar=ns.ivar, labels=lab[:, None] * 1000 + 4000,
             label_names=np.array(["TEFF"]))
    ck = tmp_path / "reg.pt"
    assert main(["nn-train", str(npz), "-o", str(ck), "--arch", "mlp", "--hidden", "8",
                 "--epochs", "3", "-q"]) == 0
    np.save(tmp_path / "cont.npy", cont)
    d = tmp_path / "stars"
    d.mkdir()
    for i, nvis in enumerate((3, 2)):
        sid = f"2M0000000{i}+0000000"
        f = np.vstack([raw[i], raw[i]] + [raw[i] + rng.normal(0, 3, NPIX) for _ in range(nvis)])
        e = np.full(f.shape, 2.0) * on_chip_mask()
        hdr = {"OBJID": sid, "NVISITS": nvis, "SNR": 150.0, "CRVAL1": 4.179, "CDELT1": 6e-6,
               "NWAVE": NPIX}
        hdr.update({f"JD{v}": 2459000.5 + v for v in range(1, nvis + 1)})
        with fitsio.FITS(str(d / f"apStar-dr17-{sid}.fits"), "rw", clobber=True) as fh:
            fh.write(None, header=[{"name": k, "value": v} for k, v in hdr.items()])
            for a in (f, np.where(e > 0, e, 1.0), np.where(e > 0, 0, 1).astype(np.int32)):
                fh.write(a)
    out = tmp_path / "visits.fits"
    capsys.readouterr()
    assert main(["nn-predict", str(ck), str(d), "--visits", "--continuum",
                 str(tmp_path / "cont.npy"), "--astra", "-o", str(out), "-q"]) == 0
    assert "visit scatter over the errors" in capsys.readouterr().out
    t = Table.read(out)
    assert list(t["visit"]) == [0, 1, 2, 3, 0, 1, 2]
    assert {"apogee_id", "teff", "e_teff", "result_flags", "flag_warn", "flag_bad",
            "visit_jd"} <= set(t.colnames)
    f = fitsio.read(str(out))
    np.testing.assert_array_equal(f["teff"], t["teff"])
    assert np.all(np.abs(t["teff"][1:4] - t["teff"][0]) < 5 * t["e_teff"][1:4])


def test_a_network_without_dropout_predicts_in_one_pass(data):
    """MC-dropout samples of a dropout-0 network would all be the same network."""
    reg = SpectrumRegressor(data.label_names, seed=0, **dict(MLP, dropout=0.0)).train(
        data.flux[:200], data.labels[:200], data.ivar[:200], **dict(FIT, epochs=3))
    many = reg.predict(data.flux[200:260], data.ivar[200:260], n_samples=30)
    one = reg.predict(data.flux[200:260], data.ivar[200:260], n_samples=1)
    np.testing.assert_allclose(many.labels, one.labels, rtol=1e-6)
    np.testing.assert_allclose(many.errors, one.errors, rtol=1e-6)
