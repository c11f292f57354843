"""The shared latent space of two instruments: labels from either, one spectrum from the other."""
import numpy as np
import pytest
import torch

from cannon_fast.nn import SharedLatent


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _instrument(labels, n_pix, n_lines, seed, noise):
    rng = np.random.default_rng(seed)
    x = (labels - labels.mean(0)) / labels.std(0)
    centres = rng.uniform(0, n_pix, n_lines)
    prof = np.exp(-0.5 * ((np.arange(n_pix)[None, :] - centres[:, None]) / 1.5) ** 2)
    clean = 1.0 - np.clip(0.3 + x @ rng.normal(0, 0.1, (n_lines, labels.shape[1])).T, 0, 1) @ prof
    return clean, clean + rng.normal(0, noise, clean.shape), np.full(clean.shape, noise ** -2)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    labels = rng.normal(size=(600, 3)) * [400, 0.8, 0.4] + [4800, 2.5, -0.3]
    ca, fa, ia = _instrument(labels, 160, 40, 1, 0.01)    # "APOGEE": many lines, S/N 100
    cb, fb, ib = _instrument(labels, 120, 25, 2, 0.02)    # "JWST": another grid, S/N 50
    model = SharedLatent(["TEFF", "LOGG", "FE_H"], ("APOGEE", "JWST"), latent_dim=6,
                         hidden=(64,), seed=0)
    model.train(fa, ia, fb, ib, labels, epochs=60, batch_size=32, learning_rate=2e-3,
                patience=10, progress=False)
    return model, labels, (ca, fa, ia), (cb, fb, ib)


def test_labels_decode_from_either_instrument(trained):
    model, labels, (_, fa, ia), (_, fb, ib) = trained
    te = model.split["test"]
    assert model.history["val_loss"][model.history["best_epoch"]] < model.history["val_loss"][0]
    for flux, ivar, name in ((fa, ia, "APOGEE"), (fb, ib, "JWST")):
        lab, err = model.predict_labels(flux[te], ivar[te], name)
        rms = np.sqrt(np.mean((lab - labels[te]) ** 2, 0))
        assert np.all(rms < 0.15 * labels.std(0)), (name, rms)
        assert np.all(err > 0)
    # the two instruments put a star at nearly the same place in the latent space
    za, zb = model.encode(fa[te], ia[te], "APOGEE"), model.encode(fb[te], ib[te], "JWST")
    assert np.mean(np.sum((za - zb) ** 2, 1)) < 0.05 * np.sum(za.var(0))


def test_one_instruments_spectrum_from_the_others_latent(trained):
    model, _, (ca, fa, ia), (_, fb, ib) = trained
    te = model.split["test"]
    made = model.generate(fb[te], ib[te], "JWST", "APOGEE")
    assert made.shape == fa[te].shape
    # against the noise-free APOGEE spectra: far better than the mean spectrum of the training
    # stars, i.e. the JWST spectrum told the decoder which star this is
    mean = fa[model.split["train"]].mean(0)
    err_made = np.sqrt(np.mean((made - ca[te]) ** 2))
    err_mean = np.sqrt(np.mean((mean - ca[te]) ** 2))
    assert err_made < 0.25 * err_mean, (err_made, err_mean)


def test_bad_input_is_a_clear_error(trained):
    model, labels, (_, fa, ia), (_, fb, ib) = trained
    with pytest.raises(ValueError, match="unknown instrument 'LAMOST'"):
        model.predict_labels(fb[:3], ib[:3], "LAMOST")
    with pytest.raises(ValueError, match="has 120 pixels but the model was trained on 160"):
        model.encode(fb[:3], ib[:3], "APOGEE")
    with pytest.raises(ValueError, match="APOGEE has 600 spectra, JWST 599"):
        SharedLatent(["A", "B", "C"]).train(fa, ia, fb[1:], ib[1:], labels, epochs=1)
