"""Pixel grids: where the pixels of a spectrum are, and what a pixel is worth.

A :class:`PixelGrid` is what the core needs to know about a spectrograph: the
vacuum wavelength of every pixel, the detector segments (chips) the pixels
belong to, with gaps between them, whether the grid is uniform in log lambda
(then every pixel has the same velocity width) or in lambda, and the resolving
power. Models record the grid they were trained on; fits, continuum
normalization and line broadening take segments and pixel velocities from it,
never from one instrument's constants.

The APOGEE grids are built in (:meth:`PixelGrid.apstar`,
:meth:`PixelGrid.aspcap`); any wavelength array makes a grid
(:meth:`PixelGrid.from_wavelength`).
"""
from __future__ import annotations

import numpy as np

__all__ = ["PixelGrid", "segment_index", "SPEED_OF_LIGHT", "APSTAR_NPIX", "APSTAR_CRVAL1",
           "APSTAR_CDELT1", "APSTAR_CHIPS", "ASPCAP_SEGMENTS", "APOGEE_RESOLUTION"]

#: km/s.
SPEED_OF_LIGHT = 299792.458

#: The apStar grid: ``10 ** (CRVAL1 + CDELT1 * i)`` Angstrom (vacuum), i < 8575.
APSTAR_NPIX = 8575
APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6e-6
#: Half-open pixel ranges of the three APOGEE chips on the apStar grid (the parts the
#: DR16/17 ASPCAP grid keeps: the chip gaps and the poorly calibrated chip ends dropped).
APSTAR_CHIPS = ((246, 3274), (3585, 6080), (6344, 8335))
#: The apStar pixels that make up each gap-free ASPCAP grid, by pixel count.
ASPCAP_SEGMENTS = {
    7214: ((322, 3242), (3648, 6048), (6412, 8306)),   # DR12-14
    7514: APSTAR_CHIPS,                                 # DR16-17
}
#: APOGEE's resolving power, lambda / FWHM.
APOGEE_RESOLUTION = 22500.0

# a grid is "uniform" in lambda or log lambda when its steps agree to this (relative)
_UNIFORM_RTOL = 1e-6


