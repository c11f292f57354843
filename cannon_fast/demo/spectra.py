"""The spectral synthesis of the demo survey: noise-free, continuum-normalized spectra.

Spectral model (all wavelengths vacuum Å, on the apStar log-lambda grid):

* the H-band line list (:func:`cannon_fast.apogee.lines.line_list`): named atomic lines
  of Fe I, Mg I, Si I, Al I, Ca I, Ti I, K I, Mn I, Ni I, C I, Na I, S I, Cr I, V I, Co I at their
  laboratory wavelengths (air, converted to vacuum), H I Brackett lines, the
  second-overtone CO bands (6 heads, R and P branches with a rotational intensity
  law), OH doublets and weak forests of CN and Fe I lines placed deterministically;
* line-centre optical depths ``tau = tau0 * (1 + u/4)**4`` (``exp(u)`` to second order)
  with a log-strength offset ``u = c . x(labels)`` linear in ``theta = 5040/Teff``,
  ``log g``, ``[Fe/H]``, ``[Mg/Fe]`` (Mg and the alpha elements, O in OH) and
  ``[Si/Fe]`` (Si) -- a Saha-Boltzmann-like ionization/excitation balance, with CNO
  abundances that follow the first dredge-up;
* an intrinsic Voigt-like profile (Doppler width from temperature and
  microturbulence, a gravity-dependent Lorentzian part for strong lines), the flux
  ``exp(-tau)``, then a Gaussian macroturbulence + line-spread function at
  ``R = 22,500`` and the pixel box, applied in Fourier space on a 5x oversampled grid.

Binaries are the light-weighted sum of two such spectra, the companion shifted by its
orbital velocity in each visit. The continuum, the noise and the instrument are added
by :mod:`cannon_fast.demo.observe`.
"""
from __future__ import annotations

import functools

import numpy as np

from ..apogee.lines import line_list
from ..core.grid import APSTAR_CDELT1, APSTAR_CRVAL1, APSTAR_NPIX, SPEED_OF_LIGHT
from .labels import GIANT_LABEL_RANGE, _as_labels, _LOGG_REF, sample_labels, vmacro_relation

__all__ = ["DV_PIX", "CHIP_PIXELS", "apstar_wavelength", "synthesize_spectra", "continuum_mask"]

#: Velocity width of one apStar pixel (km/s), about 4.14.
DV_PIX = SPEED_OF_LIGHT * np.log(10.0) * APSTAR_CDELT1
#: First and last pixel (inclusive) of the blue, green and red detectors at zero velocity.
#: (Wider than :data:`cannon_fast.core.grid.APSTAR_CHIPS`, the part of each chip that
#: ASPCAP keeps: the synthetic files cover what the detectors see, as the DR17 files do.)
CHIP_PIXELS = ((199, 3321), (3535, 6127), (6293, 8379))
_OVERSAMPLE = 5
_PAD = 160            # apStar pixels of padding each side of the synthesis grid
_THETA_REF = 5040.0 / 4500.0


def apstar_wavelength():
    """Return the apStar wavelength grid.

    Returns
    -------
    wavelength : ndarray, (8575,)
        ``10**(4.179 + 6e-6 * i)``, vacuum Å.
    """
    return 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NPIX))


_POWER = 4.0


def _strength(u):
    """Line-strength factor of the log-strength offset ``u``: ``(1 + u/4)**4``.

    It equals ``exp(u)`` to second order and, like it, is smooth and monotonic (zero
    below ``u = -4``), but its higher orders are ~3x smaller, so a quadratic-in-labels
    model can follow the spectra across the whole giant branch.
    """
    return np.clip(1.0 + u / _POWER, 0.0, None) ** _POWER


