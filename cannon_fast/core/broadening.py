"""Line broadening on any pixel grid: rotation (v sin i), Gaussian (micro/macro-turbulence), LSF.

A forward model's spectra are sampled on a :class:`~cannon_fast.core.grid.PixelGrid`;
broadening them is a convolution in velocity, which on a grid uniform in lambda
(or irregular, or made of segments) is a different kernel at every pixel. Each
pixel's output is therefore ``sum_j W_ij f_j`` over its neighbours ``j`` in the
same segment, with ``W_ij`` the kernel integrated against the piecewise-linear
interpolant of the spectrum in velocity: ``W_ij`` is the kernel convolved with
the "hat" function of pixel ``j`` at the velocity offset ``v_j - v_i``,
computed exactly from the kernel's second antiderivative. It is exact for a
spectrum linear between pixels, reduces to the identity as the kernel's width
goes to zero (no sub-pixel kernel is lost between samples), and the
weights of a row sum to one (the flux beyond a segment's end is taken as its
last pixel's).

Kernels: the rotation profile of a limb-darkened sphere (Gray 2005, eq. 18.14),

    G(x) = [2 (1 - eps) sqrt(1 - x^2) + (pi eps / 2) (1 - x^2)] / [pi v sin i (1 - eps / 3)],

``x = dv / v sin i``, with the linear limb-darkening coefficient ``eps``
(0.6 by default); and a Gaussian of velocity dispersion ``sigma`` (turbulence
or any extra broadening). Rotation is applied to the model's spectra, which are
already convolved with the instrument's line-spread function: convolutions
commute, so that is exact as long as the spectra are well sampled.

:class:`BroadenedForwardModel` adds ``VSINI`` (km/s) and, optionally,
``VBROAD`` (the Gaussian sigma, km/s: micro-turbulence as a nuisance, or
macro-turbulence) to any forward model with ``predict_with_jacobian``, so that
:func:`cannon_fast.fit_spectra` fits them with the labels.

References
----------
Gray, D. F. 2005, The Observation and Analysis of Stellar Photospheres, 3rd ed., ch. 18.
"""
from __future__ import annotations

import numpy as np

from .grid import SPEED_OF_LIGHT

__all__ = ["rotation_profile", "rotation_second_integral", "gaussian_second_integral",
           "broadening_matrix", "broaden", "lsf_matrix", "BroadenedForwardModel",
           "DEFAULT_LIMB_DARKENING"]

#: Linear limb-darkening coefficient of the rotation kernel (Gray: ~0.6 in the optical).
DEFAULT_LIMB_DARKENING = 0.6
# a kernel narrower than this (km/s) is the identity
_TINY_VELOCITY = 1e-6


def rotation_profile(dv, vsini, epsilon=DEFAULT_LIMB_DARKENING):
    """Gray's rotation kernel G(dv), 1/(km/s), zero beyond ``|dv| = vsini``."""
    x = np.asarray(dv, np.float64) / vsini
    inside = np.abs(x) < 1
    y = np.where(inside, 1.0 - x * x, 0.0)
    return np.where(inside, (2 * (1 - epsilon) * np.sqrt(y) + 0.5 * np.pi * epsilon * y)
                    / (np.pi * vsini * (1 - epsilon / 3)), 0.0)


def rotation_second_integral(u, vsini, epsilon=DEFAULT_LIMB_DARKENING):
    """``H2(u) = int_{-inf}^u int_{-inf}^t G`` of the rotation kernel (km/s).

    With ``x = u / vsini``: ``vsini [A P(x) + B (Q(x) + 1/4)]`` inside,
    ``A = (1 - eps) / (pi (1 - eps/3))``, ``B = eps / (2 (1 - eps/3))``,
    ``P = x arcsin x + sqrt(1 - x^2) - (1 - x^2)^(3/2) / 3 + pi x / 2``,
    ``Q = x^2/2 - x^4/12 + 2x/3``; 0 below ``-vsini`` and ``u`` beyond ``vsini``
    (the kernel has unit area and zero mean).
    """
    u = np.asarray(u, np.float64)
    x = np.clip(u / vsini, -1.0, 1.0)
    a = (1 - epsilon) / (np.pi * (1 - epsilon / 3))
    b = epsilon / (2 * (1 - epsilon / 3))
    r = np.sqrt(np.clip(1 - x * x, 0.0, None))
    p = x * np.arcsin(x) + r - r ** 3 / 3 + 0.5 * np.pi * x
    q = 0.5 * x ** 2 - x ** 4 / 12 + 2 * x / 3 + 0.25
    inside = vsini * (a * p + b * q)
    return np.where(u >= vsini, u, np.where(u <= -vsini, 0.0, inside))


