"""CannonModel: training, s², prediction, gradients, file round trips and bad input."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from cannon_fast import CannonModel
from cannon_fast.core import vectorizer as vz
from cannon_fast.core.backends import available_backends
from cannon_fast.core._reference.literal import train_profile_grid
from cannon_fast.testing import make_synthetic


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_stars=400, n_pix=120, n_labels=3, seed=3, intrinsic_frac=0.4,
                          intrinsic_level=0.01)


@pytest.fixture(scope="module")
def trained(data):
    return CannonModel(data.label_names).train(data.flux, data.ivar, data.labels)


def test_shapes_and_metadata(trained, data):
    assert trained.theta.shape == (120, 10)
    assert trained.s2.shape == (120,)
    assert trained.theta_cov.shape == (120, 55)
    assert np.all(np.isfinite(trained.theta)) and np.all(trained.s2 >= 0)
    assert trained.n_labels == 3 and trained.n_terms == 10
    names = "['TEFF', 'LOGG', 'FE_H']"
    assert repr(trained) == (f"<CannonModel labels={names} order=2 T=10 "
                             f"backend={trained.backend!r} P=120, trained on N=400>")
    assert repr(CannonModel(data.label_names, backend="numpy")) == (
        f"<CannonModel labels={names} order=2 T=10 backend='numpy' untrained>")


def test_prediction_error_matches_theta_covariance(trained, data):
    """The model's error against the noise-free truth is what Cov(theta) predicts."""
    resid = trained.predict(data.labels) - data.true_flux  # (N, P)
    v = vz.label_vector(trained.scale_labels(data.labels), trained.exponents)
    cov = vz.unpack_symmetric(trained.theta_cov, trained.n_terms)  # (P, T, T)
    expected = np.einsum("nt,pts,ns->np", v, cov, v)
    good = slice(0, -1)
    ratio = np.sqrt(np.mean(resid[:, good] ** 2) / np.mean(expected[:, good]))
    assert 0.85 < ratio < 1.15
    noise = np.median(1 / np.sqrt(data.ivar[data.ivar > 0]))
    assert np.sqrt(np.mean(resid[:, good] ** 2)) < 0.25 * noise


def test_fully_masked_pixel_is_flagged_not_nan(trained):
    # the last pixel has ivar = 0 in every star (see make_synthetic)
    assert trained.pixel_flags[-1] & 1
    assert np.all(np.isfinite(trained.theta[-1])) and trained.s2[-1] == 0
    assert np.count_nonzero(trained.pixel_flags & 3) == 1


def test_every_fit_uses_the_same_pixels(trained, data):
    """One pixel rule (model.fitted_pixels) for the chi² fits, MCMC and the binary fit.

    TOO_FEW_STARS and SINGULAR pixels are left out; S2_UNRESOLVED is informational.
    """
    import copy

    from cannon_fast.lab.binaries import _BinaryProblem
    from cannon_fast.core.fitting import fit_generic
    from cannon_fast.lab.mcmc import log_likelihood_function
    from cannon_fast.core.model import PIXEL_FLAGS, fitted_pixels

    m = copy.deepcopy(trained)
    m.pixel_flags[3] |= PIXEL_FLAGS["TOO_FEW_STARS"]
    m.pixel_flags[4] |= PIXEL_FLAGS["SINGULAR"]
    m.pixel_flags[5] |= PIXEL_FLAGS["S2_UNRESOLVED"]
    use = fitted_pixels(m, m.n_pixels)
    assert not use[3] and not use[4] and use[5] and not use[-1] and use.sum() == 120 - 3
    flux, ivar = data.flux[:3], data.ivar[:3]
    n_used = ((ivar > 0) & use).sum(axis=1)
    assert_array_equal(m.fit(flux, ivar, debias=False).n_pixels, n_used)
    assert_array_equal(fit_generic(m, flux, ivar, n_starts=1).n_pixels, n_used)
    assert log_likelihood_function(m, flux[0], ivar[0])[1] == n_used[0]
    wave = np.linspace(15200.0, 15300.0, 120)
    prob = _BinaryProblem(m, flux[0], ivar[0], (), 0.5, np.arange(120.0), wave)
    assert prob.good.sum() == n_used[0]
    assert fitted_pixels(object(), 7).tolist() == [True] * 7  # no flags: every pixel


