"""The core on other spectrographs' mock spectra (../shared/tools/mock_instruments.py).

JWST/NIRSpec- and LAMOST-like spectra of the stars of a mock APOGEE survey, from an ab
initio emulator that is a cubic in Teff, log g, [Fe/H]: a cubic Cannon is then the
generating model's own form, so its errors must mean what they say on these grids too,
and extra broadening convolved into the spectra must read in the grid's own velocities.
"""
import subprocess
import sys

import numpy as np
import pytest

from cannon_fast import CannonModel, PixelGrid
from cannon_fast.core.grid import SPEED_OF_LIGHT

pytestmark = pytest.mark.slow

NAMES = ["TEFF", "LOGG", "FE_H"]
RESOLUTION = {"jwst": 2700.0, "lamost": 1800.0}


@pytest.fixture(scope="module")
def instruments(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruments")
    tools = shared_dir / "tools"
    subprocess.run([sys.executable, str(tools / "mock_survey.py"), "--format", "npz",
                    "--n-stars", "3036", "--out", str(out / "survey"), "--workers", "2"],
                   check=True, capture_output=True)
    for name in RESOLUTION:
        subprocess.run([sys.executable, str(tools / "mock_instruments.py"), "--survey",
                        str(out / "survey"), "--instrument", name, "--out", str(out / "inst"),
                        "--with-model"], check=True, capture_output=True)
    return out / "inst"


def _read(path):
    import fitsio
    with fitsio.FITS(path) as f:
        lab = f["LABELS"].read()
        return (f["FLUX"].read().astype(float), f["IVAR"].read().astype(float),
                f["WAVE"].read(), f["MODEL"].read().astype(float),
                np.column_stack([lab[n] for n in NAMES]).astype(float))


@pytest.fixture(scope="module", params=list(RESOLUTION))
def trained(request, instruments):
    flux, ivar, wave, model_flux, labels = _read(instruments / f"{request.param}_spectra.fits")
    grid = PixelGrid(wave, resolution=RESOLUTION[request.param], name=request.param)
    order = np.random.default_rng(0).permutation(len(flux))
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    model = CannonModel(NAMES, order=3, grid=grid).train(flux[train], ivar[train],
                                                         labels[train])
    return request.param, model, (flux[test], ivar[test], model_flux[test], labels[test])


def _pull_widths(result, truth):
    p = (result.labels - truth) / result.errors
    return 1.4826 * np.median(np.abs(p - np.median(p, axis=0)), axis=0)


def test_cubic_cannon_errors_are_honest_on_other_grids(trained):
    name, model, (flux, ivar, _, labels) = trained
    for kwargs in (dict(), dict(refine_continuum=True)):
        res = model.fit(flux, ivar, **kwargs)
        assert res.ok.all(), (name, kwargs)
        widths = _pull_widths(res, labels)
        assert np.all((widths > 0.8) & (widths < 1.25)), (name, kwargs, widths)


def _broaden(grid, flux, sigma, oversample=4):
    """Gaussian convolution in velocity: to uniform ln(lambda), FFT, and back."""
    from scipy.interpolate import CubicSpline
    lnw = np.log(grid.wavelength)
    step = np.min(np.diff(lnw)) / oversample
    fine = np.arange(lnw[0], lnw[-1] + step / 2, step)
    pad = 64
    f = np.pad(CubicSpline(lnw, flux, axis=1)(fine), ((0, 0), (pad, pad)), mode="edge")
    k = np.fft.rfftfreq(f.shape[1])
    kernel = np.exp(-2 * (np.pi * k * sigma / SPEED_OF_LIGHT / step) ** 2)
    f = np.fft.irfft(np.fft.rfft(f, axis=1) * kernel, n=f.shape[1], axis=1)
    return CubicSpline(fine, f[:, pad:-pad], axis=1)(lnw)


def test_extra_broadening_reads_in_the_grids_velocities(trained):
    """20 km/s convolved into noise-free spectra (noise added after) reads as ~400 (km/s)²."""
    name, model, (_, ivar, model_flux, _) = trained
    rng = np.random.default_rng(1)
    n = 300
    noise = rng.normal(size=(n, model.n_pixels)) / np.sqrt(ivar[:n])
    none = model.fit(model_flux[:n] + noise, ivar[:n], debias=False, broadening=True)
    some = model.fit(_broaden(model.grid, model_flux[:n], 20.0) + noise, ivar[:n],
                     debias=False, broadening=True)
    err = np.median(some.broadening_error)
    assert abs(np.median(none.broadening)) < 0.5 * err, (name, np.median(none.broadening), err)
    assert abs(np.median(some.broadening) / 400.0 - 1) < 0.25, (name,
                                                                np.median(some.broadening))