def gaussian_second_integral(u, sigma):
    """``H2(u)`` of a unit Gaussian of dispersion ``sigma``: ``u Phi(u/s) + s phi(u/s)``."""
    from scipy.special import ndtr

    u = np.asarray(u, np.float64)
    z = u / sigma
    return u * ndtr(z) + sigma * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def _band_offsets(grid, half_width):
    """Neighbour indices (P, K) within ``half_width`` km/s, same segment, and their offsets.

    Returns index (P, K) clipped into each pixel's segment, the velocity offsets
    ``v_j - v_i`` (P, K) (ln-lambda times c), and a validity mask (P, K).
    """
    wave = grid.wavelength
    vel = SPEED_OF_LIGHT * np.log(wave)  # (P,) velocity coordinate
    seg = grid.segment_of_pixel
    min_dv = np.min(grid.pixel_velocity[grid.in_segment])
    k = int(np.ceil(half_width / max(min_dv, 1e-9))) + 2
    idx = np.arange(wave.size)[:, None] + np.arange(-k, k + 1)[None, :]  # (P, 2k + 1)
    lo = np.zeros(wave.size, np.int64)
    hi = np.full(wave.size, wave.size - 1, np.int64)
    for a, b in grid.segments:
        lo[a:b], hi[a:b] = a, b - 1
    valid = (idx >= lo[:, None]) & (idx <= hi[:, None]) & (seg[:, None] >= 0)
    idx = np.clip(idx, lo[:, None], hi[:, None])
    return idx, vel[idx] - vel[:, None], valid