def test_s2_matches_the_literal_profile_likelihood_grid(data):
    """Fast alternating training vs the lab's algorithm (grid in s², theta re-solved)."""
    sub = slice(0, 40)
    model = CannonModel(data.label_names, backend="numpy")
    model.train(data.flux[:, sub], data.ivar[:, sub], data.labels, s2_rtol=1e-4)
    design = vz.label_vector(model.scale_labels(data.labels), model.exponents)
    theta_ref, s2_ref = train_profile_grid(design, data.flux[:, sub], data.ivar[:, sub])
    noise_var = np.median(1 / data.ivar[data.ivar > 0])
    resolved = s2_ref > 0.05 * noise_var
    assert resolved.sum() >= 5
    assert_allclose(model.s2[resolved], s2_ref[resolved], rtol=0.01)
    assert np.all(model.s2[s2_ref == 0] < 1e-3 * noise_var)
    assert_allclose(model.theta, theta_ref, atol=1e-4)


def test_s2_recovers_the_true_intrinsic_scatter(trained, data):
    noise = np.median(1 / np.sqrt(data.ivar[data.ivar > 0]))
    big = np.sqrt(data.s2_true) > 0.5 * noise
    ratio = np.sqrt(trained.s2[big] / data.s2_true[big])
    assert big.sum() >= 10
    assert 0.85 < np.median(ratio) < 1.1
    # pixels without intrinsic scatter mostly get (near) zero
    assert np.median(np.sqrt(trained.s2[data.s2_true == 0])) < 0.3 * noise


@pytest.mark.parametrize("backend", available_backends())
def test_training_diagnostics_match_their_definition(backend):
    """train_info's POOR_FIT limit and neighbour correlation, recomputed the plain way.

    600 stars: the POOR_FIT limit uses every star, the correlation every second one;
    a grid of two segments (no pair across the gap) and a pixel without data (unused).
    """
    from cannon_fast.core.grid import PixelGrid
    from cannon_fast.core.model import fitted_pixels

    d = make_synthetic(n_stars=600, n_pix=50, n_labels=3, seed=11, intrinsic_frac=0.5)
    flux = d.flux.copy()
    flux[:, 1:] += 0.3 * (flux[:, :-1] - d.true_flux[:, :-1])  # correlated neighbours
    grid = PixelGrid(np.linspace(15000.0, 15100.0, 50), segments=[(0, 22), (24, 50)])
    m = CannonModel(d.label_names, backend=backend, grid=grid).train(flux, d.ivar, d.labels)
    x = vz.label_vector(m.scale_labels(d.labels), m.exponents)
    r = flux - x @ m.theta.T
    w = np.where(d.ivar > 0, d.ivar / (1 + d.ivar * m.s2), 0.0)
    use = fitted_pixels(m, 50)
    assert not use[-1] and use.sum() == 49
    w[:, ~use] = 0.0
    chi2 = (w * r ** 2).sum(axis=1) / np.maximum((w > 0).sum(axis=1) - 3, 1)
    limit = max(2.0, 2.0 * np.percentile(chi2, 99))
    assert_allclose(m.train_info["poor_fit_reduced_chi2"], limit, rtol=1e-12)
    z, good = (r * np.sqrt(w))[::2], (w > 0)[::2]
    seg = grid.segment_of_pixel
    pair = good[:, :-1] & good[:, 1:] & (seg[:-1] == seg[1:]) & (seg[:-1] >= 0)
    a, b = z[:, :-1][pair], z[:, 1:][pair]
    rho = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
    assert 0.1 < rho < 0.5
    assert_allclose(m.train_info["neighbour_noise_correlation"], rho, rtol=1e-10)