class PixelGrid:
    """The pixels of a spectrum: wavelengths, detector segments and resolution.

    Parameters
    ----------
    wavelength : array_like, (P,)
        Vacuum wavelength of each pixel centre, Angstrom, strictly increasing.
    segments : sequence of (int, int), optional
        Half-open pixel ranges of the detector segments (chips), in order and
        not overlapping. Pixels outside every segment are gaps: no data there.
        By default the grid is cut where the wavelength step jumps to more than
        twice its local size (a gap in wavelength), else it is one segment.
    resolution : float or array_like (P,), optional
        Resolving power ``lambda / FWHM`` of the line-spread function.
    name : str, optional

    Attributes
    ----------
    wavelength : ndarray, (P,)
    segments : tuple of (int, int)
    resolution : float, ndarray (P,) or None
    name : str
    spacing : {"log", "linear", "irregular"}
        Uniform in log lambda (constant velocity per pixel), in lambda, or neither.
    """

    def __init__(self, wavelength, segments=None, resolution=None, name=""):
        wave = np.array(wavelength, dtype=np.float64).ravel()
        if wave.size < 3:
            raise ValueError(f"a pixel grid needs at least 3 pixels, got {wave.size}")
        if not np.all(np.isfinite(wave)) or wave[0] <= 0:
            raise ValueError("pixel grid wavelengths must be finite and positive")
        step = np.diff(wave)
        if np.any(step <= 0):
            i = int(np.flatnonzero(step <= 0)[0])
            raise ValueError(f"pixel grid wavelengths must increase: pixel {i + 1} "
                             f"({wave[i + 1]:.4f} A) does not follow pixel {i} ({wave[i]:.4f} A)")
        wave.flags.writeable = False
        self.wavelength = wave
        self.segments = _check_segments(segments if segments is not None
                                        else _segments_from_steps(step), wave.size)
        self.resolution = _check_resolution(resolution, wave.size)
        self.name = str(name or "")
        self.spacing = _spacing(wave, self.segments)

    # ------------------------------------------------------------------ built-ins
    @classmethod
    def apstar(cls):
        """The apStar grid: 8575 pixels uniform in log lambda, three chips, R = 22,500."""
        wave = 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NPIX))
        return cls(wave, APSTAR_CHIPS, APOGEE_RESOLUTION, name="apStar")

    @classmethod
    def aspcap(cls, n_pixels=7514):
        """A gap-free ASPCAP grid: 7514 pixels (DR16-17) or 7214 (DR12-14).

        The apStar pixels of the three chips, with the gaps between them removed;
        each chip is a segment (no pixel neighbours its neighbour across a gap).
        """
        if n_pixels not in ASPCAP_SEGMENTS:
            raise ValueError(f"ASPCAP grids have 7514 (DR16-17) or 7214 (DR12-14) pixels, "
                             f"not {n_pixels}")
        full = 10.0 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NPIX))
        pieces = ASPCAP_SEGMENTS[n_pixels]
        bounds = np.cumsum([0] + [b - a for a, b in pieces])
        wave = np.concatenate([full[a:b] for a, b in pieces])
        release = "DR16-17" if n_pixels == 7514 else "DR12-14"
        return cls(wave, tuple(zip(bounds[:-1].tolist(), bounds[1:].tolist())),
                   APOGEE_RESOLUTION, name=f"ASPCAP {release} ({n_pixels})")

    @classmethod
    def builtin(cls, n_pixels):
        """The APOGEE grid with this many pixels (8575, 7514 or 7214), else None."""
        if n_pixels == APSTAR_NPIX:
            return cls.apstar()
        if n_pixels in ASPCAP_SEGMENTS:
            return cls.aspcap(n_pixels)
        return None

    @classmethod
    def from_wavelength(cls, wavelength, segments=None, resolution=None, name=""):
        """A grid from any wavelength array (see the class parameters).

        Wavelengths of a built-in APOGEE grid, without segments given, give
        that grid, with its chips (the apStar grid has no gap in wavelength to
        find them by).
        """
        wave = np.asarray(wavelength, dtype=np.float64).ravel()
        known = cls.builtin(wave.size)
        if (segments is None and resolution is None and known is not None
                and np.allclose(wave, known.wavelength, rtol=1e-9, atol=0)):
            return known
        return cls(wave, segments=segments, resolution=resolution, name=name)

    @classmethod
    def log_uniform(cls, start, stop=None, step=None, n_pixels=None, segments=None,
                    resolution=None, name=""):
        """A grid uniform in log10 lambda: ``10 ** (log10(start) + step * i)``.

        Give ``step`` (in log10 lambda) or ``n_pixels``; with ``n_pixels`` and
        ``stop`` the grid runs from ``start`` to ``stop`` inclusive.
        """
        lo = np.log10(float(start))
        if step is None:
            if stop is None or n_pixels is None:
                raise ValueError("give step, or stop and n_pixels")
            step = (np.log10(float(stop)) - lo) / (int(n_pixels) - 1)
        if n_pixels is None:
            if stop is None:
                raise ValueError("give n_pixels or stop")
            n_pixels = int(np.floor((np.log10(float(stop)) - lo) / step + 1e-9)) + 1
        return cls(10.0 ** (lo + float(step) * np.arange(int(n_pixels))), segments,
                   resolution, name)

    @classmethod
    def linear(cls, start, stop, n_pixels, segments=None, resolution=None, name=""):
        """A grid uniform in lambda from ``start`` to ``stop`` inclusive."""
        return cls(np.linspace(float(start), float(stop), int(n_pixels)), segments,
                   resolution, name)

    # ------------------------------------------------------------------ facts
    @property
    def n_pixels(self):
        """P, the number of pixels."""
        return self.wavelength.size

    def __len__(self):
        return self.n_pixels

    @property
    def segment_of_pixel(self):
        """(P,) int64: the segment of each pixel, -1 in a gap."""
        return segment_index(self.segments, self.n_pixels)

    @property
    def in_segment(self):
        """(P,) bool: pixels inside a segment (not in a gap)."""
        return self.segment_of_pixel >= 0

    @property
    def pixel_velocity(self):
        """(P,) velocity width of each pixel, km/s: ``c * dlambda / lambda``.

        From the local step in ln lambda within each segment (centred
        differences, one-sided at the segment ends: never across a gap);
        constant on a grid uniform in log lambda.
        """
        lnw = np.log(self.wavelength)
        out = np.gradient(lnw)
        for a, b in self.segments:
            if b - a >= 2:
                out[a:b] = np.gradient(lnw[a:b])
        return SPEED_OF_LIGHT * out

    @property
    def lsf_sigma_velocity(self):
        """(P,) Gaussian sigma of the line-spread function, km/s (None if R is unknown)."""
        if self.resolution is None:
            return None
        fwhm_per_sigma = 2.0 * np.sqrt(2.0 * np.log(2.0))
        return np.broadcast_to(SPEED_OF_LIGHT / (np.asarray(self.resolution) * fwhm_per_sigma),
                               (self.n_pixels,)).copy()

    def inner_pixels(self):
        """(P,) bool: pixels whose two neighbours are in the same segment.

        Where a second difference along pixels means something: never across a
        segment join or into a gap.
        """
        seg = self.segment_of_pixel
        out = np.zeros(self.n_pixels, dtype=bool)
        out[1:-1] = (seg[1:-1] >= 0) & (seg[:-2] == seg[1:-1]) & (seg[2:] == seg[1:-1])
        return out

    def nearest_pixels(self, wavelength, max_offset=0.5):
        """Indices of the pixels nearest to wavelengths, and which are on the grid.

        Parameters
        ----------
        wavelength : array_like
            Vacuum wavelengths, Angstrom.
        max_offset : float, optional
            A wavelength farther than this many pixel widths from its nearest
            pixel is off the grid.

        Returns
        -------
        index : ndarray of int64
        on_grid : ndarray of bool
        """
        wl = np.atleast_1d(np.asarray(wavelength, dtype=np.float64))
        w = self.wavelength
        idx = np.clip(np.searchsorted(w, wl), 1, w.size - 1)
        left_closer = np.abs(wl - w[idx - 1]) <= np.abs(w[idx] - wl)
        idx = np.where(left_closer, idx - 1, idx)
        width = np.gradient(w)[idx]
        on = np.abs(wl - w[idx]) <= max_offset * width
        return idx.astype(np.int64), on

    # ------------------------------------------------------------------ comparison, files
    def __eq__(self, other):
        if not isinstance(other, PixelGrid):
            return NotImplemented
        return (self.n_pixels == other.n_pixels and self.segments == other.segments
                and np.allclose(self.wavelength, other.wavelength, rtol=1e-10, atol=0)
                and _same_resolution(self.resolution, other.resolution))

    def __hash__(self):
        return hash((self.n_pixels, self.segments, float(self.wavelength[0]),
                     float(self.wavelength[-1])))

    def __repr__(self):
        r = ("R unknown" if self.resolution is None else
             f"R={self.resolution:g}" if np.ndim(self.resolution) == 0 else
             f"R={np.min(self.resolution):g}-{np.max(self.resolution):g}")
        name = f"{self.name!r}, " if self.name else ""
        return (f"<PixelGrid {name}P={self.n_pixels}, {self.wavelength[0]:.2f}-"
                f"{self.wavelength[-1]:.2f} A, {self.spacing}, {len(self.segments)} "
                f"segment(s), {r}>")

    def describe(self):
        """A JSON-able description: name, segments, scalar resolution (arrays apart).

        Returns
        -------
        meta : dict
        arrays : dict of ndarray
            ``wavelength`` and, when per pixel, ``resolution``.
        """
        meta = dict(name=self.name, segments=[list(s) for s in self.segments],
                    spacing=self.spacing)
        arrays = dict(wavelength=np.asarray(self.wavelength))
        if self.resolution is not None and np.ndim(self.resolution) == 0:
            meta["resolution"] = float(self.resolution)
        elif self.resolution is not None:
            arrays["resolution"] = np.asarray(self.resolution, dtype=np.float64)
        return meta, arrays

    @classmethod
    def from_description(cls, meta, arrays):
        """The inverse of :meth:`describe`."""
        resolution = arrays.get("resolution", meta.get("resolution"))
        return cls(arrays["wavelength"], [tuple(s) for s in meta["segments"]], resolution,
                   meta.get("name", ""))


