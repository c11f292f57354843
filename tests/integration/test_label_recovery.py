"""Statistical recovery of labels and intrinsic scatter on seeded synthetic surveys."""
import numpy as np

from cannon_fast import CannonModel
from cannon_fast.testing import make_synthetic


def test_five_label_recovery_with_honest_errors():
    train = make_synthetic(n_stars=600, n_pix=1500, n_labels=5, seed=101)
    test = make_synthetic(n_stars=400, n_pix=1500, n_labels=5, seed=102, coeffs=train.coeffs,
                          s2_true=train.s2_true)
    model = CannonModel(train.label_names).train(train.flux, train.ivar, train.labels)
    res = model.fit(test.flux, test.ivar)
    assert np.all(res.ok)
    d = res.labels - test.labels
    spread = np.ptp(test.labels, axis=0)
    # unbiased to a small fraction of the label range, and errors that mean what they say
    assert np.all(np.abs(np.median(d, axis=0)) < 3 * np.std(d, axis=0) / np.sqrt(len(d)) + 1e-3 * spread)
    pulls = np.std(d / res.errors, axis=0)
    assert np.all((pulls > 0.88) & (pulls < 1.12)), pulls
    # the recovered intrinsic scatter where it is at least half the noise
    noise = np.median(1 / np.sqrt(train.ivar[train.ivar > 0]))
    big = np.sqrt(train.s2_true) >= 0.5 * noise
    ratio = np.median(np.sqrt(model.s2[big] / train.s2_true[big]))
    assert 0.9 < ratio < 1.1, ratio
