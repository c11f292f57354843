"""The ab initio spectral model of ../shared on an instrument's grid, as a forward model.

A cubic polynomial emulator of synthetic spectra. Benchmarks only: the package never
reads ../shared.

The model (``data/synthetic_grid/SOURCES.md``): normalized flux = theta @ v(x) on an air grid
3000-18000 A at 0.1 A, x = (labels - fiducials) / scales, v = [1] + cubic terms of TEFF, LOGG,
FEH. On an instrument's grid: air -> vacuum, then a Gaussian LSF of FWHM lambda / R and the
resampling as one sparse matrix (``cannon_fast.core.broadening.lsf_matrix``) applied once to
theta's columns (the operation is linear and v does not depend on wavelength), as
``tools/mock_instruments.py`` makes its mock spectra.
"""
from __future__ import annotations

import json
import os

import numpy as np

from cannon_fast.core.grid import PixelGrid

MODEL_REL = os.path.join("data", "synthetic_grid", "doppler_cannon_coolstars_3000-18000A.npz")
LABEL_NAMES = ("TEFF", "LOGG", "FE_H")
BOX = np.array([[3500.0, 8000.0], [0.0, 5.0], [-2.5, 0.5]])


def shared_dir():
    """../shared next to the repository (override with CANNON_FAST_SHARED)."""
    env = os.environ.get("CANNON_FAST_SHARED")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared")


def air_to_vac(wave_air):
    """Air -> vacuum (the Ciddor/Morton form of VALD, as the mock instruments use)."""
    w = np.asarray(wave_air, dtype=np.float64)
    s2 = (1e4 / w) ** 2
    n = (1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2)
         + 1.599740894897e-4 / (38.92568793293 - s2))
    return w * n


def instrument_grid(name):
    """PixelGrid of the APOGEE (ASPCAP 7514), JWST-, LAMOST- and DESI-like instruments."""
    if name == "apogee":
        return PixelGrid.aspcap(7514)
    if name == "apstar":
        return PixelGrid.apstar()
    if name == "jwst":
        return PixelGrid.linear(9000.0, 18000.0, 8192, resolution=2700.0, name="JWST-like")
    if name == "lamost":
        return PixelGrid(10.0 ** (3.5682 + 1e-4 * np.arange(3861)), resolution=1800.0,
                         name="LAMOST-like")
    if name == "desi":
        wave = np.linspace(3600.0, 9824.0, 7781)
        r = 2000.0 + 3000.0 * (wave - 3600.0) / 6200.0
        return PixelGrid(wave, resolution=r, name="DESI-like")
    raise ValueError(f"unknown instrument {name!r}")


class AbInitioModel:
    """The polynomial ab initio model on a grid: a forward model (predict, Jacobian).

    Attributes: label_names, label_bounds (the model's box), training_labels (its 689
    grid points), grid, s2 (None: the model is taken as exact), theta (P, T).
    """

    def __init__(self, grid, path=None):
        from cannon_fast.core.broadening import lsf_matrix

        path = path or os.path.join(shared_dir(), MODEL_REL)
        with np.load(path, allow_pickle=False) as d:
            wave = air_to_vac(d["wave_air_A"].astype(np.float64))
            theta = d["theta"]
            self.training_labels = d["training_labels"].astype(np.float64)
            self.fiducials = d["fiducials"].astype(np.float64)
            self.scales = d["scales"].astype(np.float64)
            self.terms = json.loads(str(d["terms_json"]))
        self.grid = grid
        res = grid.resolution
        sig = grid.wavelength / np.asarray(res) / 2.3548
        lo = np.searchsorted(wave, grid.wavelength[0] - 6 * np.max(sig)) - 1
        hi = np.searchsorted(wave, grid.wavelength[-1] + 6 * np.max(sig)) + 1
        sl = slice(max(lo, 0), min(hi, wave.size))
        op = lsf_matrix(wave[sl], grid.wavelength, res, truncate=True)  # JWST's last pixels
        self.theta = np.asarray(op @ theta[sl].astype(np.float64))  # (P, T)
        self.label_names = list(LABEL_NAMES)
        self.label_bounds = BOX.copy()
        self.s2 = None

    def label_vector(self, labels):
        """(N, 3) -> (N, T) and its derivative (N, T, 3) in physical labels."""
        x = (np.atleast_2d(np.asarray(labels, np.float64)) - self.fiducials) / self.scales
        n = len(x)
        cols = [np.ones(n)]
        dcols = [np.zeros((n, 3))]
        for term in self.terms:
            c = np.ones(n)
            for idx, power in term:
                c = c * x[:, int(idx)] ** power
            d = np.zeros((n, 3))
            for j in range(3):
                dj = np.ones(n)
                pj = 0
                for idx, power in term:
                    if int(idx) == j:
                        pj = power
                        dj = dj * power * x[:, j] ** (power - 1)
                    else:
                        dj = dj * x[:, int(idx)] ** power
                d[:, j] = dj if pj else 0.0
            cols.append(c)
            dcols.append(d / self.scales)
        return np.column_stack(cols), np.stack(dcols, axis=1)

    def predict(self, labels):
        labels = np.asarray(labels, np.float64)
        out = self.label_vector(labels)[0] @ self.theta.T
        return out[0] if labels.ndim == 1 else out

    def predict_with_jacobian(self, labels):
        v, dv = self.label_vector(labels)
        flux = v @ self.theta.T
        jac = np.einsum("ntl,pt->npl", dv, self.theta)
        return flux, jac

    def in_hull(self, labels):
        """True where the model was trained around (its box without the empty hot-giant corner)."""
        lab = np.atleast_2d(labels)
        tr = self.training_labels
        tn = np.unique(tr[:, 0])
        gmin = np.array([tr[tr[:, 0] == t, 1].min() for t in tn])
        inside = np.all((lab >= BOX[:, 0]) & (lab <= BOX[:, 1]), axis=1)
        return inside & (lab[:, 1] >= np.interp(lab[:, 0], tn, gmin) - 1e-6)


def read_instrument(path, with_model=False):
    """FLUX, IVAR, WAVE and the LABELS table of a mock_instruments.py file."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as h:
        out = dict(flux=h["FLUX"].data.astype(np.float64), ivar=h["IVAR"].data.astype(np.float64),
                   wave=h["WAVE"].data.astype(np.float64),
                   labels=np.column_stack([h["LABELS"].data[c] for c in LABEL_NAMES]),
                   snr=np.asarray(h["LABELS"].data["SNR"], np.float64))
        if "APOGEE_ID" in h["LABELS"].columns.names:
            out["apogee_id"] = np.char.strip(np.asarray(h["LABELS"].data["APOGEE_ID"]).astype(str))
        if with_model and "MODEL" in h:
            out["model"] = h["MODEL"].data.astype(np.float64)
    return out