def segment_index(segments, n_pixels):
    """The segment of each of ``n_pixels`` pixels, -1 in the gaps.

    Parameters
    ----------
    segments : sequence of (int, int)
        Half-open pixel ranges.
    n_pixels : int

    Returns
    -------
    ndarray of int64, (P,)
    """
    out = np.full(int(n_pixels), -1, np.int64)
    for k, (a, b) in enumerate(segments):
        out[a:b] = k
    return out


def _segments_from_steps(step):
    """Cut where the step jumps above twice the median of its neighbours' steps."""
    n = step.size + 1
    if step.size < 5:
        return ((0, n),)
    pad = np.pad(step, 2, mode="edge")
    local = np.median(np.lib.stride_tricks.sliding_window_view(pad, 5), axis=1)
    # the median of 5 includes the step itself; a lone jump never sets its own median
    cuts = np.flatnonzero(step > 2.0 * local) + 1
    edges = [0] + cuts.tolist() + [n]
    return tuple((a, b) for a, b in zip(edges[:-1], edges[1:]))


def _check_segments(segments, n_pixels):
    out = []
    last = 0
    for s in segments:
        a, b = (int(v) for v in s)
        if not 0 <= a < b <= n_pixels:
            raise ValueError(f"segment {a}-{b} is not a non-empty pixel range inside 0-{n_pixels}")
        if a < last:
            raise ValueError(f"segments must be in order and not overlap: {a}-{b} starts "
                             f"before the previous one ends at {last}")
        out.append((a, b))
        last = b
    if not out:
        raise ValueError("a pixel grid needs at least one segment")
    return tuple(out)


def _check_resolution(resolution, n_pixels):
    if resolution is None:
        return None
    r = np.asarray(resolution, dtype=np.float64)
    if r.ndim == 0:
        if not (np.isfinite(r) and r > 0):
            raise ValueError(f"resolving power must be positive, got {float(r)}")
        return float(r)
    if r.shape != (n_pixels,):
        raise ValueError(f"resolving power must be a scalar or one per pixel ({n_pixels}), got "
                         f"shape {r.shape}")
    if not np.all(np.isfinite(r) & (r > 0)):
        raise ValueError("resolving power must be positive at every pixel")
    r = r.copy()
    r.flags.writeable = False
    return r


def _spacing(wave, segments):
    """Uniform in log lambda or in lambda inside the segments, with one step for all."""
    for name, values in (("log", np.log(wave)), ("linear", wave)):
        step = np.concatenate([np.diff(values[a:b]) for a, b in segments])
        if step.size and np.ptp(step) <= _UNIFORM_RTOL * np.abs(np.median(step)):
            return name
    return "irregular"


def _same_resolution(a, b):
    if a is None or b is None:
        return a is None and b is None
    return np.allclose(a, b)