@pytest.mark.parametrize("backend", available_backends())
def test_blocked_streamed_and_whole_pass_training_agree(backend, monkeypatch):
    """Pixel blocks one after another, the same blocks in concurrent streams, one block
    per pass (threads without streams): the same model, the first two to the last bit.

    Here blocks of 128 of 600 pixels, and a later pass gathered.
    """
    import cannon_fast.core.model as cm

    d = make_synthetic(n_stars=300, n_pix=600, n_labels=3, seed=12, intrinsic_frac=0.5)
    ivar = d.ivar.copy()
    ivar[:295, 5] = 0.0  # a pixel with too few stars
    monkeypatch.setattr(cm, "_pixel_block", lambda n_stars: 128)
    models = {}
    for mode, streams, threads in (("blocks", 1, 1), ("streams", 2, 1), ("whole", 1, 2)):
        monkeypatch.setattr(cm, "stream_count", lambda backend, n, k=streams: min(k, n))
        monkeypatch.setattr(cm, "kernel_threads", lambda backend, k=threads: k)
        models[mode] = CannonModel(d.label_names, backend=backend).train(d.flux, ivar,
                                                                         d.labels)
    a, b = models["blocks"], models["whole"]
    assert len(a.train_info["moving_pixels"]) >= 2 and a.train_info["moving_pixels"][0] > 50
    for name in ("theta", "s2", "theta_cov", "pixel_flags"):
        assert getattr(a, name).tobytes() == getattr(models["streams"], name).tobytes(), name
    assert a.train_info == models["streams"].train_info
    assert_array_equal(a.pixel_flags, b.pixel_flags)
    assert a.pixel_flags[5] != 0
    # the products' rounding differs between the two, and with it the s² search's path
    # within its tolerance (5e-5; the numpy reference's Brent search ends anywhere in it),
    # and theta where it was solved at that s²
    assert_allclose(a.s2, b.s2, rtol=1e-4, atol=1e-12)
    assert_allclose(a.theta, b.theta, rtol=1e-6, atol=1e-9)
    assert_allclose(a.theta_cov, b.theta_cov, rtol=1e-6, atol=1e-15)
    assert a.train_info["moving_pixels"] == b.train_info["moving_pixels"]
    for key in ("poor_fit_reduced_chi2", "neighbour_noise_correlation"):
        assert_allclose(a.train_info[key], b.train_info[key], rtol=1e-6)


def test_gradient_matches_finite_differences(trained, data):
    labels = data.labels[:3]
    grad = trained.gradient(labels)
    assert grad.shape == (3, 3, 120)
    for l, step in enumerate([1.0, 0.001, 0.001]):
        d = np.zeros(3)
        d[l] = step
        fd = (trained.predict(labels + d) - trained.predict(labels - d)) / (2 * step)
        assert_allclose(grad[:, l], fd, rtol=1e-6, atol=1e-9)
    flux, jac = trained.predict_with_jacobian(labels)
    assert_allclose(jac, np.swapaxes(grad, 1, 2))
    assert trained.predict(labels[0]).shape == (120,)


@pytest.mark.parametrize("n_labels,order", [(2, 3), (4, 1), (1, 2)])
def test_any_order_and_number_of_labels(n_labels, order):
    d = make_synthetic(n_stars=200, n_pix=30, n_labels=n_labels, seed=5)
    m = CannonModel(d.label_names, order=order).train(d.flux, d.ivar, d.labels)
    assert m.theta.shape == (30, vz.polynomial_exponents(n_labels, order).shape[0])
    r = m.fit(d.flux[:20], d.ivar[:20])
    assert r.labels.shape == (20, n_labels) and np.all(np.isfinite(r.labels))
    # round trip: the plain fit of the model's own noise-free spectra gives their labels back
    flux = m.predict(d.labels[:20])
    back = m.fit(flux, np.full_like(flux, 1e8), debias=False)
    assert np.all(back.ok)
    # to the fit's tolerance (xtol = 1e-6 in scaled labels, whose unit is half a label's range)
    off = np.abs(back.labels - d.labels[:20]) / np.ptp(d.labels, axis=0)
    assert off.max() < 1e-4, off.max(axis=0)


