"""The test step: fast batched fits vs the scipy "trf" reference, de-biasing, flags, bad input."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from cannon_fast import CannonModel, available_backends, fit_spectra
from cannon_fast.core import vectorizer as vz
from cannon_fast.core.fitting import FLAGS, fit_broadened, fit_trf
from cannon_fast.testing import make_synthetic, synthetic_grid


@pytest.fixture(scope="module")
def setup():
    train = make_synthetic(n_stars=300, n_pix=300, n_labels=3, seed=11)
    test = make_synthetic(n_stars=40, n_pix=300, n_labels=3, seed=12, coeffs=train.coeffs,
                          s2_true=train.s2_true)
    model = CannonModel(train.label_names, grid=train.grid).train(train.flux, train.ivar,
                                                                   train.labels)
    return model, train, test


def test_fast_matches_trf_reference(setup, backend):
    model, _, test = setup
    fast = model.fit(test.flux, test.ivar, debias=False, backend=backend)
    ref = fit_trf(model, test.flux, test.ivar)
    assert not np.any(fast.flags & (FLAGS["NOT_CONVERGED"] | FLAGS["FAILED"]))
    # labels agree to a tiny fraction of their errors; errors and chi² agree closely
    assert np.max(np.abs(fast.labels - ref.labels) / ref.errors) < 2e-3
    assert_allclose(fast.errors, ref.errors, rtol=1e-4)
    assert_allclose(fast.chi2, ref.chi2, rtol=1e-7)


def test_chi2_is_the_direct_sum(setup):
    model, _, test = setup
    r = model.fit(test.flux, test.ivar)
    w = np.where(test.ivar > 0, 1 / (1 / np.where(test.ivar > 0, test.ivar, 1) + model.s2), 0)
    w[:, model.pixel_flags & 3 > 0] = 0
    direct = np.sum(w * (test.flux - model.predict(r.labels)) ** 2, axis=1)
    assert_allclose(r.chi2, direct, rtol=1e-7)
    assert_allclose(r.reduced_chi2, direct / (r.n_pixels - 3), rtol=1e-7)


def test_float32_spectra_fit_as_their_float64_copy(setup, backend):
    """float32 spectra (a survey's) are read as they are: the fit of their float64 copy."""
    model, _, test = setup
    f32, i32 = test.flux.astype(np.float32), test.ivar.astype(np.float32)
    for options in (dict(), dict(debias=False), dict(refine_continuum=True)):
        single = model.fit(f32, i32, backend=backend, **options)
        double = model.fit(f32.astype(np.float64), i32.astype(np.float64), backend=backend,
                           **options)
        for name in ("labels", "errors", "chi2", "flags"):
            assert_array_equal(getattr(single, name), getattr(double, name), err_msg=name)


def test_debiased_fast_matches_its_reference(setup, monkeypatch):
    """Fast de-biased fit vs minimising chi² - sum_p w_p v^T C_p v directly (L-BFGS-B)."""
    from cannon_fast.core import fitting
    monkeypatch.setattr(fitting, "DEBIAS_CAPPED_SIGMA", 0.0)  # flag every capped star here
    model, _, test = setup
    exact = model.fit(test.flux[:15], test.ivar[:15], exact_debias=True)
    approx = model.fit(test.flux[:15], test.ivar[:15])
    plain = model.fit(test.flux[:15], test.ivar[:15], debias=False)
    ref = fit_trf(model, test.flux[:15], test.ivar[:15], debias=True)
    capped = (exact.flags & FLAGS["DEBIAS_CAPPED"]) > 0
    assert 0 < capped.sum() < 15
    # uncapped stars: two Newton steps reach the minimum of the corrected objective
    assert np.max(np.abs(exact.labels - ref.labels)[~capped] / exact.errors[~capped]) < 5e-3
    # capped stars: the correction is applied only in part
    full = np.abs(ref.labels - plain.labels)[capped] / plain.errors[capped]
    part = np.abs(exact.labels - plain.labels)[capped] / plain.errors[capped]
    assert np.all(np.linalg.norm(part, axis=1) < np.linalg.norm(full, axis=1))
    # the factorised Cov(theta_p) ~ t_p Cbar changes labels by a small fraction of sigma
    assert np.max(np.abs(approx.labels - exact.labels) / exact.errors) < 0.05
    assert_allclose(approx.errors, exact.errors, rtol=0.03)


def test_debiasing_removes_the_pull_to_the_centre():
    """Few training stars: plain fits shrink toward the training centre; de-biased do not."""
    train = make_synthetic(n_stars=120, n_pix=600, n_labels=3, seed=21)
    test = make_synthetic(n_stars=300, n_pix=600, n_labels=3, seed=22, coeffs=train.coeffs,
                          s2_true=train.s2_true)
    model = CannonModel(train.label_names).train(train.flux, train.ivar, train.labels)
    slopes = {}
    for debias in (False, True):
        r = model.fit(test.flux, test.ivar, debias=debias)
        dev = test.labels - test.labels.mean(axis=0)
        slopes[debias] = [np.polyfit(dev[:, l], r.labels[:, l] - test.labels.mean(0)[l], 1)[0]
                          for l in range(3)]
        pulls = np.std((r.labels - test.labels) / r.errors, axis=0)
        if debias:
            assert np.all((pulls > 0.8) & (pulls < 1.25)), pulls
        else:
            assert np.all(pulls > 1.2), pulls  # plain errors are too small
    assert np.all(np.abs(np.array(slopes[True]) - 1) < np.abs(np.array(slopes[False]) - 1))


def test_debias_capped_marks_the_stars_the_cap_leaves_biased(monkeypatch):
    """DEBIAS_CAPPED marks only the capped stars still pulled toward the training centre.

    Those whose withheld correction is large: their errors against the truth are larger.
    """
    from cannon_fast.core import fitting
    train = make_synthetic(n_stars=60, n_pix=600, n_labels=3, seed=31)
    test = make_synthetic(n_stars=300, n_pix=600, n_labels=3, seed=32, coeffs=train.coeffs,
                          s2_true=train.s2_true)
    model = CannonModel(train.label_names).train(train.flux, train.ivar, train.labels)
    r = model.fit(test.flux, test.ivar)
    flagged = (r.flags & FLAGS["DEBIAS_CAPPED"]) > 0
    monkeypatch.setattr(fitting, "DEBIAS_CAPPED_SIGMA", 0.0)
    capped = (model.fit(test.flux, test.ivar).flags & FLAGS["DEBIAS_CAPPED"]) > 0
    assert 0 < flagged.sum() < capped.sum() and not np.any(flagged & ~capped)
    assert np.all(r.warn[flagged])   # a warning (FLAG_WARN), no longer informational
    pull = np.sqrt(np.mean(((r.labels - test.labels) / r.errors) ** 2, axis=1))
    assert np.median(pull[flagged]) > 1.4 * np.median(pull[~flagged]), (
        np.median(pull[flagged]), np.median(pull[~flagged]))


def test_masked_star_is_flagged_and_the_rest_go_on(setup):
    model, _, test = setup
    ivar = test.ivar.copy()
    ivar[5] = 0
    r = model.fit(test.flux, ivar)
    assert r.flags[5] & FLAGS["TOO_FEW_PIXELS"] and np.all(np.isnan(r.labels[5]))
    assert "TOO_FEW_PIXELS" in r.flag_names(5)
    others = np.delete(np.arange(40), 5)
    assert np.all(np.isfinite(r.labels[others])) and np.all(r.ok[others]) and not r.ok[5]


def test_star_beyond_the_training_range_hits_a_bound(setup):
    model, train, _ = setup
    far = train.labels[:1].copy()
    far[0, 0] = 9000.0  # Teff far above the 3800-5700 K training range
    flux = 1.0 - vz.label_vector((far - 4750.0) / 950.0 * np.array([[1, 0, 0]])
                                 + np.array([[0, *(train.scale_labels(far)[0, 1:])]]),
                                 vz.polynomial_exponents(3, 2)) @ train.coeffs.T
    r = model.fit(flux, np.full_like(flux, 1e4))
    assert r.flags[0] & FLAGS["HIT_BOUND"]
    assert r.labels[0, 0] == pytest.approx(model.label_bounds[0, 1])


def test_symmetric_model_sets_starts_disagree():
    """flux = 1 - 0.1 x² has minima at +x and -x: the starts must see both."""
    rng = np.random.default_rng(0)
    lab = rng.uniform(-1, 1, (200, 1))
    flux = 1 - 0.1 * lab ** 2 + rng.normal(0, 0.001, (200, 50))
    model = CannonModel(["X"]).train(flux, np.full_like(flux, 1e6), lab)
    test = 1 - 0.1 * 0.7 ** 2 + rng.normal(0, 0.001, (1, 50))
    r = model.fit(test, np.full_like(test, 1e6), debias=False)
    assert r.flags[0] & FLAGS["STARTS_DISAGREE"]
    assert abs(r.labels[0, 0]) == pytest.approx(0.7, abs=0.02)


def test_generic_forward_model_matches_fast_path(setup):
    model, _, test = setup

    class Wrapped:  # any object with the forward-model protocol
        label_names = model.label_names
        label_bounds = model.label_bounds
        training_labels = model.training_labels
        s2 = model.s2

        def predict_with_jacobian(self, labels):
            return model.predict_with_jacobian(labels)

    good = model.pixel_flags == 0
    ivar = test.ivar * good[None, :]
    gen = fit_spectra(Wrapped(), test.flux[:10], ivar[:10])
    fast = model.fit(test.flux[:10], ivar[:10], debias=False)
    assert np.max(np.abs(gen.labels - fast.labels) / fast.errors) < 1e-2
    assert_allclose(gen.errors, fast.errors, rtol=1e-3)


def test_bad_fit_input(setup):
    model, _, test = setup
    with pytest.raises(ValueError, match="have 299 pixels but the model has 300"):
        model.fit(test.flux[:, :-1], test.ivar[:, :-1])
    flux = test.flux.copy()
    flux[3, 10] = np.inf
    with pytest.raises(ValueError, match=r"star 3 \(1 pixels, 10\)"):
        model.fit(flux, test.ivar)
    # checked batch by batch in the weights kernel: star numbers still count from the first
    ivar = test.ivar.copy()
    ivar[33, 7:9] = -1.0
    for backend in available_backends():
        with pytest.raises(ValueError,
                           match=r"ivar has negative values at star 33 \(2 pixels, 7-8\)"):
            model.fit(test.flux, ivar, batch_size=8, backend=backend)
    with pytest.raises(ValueError, match="unknown method"):
        fit_spectra(model, test.flux, test.ivar, method="lbfgs")


@pytest.mark.parametrize("debias", [True, False])
def test_single_spectrum_fit_is_row_0_of_the_batch_fit(setup, debias):
    """A (P,) spectrum is fitted as a batch of one, with the batch fit's result for it.

    Not bit for bit: G = sum_p w_p theta_p theta_p^T is accumulated in float32 by one
    BLAS product per batch, whose rounding depends on the batch's shape (fit_cannon).
    """
    model, _, test = setup
    one = model.fit(test.flux[0], test.ivar[0], debias=debias)
    batch = model.fit(test.flux, test.ivar, debias=debias)
    assert len(one) == 1 and one.labels.shape == (1, 3) and one.debiased == debias
    assert one.flags[0] == batch.flags[0] and one.n_pixels[0] == batch.n_pixels[0]
    assert np.max(np.abs(one.labels[0] - batch.labels[0]) / batch.errors[0]) < 1e-4
    assert_allclose(one.errors[0], batch.errors[0], rtol=1e-5)
    assert_allclose(one.chi2[0], batch.chi2[0], rtol=1e-6)
    assert_allclose(one.reduced_chi2[0], batch.reduced_chi2[0], rtol=1e-6)


def test_result_table(setup):
    model, _, test = setup
    r = model.fit(test.flux[:3], test.ivar[:3])
    t = r.to_table(ids=["a", "b", "c"])
    assert t.colnames == ["ID", "TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FE_H", "FE_H_ERR",
                          "CHI2", "REDUCED_CHI2", "N_PIXELS", "ITERATIONS", "FLAGS", "FLAG_BAD",
                          "FLAG_WARN"]
    assert list(t["ID"]) == ["a", "b", "c"]
    assert_array_equal(t["FLAG_BAD"], ~r.ok)
    assert_array_equal(t["FLAG_WARN"], r.warn)
    assert_array_equal(t["LOGG"], r.labels[:, 1])
    assert_array_equal(t["FE_H_ERR"], r.errors[:, 2])
    assert_array_equal(t["CHI2"], r.chi2)
    assert_array_equal(t["FLAGS"], r.flags)


def test_capped_hessian_matches_a_generalized_eigendecomposition():
    """F - B with the eigenvalues of B against F capped, checked star by star with scipy."""
    from scipy.linalg import eigh

    from cannon_fast.core._reference.model_eval import capped_hessian
    rng = np.random.default_rng(8)
    n, size, cap = 40, 4, 0.3
    a = rng.normal(size=(n, size, size))
    fisher = a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(size)
    b = rng.normal(size=(n, size, size))
    # B from small to large against F, so that some stars are capped and some are not
    bmat = np.geomspace(1e-3, 3.0, n)[:, None, None] * (b @ np.swapaxes(b, 1, 2))
    hess, push, capped = capped_hessian(fisher, bmat, cap)
    assert 0 < capped.sum() < n
    for i in range(n):
        lam, u = eigh(bmat[i], fisher[i])  # B u = lam F u, u^T F u = I
        assert capped[i] == (lam.max() > cap)
        fu = fisher[i] @ u
        expected = fu @ np.diag(1.0 - np.minimum(lam, cap)) @ fu.T
        assert_allclose(hess[i], expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
        scale = np.minimum(1.0, cap / lam)
        assert_allclose(push[i], fu @ np.diag(scale) @ u.T, rtol=1e-8, atol=1e-9)


def _line_spectra(labels, line_var, seed):
    """Gaussian absorption lines (variance ``line_var`` px²) whose depths follow the labels."""
    rng = np.random.default_rng(seed)
    centres = np.linspace(10, 390, 40) + rng.uniform(-3, 3, 40)
    d0 = rng.uniform(0.05, 0.4, 40)
    slopes = rng.normal(0, 0.3, (40, labels.shape[1]))
    depth = d0 * np.clip(1 + labels @ slopes.T, 0.1, None)  # (N, lines)
    pix = np.arange(400)
    var = np.broadcast_to(np.asarray(line_var, float).reshape(-1, 1), (len(labels), 1))
    # equal-area lines: broadening spreads a line, it does not change its strength
    prof = np.exp(-0.5 * (pix[None, None, :] - centres[None, :, None]) ** 2 / var[:, :, None])
    prof /= np.sqrt(var[:, :, None] / 2.25)
    return 1.0 - np.einsum("nk,nkp->np", depth, prof)


def test_broadened_fit_recovers_extra_broadening():
    """Lines broader or narrower than the training stars': the plain fit reads them as
    label changes; the broadened fit finds the velocity variance and the labels."""
    rng = np.random.default_rng(3)
    names = ["TEFF", "LOGG", "FE_H"]
    lab_train = rng.uniform(-1, 1, (300, 3))
    flux_train = _line_spectra(lab_train, 2.25, seed=0) + rng.normal(0, 0.005, (300, 400))
    grid = synthetic_grid(400)
    model = CannonModel(names, grid=grid).train(flux_train, np.full((300, 400), 0.005 ** -2),
                                                lab_train)
    lab_test = rng.uniform(-0.6, 0.6, (40, 3))
    # px², relative to the training stars' 2.25; the mock survey's 5-95 % range is
    # about +-0.2 (+-3.5 (km/s)²)
    extra = np.repeat([-0.25, 0.25], 20)
    flux = _line_spectra(lab_test, 2.25 + extra, seed=0) + rng.normal(0, 0.005, (40, 400))
    ivar = np.full_like(flux, 0.005 ** -2)
    plain = model.fit(flux, ivar, debias=False)
    broad = model.fit(flux, ivar, debias=False, broadening=True)
    assert broad.ok.all()
    b_true = extra * np.median(grid.pixel_velocity) ** 2  # (km/s)²
    # Right to first order in the added variance: the depth of a line goes as
    # (1 + b/sigma²)^-1/2, so narrowing reads ~9 % high and broadening ~8 % low; and
    # the second difference is ~10 % short of the curvature of a 1.5-pixel line,
    # which reads b high by as much. Measured: 1.17 and 1.02 times b.
    ratio = broad.broadening / b_true
    assert np.all((ratio[:20] > 1.05) & (ratio[:20] < 1.3))  # narrower lines
    assert np.all((ratio[20:] > 0.9) & (ratio[20:] < 1.15))  # broader lines
    err_plain = np.sqrt(np.mean((plain.labels - lab_test) ** 2, axis=0))
    err_broad = np.sqrt(np.mean((broad.labels - lab_test) ** 2, axis=0))
    assert np.all(err_broad < 0.5 * err_plain), (err_plain, err_broad)
    t = broad.to_table()
    assert "BROADENING" in t.colnames and "BROADENING_ERR" in t.colnames


def test_broadened_model_jacobian_matches_finite_differences(setup):
    from cannon_fast.core.fitting import BroadenedModel
    model = setup[0]
    bm = BroadenedModel(model)
    labels = np.column_stack([model.training_labels[:3], [-5.0, 0.0, 7.0]])
    _, jac = bm.predict_with_jacobian(labels)
    for j in range(labels.shape[1]):
        h = np.zeros_like(labels)
        h[:, j] = 1e-4 * (np.ptp(model.training_labels[:, j]) if j < 3 else 1.0)
        num = (bm.predict_with_jacobian(labels + h)[0]
               - bm.predict_with_jacobian(labels - h)[0]) / (2 * h[:, j:j + 1])
        assert_allclose(jac[:, :, j], num, rtol=1e-6, atol=1e-9 * np.abs(num).max())


def test_broadening_needs_the_plain_fit(setup):
    model, _, test = setup
    with pytest.raises(ValueError, match="debias=False"):
        model.fit(test.flux[:2], test.ivar[:2], broadening=True)


def test_generic_fit_from_given_starts(setup):
    """Per-star starting points: from the answer, the fit stays there; from far, it gets there."""
    from cannon_fast.core.fitting import BroadenedModel, fit_generic
    model, _, test = setup
    bm = BroadenedModel(model)
    ivar = test.ivar[:6] * bm.good_pixels
    ref = fit_generic(bm, test.flux[:6], ivar)
    far = np.column_stack([np.tile(model.training_labels.mean(0), (6, 1)), np.full(6, 3.0)])
    for init in (ref.labels, far):
        r = fit_generic(bm, test.flux[:6], ivar, initial=init)
        assert np.max(np.abs(r.labels - ref.labels) / ref.errors) < 1e-2
    with pytest.raises(ValueError, match="initial must be finite"):
        fit_generic(bm, test.flux[:6], ivar, initial=ref.labels[:5])


@pytest.mark.parametrize("reciprocal", [(), ("TEFF",)])
def test_broadened_fast_path_matches_its_reference(reciprocal):
    """The moment path of fit_broadened against LM on the model itself (fit_generic),
    for a plain model and one in 1/TEFF."""
    from cannon_fast.core.fitting import BroadenedModel, fit_broadened, fit_generic
    rng = np.random.default_rng(5)
    lab_train = rng.uniform(-1, 1, (300, 3))
    flux_train = _line_spectra(lab_train, 2.25, seed=1) + rng.normal(0, 0.005, (300, 400))
    shift = np.array([3.0, 0.0, 0.0])  # a reciprocal label must be positive
    model = CannonModel(["TEFF", "LOGG", "FE_H"], reciprocal_labels=reciprocal,
                        grid=synthetic_grid(400)).train(
        flux_train, np.full((300, 400), 0.005 ** -2), lab_train + shift)
    lab = rng.uniform(-0.8, 0.8, (30, 3))
    flux = _line_spectra(lab, rng.uniform(1.9, 2.6, 30), seed=1) + rng.normal(0, 0.005, (30, 400))
    ivar = np.full_like(flux, 0.005 ** -2)
    ivar[3, 100:140] = 0.0  # a masked stretch
    start = model.fit(flux, ivar, debias=False)
    fast = fit_broadened(model, flux, ivar, start=start, correct_training_noise=False)
    bm = BroadenedModel(model)
    ref = fit_generic(bm, flux, ivar * bm.good_pixels,
                      initial=np.column_stack([start.labels, np.zeros(30)]))
    assert not np.any(fast.flags) and not np.any(ref.flags)
    assert np.max(np.abs(fast.labels - ref.labels[:, :3]) / fast.errors) < 1e-3
    assert np.max(np.abs(fast.broadening - ref.labels[:, 3]) / fast.broadening_error) < 1e-3
    assert_allclose(fast.errors, ref.errors[:, :3], rtol=1e-4)
    assert_allclose(fast.broadening_error, ref.errors[:, 3], rtol=1e-4)
    assert_allclose(fast.chi2, ref.chi2, rtol=1e-8)


def test_broadened_fit_keeps_an_unfittable_star_as_it_was(setup):
    from cannon_fast.core.fitting import fit_broadened
    model, _, test = setup
    ivar = test.ivar[:4].copy()
    ivar[2] = 0.0  # no data at all
    r = fit_broadened(model, test.flux[:4], ivar)  # makes its own plain fit
    assert r.flags[2] & FLAGS["TOO_FEW_PIXELS"] and np.isnan(r.broadening[2])
    assert np.all(np.isnan(r.labels[2]))
    assert np.all(np.isfinite(r.broadening[[0, 1, 3]])) and r.ok[[0, 1, 3]].all()
    with pytest.raises(ValueError, match="start must be a plain fit"):
        fit_broadened(model, test.flux[:4], ivar, start=model.fit(test.flux[:4], ivar))


def test_sparse_training_flag_marks_the_thin_part_of_the_training_set(setup):
    """SPARSE_TRAINING: labels whose 10th-nearest training star is farther than for 95 % of
    the training stars. Informational: the fit stays usable."""
    from cannon_fast.core.fitting import SPARSE_QUANTILE, fit_broadened, sparse_training

    model, train, test = setup
    # new stars from the training set's own distribution: ~5 % are as isolated as its tail
    draws = make_synthetic(n_stars=3000, n_pix=10, n_labels=3, seed=99).labels
    frac = sparse_training(model, draws).mean()
    assert abs(frac - (1 - SPARSE_QUANTILE / 100)) < 0.02, frac
    centre = np.median(train.labels, axis=0)
    far = centre + 1.25 * model.label_scales  # inside the training range, in a thin corner
    assert np.all((far > model.label_bounds[:, 0]) & (far < model.label_bounds[:, 1]))
    flagged = sparse_training(model, np.array([centre, far, [np.nan, 1.0, 0.0]]))
    assert flagged.tolist() == [False, True, False]
    # every fit sets the bit from its own labels, clears a stale one, and keeps ok
    bit = FLAGS["SPARSE_TRAINING"]
    fast = model.fit(test.flux, test.ivar, debias=False)
    ref = fit_trf(model, test.flux, test.ivar)
    stale = fast.flags.copy()
    fast.flags |= bit
    broad = fit_broadened(model, test.flux, test.ivar, start=fast)
    fast.flags = stale
    for res in (fast, ref, broad):
        assert np.array_equal(res.flags & bit > 0, sparse_training(model, res.labels))
        assert res.ok.all()
    # a star placed in the tail by the fit itself: its spectrum at the far labels
    spec = model.predict(far[None])
    res = model.fit(spec, np.full_like(spec, 1e4), debias=False)
    assert res.flags[0] & bit and res.ok[0] and "SPARSE_TRAINING" in res.flag_names(0)
    assert not res.flags[0] & FLAGS["HIT_BOUND"]


def test_reciprocal_model_fits_match_the_trf_reference():
    """Labels and errors of a model in 1/TEFF go through its d label / d x."""
    rng = np.random.default_rng(7)
    names = ["TEFF", "LOGG", "FE_H"]
    lab = np.column_stack([rng.uniform(3800, 5600, 300), rng.uniform(0.5, 3.5, 300),
                           rng.uniform(-1, 0.4, 300)])
    x = np.column_stack([5040.0 / lab[:, 0] - 1.0, (lab[:, 1] - 2) / 1.5, lab[:, 2]])
    coeffs = rng.normal(0, 0.05, (200, 10))
    coeffs[:, 0] = 0.8
    v = vz.label_vector(x, vz.polynomial_exponents(3, 2))
    flux = v @ coeffs.T + rng.normal(0, 0.01, (300, 200))
    ivar = np.full_like(flux, 1e4)
    model = CannonModel(names, reciprocal_labels=["TEFF"]).train(flux[:250], ivar[:250],
                                                                 lab[:250])
    fast = model.fit(flux[250:], ivar[250:], debias=False)
    ref = fit_trf(model, flux[250:], ivar[250:])
    assert fast.ok.all()
    assert np.max(np.abs(fast.labels - ref.labels) / ref.errors) < 2e-3
    assert_allclose(fast.errors, ref.errors, rtol=1e-4)
    # the errors are honest: the pulls against the true labels have unit spread
    pull = (fast.labels - lab[250:]) / fast.errors
    assert np.all(np.abs(np.std(pull, axis=0) - 1) < 0.35), np.std(pull, axis=0)
    # SPARSE_TRAINING measures distances in the labels, not in 1/TEFF: the same stars
    # as for a plain model of the same training labels (theta would squeeze the hot end)
    plain = CannonModel(names).train(flux[:250], ivar[:250], lab[:250])
    probe = np.column_stack([np.linspace(3600, 5800, 40), np.full(40, 3.5), np.full(40, 0.4)])
    from cannon_fast.core.fitting import sparse_training
    flagged = sparse_training(model, probe)
    assert flagged.any() and not flagged.all()
    assert np.array_equal(flagged, sparse_training(plain, probe))


def test_refined_continuum_undoes_a_continuum_error(setup):
    """Spectra divided by a smooth error per chip: the refined fit recovers the labels
    the plain fit of the clean spectra gets; fit_cannon's two fits are one call."""
    from cannon_fast.core.continuum import renormalize_to_model
    model, _, test = setup
    n, p = test.flux.shape
    u = np.linspace(-1, 1, p)
    tilt = 1 + 0.06 * np.sin(np.arange(n))[:, None] * u[None, :] + 0.02 * (u * u)[None, :]
    flux, ivar = test.flux * tilt, test.ivar / tilt ** 2
    one_chip = [(0, p)]
    clean = model.fit(test.flux, test.ivar, debias=False)
    tilted = model.fit(flux, ivar, debias=False)
    # the correction, as fit_cannon makes it, but with this test's one "chip"
    from cannon_fast.core.fitting import fitted_spectra
    f2, iv2 = renormalize_to_model(flux, ivar, fitted_spectra(model, tilted),
                                   model_variance=model.s2, segments=one_chip)
    refined = model.fit(f2, iv2, debias=False)
    ok = clean.ok & tilted.ok & refined.ok
    off_tilted = np.abs(tilted.labels - clean.labels)[ok] / clean.errors[ok]
    off_refined = np.abs(refined.labels - clean.labels)[ok] / clean.errors[ok]
    assert np.median(off_tilted) > 1.0 and np.median(off_refined) < 0.2 * np.median(off_tilted), \
        (np.median(off_tilted), np.median(off_refined))
    # the continuum of a star without a fit is left alone
    nan_model = fitted_spectra(model, tilted)
    nan_model[0] = np.nan
    f3, iv3 = renormalize_to_model(flux, ivar, nan_model, segments=one_chip)
    assert_allclose(f3[0], flux[0])
    assert_allclose(iv3[0], ivar[0])
    with pytest.raises(ValueError, match="same"):
        renormalize_to_model(flux, ivar, nan_model[:, :-1])


@pytest.mark.parametrize("debias", [True, False])
def test_hit_bound_is_set_wherever_a_label_ends_on_a_bound(setup, debias):
    """Stars at the edge of the bounds: every label that ends on a bound is flagged,
    whether LM put it there or a de-biasing step (which pushes away from the training
    set's centre) did."""
    model, _, _ = setup
    lo, hi = model.label_bounds.T
    rng = np.random.default_rng(0)
    n = 400
    labels = np.tile(np.median(model.training_labels, axis=0), (n, 1))
    which, frac = rng.integers(0, 3, n), rng.uniform(0.97, 1.01, n)
    centre = np.median(model.training_labels, axis=0)
    labels[np.arange(n), which] = centre[which] + frac * (hi[which] - centre[which])
    flux = model.predict(labels) + rng.normal(size=(n, model.n_pixels)) / 20
    res = model.fit(flux, np.full_like(flux, 400.0), debias=debias)
    on_bound = np.any(np.isclose(res.labels, lo, rtol=1e-9, atol=1e-12)
                      | np.isclose(res.labels, hi, rtol=1e-9, atol=1e-12), axis=1)
    assert on_bound.sum() > 50
    flagged = (res.flags & FLAGS["HIT_BOUND"]) > 0
    assert np.all(flagged[on_bound]), res.labels[on_bound & ~flagged]


def test_flags_say_why_not_to_trust_a_star(setup):
    """A star outside the training labels, and one the model does not describe (a line
    list the model never saw), are flagged by default; the test set's stars mostly not."""
    model, train, test = setup
    res = model.fit(test.flux, test.ivar)
    limit = model.train_info["poor_fit_reduced_chi2"]
    assert 2.0 <= limit < 5.0
    assert np.mean(res.flags & (FLAGS["POOR_FIT"] | FLAGS["OUTSIDE_TRAINING"]) > 0) < 0.1
    assert np.mean(res.warn) < 0.2 and res.ok.all()
    lo, hi = model.training_labels.min(axis=0), model.training_labels.max(axis=0)
    beyond = np.median(model.training_labels, axis=0)
    beyond[1] = hi[1] + 0.1 * (hi[1] - lo[1])  # past the training range, inside the bounds
    odd = test.flux[0].copy()
    odd[::7] -= 0.2  # absorption the model has never seen
    flux = np.vstack([model.predict(beyond), odd])
    ivar = np.vstack([np.full(model.n_pixels, 1e4), test.ivar[0]])
    r = model.fit(flux, ivar)
    assert r.flag_names(0).count("OUTSIDE_TRAINING") == 1 and r.warn[0]
    assert "POOR_FIT" in r.flag_names(1) and r.reduced_chi2[1] > limit and r.warn[1]
    # a model file from before these records: no POOR_FIT, never an error
    del model.train_info["poor_fit_reduced_chi2"]
    try:
        assert "POOR_FIT" not in model.fit(flux, ivar).flag_names(1)
    finally:
        model.train_info["poor_fit_reduced_chi2"] = limit


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "numpy"])
def test_batches_in_concurrent_streams_give_the_one_stream_fit(setup, backend, monkeypatch):
    """Batches fitted by two single-threaded streams: the serial fit to the last bit.

    Also: the process's thread limits are put back, a bad value in a later batch is
    refused as in one stream, and two such fits started at once (one of them then runs
    as one stream) give the same results.
    """
    from concurrent.futures import ThreadPoolExecutor

    from cannon_fast.core import threads
    from cannon_fast.core.threads import kernel_threads, limited_threads

    model, _, test = setup
    model.fit(test.flux[:2], test.ivar[:2], backend=backend)  # numba: picks its threading layer
    monkeypatch.setattr(threads, "kernel_threads", lambda backend: 2)
    if backend == "numba":
        import numba
        if numba.threading_layer() not in ("omp", "tbb"):
            pytest.skip(f"numba's {numba.threading_layer()} layer: fits run as one stream")
    assert threads.stream_count(backend, 5) == 2 and threads.stream_count(backend, 1) == 1
    before = kernel_threads(backend)
    for options in (dict(), dict(debias=False), dict(exact_debias=True)):
        streams = model.fit(test.flux, test.ivar, batch_size=8, backend=backend, **options)
        assert kernel_threads(backend) == before
        with limited_threads(1):
            monkeypatch.setattr(threads, "kernel_threads", lambda backend: 1)
            one = model.fit(test.flux, test.ivar, batch_size=8, backend=backend, **options)
            monkeypatch.setattr(threads, "kernel_threads", lambda backend: 2)
        for name in ("labels", "errors", "covariance", "chi2", "flags", "iterations"):
            assert getattr(streams, name).tobytes() == getattr(one, name).tobytes(), name
    # the broadened fit's batches too (numpy and BLAS only)
    start = model.fit(test.flux, test.ivar, debias=False, backend=backend)
    monkeypatch.setattr(model, "backend", backend)  # streams follow the model's backend
    broad = fit_broadened(model, test.flux, test.ivar, start=start, batch_size=8)
    with limited_threads(1):
        monkeypatch.setattr(threads, "kernel_threads", lambda backend: 1)
        one = fit_broadened(model, test.flux, test.ivar, start=start, batch_size=8)
        monkeypatch.setattr(threads, "kernel_threads", lambda backend: 2)
    for name in ("labels", "errors", "broadening", "broadening_error", "chi2", "flags"):
        assert getattr(broad, name).tobytes() == getattr(one, name).tobytes(), name
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: model.fit(test.flux, test.ivar, batch_size=8,
                                                 backend=backend), range(2)))
    assert all(b.labels.tobytes() == both[0].labels.tobytes() for b in both)
    assert kernel_threads(backend) == before
    ivar = test.ivar.copy()
    ivar[33, 7:9] = -1.0
    with pytest.raises(ValueError, match=r"ivar has negative values at star 33 \(2 pixels"):
        model.fit(test.flux, ivar, batch_size=8, backend=backend)
    assert kernel_threads(backend) == before


def test_work_buffer_pool_holds_no_more_sets_than_were_in_use_at_once():
    """A set for another grid or a smaller batch is replaced, not kept beside the new one."""
    from cannon_fast.core.fitting import _BufferPool

    pool = _BufferPool()
    for batch, n_pix in ((64, 300), (32, 300), (64, 400), (128, 400), (16, 300)):
        with pool.take(batch, n_pix) as (w, wr):
            assert w.shape[0] >= batch and w.shape[1] == n_pix and wr.shape == w.shape
    assert len(pool._spare) == 1
    with pool.take(64, 300) as first, pool.take(64, 300) as second:  # two streams at once
        assert first[0] is not second[0]
    assert len(pool._spare) == 2
    with pool.take(32, 300) as again:  # reused, not made anew
        assert again[0] is first[0] or again[0] is second[0]