class _Grid:
    """The oversampled synthesis grid and the sparse line-profile matrices for it."""

    def __init__(self, lo_pix, hi_pix, oversample=_OVERSAMPLE):
        import scipy.fft
        import scipy.sparse

        self.oversample = oversample
        self.start_pix = lo_pix - _PAD
        n_fine = (hi_pix - lo_pix + 2 * _PAD) * oversample
        self.n_fft = scipy.fft.next_fast_len(n_fine, real=True)
        self.x = self.start_pix + np.arange(self.n_fft) / oversample   # apStar pixel coordinate
        self.dv = DV_PIX / oversample                                   # km/s per fine step
        lines = line_list()
        lw = lines["wavelength"]
        xline = (np.log10(lw) - APSTAR_CRVAL1) / APSTAR_CDELT1          # line centres, pixels
        inside = (xline > self.x[0] + 8) & (xline < self.x[-1] - 8)
        self.lines = lines[inside]
        xline = xline[inside]
        # Doppler width: thermal at 4500 K + 1.8 km/s microturbulence (km/s, Gaussian sigma)
        b = np.sqrt(2 * 1.380649e-23 * 4500.0 / (self.lines["mass"] * 1.66054e-27) / 1e6
                    + 1.8 ** 2)
        sig = b / np.sqrt(2.0) / self.dv                                # fine steps
        rows, cols, vals = [], [], []
        for k, (xc, sg) in enumerate(zip(xline, sig)):
            c = (xc - self.start_pix) * oversample
            half = int(np.ceil(6 * sg)) + 1
            idx = np.arange(int(c) - half, int(c) + half + 2)
            g = np.exp(-0.5 * ((idx - c) / sg) ** 2)
            rows.append(idx), cols.append(np.full(idx.size, k)), vals.append(g)
        self.gauss = scipy.sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(self.n_fft, len(self.lines)))
        # Lorentzian (pressure-broadened) part for strong lines and the Brackett lines,
        # normalized to 1 at line centre like the Gaussian; wings cut at +-15 Å
        lor = np.flatnonzero(self.lines["lorentz"] > 0)
        rows, cols, vals = [], [], []
        for k in lor:
            c = (xline[k] - self.start_pix) * oversample
            hwhm = (120.0 if self.lines["kind"][k] == "brackett" else 1.5 * sig[k])
            half = int(15.0 / (self.lines["wavelength"][k] * self.dv / SPEED_OF_LIGHT))
            idx = np.arange(max(int(c) - half, 0), min(int(c) + half + 2, self.n_fft))
            rows.append(idx), cols.append(np.full(idx.size, k))
            vals.append(1.0 / (1.0 + ((idx - c) / hwhm) ** 2))
        self.lorentz = scipy.sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(self.n_fft, len(self.lines))) if lor.size else None
        self.coef = np.column_stack([self.lines[k] for k in
                                     ("c_theta", "c_logg", "c_feh", "c_mgfe", "c_sife")])
        self.ln_tau0 = np.log(self.lines["tau0"])
        self.freq = np.fft.rfftfreq(self.n_fft)                         # cycles per fine step

    def tau(self, lab):
        """Line-centre optical depths and Lorentz fractions, (N, n_lines) each."""
        x = np.column_stack([5040.0 / lab[:, 0] - _THETA_REF, lab[:, 1] - _LOGG_REF,
                             lab[:, 2], lab[:, 3], lab[:, 4]])
        tau = np.exp(self.ln_tau0) * _strength(x @ self.coef.T)
        eta = np.clip(self.lines["lorentz"] * 10 ** (0.25 * (lab[:, 1:2] - _LOGG_REF)), 0, 0.95)
        return tau, eta

    def depth_ft(self, lab):
        """Fourier transform of the intrinsic line absorption 1 - exp(-tau(lambda))."""
        import scipy.fft

        tau, eta = self.tau(lab)
        opacity = self.gauss @ (tau * (1 - eta)).T                      # (n_fft, N)
        if self.lorentz is not None:
            opacity += self.lorentz @ (tau * eta).T
        return scipy.fft.rfft(-np.expm1(-opacity.T), axis=1)

    def kernel_ft(self, sigma_v, shift_v=None):
        """Gaussian (LSF + macroturbulence) x pixel box x velocity shift, (N, n_freq)."""
        s = (np.asarray(sigma_v, float) / self.dv)[:, None]
        k = np.exp(-2.0 * (np.pi * self.freq * s) ** 2) * np.sinc(self.freq * self.oversample)
        if shift_v is not None:
            sh = (np.asarray(shift_v, float) / self.dv)[:, None]
            k = k * np.exp(-2j * np.pi * self.freq * sh)
        return k

    def to_flux(self, dft, kft, x_out):
        """Convolve and sample at apStar pixel coordinates ``x_out``: (N, P) normalized flux."""
        import scipy.fft

        depth = scipy.fft.irfft(dft * kft, n=self.n_fft, axis=1)
        pos = (x_out - self.start_pix) * self.oversample
        i0 = np.clip(np.floor(pos).astype(int), 0, self.n_fft - 2)
        w = pos - i0
        return 1.0 - (depth[:, i0] * (1 - w) + depth[:, i0 + 1] * w)


