"""Lab step 16 (cannon_fast.lab.nn_compare): networks against the Cannon, honestly scored."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cannon_fast.lab import report  # noqa: E402
from cannon_fast.lab.nn_compare import TARGET_RATIO, compare_networks  # noqa: E402
from cannon_fast.testing import make_synthetic  # noqa: E402

ARCHS = {"mlp": dict(arch="mlp", hidden=(32, 16), dropout=0.1),
         "cnn": dict(arch="cnn", filters=(4, 8), kernel_size=5, stride=1, pool_size=(2, 2),
                     hidden=(16, 8), dropout=0.1)}
TRAIN = dict(split=(5, 1, 0), batch_size=16, learning_rate=2e-3, patience=10)


@pytest.fixture(scope="module")
def run():
    """Train the tiny networks once against a poor and a near-perfect Cannon."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    s = make_synthetic(n_stars=360, n_pix=100, n_labels=3, seed=5)
    tr, va = np.arange(240), np.arange(240, 359)  # the last star is fully masked: left out
    rng = np.random.default_rng(0)
    # a "Cannon" 10x worse than the networks can be (met) and one near-perfect (not met)
    sig = np.std(s.labels[tr], axis=0)
    poor = s.labels[va] + rng.normal(0, 1, (len(va), 3)) * sig
    good = s.labels[va] + 1e-3 * sig
    out = {}
    for key, cannon in (("poor", poor), ("good", good)):
        out[key] = compare_networks(
            s.flux[tr], s.ivar[tr], s.labels[tr], s.flux[va], s.ivar[va], s.labels[va] + 0.0,
            cannon, s.label_names, val_truth=s.labels[va], architectures=ARCHS,
            training=TRAIN, epochs=40, progress=False)
    torch.set_num_threads(old)
    return s, va, poor, good, out


def test_chosen_network_has_the_lowest_validation_loss(run):
    """The kept network is the one with the lowest validation loss."""
    _, _, _, _, out = run
    res = out["poor"]
    losses = {k: v["best_val_loss"] for k, v in res["networks"].items()}
    assert res["chosen"] == min(losses, key=losses.get)
    for v in res["networks"].values():
        assert 1 <= v["best_epoch"] <= v["n_epochs"] <= 40 and v["n_weights"] > 0
    # the same seed and data give the same networks whatever the Cannon's labels
    assert losses == {k: v["best_val_loss"] for k, v in out["good"]["networks"].items()}


def test_targets_are_the_rmse_ratios_and_say_when_they_are_missed(run):
    """Targets are NN/Cannon RMSE ratios; the headline says met or NOT met."""
    s, va, poor, good, out = run
    for key, cannon in (("poor", poor), ("good", good)):
        res = out[key]
        t = res["targets"]
        for j, n in enumerate(s.label_names):
            rmse_c = np.sqrt(np.mean((cannon[:, j] - s.labels[va, j]) ** 2))
            assert res["cannon"]["vs_true"][n]["rmse"] == pytest.approx(rmse_c, rel=1e-12)
            nn = res["networks"][res["chosen"]]["vs_true"][n]["rmse"]
            if n in t:
                assert t[n]["ratio"] == pytest.approx(nn / rmse_c, rel=1e-12)
                assert t[n]["met"] == (nn / rmse_c <= TARGET_RATIO)
    assert out["poor"]["targets"]["all_met"] and "target <= 1.5x: met" in out["poor"]["headline"]
    assert not out["good"]["targets"]["all_met"] and "NOT met" in out["good"]["headline"]


def test_networks_learn_and_figures_and_report(run, tmp_path):
    """The chosen network learns; figures and the report table are made."""
    s, va, _, _, out = run
    res = out["poor"]
    best = res["networks"][res["chosen"]]["vs_true"]  # better than predicting the mean label
    for j, n in enumerate(s.label_names):
        assert best[n]["rmse"] < 0.6 * np.std(s.labels[va, j])
    names = [f[0] for f in res["figures"]]
    assert names == ["nn_loss", "nn_vs_true"]
    assert all(hasattr(f[1], "savefig") for f in res["figures"])
    status = {k: v for k, v in res.items() if k != "figures"}
    status["status"] = "ok"
    summary = {"labels": list(s.label_names), "extras": {"nn": status}}
    html = report._nn_html(summary)
    assert "Cannon" in html and f"{res['chosen']} (chosen)" in html
    assert report._esc(res["headline"].split(";")[0]) in html