def test_theta_is_the_weighted_least_squares_solution_at_the_final_s2():
    """Even when one star has a pixel of enormous variance (a real-data case).

    Such a pixel once ruled the convergence threshold of s², so that no pixel was
    re-solved after s² = 0: theta was the unweighted-by-s² solution.
    """
    d = make_synthetic(n_stars=300, n_pix=200, n_labels=3, seed=9, masked_pixel=False)
    ivar = d.ivar.copy()
    ivar[0, 7] = 1e-12  # star 0, pixel 7: sigma = 1e6
    m = CannonModel(d.label_names).train(d.flux, ivar, d.labels)
    assert (m.s2 > 0).sum() > 30 and len(m.train_info["moving_pixels"]) >= 2
    x = vz.label_vector(m.scale_labels(d.labels), m.exponents)
    for p in np.flatnonzero(m.s2 > 0):
        w = np.where(ivar[:, p] > 0, 1.0 / (1.0 / np.maximum(ivar[:, p], 1e-300) + m.s2[p]), 0.0)
        direct = np.linalg.solve(x.T @ (w[:, None] * x), x.T @ (w * d.flux[:, p]))
        chi2 = [np.sum(w * (d.flux[:, p] - x @ t) ** 2) for t in (m.theta[p], direct)]
        # theta was solved at an s² within s2_rtol (1 %) of the final one
        assert chi2[0] <= chi2[1] * (1 + 1e-3), (p, chi2)


def test_extra_terms_fit_what_the_quadratic_cannot(tmp_path):
    """A TEFF³ dependence: the quadratic leaves it in the residuals, quadratic + TEFF^3 does not."""
    d = make_synthetic(n_stars=400, n_pix=60, n_labels=3, seed=6, intrinsic_frac=0.0,
                       bad_frac=0.0, masked_pixel=False)
    x = (d.labels - d.labels.mean(axis=0)) / d.labels.std(axis=0)
    cubic = 0.02 * np.random.default_rng(7).uniform(0.5, 1.0, 60)  # per-pixel TEFF³ coefficient
    flux = d.true_flux + x[:, :1] ** 3 * cubic  # noise-free: only the model's form matters
    ivar = np.full_like(flux, 1e6)
    train, test = slice(0, 300), slice(300, None)
    rms = {}
    for extra in ((), ("TEFF^3",)):
        m = CannonModel(d.label_names, extra_terms=extra).train(flux[train], ivar[train],
                                                              d.labels[train])
        rms[extra] = np.sqrt(np.mean((m.predict(d.labels[test]) - flux[test]) ** 2))
    assert rms[("TEFF^3",)] < 0.05 * rms[()], rms
    assert m.n_terms == 11 and m.term_names[-1] == "TEFF*TEFF*TEFF"
    for suffix in (".npz", ".fits"):
        m.write(tmp_path / f"m{suffix}")
        back = CannonModel.read(tmp_path / f"m{suffix}")
        assert back.extra_terms == m.extra_terms
        assert_array_equal(back.predict(d.labels[test]), m.predict(d.labels[test]))


@pytest.mark.parametrize("terms, match", [
    (["TEFF^2"], "already in the model"), (["TEFF^3", "TEFF*TEFF*TEFF"], "listed twice"),
    (["MASS^3"], "unknown label 'MASS'"), (["TEFF^0"], "positive integer"),
    ([[1, 2]], "3 non-negative integer exponents")])
def test_bad_extra_terms(terms, match):
    with pytest.raises(ValueError, match=match):
        CannonModel(["TEFF", "LOGG", "FE_H"], extra_terms=terms)


