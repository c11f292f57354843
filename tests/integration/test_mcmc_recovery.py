"""Statistical check of the MCMC: truth recovered, posterior width = formal chi² error."""
import numpy as np

from cannon_fast import CannonModel
from cannon_fast.lab.mcmc import sample_posterior
from cannon_fast.testing import make_synthetic


def test_mcmc_recovers_truth_and_formal_errors():
    tr = make_synthetic(n_stars=300, n_pix=300, n_labels=3, seed=21)
    model = CannonModel(tr.label_names).train(tr.flux, tr.ivar, tr.labels)
    # test stars well inside the training range, so the prior does not truncate
    te = make_synthetic(n_stars=40, n_pix=300, n_labels=3, seed=22, coeffs=tr.coeffs,
                        s2_true=tr.s2_true, snr=(120, 120))
    x = te.scale_labels(te.labels)
    inner = np.flatnonzero(np.all(np.abs(x) < 0.6, axis=1))[:4]
    assert len(inner) == 4
    z, ratio = [], []
    for k, i in enumerate(inner):
        res = sample_posterior(model, te.flux[i], te.ivar[i], seed=k, warn=False)
        assert res.converged
        assert res.n_steps > 50 * np.max(res.autocorr_time)
        assert 0.2 < res.acceptance_fraction < 0.8
        z.append((res.median - te.labels[i]) / res.sigma)
        ratio.append(res.sigma / res.fit_errors)
    z, ratio = np.array(z), np.array(ratio)
    assert np.all(np.abs(z) < 3.0), z
    assert np.all(np.abs(ratio - 1) < 0.3), ratio