def broadening_matrix(grid, h2, half_width):
    """Banded convolution weights of a kernel on a grid.

    Parameters
    ----------
    grid : PixelGrid
    h2 : callable
        The kernel's second antiderivative ``H2(u)`` (km/s; ``H2(u) = 0`` below the
        kernel, ``u - mean`` far above it).
    half_width : float
        Velocity beyond which the kernel is zero (km/s).

    Returns
    -------
    index : ndarray, (P, K) int64
        Neighbour pixels.
    weights : ndarray, (P, K)
        ``out_i = sum_k weights[i, k] f[index[i, k]]``; rows sum to 1, gap pixels
        keep their own value.
    """
    idx, dv, valid = _band_offsets(grid, half_width)
    big = 1e6 * max(half_width, 1.0)
    # the hat of neighbour j spans its left and right neighbours' offsets; at a
    # segment's end the flux is taken as constant, i.e. the hat's far side is infinite
    left = np.where(valid[:, :-1] & valid[:, 1:], dv[:, :-1], -big)
    right = np.where(valid[:, 1:] & valid[:, :-1], dv[:, 1:], big)
    hd = h2(dv)
    h_left = np.concatenate([np.zeros((dv.shape[0], 1)), h2(left)], axis=1)
    h_right = np.concatenate([h2(right), np.zeros((dv.shape[0], 1))], axis=1)
    d_left = dv - np.concatenate([np.full((dv.shape[0], 1), -big), left], axis=1)
    d_right = np.concatenate([right, np.full((dv.shape[0], 1), big), ], axis=1) - dv
    first = ~np.concatenate([np.zeros((dv.shape[0], 1), bool), valid[:, :-1]], axis=1)
    last = ~np.concatenate([valid[:, 1:], np.zeros((dv.shape[0], 1), bool)], axis=1)
    # slope of H2 to the right minus slope to the left; the far sides of the end
    # pixels: H2 slope 0 (left, below the kernel) and 1 (right, above it)
    slope_right = np.where(last, 1.0, (h_right - hd) / np.where(last, 1.0, d_right))
    slope_left = np.where(first, 0.0, (hd - h_left) / np.where(first, 1.0, d_left))
    w = np.where(valid, slope_right - slope_left, 0.0)
    gaps = ~grid.in_segment
    if gaps.any():
        w[gaps] = 0.0
        w[gaps, idx.shape[1] // 2] = 1.0
    return idx, w


def _kernel_operator(grid, h2, half_width):
    """Weights of a kernel on a grid, as a banded matrix or, uniform in log lambda, one row.

    On a grid uniform in log lambda every pixel has the same neighbours in
    velocity, so one row of weights (a convolution per segment, the segment's
    end values repeated beyond it: the same constant extension) is all there is.
    """
    if grid.spacing != "log":
        return ("band",) + broadening_matrix(grid, h2, half_width)
    dv = float(np.median(grid.pixel_velocity[grid.in_segment]))
    k = int(np.ceil(half_width / dv)) + 2
    off = dv * np.arange(-k - 1, k + 2)
    h = h2(off)
    slope = np.diff(h) / dv  # (2k + 2,)
    return ("conv", slope[1:] - slope[:-1], k)  # (2k + 1,) weights of offsets -k..k


def _rotation_matrix(grid, vsini, epsilon):
    if vsini <= _TINY_VELOCITY:
        return None
    return _kernel_operator(grid, lambda u: rotation_second_integral(u, vsini, epsilon), vsini)


def _gaussian_matrix(grid, sigma):
    if sigma <= _TINY_VELOCITY:
        return None
    return _kernel_operator(grid, lambda u: gaussian_second_integral(u, sigma), 6.0 * sigma)


def _apply(op, flux, grid=None):
    """Apply a kernel operator to (..., P) arrays."""
    if op is None:
        return flux
    if op[0] == "band":
        idx, w = op[1], op[2]
        return np.einsum("...pk,pk->...p", flux[..., idx], w)
    w, k = op[1], op[2]
    out = np.array(flux, dtype=np.float64, copy=True)
    for a, b in grid.segments:
        seg = flux[..., a:b]
        pad = np.concatenate([np.repeat(seg[..., :1], k, axis=-1), seg,
                              np.repeat(seg[..., -1:], k, axis=-1)], axis=-1)
        win = np.lib.stride_tricks.sliding_window_view(pad, 2 * k + 1, axis=-1)
        out[..., a:b] = win @ w
    return out


def broaden(flux, grid, vsini=0.0, sigma=0.0, epsilon=DEFAULT_LIMB_DARKENING):
    """Rotate and/or Gaussian-broaden spectra on a grid.

    Parameters
    ----------
    flux : array_like, (N, P) or (P,)
        Normalized spectra (already through the instrument's LSF).
    grid : PixelGrid
    vsini : float or array_like (N,)
        Projected rotation, km/s (0: none).
    sigma : float or array_like (N,)
        Gaussian velocity dispersion, km/s (0: none).
    epsilon : float
        Linear limb-darkening coefficient.

    Returns
    -------
    ndarray like ``flux``
    """
    flux = np.asarray(flux, np.float64)
    single = flux.ndim == 1
    flux = np.atleast_2d(flux)
    if flux.shape[1] != grid.n_pixels:
        raise ValueError(f"spectra have {flux.shape[1]} pixels, the grid {grid.n_pixels}")
    n = flux.shape[0]
    vsini = np.broadcast_to(np.asarray(vsini, np.float64), (n,))
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (n,))
    if np.any(vsini < 0) or np.any(sigma < 0):
        raise ValueError("vsini and sigma must be >= 0")
    out = np.empty_like(flux)
    for i in range(n):
        f = _apply(_rotation_matrix(grid, vsini[i], epsilon), flux[i], grid)
        out[i] = _apply(_gaussian_matrix(grid, sigma[i]), f, grid)
    return out[0] if single else out