def test_cannon_spectra_are_the_models_at_labels_near_the_training_stars():
    """cannon_spectra: the model's spectra at jittered training labels, a training star's ivar
    and one noise draw at it."""
    from cannon_fast import CannonModel
    from cannon_fast.lab.nn_compare import cannon_spectra

    s = make_synthetic(n_stars=120, n_pix=60, n_labels=3, seed=2)
    labels = s.labels.copy()
    labels[0, 1] = np.nan  # a star with a missing label is never drawn
    model = CannonModel(s.label_names, order=2).train(s.flux, s.ivar, s.labels)
    flux, ivar, drawn = cannon_spectra(model, labels, s.ivar, 500, jitter=0.1, seed=3)
    assert flux.shape == (500, 60) and ivar.shape == (500, 60) and drawn.shape == (500, 3)
    # the noise is the borrowed ivar's: unit pulls, none at masked pixels
    pull = (flux - model.predict(drawn)) * np.sqrt(ivar)
    assert abs(np.std(pull[ivar > 0]) - 1.0) < 0.02 and abs(np.mean(pull[ivar > 0])) < 0.02
    masked = ivar == 0
    np.testing.assert_allclose(flux[masked], model.predict(drawn)[masked], rtol=1e-6, atol=1e-6)
    # each ivar row is one training star's
    assert all(any(np.array_equal(r, t) for t in s.ivar) for r in ivar[:20])
    # labels within a few jitters of some complete training star, never near star 0 alone
    sd = np.std(s.labels[1:], axis=0)
    dist = np.min(np.max(np.abs(drawn[:, None] - s.labels[None, 1:]) / sd, axis=2), axis=1)
    assert dist.max() < 0.6
    again = cannon_spectra(model, labels, s.ivar, 500, jitter=0.1, seed=3)
    assert np.array_equal(again[2], drawn)  # seeded
    # a nearly-zero ivar (some files' bad pixels) gets the augmentation's capped noise
    from cannon_fast.nn.regressor import NOISE_SIGMA_CAP
    tiny = np.where(np.arange(60) == 7, 1e-20, s.ivar)
    f2, iv2, d2 = cannon_spectra(model, labels, tiny, 500, jitter=0.1, seed=3)
    resid = (f2 - model.predict(d2))[:, 7]
    assert np.all(iv2[:, 7] == 1e-20) and 0.8 < np.std(resid) / NOISE_SIGMA_CAP < 1.2
    with pytest.raises(ValueError, match="no training star has every label"):
        cannon_spectra(model, np.full_like(labels, np.nan), s.ivar, 5)


def test_a_network_trained_on_cannon_spectra_is_reported_apart(run):
    """A network with cannon_spectra is reported apart from the observed-only ones.

    Skipped without a model, else trained on the extra spectra; never the 'chosen' one
    (its validation set differs); the headline says it learnt from the Cannon when best.
    """
    from cannon_fast import CannonModel

    s, va, poor, _, _ = run
    tr = np.arange(240)
    archs = {"mlp": ARCHS["mlp"], "mlp+cannon": dict(ARCHS["mlp"], cannon_spectra=300)}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        no_model = compare_networks(
            s.flux[tr], s.ivar[tr], s.labels[tr], s.flux[va], s.ivar[va], s.labels[va], poor,
            s.label_names, val_truth=s.labels[va], architectures=archs, training=TRAIN,
            epochs=3, progress=False)
        assert list(no_model["networks"]) == ["mlp"] and "mlp+cannon" in no_model["skipped"]
        assert no_model["networks"]["mlp"]["calibrated_against"] == "catalogue labels and errors"
        model = CannonModel(s.label_names, order=2).train(s.flux[tr], s.ivar[tr], s.labels[tr])
        res = compare_networks(
            s.flux[tr], s.ivar[tr], s.labels[tr], s.flux[va], s.ivar[va], s.labels[va], poor,
            s.label_names, val_truth=s.labels[va], architectures=archs, training=TRAIN,
            epochs=3, progress=False, cannon_model=model, train_truth=s.labels[tr])
    finally:
        torch.set_num_threads(old)
    nets = res["networks"]
    assert nets["mlp+cannon"]["cannon_spectra"] == 300 and nets["mlp"]["cannon_spectra"] == 0
    # its errors are calibrated on the observed stars of its validation split only
    from cannon_fast.nn._common import split_indices
    _, v_obs, _ = split_indices(240, TRAIN["split"], 0)
    _, v_all, _ = split_indices(540, TRAIN["split"], 0)
    assert nets["mlp"]["n_calibration_stars"] == len(v_obs)
    assert nets["mlp+cannon"]["n_calibration_stars"] == int((v_all < 240).sum()) < len(v_all)
    for net in nets.values():
        assert net["calibrated_against"] == "true labels"
        for v in net["true_within_1sigma"].values():
            assert 0 <= v["fraction"] <= 1 and v["pull_std"] > 0
    assert res["chosen"] == "mlp"
    ranked = sorted(nets, key=lambda k: (-sum(v["met"] for n, v in nets[k]["targets"].items()
                                              if n != "all_met"),
                                         max(v["ratio"] for n, v in nets[k]["targets"].items()
                                             if n != "all_met")))
    assert res["best"] == ranked[0]
    if res["best"] == "mlp+cannon":
        assert "learnt from the Cannon" in res["headline"]


