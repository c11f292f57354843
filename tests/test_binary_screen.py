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