@pytest.mark.parametrize("suffix", [".npz", ".fits"])
def test_write_read_round_trip_is_exact(trained, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    trained.write(path)
    back = CannonModel.read(path)
    for name in ("theta", "s2", "theta_cov", "pixel_flags", "label_offsets", "label_scales",
                 "training_labels", "exponents"):
        assert_array_equal(getattr(back, name), getattr(trained, name))
    assert back.label_names == trained.label_names and back.order == trained.order
    assert back.training_hash == trained.training_hash
    assert back.train_info["trained_with_backend"] == trained.backend
    labels = trained.training_labels[:4]
    assert_array_equal(back.predict(labels), trained.predict(labels))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.write(path)
    trained.write(path, overwrite=True)


def test_npz_needs_no_pickle(trained, tmp_path):
    path = tmp_path / "m.npz"
    trained.write(path)
    with np.load(path, allow_pickle=False) as f:
        assert "theta" in f.files and "meta" in f.files


def test_interrupted_write_leaves_the_old_file(trained, tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    trained.write(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        trained.write(path, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left behind


def test_read_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a cannon_fast model"):
        CannonModel.read(bad)
    with pytest.raises(FileNotFoundError, match="no model file"):
        CannonModel.read(tmp_path / "missing.fits")


def _rewrite(src, dst, meta=None, **arrays):
    """A copy of the model file ``src`` at ``dst`` with metadata items and arrays replaced."""
    import json
    with np.load(src, allow_pickle=False) as f:
        d = {k: f[k] for k in f.files}
    m = json.loads(str(d.pop("meta")))
    m.update(meta or {})
    d.update(arrays)
    np.savez(dst, meta=np.array(json.dumps(m)), **{k: v for k, v in d.items() if v is not None})
    return dst


@pytest.mark.parametrize("meta,arrays,why", [
    ({"order": 400}, {}, "order 400 with 0 extra term.s. does not make the 10 stored terms"),
    ({"order": 3}, {}, "order 3 with 0 extra"),
    ({"order": "2"}, {}, "order must be an integer >= 1, got '2'"),
    ({"label_names": None}, {}, "label_names must be a non-empty list of names, got None"),
    ({"label_names": []}, {}, "label_names must be a non-empty list"),
    ({"label_names": ["A", 2, "C"]}, {}, "label_names must be a non-empty list"),
    ({}, {"theta": np.zeros((120, 9))}, r"theta has shape \(120, 9\), expected \(P, 10\)"),
    ({}, {"s2": np.zeros(119)}, r"s2 has shape \(119,\), expected \(120,\)"),
    ({}, {"theta_cov": np.zeros((120, 10, 10))}, r"theta_cov has shape \(120, 10, 10\)"),
    ({}, {"training_labels": np.zeros((0, 3))}, r"training_labels have shape \(0, 3\)"),
    ({}, {"exponents": np.zeros((10, 2), np.int64)}, r"exponents have shape \(10, 2\)"),
    ({}, {"label_scales": None}, r"missing array\(s\) \['label_scales'\]"),
    ({}, {"theta": np.array(["x"] * 10)}, "theta has dtype <U1, not numbers"),
])
def test_read_refuses_inconsistent_files(trained, tmp_path, meta, arrays, why):
    """Metadata and arrays are checked against each other before anything is built."""
    good = tmp_path / "good.npz"
    trained.write(good)
    bad = _rewrite(good, tmp_path / "bad.npz", meta, **arrays)
    with pytest.raises(ValueError, match=rf"bad.npz: corrupt model file: {why}"):
        CannonModel.read(bad)


def test_read_refuses_truncated_files(trained, tmp_path):
    """A truncated .npz or .fits is a ValueError naming the file, at every length."""
    for suffix in (".npz", ".fits"):
        good = tmp_path / f"good{suffix}"
        trained.write(good)
        raw = good.read_bytes()
        for frac in (0.1, 0.5, 0.9, 0.999):
            bad = tmp_path / f"cut{suffix}"
            bad.write_bytes(raw[:int(len(raw) * frac)])
            with pytest.raises(ValueError, match=rf"cut{suffix}"):
                CannonModel.read(bad)


def test_untrained_model_says_so():
    with pytest.raises(RuntimeError, match="not trained"):
        CannonModel(["A"]).predict([1.0])


# ---------------------------------------------------------------------- bad input
def _small():
    return make_synthetic(n_stars=60, n_pix=20, n_labels=2, seed=9, masked_pixel=False)


def test_nan_flux_where_ivar_positive_names_star_and_pixel():
    d = _small()
    d.flux[7, 3:5] = np.nan
    with pytest.raises(ValueError, match=r"flux is NaN/inf where ivar > 0 at star 7 \(2 pixels, 3-4\)"):
        CannonModel(d.label_names).train(d.flux, d.ivar, d.labels)


def test_nan_flux_where_masked_is_fine():
    d = _small()
    d.flux[7, 3] = np.nan
    d.ivar[7, 3] = 0
    m = CannonModel(d.label_names).train(d.flux, d.ivar, d.labels)
    assert np.all(np.isfinite(m.theta))


@pytest.mark.parametrize("value,match", [(np.nan, "non-finite"), (-1.0, "negative")])
def test_bad_ivar(value, match):
    d = _small()
    d.ivar[2, 5] = value
    with pytest.raises(ValueError, match=f"ivar has {match} values at star 2"):
        CannonModel(d.label_names).train(d.flux, d.ivar, d.labels)


def test_shape_mismatches():
    d = _small()
    m = CannonModel(d.label_names)
    with pytest.raises(ValueError, match="shapes differ"):
        m.train(d.flux, d.ivar[:, :-1], d.labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(N, L\) = \(60, 2\)"):
        m.train(d.flux, d.ivar, d.labels[:, :1])


def test_missing_label_names_star_and_label():
    d = _small()
    d.labels[11, 1] = np.nan
    with pytest.raises(ValueError, match="star 11 label LOGG"):
        CannonModel(d.label_names).train(d.flux, d.ivar, d.labels)


def test_all_masked_star_and_empty_set():
    d = _small()
    d.ivar[4] = 0
    with pytest.raises(ValueError, match=r"masked at every pixel \(ivar = 0\): star 4"):
        CannonModel(d.label_names).train(d.flux, d.ivar, d.labels)
    with pytest.raises(ValueError, match="training set is empty"):
        CannonModel(d.label_names).train(d.flux[:0], d.ivar[:0], d.labels[:0])


def test_degenerate_labels():
    d = _small()
    const = d.labels.copy()
    const[:, 1] = 2.5
    with pytest.raises(ValueError, match=r"label\(s\) \['LOGG'\] are constant"):
        CannonModel(d.label_names).train(d.flux, d.ivar, const)
    collinear = np.column_stack([d.labels[:, 0], 2 * d.labels[:, 0] + 1])
    with pytest.raises(ValueError, match="collinear"):
        CannonModel(d.label_names).train(d.flux, d.ivar, collinear)
    with pytest.raises(ValueError, match="6 terms per pixel"):
        CannonModel(d.label_names).train(d.flux[:4], d.ivar[:4], d.labels[:4])


def test_pixel_with_too_few_stars_is_flagged():
    d = _small()
    d.ivar[3:, 0] = 0  # only 3 stars see pixel 0
    m = CannonModel(d.label_names).train(d.flux, d.ivar, d.labels)
    assert m.pixel_flags[0] & 1 and not np.any(m.pixel_flags[1:] & 3)
    assert np.all(np.isfinite(m.theta[0])) and m.theta[0, 1:].tolist() == [0.0] * 5


def test_unknown_backend_and_duplicate_labels():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        CannonModel(["A"], backend="cuda")
    with pytest.raises(ValueError, match="unique"):
        CannonModel(["A", "A"])


def test_env_override_picks_backend(monkeypatch):
    monkeypatch.setenv("CANNON_FAST_BACKEND", "numpy")
    assert CannonModel(["A"]).backend == "numpy"
    for name in available_backends():  # it overrides "auto" only: an explicit request wins
        assert CannonModel(["A"], backend=name).backend == name


def test_expected_true_labels_undo_the_attenuation():
    from cannon_fast.core.model import expected_true_labels
    rng = np.random.default_rng(3)
    n = 20000
    true = rng.multivariate_normal([4500.0, 2.5], [[300.0 ** 2, 0.8 * 300 * 0.6],
                                                   [0.8 * 300 * 0.6, 0.6 ** 2]], n)
    err = np.column_stack([rng.uniform(30, 200, n), rng.uniform(0.05, 0.4, n)])
    noisy = true + err * rng.standard_normal((n, 2))
    exp = expected_true_labels(noisy, err, ["TEFF", "LOGG"])
    for j in range(2):
        slope_noisy = np.polyfit(noisy[:, j], true[:, j], 1)[0]
        slope_exp = np.polyfit(exp[:, j], true[:, j], 1)[0]
        assert slope_noisy < 0.93 and abs(slope_exp - 1) < 0.02, (slope_noisy, slope_exp)
        assert np.std(exp[:, j] - true[:, j]) < 0.9 * np.std(noisy[:, j] - true[:, j])
    with pytest.raises(ValueError, match="as large as the spread.*LOGG"):
        expected_true_labels(noisy, err * [1, 10], ["TEFF", "LOGG"])


def test_training_with_label_errors_recovers_the_true_label_scale():
    """Noisy training labels attenuate the model and stretch the fitted labels; training
    with their errors recovers most of the precision of training on the truth."""
    s = make_synthetic(n_stars=700, n_pix=800, n_labels=3, seed=21)
    rng = np.random.default_rng(5)
    tr, te = slice(0, 400), slice(400, 700)
    spread = s.labels[tr].std(0)
    err = spread * rng.uniform(0.1, 0.4, (400, 3))
    noisy = s.labels[tr] + err * rng.standard_normal((400, 3))
    scatter = {}
    for name, e in (("plain", None), ("errors", err)):
        m = CannonModel(s.label_names).train(s.flux[tr], s.ivar[tr], noisy, label_errors=e)
        scatter[name] = (m.fit(s.flux[te], s.ivar[te]).labels - s.labels[te]).std(0) / spread
    assert np.all(scatter["errors"] < 0.85 * scatter["plain"]), scatter
    np.testing.assert_array_equal(m.training_labels, noisy)  # ranges stay the catalogue's
    assert set(m.train_info["label_errors"]) == {"median_error", "median_shift"}
    bad = err.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"star 7 LOGG_ERR = nan"):
        CannonModel(s.label_names).train(s.flux[tr], s.ivar[tr], noisy, label_errors=bad)
    with pytest.raises(ValueError, match="shape of labels"):
        CannonModel(s.label_names).train(s.flux[tr], s.ivar[tr], noisy, label_errors=err[:, :2])


def test_expected_true_labels_do_not_pull_a_minority_onto_the_main_locus():
    """A tight giant branch and a few stars off it (as dwarfs or halo giants): one Gaussian
    prior drags the few toward the branch; the deconvolved mixture does not."""
    from cannon_fast.core.model import expected_true_labels
    rng = np.random.default_rng(4)
    t_main = rng.uniform(4000, 5000, 2000)
    main = np.column_stack([t_main, 2.5 + (t_main - 4500) / 400 + rng.normal(0, 0.08, 2000)])
    few = np.column_stack([rng.normal(5600, 80, 60), rng.normal(3.6, 0.1, 60)])
    true = np.vstack([main, few])
    err = np.column_stack([rng.uniform(40, 80, len(true)), rng.uniform(0.05, 0.1, len(true))])
    noisy = true + err * rng.standard_normal(true.shape)
    one = expected_true_labels(noisy, err, max_components=1)
    mix = expected_true_labels(noisy, err)
    k = slice(2000, None)
    bias_one = np.median(one[k] - true[k], axis=0)
    bias_mix = np.median(mix[k] - true[k], axis=0)
    assert bias_one[0] < -20  # toward the branch, as measured on the mock survey
    assert np.all(np.abs(bias_mix) < 0.35 * np.abs(bias_one)), (bias_one, bias_mix)
    # and the main locus is no worse
    for lab in (one, mix):
        assert np.std(lab[:2000, 0] - true[:2000, 0]) < np.std(noisy[:2000, 0] - true[:2000, 0])


def test_expected_true_labels_of_a_small_sample_are_the_gaussian_formula():
    """Too few stars for a mixture (5 labels, 40 stars): mu + S (S + E_n)^-1 (l_n - mu)."""
    from cannon_fast.core.model import expected_true_labels
    rng = np.random.default_rng(6)
    labels = rng.normal(0, 1, (40, 5))
    err = rng.uniform(0.1, 0.3, (40, 5))
    mu = labels.mean(0)
    s = np.cov(labels, rowvar=False) - np.diag((err ** 2).mean(0))
    want = np.array([mu + s @ np.linalg.solve(s + np.diag(e ** 2), lab - mu)
                     for lab, e in zip(labels, err)])
    np.testing.assert_allclose(expected_true_labels(labels, err), want, rtol=1e-10, atol=1e-12)


def _theta_spectra(teff, logg, feh, n_pix, seed):
    """Spectra exactly quadratic in theta = 5040 / Teff (and in logg, [Fe/H])."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([5040.0 / teff - 1.0, (logg - 2.5) / 2, feh])
    v = vz.label_vector(x, vz.polynomial_exponents(3, 2))
    coeffs = rng.normal(0, 0.05, (n_pix, v.shape[1]))
    coeffs[:, 0] = 0.8
    return v @ coeffs.T


def test_reciprocal_label_model(tmp_path):
    """A model in 1/TEFF: exact for spectra quadratic in 5040/Teff, where the plain
    quadratic in Teff is not; gradients, label derivatives and a file round trip."""
    rng = np.random.default_rng(5)
    n, p, names = 600, 60, ["TEFF", "LOGG", "FE_H"]
    lab = np.column_stack([rng.uniform(3600, 6000, n), rng.uniform(0.5, 4.5, n),
                           rng.uniform(-1, 0.4, n)])
    flux = _theta_spectra(*lab.T, p, seed=1)
    noisy = flux + rng.normal(0, 1e-3, flux.shape)
    ivar = np.full_like(flux, 1e6)
    rec = CannonModel(names, reciprocal_labels=["TEFF"]).train(noisy, ivar, lab)
    plain = CannonModel(names).train(noisy, ivar, lab)
    assert rec.reciprocal_labels == ["TEFF"] and "1/TEFF" in repr(rec)
    err_rec = np.std(rec.predict(lab) - flux)
    err_plain = np.std(plain.predict(lab) - flux)
    # the reciprocal model is off by its noise-propagated error only (1e-3 / sqrt(N / T))
    assert err_rec < 2e-4 and err_plain > 4 * err_rec, (err_rec, err_plain)
    # scaled <-> physical and d label / d x
    x = rec.scale_labels(lab[:5])
    assert_allclose(rec.unscale_labels(x), lab[:5], rtol=1e-12)
    h = 1e-6
    for j in range(3):
        step = np.zeros(3)
        step[j] = h
        num = (rec.unscale_labels(x + step) - rec.unscale_labels(x - step))[:, j] / (2 * h)
        assert_allclose(rec.label_derivatives(x)[:, j], num, rtol=1e-6)
    # the gradient spectra are in physical labels
    grad = rec.gradient(lab[:3])
    for j in range(3):
        step = np.zeros(3)
        step[j] = 1e-4 * np.ptp(lab[:, j])
        num = (rec.predict(lab[:3] + step) - rec.predict(lab[:3] - step)) / (2 * step[j])
        assert_allclose(grad[:, j], num, rtol=1e-5, atol=1e-9)
    # fit bounds stay ordered and the Teff bound stays positive
    lo, hi = rec.scaled_label_bounds
    assert np.all(lo < hi) and np.all(rec.label_bounds[:, 0] < rec.label_bounds[:, 1])
    assert rec.label_bounds[0, 0] > 0
    rec.write(tmp_path / "rec.npz")
    back = CannonModel.read(tmp_path / "rec.npz")
    assert back.reciprocal_labels == ["TEFF"]
    assert_allclose(back.predict(lab[:4]), rec.predict(lab[:4]), rtol=0, atol=0)


def test_reciprocal_label_bad_input():
    with pytest.raises(ValueError, match="not among the labels"):
        CannonModel(["TEFF", "LOGG"], reciprocal_labels=["THETA"])
    lab = np.column_stack([np.linspace(-1, 1, 40), np.linspace(0, 1, 40)])
    flux = np.ones((40, 10)) + 0.01 * lab[:, :1]
    with pytest.raises(ValueError, match="TEFF of training star 0 is -1.0.*positive"):
        CannonModel(["TEFF", "LOGG"], reciprocal_labels=["TEFF"]).train(
            flux, np.ones_like(flux), lab)
    with pytest.raises(ValueError, match="positive"):
        CannonModel(["TEFF", "LOGG"], reciprocal_labels=["TEFF"]).train(
            flux, np.ones_like(flux), lab, label_errors=np.full_like(lab, 0.1))


@pytest.mark.parametrize("placeholder", [-9999.0, -999.0])
def test_train_refuses_a_missing_value_placeholder(placeholder):
    """One -9999 in FE_H would make its range [-12499, 2500] and move every fit."""
    s = make_synthetic(n_stars=60, n_pix=40, n_labels=3, seed=5)
    labels = s.labels.copy()
    labels[7, 2] = placeholder
    with pytest.raises(ValueError, match=f"placeholder {placeholder:g} as a label, e.g. star 7 "
                                         "FE_H"):
        CannonModel(s.label_names).train(s.flux, s.ivar, labels)


def test_train_refuses_a_label_without_spread():
    s = make_synthetic(n_stars=60, n_pix=40, n_labels=3, seed=5)
    labels = s.labels.copy()
    labels[:, 1] = 2.5 + 1e-12 * np.arange(60)
    with pytest.raises(ValueError, match=r"\['LOGG'\] are constant"):
        CannonModel(s.label_names).train(s.flux, s.ivar, labels)