def lsf_matrix(wave_in, wave_out, resolution, n_sigma=5.0, truncate=False):
    """Gaussian line-spread function and resampling as one sparse matrix.

    Row ``i`` is a Gaussian of FWHM ``wave_out[i] / R_i`` centred on
    ``wave_out[i]``, sampled on the input pixels with trapezoid weights and
    normalized to unit sum (the way a high-resolution model spectrum is taken
    to an instrument's grid).

    Parameters
    ----------
    wave_in : array_like, (P_in,)
        Wavelengths of the input (model) pixels, increasing.
    wave_out : array_like, (P,)
    resolution : float or array_like (P,)
        Resolving power at the output pixels.
    n_sigma : float
        Kernel half-width in sigma.
    truncate : bool
        Where the input ends inside a kernel, cut the kernel there (and
        renormalize) instead of refusing.

    Returns
    -------
    scipy.sparse.csr_matrix, (P, P_in)
    """
    from scipy import sparse

    wave_in = np.asarray(wave_in, np.float64)
    wave_out = np.asarray(wave_out, np.float64)
    sig = wave_out / np.broadcast_to(np.asarray(resolution, np.float64), wave_out.shape) \
        / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    if wave_out[0] < wave_in[0] or wave_out[-1] > wave_in[-1] or (not truncate and (
            wave_out[0] - n_sigma * sig[0] < wave_in[0]
            or wave_out[-1] + n_sigma * sig[-1] > wave_in[-1])):
        raise ValueError(f"the output grid {wave_out[0]:.2f}-{wave_out[-1]:.2f} A with its LSF "
                         f"needs input from {wave_out[0] - n_sigma * sig[0]:.2f} to "
                         f"{wave_out[-1] + n_sigma * sig[-1]:.2f} A; the input covers "
                         f"{wave_in[0]:.2f}-{wave_in[-1]:.2f} A")
    dw = np.gradient(wave_in)
    lo = np.searchsorted(wave_in, wave_out - n_sigma * sig)
    hi = np.searchsorted(wave_in, wave_out + n_sigma * sig, side="right")
    rows, cols, vals = [], [], []
    for i in range(wave_out.size):  # rows differ in length where the input step changes
        j = np.arange(lo[i], hi[i])
        x = (wave_in[j] - wave_out[i]) / sig[i]
        w = np.exp(-0.5 * x * x) * dw[j]
        rows.append(np.full(j.size, i))
        cols.append(j)
        vals.append(w / w.sum())
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(wave_out.size, wave_in.size))