def test_combine_predictions_of_a_seed_ensemble_by_hand():
    """Mean labels; model errors add the members' spread; flags of any member."""
    from cannon_fast.lab.nn_compare import combine_predictions
    from cannon_fast.nn import NNResult

    def result(labels, model_err, pred_err, flags):
        labels, m, p = (np.array(x, float) for x in (labels, model_err, pred_err))
        return NNResult(labels=labels, errors=np.hypot(m, p), model_errors=m,
                        predictive_errors=p, flags=np.array(flags), uncertain=labels > 5,
                        bad_pixel_fraction=np.zeros(len(labels)), label_names=("A", "B"))

    a = result([[1.0, 2.0], [3.0, 4.0]], [[0.1, 0.2]] * 2, [[0.3, 0.4]] * 2, [0, 1])
    b = result([[3.0, 2.0], [3.0, 8.0]], [[0.1, 0.2]] * 2, [[0.5, 0.4]] * 2, [2, 0])
    c = combine_predictions([a, b])
    np.testing.assert_allclose(c.labels, [[2.0, 2.0], [3.0, 6.0]])
    # variance of two values x, y about their mean: ((x - y) / 2)^2
    np.testing.assert_allclose(c.model_errors, np.sqrt([[0.01 + 1.0, 0.04], [0.01, 0.04 + 4.0]]))
    np.testing.assert_allclose(c.predictive_errors, np.sqrt([[0.17, 0.16]] * 2))
    np.testing.assert_allclose(c.errors, np.hypot(c.model_errors, c.predictive_errors))
    assert c.flags.tolist() == [2, 1] and c.uncertain.tolist() == [[False, False], [False, True]]
    assert combine_predictions([a]) is a


def test_a_seed_ensemble_scores_the_mean_of_its_members(run):
    """members=2: the members are the networks seeds 0 and 1 train alone; scored on their mean."""
    from cannon_fast.nn import SpectrumRegressor

    s, va, poor, _, _ = run
    tr = np.arange(240)
    arch = dict(ARCHS["mlp"])
    archs = {"mlp x2": dict(arch, members=2, epochs=3, train=dict(lr_schedule="cosine"))}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = compare_networks(
            s.flux[tr], s.ivar[tr], s.labels[tr], s.flux[va], s.ivar[va], s.labels[va], poor,
            s.label_names, val_truth=s.labels[va], architectures=archs, training=TRAIN,
            epochs=40, progress=False)
        alone = [SpectrumRegressor(s.label_names, seed=k, device="cpu", **arch).train(
            s.flux[tr], s.labels[tr], s.ivar[tr], epochs=3, progress=False,
            lr_schedule="cosine", **TRAIN) for k in (0, 1)]
        preds = [r.predict(s.flux[va], s.ivar[va], n_samples=20).labels for r in alone]
    finally:
        torch.set_num_threads(old)
    net = res["networks"]["mlp x2"]
    assert net["members"] == 2 and net["n_epochs"] == 3 and net["lr_schedule"] == "cosine"
    assert net["n_weights"] == 2 * alone[0].n_parameters
    assert not np.allclose(preds[0], preds[1])  # two different networks
    mean = np.mean(preds, axis=0)
    for j, n in enumerate(s.label_names):
        rmse = np.sqrt(np.mean((mean[:, j] - s.labels[va, j]) ** 2))
        assert net["vs_true"][n]["rmse"] == pytest.approx(rmse, rel=1e-9)