@functools.lru_cache(maxsize=4)
def _grid(lo_pix, hi_pix):
    return _Grid(lo_pix, hi_pix)


def _grid_for(x_out):
    lo = int(np.floor(x_out.min())) // 256 * 256
    hi = (int(np.ceil(x_out.max())) // 256 + 1) * 256
    return _grid(lo, hi)


def _sigma_v(vmacro, resolution):
    """Total Gaussian sigma (km/s) of the LSF and the macroturbulence."""
    return np.sqrt((SPEED_OF_LIGHT / resolution / 2.3548) ** 2 + (np.asarray(vmacro) / 2.3548) ** 2)


def synthesize_spectra(labels, wavelength=None, resolution=22500.0, vmacro=None, velocity=None,
                       chunk=64):
    """Noise-free, continuum-normalized synthetic spectra for given labels.

    Parameters
    ----------
    labels : array_like, (N, 5) or (5,)
        ``TEFF`` (K), ``LOGG``, ``FE_H``, ``MG_FE``, ``SI_FE`` (the order of ``LABEL_NAMES``).
    wavelength : array_like, (P,), optional
        Vacuum wavelengths (Å) between 15050 and 17050 to sample; the apStar grid
        (:func:`apstar_wavelength`) by default.
    resolution : float
        Spectral resolving power of the Gaussian line-spread function (FWHM = lambda/R).
    vmacro : array_like, (N,), optional
        Macroturbulence (Gaussian FWHM, km/s); :func:`vmacro_relation` of the labels by default.
    velocity : array_like, (N,), optional
        Doppler shift (km/s, positive = redshift) applied to each spectrum.
    chunk : int
        Stars synthesized at once (memory ~ chunk x 0.7 MB).

    Returns
    -------
    flux : ndarray, (N, P) or (P,)
        Normalized flux (1 = continuum), each pixel integrated over the apStar pixel width.
    """
    lab, single = _as_labels(labels)
    if wavelength is None:
        x_out = np.arange(APSTAR_NPIX, dtype=np.float64)
    else:
        wave = np.asarray(wavelength, dtype=np.float64)
        if wave.ndim != 1 or not np.all(np.isfinite(wave)) or wave.min() < 15050 \
                or wave.max() > 17050:
            raise ValueError("wavelength must be a 1-D array of vacuum Å within 15050-17050")
        x_out = (np.log10(wave) - APSTAR_CRVAL1) / APSTAR_CDELT1
    if resolution <= 1000:
        raise ValueError(f"resolution must be > 1000, got {resolution}")
    n = len(lab)
    vmac = vmacro_relation(lab[:, 0], lab[:, 1]) if vmacro is None else \
        np.broadcast_to(np.asarray(vmacro, float), (n,))
    vel = None if velocity is None else np.broadcast_to(np.asarray(velocity, float), (n,))
    if vel is not None and np.any(np.abs(vel) > 500):
        raise ValueError("velocity must be within +-500 km/s")
    grid = _grid_for(x_out)
    out = np.empty((n, x_out.size))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        kft = grid.kernel_ft(_sigma_v(vmac[a:b], resolution), None if vel is None else vel[a:b])
        out[a:b] = grid.to_flux(grid.depth_ft(lab[a:b]), kft, x_out)
    return out[0] if single else out


def _normalized_spectra(S, i0, i1, resolution=22500.0):
    """Normalized rest-frame spectra of stars i0:i1, one row per visit: (sum nvisits, P)."""
    lab = S["labels"][i0:i1]
    grid = _grid_for(np.arange(APSTAR_NPIX, dtype=float))
    x_out = np.arange(APSTAR_NPIX, dtype=float)
    nv = S["nvisits"][i0:i1]
    kft1 = grid.kernel_ft(_sigma_v(S["vmacro"][i0:i1], resolution))
    f1 = grid.to_flux(grid.depth_ft(lab), kft1, x_out)
    out = np.repeat(f1, nv, axis=0)
    isb = S["is_binary"][i0:i1]
    if isb.any():
        b = np.flatnonzero(isb)
        lab2 = lab[b].copy()
        lab2[:, 0] = S["teff2"][i0:i1][b]
        lab2[:, 1] = S["logg2"][i0:i1][b]
        d2 = grid.depth_ft(lab2)
        vm2 = vmacro_relation(lab2[:, 0], lab2[:, 1])
        starts = np.concatenate([[0], np.cumsum(nv)[:-1]])
        for k, j in enumerate(b):
            dvs = S["dv"][i0 + j, :nv[j]]
            kk = grid.kernel_ft(np.repeat(_sigma_v(vm2[k:k + 1], resolution), nv[j]), dvs)
            f2 = grid.to_flux(np.repeat(d2[k:k + 1], nv[j], axis=0), kk, x_out)
            r = S["light_ratio"][i0 + j]
            rows = slice(starts[j], starts[j] + nv[j])
            out[rows] = (out[rows] + r * f2) / (1.0 + r)
    return f1, out


#: Labels added to the giants of :func:`continuum_mask`: the coolest metal-rich and the
#: warm metal-poor ends of the giant branch.
_GIANT_EXTREMES = np.array([[3950.0, 1.0, 0.4, 0.0, 0.0], [4100.0, 1.5, 0.3, 0.0, 0.0],
                            [5250.0, 3.6, -1.0, 0.35, 0.3], [4000.0, 1.0, -0.3, 0.3, 0.2]])


def continuum_mask(wavelength=None, tolerance=0.003, n_stars=300):
    """Pixels that stay at the continuum for every giant of the demo population.

    Parameters
    ----------
    wavelength : array_like, (P,), optional
        Vacuum Å; the apStar grid by default (chip-gap pixels are then False).
    tolerance : float
        Maximum line depth ``1 - flux`` allowed.
    n_stars : int
        Giants drawn (seed 0) from the population within ``GIANT_LABEL_RANGE``; the
        coolest metal-rich and the warm metal-poor ends of the giant branch are added.

    Returns
    -------
    mask : ndarray of bool, (P,)
    """
    if not 0 < tolerance < 0.1:
        raise ValueError(f"tolerance must be within (0, 0.1), got {tolerance}")
    labels, pop = sample_labels(4 * n_stars, seed=0)
    lo, hi = GIANT_LABEL_RANGE.T
    keep = np.all((labels >= lo) & (labels <= hi), axis=1) & (pop != "dwarf")
    # plus the extremes of the giant branch: coolest metal-rich and warm metal-poor giants
    labels = np.vstack([labels[keep][:n_stars], _GIANT_EXTREMES])
    flux = synthesize_spectra(labels, wavelength)
    mask = np.all(1.0 - flux < tolerance, axis=0)
    if wavelength is None:
        inside = np.zeros(APSTAR_NPIX, bool)
        for lo_p, hi_p in CHIP_PIXELS:
            inside[lo_p + 5:hi_p - 4] = True
        mask &= inside
    return mask