class BroadenedForwardModel:
    """Any forward model with projected rotation and Gaussian broadening as extra labels.

    Labels are the model's, then ``VSINI`` (km/s, >= 0) and, with
    ``gaussian=True``, ``VBROAD`` (the Gaussian velocity dispersion, km/s:
    micro-turbulence as a nuisance — it broadens; it does not change line
    strengths, which only a model computed with it can — or macro-turbulence).
    The Jacobian of the labels is the broadened Jacobian of the model (a
    convolution is linear); ``d flux / d VSINI`` and ``d / d VBROAD`` are
    central differences of the broadening.

    Parameters
    ----------
    model : forward model
        With ``predict_with_jacobian``, ``label_names``, ``label_bounds``,
        ``training_labels`` (``s2``, ``pixel_flags`` optional).
    grid : PixelGrid, optional
        The model's pixels (default ``model.grid``).
    vsini_max : float
        Upper bound of VSINI for fits, km/s.
    gaussian : bool
        Also fit VBROAD (bounded by ``vbroad_max``).
    vbroad_max : float
    epsilon : float
        Linear limb darkening.
    step : float
        Finite-difference step of VSINI / VBROAD, km/s.
    """

    def __init__(self, model, grid=None, vsini_max=300.0, gaussian=False, vbroad_max=30.0,
                 epsilon=DEFAULT_LIMB_DARKENING, step=0.5):
        self.model = model
        self.grid = grid if grid is not None else getattr(model, "grid", None)
        if self.grid is None:
            raise ValueError("rotation needs the wavelengths of the model's pixels: give grid=")
        self.epsilon = float(epsilon)
        self.gaussian = bool(gaussian)
        self.step = float(step)
        extra = ["VSINI"] + (["VBROAD"] if gaussian else [])
        self.label_names = list(model.label_names) + extra
        n_base = len(model.label_names)
        self.n_base = n_base
        bounds = [[0.0, float(vsini_max)]] + ([[0.0, float(vbroad_max)]] if gaussian else [])
        self.label_bounds = np.vstack([np.asarray(model.label_bounds, np.float64), bounds])
        # starting points and label scaling for fits: the model's, each with a spread of
        # velocities over the allowed range (so that fits start at several)
        tl = np.atleast_2d(np.asarray(model.training_labels, np.float64))
        rng = np.random.default_rng(0)
        spread = [rng.uniform(0.1, 0.6, len(tl)) * vsini_max]
        if gaussian:
            spread.append(rng.uniform(0.1, 0.6, len(tl)) * vbroad_max)
        self.training_labels = np.column_stack([tl] + spread)
        self.s2 = getattr(model, "s2", None)
        if getattr(model, "pixel_flags", None) is not None:
            self.pixel_flags = model.pixel_flags

    def outside_training(self, labels):
        """(N,) bool: the model's own ``outside_training`` of the labels (False without one)."""
        labels = np.atleast_2d(np.asarray(labels, np.float64))
        own = getattr(self.model, "outside_training", None)
        if own is None:
            return np.zeros(len(labels), bool)
        return np.asarray(own(labels[:, :self.n_base]), bool)

    def _broaden(self, arr, vsini, sigma):
        """One star's (K, P) rows, broadened."""
        out = _apply(_rotation_matrix(self.grid, vsini, self.epsilon), arr, self.grid)
        return _apply(_gaussian_matrix(self.grid, sigma), out, self.grid)

    def _split(self, labels):
        labels = np.atleast_2d(np.asarray(labels, np.float64))
        vsini = np.clip(labels[:, self.n_base], 0.0, None)
        sigma = (np.clip(labels[:, self.n_base + 1], 0.0, None) if self.gaussian
                 else np.zeros(len(labels)))
        return labels[:, :self.n_base], vsini, sigma

    def predict(self, labels):
        """Broadened flux, (N, L + extra) -> (N, P)."""
        base, vsini, sigma = self._split(labels)
        flux = np.atleast_2d(self.model.predict(base))
        return np.stack([self._broaden(flux[i], vsini[i], sigma[i]) for i in range(len(flux))])

    def predict_with_jacobian(self, labels):
        """Broadened flux (N, P) and Jacobian (N, P, L + extra)."""
        base, vsini, sigma = self._split(labels)
        flux, jac = self.model.predict_with_jacobian(base)
        n, p, n_lab = jac.shape
        n_extra = 1 + self.gaussian
        out_f = np.empty((n, p))
        out_j = np.empty((n, p, n_lab + n_extra))
        h = self.step
        for i in range(n):
            stack = np.vstack([flux[i][None], np.swapaxes(jac[i], 0, 1)])  # (1 + L, P)
            b = self._broaden(stack, vsini[i], sigma[i])
            out_f[i], out_j[i, :, :n_lab] = b[0], b[1:].T
            # one-sided at 0: the velocity is >= 0 (flux is even in it, d/dv -> 0 there)
            lo, hi = max(vsini[i] - h, 0.0), vsini[i] + h
            out_j[i, :, n_lab] = (self._broaden(flux[i], hi, sigma[i])
                                  - self._broaden(flux[i], lo, sigma[i])) / (hi - lo)
            if self.gaussian:
                lo, hi = max(sigma[i] - h, 0.0), sigma[i] + h
                out_j[i, :, n_lab + 1] = (self._broaden(flux[i], vsini[i], hi)
                                          - self._broaden(flux[i], vsini[i], lo)) / (hi - lo)
        return out_f, out_j
