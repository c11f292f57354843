"""The batched binary screen (core.binaries): against a plain per-star reference, and
recovery of injected composites with their primaries' labels."""
import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast.core import binaries as cb
from cannon_fast.core._common import fitted_pixels
from cannon_fast.testing import make_synthetic


@pytest.fixture(scope="module")
def setup():
    tr = make_synthetic(n_stars=500, n_pix=800, n_labels=3, seed=41, bad_frac=0.0,
                        masked_pixel=False)
    m = CannonModel(tr.label_names, grid=tr.grid).train(tr.flux, tr.ivar, tr.labels)
    n = 160
    te = make_synthetic(n_stars=2 * n, n_pix=800, n_labels=3, seed=42, bad_frac=0.0,
                        masked_pixel=False, coeffs=tr.coeffs, s2_true=tr.s2_true,
                        snr=(150.0, 250.0))
    # half of the stars get a companion: 30 % of the light, 30 km/s away, on the grid
    # of labels the model knows (a hotter, higher-gravity star of the same metallicity)
    prim, sec = te.labels[:n], te.labels[n:].copy()
    sec[:, 0] = np.clip(prim[:, 0] + 400, None, 5600)
    sec[:, 1] = np.clip(prim[:, 1] + 0.8, None, 3.9)
    sec[:, 2] = prim[:, 2]
    wave = tr.grid.wavelength
    f2 = m.predict(sec)
    shifted = np.stack([np.interp(wave / (1 + 30.0 / cb.C_KMS), wave, f) for f in f2])
    w = 0.3
    is_b = np.zeros(2 * n, bool)
    is_b[:n // 2] = True
    k = np.flatnonzero(is_b)
    flux = te.flux.copy()
    noise = te.flux - te.true_flux
    flux[k] = (1 - w) * te.true_flux[k] + w * shifted[k] + noise[k]
    return m, flux, te.ivar, te.labels, is_b


def _reference_delta_chi2(m, flux, ivar, labels, max_weight=0.6):
    """Per star and template, the two-parameter least squares in float64, by loops."""
    use = fitted_pixels(m, m.n_pixels)
    inner = m.grid.inner_pixels()
    pairs = cb._secondary_grid(m, 8, 6)
    vels = np.arange(-40.0, 41.0, 4.0)
    out = []
    for f, iv, lab in zip(flux, ivar, labels):
        m1 = m.predict(lab[None])[0]
        g = np.zeros_like(m1)
        g[1:-1] = (m1[2:] - 2 * m1[1:-1] + m1[:-2]) * inner[1:-1]
        w_ = (iv / (1 + iv * m.s2))[use]
        r, g = (f - m1)[use], g[use]
        chi2_b = np.sum(w_ * r * r) - np.sum(w_ * g * r) ** 2 / np.sum(w_ * g * g)
        rchi2 = max(chi2_b / (use.sum() - len(lab) - 1), 1.0)
        lab2 = np.repeat(lab[None], len(pairs), axis=0)
        lab2[:, 0], lab2[:, 1] = pairs[:, 0], pairs[:, 1]
        best = 0.0
        for s in cb._shifted(m.predict(lab2), m.grid.wavelength, vels):
            d = (s - m1)[use]
            # chi2 of the broadened single star minus that of the broadened composite
            # with w clipped to [0, max_weight] (beta free)
            A = np.array([[np.sum(w_ * d * d), np.sum(w_ * d * g)],
                          [np.sum(w_ * d * g), np.sum(w_ * g * g)]])
            y = np.array([np.sum(w_ * d * r), np.sum(w_ * g * r)])
            wt = np.clip(np.linalg.solve(A, y)[0], 0, max_weight)
            beta = (y[1] - wt * A[0, 1]) / A[1, 1]
            resid = r - wt * d - beta * g
            best = max(best, (chi2_b - np.sum(w_ * resid * resid)) / rchi2)
        out.append(best)
    return np.array(out)


def test_batched_screen_matches_the_plain_reference(setup):
    m, flux, ivar, labels, _ = setup
    rows = np.arange(6)   # one [Fe/H] group each, so the templates are at the star's labels
    lab = labels[rows]
    got = np.array([cb.screen_binaries(m, flux[[i]], ivar[[i]], lab[[k]], n_refine=0)
                    .delta_chi2[0] for k, i in enumerate(rows)])
    ref = _reference_delta_chi2(m, flux[rows], ivar[rows], lab)
    np.testing.assert_allclose(got, ref, rtol=2e-3)


def test_screen_flags_composites_and_corrects_their_primaries(setup):
    m, flux, ivar, labels, is_b = setup
    single = m.fit(flux, ivar, debias=False)
    scr = cb.screen_binaries(m, flux, ivar, single.labels)
    assert np.mean(scr.flagged[is_b]) >= 0.9
    assert np.mean(scr.flagged[~is_b]) <= 0.03
    f = scr.flagged & is_b
    # the companion's light share and velocity are found
    assert abs(np.median(scr.weight[f]) - 0.3) < 0.1
    assert abs(np.median(scr.velocity[f]) - 30.0) <= 4.0
    # the composite fit's primary labels are closer to the truth than the single fit's
    err_single = np.abs(single.labels[f] - labels[f]) / np.std(labels, axis=0)
    err_comp = np.abs(scr.primary_labels[f] - labels[f]) / np.std(labels, axis=0)
    assert np.median(err_comp) < 0.5 * np.median(err_single)
    cols = scr.columns(m.label_names)
    assert {"BINARY_FLAG", "BINARY_PRIMARY_TEFF", "BINARY_DELTA_CHI2"} <= set(cols)
    assert np.all(np.isnan(cols["BINARY_PRIMARY_TEFF"][~scr.flagged]))


def test_screen_refuses_what_it_cannot_do(setup):
    m, flux, ivar, labels, _ = setup
    with pytest.raises(ValueError, match="do not match"):
        cb.screen_binaries(m, flux[:, :-1], ivar[:, :-1], labels)
    nogrid = CannonModel(m.label_names)
    nogrid.__dict__.update({k: v for k, v in m.__dict__.items() if k != "grid"})
    nogrid.grid = None
    with pytest.raises(ValueError, match="pixel grid"):
        cb.screen_binaries(nogrid, flux, ivar, labels)
    # a star whose single fit failed (NaN labels) is skipped, not flagged
    lab = labels[:4].copy()
    lab[1] = np.nan
    scr = cb.screen_binaries(m, flux[:4], ivar[:4], lab)
    assert not scr.flagged[1] and np.isnan(scr.delta_chi2[1])


def _draw(seed, n):
    """High-S/N stars of the fixture's training model (the same truth, seed 41)."""
    tr = make_synthetic(n_stars=500, n_pix=800, n_labels=3, seed=41, bad_frac=0.0,
                        masked_pixel=False)
    return make_synthetic(n_stars=n, n_pix=800, n_labels=3, seed=seed, bad_frac=0.0,
                          masked_pixel=False, coeffs=tr.coeffs, s2_true=tr.s2_true,
                          snr=(200.0, 300.0))


def _composite(m, te, sec_flux, w_v, is_b):
    """Spectra of ``te`` with a secondary ``sec_flux`` at velocities {v: light share}."""
    wave = m.grid.wavelength
    flux = te.flux.copy()
    noise = te.flux - te.true_flux
    for k in np.flatnonzero(is_b):
        s = sum(w * np.interp(wave / (1 + v / cb.C_KMS), wave, sec_flux[k])
                for v, w in w_v.items())
        flux[k] = (1 - sum(w_v.values())) * te.true_flux[k] + s + noise[k]
    return flux


def test_joint_step_matches_the_plain_nnls(setup):
    """The batched step (normal matrices, Cholesky) solves the problem a direct NNLS does."""
    from scipy.optimize import nnls

    m, flux, ivar, labels, is_b = setup
    rows = np.flatnonzero(is_b)[:4]
    single = m.fit(flux[rows], ivar[rows], debias=False).labels
    sc = cb._Scorer(m, flux, ivar, cb._secondary_grid(m, 8, 6), np.arange(-40.0, 41.0, 4.0),
                    0.6, 0.1)
    group = sc.groups(labels)
    tmpl = {g: sc.templates(labels[rows][group[rows] == g][0]) for g in np.unique(group[rows])}
    best = np.zeros(len(labels), np.int64)
    best[rows] = 7
    use, K, L = sc.use, len(sc.pairs), m.n_labels
    S_all = np.stack([tmpl[group[i]][0][best[i] % K::K] + tmpl[group[i]][1]
                      for i in rows]).astype(np.float64)
    # two extra signed columns, as the continuous secondary's label derivatives (a
    # hotter star's, 28 km/s away)
    wave = m.grid.wavelength
    X = np.stack([[np.interp(wave / (1 + 28.0 / cb.C_KMS), wave, d)[use] for d in gr[:2]]
                  for gr in m.gradient(single + np.array([400.0, 0.8, 0.0]))])
    got_lab, got_sec, got_w, _, got_x = cb._composite_step(sc, rows, single,
                                                            np.zeros(len(rows)), S_all, extra=X)
    for a, i in enumerate(rows):
        S = S_all[a]
        m1 = m.predict(single[a])
        g = np.zeros_like(m1)
        g[1:-1] = (m1[2:] - 2 * m1[1:-1] + m1[:-2]) * sc.inner[1:-1]
        J = m.gradient(single[a])[:, use]
        iv = ivar[i, use]
        sw = np.sqrt(iv / (1 + iv * sc.s2))
        D = np.vstack([S - m1[use], g[use], -g[use], J, -J, X[a], -X[a]]).T * sw[:, None]
        coef, _ = nnls(D, (flux[i, use] - m1[use]) * sw, maxiter=5000)
        V = len(S)
        step = coef[V + 2:V + 2 + L] - coef[V + 2 + L:V + 2 + 2 * L]
        x_step = coef[V + 2 + 2 * L:V + 4 + 2 * L] - coef[V + 4 + 2 * L:]
        # (the light share capped at max_weight after the solve, keeping it a secondary)
        np.testing.assert_allclose(got_w[a], min(coef[:V].sum(), 0.6), rtol=1e-4, atol=1e-6)
        # a thousandth of each label's spread (the fits' errors are ~100x that)
        assert np.all(np.abs(got_lab[a] - (single[a] + step)) < 1e-3 * np.std(labels, axis=0))
        assert np.all(np.abs(got_x[a] - x_step) < 1e-3 * np.std(labels, axis=0)[:2])


def test_light_spread_over_velocities_is_recovered(setup):
    """A combined spectrum of visits at two orbital phases: both halves of the light count."""
    m, _, _, _, _ = setup
    te = _draw(52, 60)
    sec = te.labels.copy()
    sec[:, 0] = np.clip(sec[:, 0] + 400, None, 5600)
    sec[:, 1] = np.clip(sec[:, 1] + 0.8, None, 3.9)
    is_b = np.ones(len(sec), bool)
    flux = _composite(m, te, m.predict(sec), {-20.0: 0.15, 24.0: 0.15}, is_b)
    single = m.fit(flux, te.ivar, debias=False)
    scr = cb.screen_binaries(m, flux, te.ivar, single.labels)
    f = scr.flagged
    assert f.mean() >= 0.9
    # one velocity would catch about half the light (0.15)
    assert abs(np.median(scr.weight[f]) - 0.3) < 0.1
    scale = np.std(te.labels, axis=0)
    err_single = np.abs(single.labels[f] - te.labels[f]) / scale
    err_comp = np.abs(scr.primary_labels[f] - te.labels[f]) / scale
    assert np.median(err_comp) < 0.5 * np.median(err_single)


def test_a_secondary_model_makes_companions_the_model_cannot(setup):
    """Companions from another star family: the primaries come right only with its model."""
    m, _, _, _, _ = setup
    # the same lines, their strengths changed line by line (as gravity-sensitive lines
    # differ between dwarfs and giants): spectra no label of the giants' model gives
    tr = make_synthetic(n_stars=500, n_pix=800, n_labels=3, seed=41, bad_frac=0.0,
                        masked_pixel=False)
    u = np.random.default_rng(77).uniform(0.4, 1.6, 800)
    other = make_synthetic(n_stars=400, n_pix=800, n_labels=3, seed=77, bad_frac=0.0,
                           masked_pixel=False, coeffs=tr.coeffs * u[:, None],
                           s2_true=tr.s2_true)
    dwarfs = CannonModel(other.label_names, grid=other.grid).train(other.flux, other.ivar,
                                                                   other.labels)
    te = _draw(53, 60)
    sec = other.labels[:60].copy()
    sec[:, 2] = te.labels[:, 2]
    is_b = np.ones(60, bool)
    flux = _composite(m, te, dwarfs.predict(sec), {30.0: 0.3}, is_b)
    single = m.fit(flux, te.ivar, debias=False)
    own = cb.screen_binaries(m, flux, te.ivar, single.labels)
    with_sec = cb.screen_binaries(m, flux, te.ivar, single.labels, secondary_model=dwarfs)
    np.testing.assert_array_equal(own.flagged, with_sec.flagged)   # the flag is the model's
    f = with_sec.flagged
    assert f.mean() >= 0.8
    scale = np.std(te.labels, axis=0)
    rms_own = np.sqrt(np.mean((own.primary_labels[f] - te.labels[f]) ** 2, axis=0)) / scale
    rms_sec = np.sqrt(np.mean((with_sec.primary_labels[f] - te.labels[f]) ** 2, axis=0)) / scale
    # Teff and log g, which the companion's lines confuse most, come closer (measured
    # 0.74x and 0.61x; 0.58x and 0.44x without the extra starts, which help the model's
    # own templates more); no label gets worse
    assert np.all(rms_sec[:2] < 0.85 * rms_own[:2]) and np.all(rms_sec < 1.05 * rms_own)
    assert abs(np.median(with_sec.weight[f]) - 0.3) < 0.1
    # the extra starts from other templates keep, star by star, the composite of lowest
    # chi2: never above the refined path's alone, lower for some stars
    # (on the templates alone: the continuous refinement after them is tested below)
    one, starts = (cb.screen_binaries(m, flux, te.ivar, single.labels, secondary_model=dwarfs,
                                      n_starts=k, n_secondary_steps=0) for k in (0, 10))
    assert np.all(np.isnan(starts.primary_chi2[~f])) and np.all(np.isfinite(one.primary_chi2[f]))
    assert np.all(starts.primary_chi2[f] <= one.primary_chi2[f])
    assert np.sum(starts.primary_chi2[f] < one.primary_chi2[f] - 1.0) >= 0.1 * f.sum()
    # and the continuous secondary never raises the chi2 of the composite it starts from
    assert np.all(with_sec.primary_chi2[f] <= starts.primary_chi2[f])
    # a secondary model on other pixels is refused, naming both
    short = make_synthetic(n_stars=100, n_pix=700, n_labels=3, seed=78)
    other_grid = CannonModel(short.label_names, grid=short.grid).train(short.flux, short.ivar,
                                                                      short.labels)
    with pytest.raises(ValueError, match="700.*800"):
        cb.screen_binaries(m, flux, te.ivar, single.labels, secondary_model=other_grid)


def test_secondary_models_without_teff_and_logg_are_refused(setup):
    m, flux, ivar, labels, _ = setup
    t = make_synthetic(n_stars=100, n_pix=800, n_labels=3, seed=79)
    no_logg = CannonModel(["TEFF", "FE_H"], grid=m.grid).train(t.flux, t.ivar, t.labels[:, [0, 2]])
    with pytest.raises(ValueError, match="secondary model needs TEFF and LOGG.*'FE_H'"):
        cb.screen_binaries(m, flux[:4], ivar[:4], labels[:4], secondary_model=no_logg)
    with pytest.raises(ValueError, match="secondary model needs TEFF and LOGG.*'FE_H'"):
        cb.train_secondary_model(t.flux, t.ivar, t.labels[:, [0, 2]], ("TEFF", "FE_H"))


def test_a_continuous_secondary_finds_a_companion_between_the_templates(setup):
    """The secondary's TEFF and LOGG fitted, not taken from the grid.

    Recovered better than the templates get, and the composite's chi2 never above theirs.
    """
    m, _, _, _, _ = setup
    te = _draw(54, 40)
    grid = cb._secondary_grid(m, 8, 6)
    # companions half-way between grid points (the templates' worst case)
    t_steps, g_steps = np.unique(grid[:, 0]), np.unique(grid[:, 1])
    sec = te.labels.copy()
    sec[:, 0] = np.clip(te.labels[:, 0] + 400, None, t_steps[-2])
    sec[:, 0] = t_steps[np.searchsorted(t_steps, sec[:, 0])] - 0.5 * np.diff(t_steps)[0]
    sec[:, 1] = g_steps[np.searchsorted(g_steps, np.clip(te.labels[:, 1] + 0.8, None,
                                                         g_steps[-2]))] - 0.5 * np.diff(g_steps)[0]
    is_b = np.ones(len(sec), bool)
    flux = _composite(m, te, m.predict(sec), {-12.0: 0.15, 16.0: 0.15}, is_b)
    single = m.fit(flux, te.ivar, debias=False)
    tmpl = cb.screen_binaries(m, flux, te.ivar, single.labels, n_secondary_steps=0)
    cont = cb.screen_binaries(m, flux, te.ivar, single.labels)
    f = cont.flagged
    assert f.mean() >= 0.9
    np.testing.assert_array_equal(tmpl.flagged, f)
    assert np.all(cont.primary_chi2[f] <= tmpl.primary_chi2[f])
    # the secondary's labels: off the grid, closer to the truth than the templates get
    # (mean |error| in units of the training labels' spread, measured 1.22 -> 0.79 in
    # TEFF, 0.61 -> 0.36 in LOGG: the refinement is kept for about half of the stars)
    scale = np.std(m.training_labels[:, :2], axis=0)
    err_t = np.mean(np.abs(tmpl.secondary[f] - sec[f, :2]) / scale, axis=0)
    err_c = np.mean(np.abs(cont.secondary[f] - sec[f, :2]) / scale, axis=0)
    assert np.all(err_c < 0.8 * err_t), (err_c, err_t)
    # and the primaries' labels no worse (measured: 10-17 % better)
    s = np.std(te.labels, axis=0)
    rms_t = np.sqrt(np.mean((tmpl.primary_labels[f] - te.labels[f]) ** 2, axis=0)) / s
    rms_c = np.sqrt(np.mean((cont.primary_labels[f] - te.labels[f]) ** 2, axis=0)) / s
    assert np.all(rms_c <= 1.05 * rms_t), (rms_c, rms_t)
