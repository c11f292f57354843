"""Censored abundance networks: an element from its own pixels and the stellar parameters."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cannon_fast.apogee.lines import read_element_windows  # noqa: E402
from cannon_fast.nn.censored import CensoredAbundanceNetwork, window_mask  # noqa: E402

FIT = dict(split=(5, 1, 0), epochs=40, batch_size=32, learning_rate=2e-3, patience=10,
           progress=False)


def test_window_mask_and_dr17_windows(shared_dir, tmp_path):
    """Pixels inside any window; the DR17 Si windows are read in vacuum Å."""
    wave = np.array([15000.0, 15363.7, 15365.0, 15367.4, 15400.0])
    assert window_mask(wave, [[15363.709, 15367.383]]).tolist() == [False, False, True, False,
                                                                     False]
    si = read_element_windows(shared_dir / "data" / "real" / "windows_dr17" / "Si.wind")
    assert si.shape == (29, 2) and np.all(si[:, 1] > si[:, 0]) and si.min() > 15000
    bad = tmp_path / "X.wind"
    bad.write_text("15000.0 15001.0 1\n15002.0 oops 1\n")
    with pytest.raises(ValueError, match=r"X.wind:2: expected 'start end \[flag\]'"):
        read_element_windows(bad)


def test_censored_prediction_ignores_pixels_outside_the_element():
    """Only the element's pixels and the parameters reach the censored network."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, p = 500, 90
    teff = rng.normal(0, 1, n)
    mg = rng.normal(0, 1, n)
    si = 0.8 * mg + 0.6 * rng.normal(0, 1, n)  # correlated, as in the Galaxy
    shape = np.sin(np.arange(30) / 3.0)
    flux = np.ones((n, p)) + 0.003 * rng.standard_normal((n, p))
    flux[:, :30] += 0.02 * np.outer(mg, shape)       # Mg lines
    flux[:, 30:60] += 0.02 * np.outer(si, shape)     # Si lines
    flux[:, 60:] += 0.02 * np.outer(teff, shape)     # temperature-sensitive lines
    ivar = np.full((n, p), 1 / 0.003 ** 2)
    mask = np.zeros(p, bool)
    mask[30:60] = True
    net = CensoredAbundanceNetwork("SI_FE", mask, seed=0, device="cpu").train(
        flux[:400], ivar[:400], teff[:400, None], si[:400], **FIT)
    res = net.predict(flux[400:], ivar[400:], teff[400:, None], n_samples=1)
    assert np.sqrt(np.mean((res.labels[:, 0] - si[400:]) ** 2)) < 0.3 * si.std()
    other = flux[400:].copy()
    other[:, :30] = 1 + 0.02 * np.outer(rng.normal(0, 3, 100), shape)  # new Mg lines
    again = net.predict(other, ivar[400:], teff[400:, None], n_samples=1)
    np.testing.assert_array_equal(again.labels, res.labels)
    moved = net.predict(flux[400:], ivar[400:], teff[400:, None] + 1.0, n_samples=1)
    assert not np.allclose(moved.labels, res.labels)  # the parameters do reach it
    with pytest.raises(ValueError, match="selects no pixel"):
        CensoredAbundanceNetwork("SI_FE", np.zeros(p, bool))
    torch.set_num_threads(old)
