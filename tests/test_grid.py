"""PixelGrid: the built-in APOGEE grids, grids from wavelengths, and models that keep theirs."""
import json

import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast.core.grid import SPEED_OF_LIGHT, PixelGrid
from cannon_fast.testing import make_synthetic


def test_apogee_grids():
    ap = PixelGrid.apstar()
    assert ap.n_pixels == 8575 and ap.spacing == "log"
    assert ap.segments == ((246, 3274), (3585, 6080), (6344, 8335))
    # c ln(10) CDELT1, the apStar pixel
    np.testing.assert_allclose(ap.pixel_velocity, SPEED_OF_LIGHT * np.log(10) * 6e-6, rtol=1e-6)
    for n, first in ((7514, 246), (7214, 322)):
        g = PixelGrid.aspcap(n)
        assert g.n_pixels == n and len(g.segments) == 3 and g.spacing == "log"
        assert g.segments[0][0] == 0 and g.segments[-1][1] == n
        assert g.wavelength[0] == ap.wavelength[first]
        # one pixel velocity everywhere, also at the joins (never across a gap)
        np.testing.assert_allclose(g.pixel_velocity, ap.pixel_velocity[0], rtol=1e-6)
        assert PixelGrid.builtin(n) == g
    assert PixelGrid.builtin(100) is None
    with pytest.raises(ValueError, match="7514 .* or 7214"):
        PixelGrid.aspcap(8000)


def test_grids_from_wavelengths():
    lin = PixelGrid.linear(9000, 18000, 8192, resolution=2700)
    assert lin.spacing == "linear" and lin.segments == ((0, 8192),)
    v = lin.pixel_velocity
    np.testing.assert_allclose(v[[0, -1]], SPEED_OF_LIGHT * (9000 / 8191) / np.array([9000, 18000]),
                               rtol=1e-3)
    log = PixelGrid.log_uniform(3700, 9000, step=1e-4, resolution=1800)
    assert log.spacing == "log" and log.n_pixels == 3861
    # gaps in wavelength make segments; the gap-free ASPCAP wavelengths find their chips
    asp = PixelGrid.aspcap(7514)
    assert PixelGrid(asp.wavelength).segments == asp.segments
    # the apStar wavelengths have no gap to find: from_wavelength knows the grid
    assert PixelGrid.from_wavelength(PixelGrid.apstar().wavelength) == PixelGrid.apstar()
    irregular = PixelGrid(np.cumsum(np.linspace(1, 2, 50)) + 5000)
    assert irregular.spacing == "irregular"
    np.testing.assert_allclose(lin.lsf_sigma_velocity, SPEED_OF_LIGHT / 2700 / 2.35482, rtol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(wavelength=[1.0, 3.0, 2.0]), "must increase: pixel 2"),
    (dict(wavelength=[1.0, 2.0]), "at least 3 pixels"),
    (dict(wavelength=np.arange(1.0, 11), segments=[(0, 5), (4, 10)]), "not overlap"),
    (dict(wavelength=np.arange(1.0, 11), segments=[(0, 11)]), "inside 0-10"),
    (dict(wavelength=np.arange(1.0, 11), resolution=np.ones(3)), "one per pixel"),
])
def test_bad_grids_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        PixelGrid(**bad)


def test_second_differences_stay_inside_segments():
    g = PixelGrid(np.arange(1000.0, 1010.0), segments=[(0, 4), (5, 10)])
    inner = g.inner_pixels()
    assert list(np.flatnonzero(inner)) == [1, 2, 6, 7, 8]
    assert list(g.segment_of_pixel) == [0, 0, 0, 0, -1, 1, 1, 1, 1, 1]


def test_nearest_pixels():
    g = PixelGrid.linear(1000, 1100, 101)
    idx, on = g.nearest_pixels([1000.2, 1050.6, 1099.9, 1200.0])
    assert list(idx) == [0, 51, 100, 100] and list(on) == [True, True, True, False]


@pytest.mark.parametrize("suffix", [".npz", ".fits"])
@pytest.mark.parametrize("resolution", [2700.0, "per pixel"])
def test_a_model_keeps_its_grid(tmp_path, suffix, resolution):
    s = make_synthetic(n_stars=80, n_pix=50, n_labels=2, seed=3)
    r = np.linspace(2000, 3000, 50) if resolution == "per pixel" else resolution
    grid = PixelGrid(np.linspace(9000, 9100, 50), segments=[(0, 20), (25, 50)], resolution=r,
                     name="mine")
    model = CannonModel(s.label_names, grid=grid).train(s.flux, s.ivar, s.labels)
    model.write(tmp_path / f"m{suffix}")
    back = CannonModel.read(tmp_path / f"m{suffix}")
    assert back.grid == grid and back.grid.name == "mine" and back.segments == grid.segments
    np.testing.assert_array_equal(back.predict(s.labels[:3]), model.predict(s.labels[:3]))


def test_a_grid_must_fit_the_spectra():
    s = make_synthetic(n_stars=80, n_pix=50, n_labels=2, seed=3)
    with pytest.raises(ValueError, match="50 pixels but the model's grid"):
        CannonModel(s.label_names, grid=PixelGrid.linear(1, 2, 60)).train(s.flux, s.ivar,
                                                                         s.labels)
    with pytest.raises(TypeError, match="PixelGrid"):
        CannonModel(s.label_names, grid=np.arange(50.0))


def test_model_files_from_before_grids(tmp_path):
    """A file without a grid record reads as before: the APOGEE grid of its size, else none."""
    for n_pix, expected in ((7514, PixelGrid.aspcap(7514)), (40, None)):
        s = make_synthetic(n_stars=60, n_pix=n_pix, n_labels=2, seed=4)
        model = CannonModel(s.label_names).train(s.flux, s.ivar, s.labels)
        assert model.grid == expected
        model.write(tmp_path / "new.npz", overwrite=True)
        with np.load(tmp_path / "new.npz") as f:
            arrays = {k: f[k] for k in f.files if not k.startswith("grid_")}
        meta = json.loads(str(arrays.pop("meta")))
        meta.pop("grid")
        np.savez(tmp_path / "old.npz", meta=np.array(json.dumps(meta)), **arrays)
        old = CannonModel.read(tmp_path / "old.npz")
        assert old.grid == expected
        if expected is None:
            with pytest.raises(ValueError, match="has no grid"):
                old.fit(s.flux[:2], s.ivar[:2], debias=False, broadening=True)
