"""The Cannon: a per-pixel polynomial-in-labels model with per-pixel intrinsic scatter.

References
----------
Ness, Hogg, Rix, Ho & Zasowski 2015, ApJ 808, 16 ("The Cannon").
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from . import vectorizer as vz
from .._util import as_float64, atomic_path, describe_bad
from ._common import (PIXEL_FLAGS, UNUSABLE_PIXEL_FLAGS, check_spectra, fitted_pixels,
                      label_scaling)
from .backends import kernels, resolve_backend
from .grid import PixelGrid
from .threads import kernel_threads, map_in_streams, stream_count

__all__ = ["CannonModel", "PIXEL_FLAGS", "UNUSABLE_PIXEL_FLAGS", "fitted_pixels",
           "expected_true_labels", "MAX_PRIOR_COMPONENTS"]

#: Format version of the files written by ``CannonModel.write``.
FILE_FORMAT = 1


class CannonModel:
    """A data-driven spectral model: flux at each pixel is a polynomial in the labels.

    Parameters
    ----------
    label_names : sequence of str
        Names of the L labels, e.g. ``["TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE"]``.
    order : int, optional
        Polynomial order (2, quadratic, as in Ness et al. 2015, by default).
    backend : {"auto", "c", "numba", "numpy"}, optional
        Kernel implementation for training and fitting (see ``cannon_fast.core.backends``).
    extra_terms : sequence of str or of int sequences, optional
        Terms added to the full polynomial of ``order``, e.g. ``["TEFF^3", "TEFF^4"]``
        (see ``vectorizer.parse_term``): more freedom along one label without the
        cost of the next full order (56 terms for a cubic in 5 labels). Line
        strengths vary with temperature roughly as exp(-chi / kT), which a
        quadratic in Teff follows poorly at the hot and cool edges of a giant sample.
    reciprocal_labels : sequence of str, optional
        Labels the polynomial is built in the reciprocal of, e.g. ``["TEFF"]``:
        the model is then a polynomial in ``theta = 5040 / Teff`` (up to its
        scaling), in which the Boltzmann and Saha factors of line strengths,
        ``exp(-chi theta)``, are simpler. Fits, errors and gradients stay in
        the physical labels. The labels must be positive.
    grid : PixelGrid, optional
        The pixels of the training spectra: their segments (chips) and pixel
        velocities are what continuum refinement and line broadening use.
        By default the APOGEE grid of the spectra's pixel count (8575, 7514
        or 7214), else none (one segment, no broadening).

    Attributes
    ----------
    theta : ndarray, (P, T)
        Coefficients of the terms ``v(x)`` at each pixel, in scaled labels.
    s2 : ndarray, (P,)
        Intrinsic variance at each pixel.
    theta_cov : ndarray, (P, T(T+1)/2)
        Packed ``Cov(theta_p) = (X^T W_p X)^-1``, used to de-bias label fits.
    pixel_flags : ndarray of uint8, (P,)
        Bits of ``PIXEL_FLAGS``; 0 for a good pixel.
    label_offsets, label_scales : ndarray, (L,)
        Scaled labels are ``x = (label - offset) / scale``, with ``1 / label``
        in place of ``label`` for the ``reciprocal_labels``.
    training_labels : ndarray, (N_train, L)
    grid : PixelGrid or None
        The training spectra's pixel grid (set by ``train`` when not given).
    """

    def __init__(self, label_names, order=2, backend="auto", extra_terms=(),
                 reciprocal_labels=(), grid=None):
        label_names = [str(n) for n in label_names]
        if not label_names:
            raise ValueError("a CannonModel needs at least one label name")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"label names must be unique, got {label_names}")
        self.label_names = label_names
        self.order = int(order)
        base = vz.polynomial_exponents(len(label_names), self.order)
        extra = [vz.parse_term(t, label_names) for t in (extra_terms or ())]
        seen = {tuple(r) for r in base}
        for t, e in zip(extra_terms or (), extra):
            if tuple(e) in seen:
                raise ValueError(f"extra term {t!r} is already in the model (order {self.order} "
                                 "or listed twice)")
            seen.add(tuple(e))
        self.extra_terms = [[int(v) for v in e] for e in extra]
        unknown = [n for n in reciprocal_labels or () if n not in label_names]
        if unknown:
            raise ValueError(f"reciprocal label(s) {unknown} are not among the labels "
                             f"{label_names}")
        self.reciprocal_labels = [n for n in label_names if n in set(reciprocal_labels or ())]
        self._reciprocal = np.array([n in self.reciprocal_labels for n in label_names])
        self.exponents = np.ascontiguousarray(np.vstack([base] + [e[None] for e in extra]),
                                              dtype=np.int64)
        self.backend = resolve_backend(backend)
        if grid is not None and not isinstance(grid, PixelGrid):
            raise TypeError(f"grid must be a cannon_fast.PixelGrid, got {type(grid).__name__}")
        self.grid = grid
        self._grid_given = grid is not None
        self.theta = self.s2 = self.theta_cov = self.pixel_flags = None
        self.label_offsets = self.label_scales = self.training_labels = None
        self.training_hash = None
        self.train_info = {}
        #: calibrated errors (``core.errors.ErrorModel``) that ``fit`` applies; see
        #: ``calibrate_errors``. Training again drops it: it belongs to one training.
        self.error_model = None

    # ------------------------------------------------------------------ shape facts
    @property
    def n_labels(self):
        """L, the number of labels."""
        return len(self.label_names)

    @property
    def n_terms(self):
        """T, the number of polynomial terms."""
        return self.exponents.shape[0]

    @property
    def n_pixels(self):
        """P, the number of pixels (None before training)."""
        return None if self.theta is None else self.theta.shape[0]

    @property
    def is_trained(self):
        """Whether ``theta`` and ``s2`` are set."""
        return self.theta is not None

    @property
    def term_names(self):
        """Names of the T terms, e.g. ``'TEFF*LOGG'``."""
        return vz.term_names(self.label_names, self.exponents)

    @property
    def label_bounds(self):
        """(L, 2) physical bounds of label fits: the training range widened by 25 % each side."""
        self._require_trained()
        lo = self.training_labels.min(axis=0)
        hi = self.training_labels.max(axis=0)
        pad = 0.25 * (hi - lo)
        low = np.where(self._reciprocal, np.maximum(lo - pad, 0.5 * lo), lo - pad)
        return np.stack([low, hi + pad], axis=1)

    @property
    def scaled_label_bounds(self):
        """(2, L) lower and upper bounds of label fits in scaled labels."""
        return np.sort(self.scale_labels(self.label_bounds.T), axis=0)

    def __repr__(self):
        state = f"P={self.n_pixels}, trained on N={len(self.training_labels)}" \
            if self.is_trained else "untrained"
        extra = (" + " + ", ".join(self.term_names[-len(self.extra_terms):])
                 if self.extra_terms else "")
        if self.reciprocal_labels:
            extra += " in " + ", ".join(f"1/{n}" for n in self.reciprocal_labels)
        return (f"<CannonModel labels={self.label_names} order={self.order}{extra} "
                f"T={self.n_terms} backend={self.backend!r} {state}>")

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the model is not trained: call train() or CannonModel.read()")

    # ------------------------------------------------------------------ labels
    def _model_labels(self, labels):
        """Physical labels -> the quantities the polynomial is built in (before scaling).

        Also the way back: the reciprocal is its own inverse.
        """
        labels = np.asarray(labels, dtype=np.float64)
        if not self._reciprocal.any():
            return labels
        with np.errstate(divide="ignore"):
            return np.where(self._reciprocal, 1.0 / labels, labels)

    def scale_labels(self, labels):
        """Physical labels (N, L) -> scaled labels x (N, L)."""
        return (self._model_labels(labels) - self.label_offsets) / self.label_scales

    def unscale_labels(self, x):
        """Scaled labels x (N, L) -> physical labels (N, L)."""
        return self._model_labels(np.asarray(x) * self.label_scales + self.label_offsets)

    def label_derivatives(self, x):
        """``d label / d x`` at scaled labels x (N, L), element by element.

        The scale for a plain label; ``-scale * label²`` for a reciprocal one.
        Errors and Jacobians convert between scaled and physical labels with it.
        """
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        d = np.broadcast_to(self.label_scales, x.shape).copy()
        if self._reciprocal.any():
            labels = self.unscale_labels(x)
            d[:, self._reciprocal] *= -labels[:, self._reciprocal] ** 2
        return d

    def _labels_2d(self, labels, name="labels"):
        arr = np.asarray(labels, dtype=np.float64)
        single = arr.ndim == 1
        arr = np.atleast_2d(arr)
        if arr.ndim != 2 or arr.shape[1] != self.n_labels:
            raise ValueError(f"{name} must have shape (N, {self.n_labels}) for labels "
                             f"{self.label_names}, got {np.shape(labels)}")
        return arr, single

    # ------------------------------------------------------------------ training
    def train(self, flux, ivar, labels, max_iter=25, s2_rtol=1e-2, label_errors=None,
              band_limit=False):
        """Fit theta and s² at every pixel to a training set.

        At fixed s² the coefficients are the weighted least-squares solution with
        weights ``1 / (sigma² + s²)`` (one matrix product over all pixels gives
        every pixel's normal equations). s² then maximises the training-set
        likelihood (including its ``log(sigma² + s²)`` term) at that theta: a
        grid brackets the maximum and a search in the bracket refines it to a
        relative 5e-5 (absolute below 1e-4 of the pixel's mean noise variance;
        the tolerance of every backend, stated in ``cannon_fast._reference.s2_grid``;
        later passes start from the previous pass's s² with Newton steps instead,
        to the same tolerance). The two steps alternate until no pixel's s² moves by more than
        ``s2_rtol`` between passes, which converges to the joint
        maximum-likelihood (theta, s²). The returned s² maximises the
        likelihood at the returned theta, which was solved at an s² within
        ``s2_rtol`` of it (see ``s2_rtol`` for the exceptions).

        Parameters
        ----------
        flux, ivar : array_like, (N, P)
            Pseudo-continuum-normalised flux and its inverse variance; ``ivar = 0``
            marks a pixel that carries no information for that star.
        labels : array_like, (N, L)
            Training labels, in the order of ``label_names``.
        max_iter : int, optional
            Maximum number of (theta, s²) alternations.
        s2_rtol : float, optional
            Tolerance of the alternation, not of each s² (see above): stop when
            at every pixel s² changed between the last two passes by at most
            ``s2_rtol`` times the larger of the two, or both are below 1e-6 of
            the training set's median noise variance (an s² that changes no
            weight). Pixels still moving after ``max_iter`` passes are flagged
            ``S2_UNRESOLVED``. Convergence is fast (two passes on the benchmark
            data; docs/measurements.md).
        label_errors : array_like, (N, L), optional
            1-sigma errors of the training labels (e.g. the catalogue's
            ``TEFF_ERR``...). With them the model is trained for the true labels
            rather than the noisy ones, to first order (errors-in-variables):
            the labels are replaced by their expectation given the catalogue
            value under a prior fitted to the catalogue labels with their errors
            (``expected_true_labels``: regression calibration with a Gaussian
            mixture; a regression on noisy labels is attenuated, one on these is
            not), and each star's label errors, propagated through a
            first model's gradient spectra, are added to its pixel variances
            (``sum_l (df/dl)² err_l²``), so stars with poor labels weigh less.
            This trains twice. Whether it helps depends on how right the errors
            are, so the lab chooses it by cross-validation.
        band_limit : bool, optional
            Smooth theta along wavelength within the band the line-spread
            function leaves (``core.bandlimit.band_limit_theta``: a local
            polynomial over ~2.5 FWHM) and shrink ``theta_cov`` to match. On a
            grid that oversamples the LSF (several pixels per FWHM) this removes
            most of the training noise in theta, the main excess of label errors
            over the Cramér-Rao bound at high S/N (docs/measurements.md). Needs
            the grid's resolving power; recorded in ``train_info["band_limit"]``.

        Returns
        -------
        self : CannonModel

        Raises
        ------
        ValueError
            On non-finite or negative inputs, mismatched shapes, missing labels, an
            all-masked star, an empty training set or a degenerate label set; the
            message names the stars, pixels or labels at fault.

        References
        ----------
        Ness et al. 2015, eqs. 4-5.
        """
        if label_errors is not None:
            return self._train_with_label_errors(flux, ivar, labels, label_errors, max_iter,
                                                 s2_rtol, band_limit)
        if band_limit:  # refused before the work, with the fix in the message
            grid = self.grid if self._grid_given else PixelGrid.builtin(np.shape(flux)[-1])
            if grid is None or grid.resolution is None:
                raise ValueError(f"band_limit=True needs the grid's resolving power, and "
                                 f"{'the model has no grid' if grid is None else repr(grid)}"
                                 f"{'' if grid is None else ' has none'}: give the model a "
                                 "PixelGrid(..., resolution=R) (read_spectra(..., "
                                 "resolution=R) gives one)")
        flux, ivar, labels, column_sums = _check_training_set(flux, ivar, labels,
                                                              self.label_names)
        n_stars, n_pix = flux.shape
        self._set_grid(n_pix)
        k = kernels(self.backend)
        self._check_reciprocal(labels)
        med, scales = label_scaling(self._model_labels(labels))
        _check_label_spread(labels, self._model_labels(labels), scales, self.label_names)
        self.label_offsets, self.label_scales = med, scales
        x = self.scale_labels(labels)
        design = vz.label_vector(x, self.exponents)  # (N, T)
        _check_design(design, self.term_names)
        # Each pixel's packed normal matrix sum_n w_n v_n v_n^T from one product over
        # the distinct monomials v_i v_j only (126 of 231 columns for 5 labels, quadratic).
        mono_first, mono_index = vz.packed_outer_monomials(self.exponents)
        monomials_t = np.ascontiguousarray(vz.packed_outer(design)[:, mono_first].T)  # (M, N)

        # NaN flux is allowed where ivar = 0 (finite column sums: there is none)
        if not np.isfinite(column_sums[0]).all():
            flux = np.where(ivar > 0, flux, 0.0)
            column_sums = (flux.sum(axis=0), column_sums[1])
        n_valid = np.add.reduce(ivar > 0, axis=0, dtype=np.int32)
        too_few = n_valid < self.n_terms + 1
        # s² below this is "zero" for convergence purposes: 1e-6 of a typical noise
        # variance changes no weight. A median over up to 64 stars, because a mean is
        # ruled by the odd pixel with an enormous variance (one star's mean once made
        # this floor so high that no pixel was re-solved at its s²).
        iv_rows = ivar[::max(1, n_stars // 64)]
        s2_floor = 1e-6 * float(np.median(1.0 / iv_rows[iv_rows > 0]))

        s2 = np.zeros(n_pix)
        theta = np.empty((n_pix, self.n_terms))
        cov = np.empty((n_pix, vz.n_packed(self.n_terms)))
        status = np.zeros(n_pix, dtype=np.int8)
        # Every pass works through its pixels in blocks of `block` columns, each in one
        # small work buffer (three (N, block) arrays) reused throughout: whole (N, P)
        # temporaries cost as much in first-touch page faults and memory traffic as the
        # arithmetic, and a block's weights, residuals and s² stay in cache between the
        # products that make them. With several threads, the blocks run side by side in
        # single-threaded streams, one buffer each (``threads``: threads inside each
        # product and kernel leave cores idle), so the model does not depend on the
        # thread count. Where streams cannot run (the numpy reference, numba's workqueue
        # layer) but threads do, the many short parallel regions of small blocks cost
        # more than blocks save (several times more on a loaded machine, where a region
        # waits for a descheduled thread): a pass is one block there, or three for a
        # later pass whose gathered columns outgrow the one (N, P) buffer.
        pixel_block = _pixel_block(n_stars)
        streams = stream_count(self.backend, n_pix // pixel_block)
        threaded = streams == 1 and kernel_threads(self.backend) > 1
        block = n_pix if threaded else min(n_pix, pixel_block)
        works = [np.empty(n_stars * n_pix if threaded else 3 * n_stars * block)
                 for _ in range(streams)]
        gram = (monomials_t, mono_index)

        def solve_block(j0, work):
            cols = active[j0:j0 + step]
            th, cv, st, s2_b = self._train_block(k, cols, flux, ivar, s2, design, gram, work,
                                                 (theta, cov, status))
            s2_b[too_few[cols] | (st != 0)] = 0.0
            s2_new[j0:j0 + step] = s2_b

        # Alternate theta | s² and s² | theta. Only pixels whose s² moved by more than
        # s2_rtol are solved again, so later passes are cheap (most pixels settle at once).
        active = np.arange(n_pix)
        history = []
        for it in range(max_iter):
            s2_new = np.empty(len(active))
            step = block if it == 0 else min(block, len(works[0]) // (3 * n_stars))
            starts = range(0, len(active), step)
            for _ in map_in_streams(solve_block, starts, min(streams, len(starts)),
                                    self.backend, works):
                pass
            old = s2[active]
            moved = (np.abs(s2_new - old) > s2_rtol * np.maximum(s2_new, old)) \
                & (np.maximum(s2_new, old) > s2_floor)
            s2[active] = s2_new
            history.append(int(moved.sum()))
            active = active[moved]
            if len(active) == 0:
                break
        # theta of a pixel is from the last pass that solved it, at an s² within s2_rtol
        # of the final one; pixels still moving after max_iter are flagged.
        moved = np.zeros(n_pix, dtype=bool)
        moved[active] = True

        flags = np.zeros(n_pix, dtype=np.uint8)
        flags[too_few] |= PIXEL_FLAGS["TOO_FEW_STARS"]
        flags[status != 0] |= PIXEL_FLAGS["SINGULAR"]
        flags[moved] |= PIXEL_FLAGS["S2_UNRESOLVED"]
        bad = flags & (PIXEL_FLAGS["TOO_FEW_STARS"] | PIXEL_FLAGS["SINGULAR"]) > 0
        # A flagged pixel gets a constant model (the weighted mean flux) and no scatter,
        # never NaN; fits ignore it.
        if bad.any():
            wsum = ivar[:, bad]
            tot = wsum.sum(axis=0)
            wmean = (wsum * flux[:, bad]).sum(axis=0) / np.maximum(tot, 1e-300)
            mean = np.where(tot > 0, wmean, 1.0)
            theta[bad] = 0.0
            theta[bad, 0] = mean
            cov[bad] = 0.0
            s2[bad] = 0.0
        limited = None
        if band_limit:
            from .bandlimit import BAND_LIMIT_ORDER, BAND_LIMIT_WIDTH, band_limit_theta
            theta, factor = band_limit_theta(theta, self.grid, flags == 0)
            # Cov of a weighted sum of independent neighbours ~ sum(c²) C_p (C varies slowly)
            cov = cov * factor[:, None]
            limited = dict(order=BAND_LIMIT_ORDER, width_fwhm=BAND_LIMIT_WIDTH,
                           median_variance_factor=float(np.median(factor)))
        self.theta, self.s2, self.theta_cov, self.pixel_flags = theta, s2, cov, flags
        self.training_labels = labels
        self.training_hash = _fingerprint(flux, ivar, labels, column_sums)
        self.error_model = None
        diagnostics = self._fit_diagnostics(flux, ivar, design, works, threaded, streams)
        self.train_info = dict(n_stars=n_stars, n_pixels=n_pix, iterations=len(history),
                               moving_pixels=history, n_flagged_pixels=int((flags > 0).sum()),
                               **diagnostics)
        if limited is not None:
            self.train_info["band_limit"] = limited
        return self

    def _train_block(self, k, cols, flux, ivar, s2, design, gram, work, out):
        """One pass of ``train`` at the training pixels ``cols`` (increasing).

        theta | s² (the weighted least-squares solution at the current ``s2``), then
        s² | theta. Returns (theta, its packed inverse normal matrix, the solver's
        status, the new s²) of those pixels. ``gram`` is (the distinct monomials of the
        design's outer products, transposed; their index into the packed normal
        matrix); ``work`` holds three (N, len(cols)) arrays, or one when ``cols`` is
        every pixel (ivar and flux are then used in place). theta, the
        inverse normal matrix and the status are written into ``out`` (the model's
        (P, ...) arrays) at ``cols``.
        """
        n, m = len(flux), len(cols)
        run = cols[-1] - cols[0] == m - 1
        if m == flux.shape[1]:  # every pixel: the arrays themselves
            iv, f, buf = ivar, flux, work[:n * m].reshape(n, m)
        elif run:  # a run of pixels (the first pass): copies, contiguous for the kernels
            iv, f, buf = (work[i * n * m:(i + 1) * n * m].reshape(n, m) for i in range(3))
            np.copyto(iv, ivar[:, cols[0]:cols[0] + m])
            np.copyto(f, flux[:, cols[0]:cols[0] + m])
        else:  # np.take gathers columns ~8x faster than fancy indexing; with out=, only
            # a mode other than "raise" spares it a buffered copy (cols are valid indices)
            iv, f, buf = (work[i * n * m:(i + 1) * n * m].reshape(n, m) for i in range(3))
            np.take(ivar, cols, axis=1, out=iv, mode="clip")
            np.take(flux, cols, axis=1, out=f, mode="clip")
        s2_b = s2[cols]
        weights = iv
        if s2_b.any():  # 1 / (1/ivar + s²); 0 where ivar = 0
            weights = np.multiply(iv, s2_b, out=buf)
            weights += 1.0
            np.divide(iv, weights, out=weights)
        # each pixel's packed normal matrix sum_n w_n v_n v_n^T from one product over
        # the distinct monomials v_i v_j only (126 of 231 columns for 5 labels, quadratic)
        # (M, N) @ (N, m) then the small transpose: BLAS is ~30 % faster in this
        # orientation than in (m, N) @ (N, M) (measured on the benchmark's shapes)
        monomials_t, mono_index = gram
        a_packed = np.ascontiguousarray(np.take(monomials_t @ weights, mono_index, axis=0).T)
        wf = np.multiply(weights, f, out=buf)
        b = np.ascontiguousarray((design.T @ wf).T)  # (m, T)
        theta, cov, status = out
        if run:  # the kernel writes straight into the model's arrays
            th, cv, st = (a[cols[0]:cols[0] + m] for a in out)
        else:
            th, cv, st = (np.empty((m,) + a.shape[1:], a.dtype) for a in out)
        k.solve_normal_equations(a_packed, b, th, cv, st)
        if not run:
            theta[cols], cov[cols], status[cols] = th, cv, st
        resid = np.matmul(design, th.T, out=buf)
        np.subtract(f, resid, out=resid)
        s2_new = np.empty(m)
        # started from the previous pass's s² (where there is one: 0 runs the full
        # search), whose theta hardly differs: a few Newton steps instead of a grid
        k.s2_update_warm(resid, iv, s2_b, s2_new, np.empty(m, dtype=np.int8))
        return th, cv, st, s2_new

    def _fit_diagnostics(self, flux, ivar, design, works, threaded, streams,
                         poor_fit_stars=512, neighbour_stars=256):
        """``train_info``'s POOR_FIT limit and neighbour noise correlation.

        From the residuals of every ``len(flux) // poor_fit_stars``-th training star
        (``errors.poor_fit_limit``) and every ``len(flux) // neighbour_stars``-th (the
        correlation of neighbouring pixels' normalized residuals: resampling onto a
        grid correlates the noise of neighbouring pixels, and with it the training
        noise of neighbouring coefficients, which the broadened fit's correction for
        that noise, ``fit_broadened``, needs to know), at their labels. The stars are
        taken a few at a time (all at once if ``threaded``) in ``works`` (training's
        flat buffers, free by now; one per stream, as in ``train``), each star's
        residuals computed once for both, and the kernel ``training_sums`` makes
        every sum in one pass over them.
        """
        n, n_pix = flux.shape
        step_p, step_n = max(1, n // poor_fit_stars), max(1, n // neighbour_stars)
        rows = np.union1d(np.arange(0, n, step_p), np.arange(0, n, step_n))
        use = fitted_pixels(self, n_pix)
        seg = (self.grid.segment_of_pixel if self.grid is not None
               else np.zeros(n_pix, np.int64))
        same_seg = np.append((seg[:-1] == seg[1:]) & (seg[:-1] >= 0), False)
        # chunks of ~256k values: in cache for the kernel, few enough calls; with
        # threads, as few chunks as the buffer allows (see ``train``)
        fit_in = len(works[0]) // n_pix
        chunk = max(1, min(len(rows), fit_in if threaded else min(fit_in, (1 << 18) // n_pix)))
        chi2, count = np.empty(len(rows)), np.empty(len(rows), np.int64)
        pair = np.empty((len(rows), 4))
        theta_t = np.ascontiguousarray(self.theta.T)  # BLAS is faster with it contiguous
        k = kernels(self.backend)

        def sums(j0, work):
            sel = rows[j0:j0 + chunk]
            c = len(sel)
            with_pairs = sel % step_n == 0
            if sel[-1] - sel[0] == c - 1:  # a run of stars: views, not copies
                sel = slice(sel[0], sel[0] + c)
            r = np.matmul(design[sel], theta_t, out=work[:c * n_pix].reshape(c, n_pix))
            np.subtract(flux[sel], r, out=r)
            k.training_sums(r, np.ascontiguousarray(ivar[sel]), self.s2, use, same_seg,
                            with_pairs, chi2[j0:j0 + c], count[j0:j0 + c], pair[j0:j0 + c])

        starts = range(0, len(rows), chunk)
        for _ in map_in_streams(sums, starts, min(streams, len(starts)), self.backend, works):
            pass
        keep = rows % step_p == 0
        from .errors import poor_fit_limit
        limit = poor_fit_limit(chi2[keep], np.maximum(count[keep] - self.n_labels, 1))
        n_pair, ab, aa, bb = pair.sum(axis=0)
        corr = 0.0 if n_pair < 100 else float(ab / np.sqrt(aa * bb))
        return dict(neighbour_noise_correlation=corr, poor_fit_reduced_chi2=limit)

    def _train_with_label_errors(self, flux, ivar, labels, label_errors, max_iter, s2_rtol,
                                 band_limit=False):
        """``train`` for noisy training labels; see ``label_errors`` there."""
        flux, ivar, labels, _ = _check_training_set(flux, ivar, labels, self.label_names)
        errors = as_float64(label_errors, "label_errors")
        if errors.ndim == 1 and labels.shape[1] == 1:  # as _check_training_set does for labels
            errors = errors[:, None]
        if errors.shape != labels.shape:
            raise ValueError(f"label_errors must have the shape of labels {labels.shape}, got "
                             f"{np.shape(label_errors)}")
        bad = ~(np.isfinite(errors) & (errors >= 0))
        if bad.any():
            n, l = np.argwhere(bad)[0]
            raise ValueError(f"{int(bad.any(axis=1).sum())} training star(s) have a missing or "
                             f"negative label error, e.g. star {n} {self.label_names[l]}_ERR = "
                             f"{errors[n, l]}; fill them (e.g. with the median error)")
        # the expectation in the quantities the model is built in (1 / label for a
        # reciprocal one), whose distribution the Gaussian-mixture prior describes
        self._check_reciprocal(labels)
        rec = self._reciprocal
        expected = expected_true_labels(self._model_labels(labels),
                                        np.where(rec, errors / labels ** 2, errors),
                                        self.label_names)
        expected = self._model_labels(expected)
        self.train(flux, ivar, expected, max_iter=max_iter, s2_rtol=s2_rtol,
                   band_limit=band_limit)
        extra = np.empty_like(ivar)  # label errors as flux variance, chunk by chunk
        for a in range(0, len(ivar), 256):
            grad = self.gradient(expected[a:a + 256])  # (n, L, P)
            extra[a:a + 256] = np.einsum("nlp,nl->np", grad ** 2, errors[a:a + 256] ** 2)
        ivar_eff = ivar / (1.0 + ivar * extra)
        self.train(flux, ivar_eff, expected, max_iter=max_iter, s2_rtol=s2_rtol,
                   band_limit=band_limit)
        self.training_labels = labels  # the ranges users and priors see are the catalogue's
        self.training_hash = _fingerprint(flux, ivar, np.hstack([labels, errors]))
        self.train_info["label_errors"] = dict(
            median_error=dict(zip(self.label_names, np.median(errors, axis=0).tolist())),
            median_shift=dict(zip(self.label_names,
                                  np.median(np.abs(expected - labels), axis=0).tolist())))
        return self

    def _set_grid(self, n_pix):
        """Check the model's grid against the training spectra, or take the built-in one."""
        if not self._grid_given:
            self.grid = PixelGrid.builtin(n_pix)
        elif self.grid.n_pixels != n_pix:
            raise ValueError(f"the training spectra have {n_pix} pixels but the model's grid "
                             f"{self.grid!r} has {self.grid.n_pixels}")

    @property
    def segments(self):
        """Half-open pixel ranges of the grid's segments (one for a model without a grid)."""
        self._require_trained()
        return self.grid.segments if self.grid is not None else ((0, self.n_pixels),)

    def _check_reciprocal(self, labels):
        """Refuse a non-positive training value of a reciprocal label."""
        if self._reciprocal.any() and not np.all(labels[:, self._reciprocal] > 0):
            n, l = np.argwhere(labels[:, self._reciprocal] <= 0)[0]
            raise ValueError(f"{self.reciprocal_labels[l]} of training star {n} is "
                             f"{labels[n, np.flatnonzero(self._reciprocal)[l]]}: a reciprocal "
                             "label must be positive")

    # ------------------------------------------------------------------ prediction
    def predict(self, labels):
        """Model spectra at the given labels.

        Parameters
        ----------
        labels : array_like, (N, L) or (L,)

        Returns
        -------
        ndarray, (N, P) or (P,)
        """
        self._require_trained()
        arr, single = self._labels_2d(labels)
        flux = vz.label_vector(self.scale_labels(arr), self.exponents) @ self.theta.T
        return flux[0] if single else flux

    def gradient(self, labels):
        """Gradient spectra ``d flux / d label`` in physical label units.

        Parameters
        ----------
        labels : array_like, (N, L) or (L,)

        Returns
        -------
        ndarray, (N, L, P) or (L, P)
        """
        self._require_trained()
        arr, single = self._labels_2d(labels)
        dv = vz.label_vector_jacobian(self.scale_labels(arr), self.exponents)  # (N, T, L)
        n, t, l = dv.shape
        # one BLAS product (N L, T) x (T, P): 15x faster than the equivalent einsum
        grad = (np.ascontiguousarray(dv.transpose(0, 2, 1)).reshape(n * l, t) @ self.theta.T)
        grad = grad.reshape(n, l, -1)
        grad /= self.label_derivatives(self.scale_labels(arr))[:, :, None]
        return grad[0] if single else grad

    def predict_with_jacobian(self, labels):
        """Model spectra and their Jacobian (the generic forward-model protocol).

        Parameters
        ----------
        labels : array_like, (N, L)

        Returns
        -------
        flux : ndarray, (N, P)
        jac : ndarray, (N, P, L)
        """
        arr, _ = self._labels_2d(labels)
        return self.predict(arr), np.swapaxes(self.gradient(arr), 1, 2)

    def fit(self, flux, ivar, calibrated_errors=True, **kwargs):
        """Fit labels to spectra: see ``cannon_fast.core.fitting.fit_cannon``.

        With an ``error_model`` (``calibrate_errors``) and ``calibrated_errors``
        (default), the result's ``errors`` are the calibrated ones and
        ``formal_errors`` the fit's own.
        """
        from .fitting import fit_cannon
        res = fit_cannon(self, flux, ivar, **kwargs)
        if calibrated_errors and self.error_model is not None:
            res = self.error_model.apply(res)
        return res

    def calibrate_errors(self, flux, ivar, labels, label_errors=None, reference=None,
                         reference_errors=None, n_folds=5, seed=0, progress_bar=False,
                         **fit_options):
        """Learn calibrated errors by cross-validation on a training set; keep them.

        The training set is split in ``n_folds``; a model like this one is trained
        on the others and fits each fold (with ``fit_options``); the held-out
        fits against ``reference`` set ``self.error_model`` (see
        ``core.errors``), which ``fit`` and ``write`` then carry.

        Parameters
        ----------
        flux, ivar, labels, label_errors
            The training set, as given to ``train`` (normally the same one).
        reference, reference_errors : ndarray, (N, L), optional
            What the held-out fits are judged against (default: ``labels`` with
            ``label_errors``). Reference labels better than the training labels
            (a simulation's truth, a calibration sample) give truer errors;
            understated reference errors make them too large, not too small.
        n_folds, seed : int
        progress_bar : bool
        **fit_options
            Options of the fits the errors are for (e.g. ``debias=False``).

        Returns
        -------
        ErrorModel
        """
        from .errors import fit_error_model

        self._require_trained()
        labels = np.atleast_2d(np.asarray(labels, float))
        n = len(labels)
        if not 2 <= n_folds <= n // 10:
            raise ValueError(f"{n} stars cannot be split into {n_folds} folds of >= 10 stars")
        ref = labels if reference is None else np.atleast_2d(np.asarray(reference, float))
        ref_err = label_errors if reference is None else reference_errors
        folds = np.random.default_rng(seed).permutation(n) % n_folds
        fitted = np.full(labels.shape, np.nan)
        formal = np.full(labels.shape, np.nan)
        for k in range(n_folds):
            inner, held = folds != k, folds == k
            m = CannonModel(self.label_names, order=self.order, backend=self.backend,
                            extra_terms=self.extra_terms,
                            reciprocal_labels=self.reciprocal_labels,
                            grid=self.grid if self._grid_given else None)
            m.train(flux[inner], ivar[inner], labels[inner],
                    label_errors=None if label_errors is None else label_errors[inner],
                    band_limit="band_limit" in (self.train_info or {}))
            r = m.fit(flux[held], ivar[held], progress_bar=progress_bar, **fit_options)
            fitted[held] = np.where(r.ok[:, None], r.labels, np.nan)
            formal[held] = r.errors
        self.error_model = fit_error_model(
            fitted, formal, ref, self.label_names, reference_errors=ref_err,
            training_labels=self.training_labels,
            info=dict(reference="training labels" if reference is None else "given",
                      n_folds=n_folds, fit_options={k: v for k, v in fit_options.items()
                                                    if isinstance(v, (bool, int, float, str))}))
        return self.error_model

    def starting_points(self, n):
        """``n`` starting points for label fits, in scaled labels.

        The median training star first, then training stars spread over the
        label space (farthest-point sampling in scaled labels among the stars
        inside the 5-95 % range of every label).
        """
        self._require_trained()
        x = self.scale_labels(self.training_labels)
        lo, hi = np.percentile(x, [5, 95], axis=0)
        inner = x[np.all((x >= lo) & (x <= hi), axis=1)]
        if len(inner) == 0:
            inner = x
        pts = [np.median(x, axis=0)]
        dist = np.sum((inner - pts[0]) ** 2, axis=1)
        while len(pts) < n and dist.max() > 0:
            j = int(np.argmax(dist))
            pts.append(inner[j])
            dist = np.minimum(dist, np.sum((inner - inner[j]) ** 2, axis=1))
        return np.ascontiguousarray(np.array(pts))

    # ------------------------------------------------------------------ I/O
    def _metadata(self):
        from .. import __version__
        return dict(format=FILE_FORMAT, package="cannon_fast", version=__version__,
                    label_names=self.label_names, order=self.order,
                    extra_terms=self.extra_terms, reciprocal_labels=self.reciprocal_labels,
                    backend=self.backend,
                    training_hash=self.training_hash, train_info=self.train_info,
                    error_model=None if self.error_model is None
                    else self.error_model.to_dict())

    def _grid_record(self):
        """The grid's metadata (None without a grid) and its arrays, named for the file."""
        if self.grid is None:
            return None, {}
        meta, arrays = self.grid.describe()
        return meta, {f"grid_{k}": v for k, v in arrays.items()}

    def write(self, path, overwrite=False):
        """Write the trained model to one self-describing file, atomically.

        ``.fits`` writes a FITS file (metadata in the primary header, one image
        HDU per array); any other suffix writes an ``.npz`` readable with
        ``allow_pickle=False``. The round trip is exact.

        Parameters
        ----------
        path : str or os.PathLike
        overwrite : bool, optional
            Replace an existing file (default: refuse).
        """
        self._require_trained()
        path = os.fspath(path)
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        arrays = dict(theta=self.theta, s2=self.s2, theta_cov=self.theta_cov,
                      pixel_flags=self.pixel_flags, label_offsets=self.label_offsets,
                      label_scales=self.label_scales, training_labels=self.training_labels,
                      exponents=self.exponents)
        meta = self._metadata()
        meta["grid"], grid_arrays = self._grid_record()
        arrays.update(grid_arrays)
        with atomic_path(path) as tmp:
            if path.lower().endswith((".fits", ".fit", ".fits.gz")):
                import fitsio
                with fitsio.FITS(tmp, "rw", clobber=True) as fits:
                    fits.write(None, header=[
                        dict(name="CF_META", value="see META HDU"),
                        dict(name="CF_VER", value=meta["version"]),
                        dict(name="ORDER", value=self.order),
                        dict(name="NLABELS", value=self.n_labels)])
                    fits.write(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                               extname="META")
                    for name, arr in arrays.items():
                        fits.write(np.ascontiguousarray(arr), extname=name.upper())
            else:
                with open(tmp, "wb") as fh:
                    np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def read(cls, path, backend="auto"):
        """Read a model written by ``write``.

        Parameters
        ----------
        path : str or os.PathLike
        backend : str, optional
            Backend for later fits (the file records the one used in training).

        Returns
        -------
        CannonModel
        """
        import zipfile
        import zlib

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model file at {path}")
        try:
            if path.lower().endswith((".fits", ".fit", ".fits.gz")):
                import fitsio
                with fitsio.FITS(path) as fits:
                    meta = json.loads(fits["META"].read().tobytes().decode())
                    names = ["theta", "s2", "theta_cov", "pixel_flags", "label_offsets",
                             "label_scales", "training_labels", "exponents"]
                    names += [n for n in ("grid_wavelength", "grid_resolution")
                              if n.upper() in fits]
                    arrays = {name: fits[name.upper()].read() for name in names}
            else:
                # our own handle: np.load leaks its file when the zip is truncated
                with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
                    meta = json.loads(str(data["meta"]))
                    arrays = {k: data[k] for k in data.files if k != "meta"}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            # a truncated .npz fails as BadZipFile, EOFError or zlib.error, not OSError
            raise ValueError(f"{path} is not a cannon_fast model file (truncated or corrupt?): "
                             f"{type(err).__name__}: {err}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path} is not a cannon_fast model file: its metadata is not a "
                             "JSON object")
        if meta.get("package") != "cannon_fast" or meta.get("format") != FILE_FORMAT:
            raise ValueError(f"{path}: unsupported model file (format {meta.get('format')!r}, "
                             f"package {meta.get('package')!r})")
        _check_model_file(path, meta, arrays)   # before building anything from it
        try:
            model = cls(meta["label_names"], order=meta["order"], backend=backend,
                        extra_terms=meta.get("extra_terms", ()),
                        reciprocal_labels=meta.get("reciprocal_labels", ()))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: bad model metadata: {err}") from None
        if not np.array_equal(model.exponents, arrays["exponents"]):
            raise ValueError(f"{path}: the stored polynomial terms do not match order "
                             f"{meta['order']} and extra terms {meta.get('extra_terms', [])}")
        model.theta = np.ascontiguousarray(arrays["theta"], dtype=np.float64)
        model.s2 = np.ascontiguousarray(arrays["s2"], dtype=np.float64)
        model.theta_cov = np.ascontiguousarray(arrays["theta_cov"], dtype=np.float64)
        model.pixel_flags = np.asarray(arrays["pixel_flags"], dtype=np.uint8)
        model.label_offsets = np.asarray(arrays["label_offsets"], dtype=np.float64)
        model.label_scales = np.asarray(arrays["label_scales"], dtype=np.float64)
        model.training_labels = np.asarray(arrays["training_labels"], dtype=np.float64)
        try:
            if meta.get("grid") is not None:
                model.grid = PixelGrid.from_description(
                    meta["grid"], {k[5:]: arrays[k] for k in arrays if k.startswith("grid_")})
                model._grid_given = True
            model._set_grid(model.theta.shape[0])  # files before grids: the APOGEE grids
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: bad pixel grid record: {err}") from None
        model.training_hash = meta["training_hash"]
        if meta.get("error_model") is not None:
            from .errors import ErrorModel
            try:
                model.error_model = ErrorModel.from_dict(meta["error_model"])
            except ValueError as err:
                raise ValueError(f"{path}: bad error-model record: {err}") from None
        model.train_info = meta.get("train_info", {})
        model.train_info["trained_with_backend"] = meta.get("backend")
        model.train_info["written_by_version"] = meta.get("version")
        return model


#: The arrays of a model file (besides the optional ``grid_*``).
_MODEL_ARRAYS = ("theta", "s2", "theta_cov", "pixel_flags", "label_offsets", "label_scales",
                 "training_labels", "exponents")


def _check_model_file(path, meta, arrays):
    """Refuse a model file whose metadata and arrays disagree (ValueError naming it).

    Everything the constructor would build from is bounded first by the stored
    arrays: an ``order`` whose polynomial has more terms than the stored
    exponents (``"order": 400`` would take hours and all memory) is refused
    before any term is built.
    """
    import math

    def bad(what):
        return ValueError(f"{path}: corrupt model file: {what}")

    names = meta.get("label_names")
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n for n in names)):
        raise bad(f"label_names must be a non-empty list of names, got {names!r}")
    missing = [k for k in _MODEL_ARRAYS if k not in arrays]
    if missing:
        raise bad(f"missing array(s) {missing}")
    for k in _MODEL_ARRAYS:
        if arrays[k].dtype.kind not in "biuf":
            raise bad(f"{k} has dtype {arrays[k].dtype}, not numbers")
    n_labels = len(names)
    exponents = arrays["exponents"]
    if exponents.ndim != 2 or exponents.shape[1] != n_labels or exponents.shape[0] < 2:
        raise bad(f"exponents have shape {exponents.shape}, expected (T, {n_labels}) for "
                  f"{n_labels} labels")
    if exponents.dtype.kind not in "iu" or exponents.min() < 0:
        raise bad("exponents must be non-negative integers")
    n_terms = exponents.shape[0]
    order, extra = meta.get("order"), meta.get("extra_terms", [])
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise bad(f"order must be an integer >= 1, got {order!r}")
    if not isinstance(extra, list):
        raise bad(f"extra_terms must be a list, got {extra!r}")
    # comb() is exact and quick; the stored T bounds how many terms the order may make
    if order > int(exponents.sum(axis=1).max()) or \
            math.comb(n_labels + order, order) + len(extra) != n_terms:
        raise bad(f"order {order} with {len(extra)} extra term(s) does not make the "
                  f"{n_terms} stored terms of {n_labels} labels")
    theta = arrays["theta"]
    if theta.ndim != 2 or theta.shape[1] != n_terms or theta.shape[0] < 1:
        raise bad(f"theta has shape {theta.shape}, expected (P, {n_terms})")
    n_pix = theta.shape[0]
    expected = dict(s2=(n_pix,), theta_cov=(n_pix, n_terms * (n_terms + 1) // 2),  # packed
                    pixel_flags=(n_pix,),
                    label_offsets=(n_labels,), label_scales=(n_labels,))
    for k, shape in expected.items():
        if arrays[k].shape != shape:
            raise bad(f"{k} has shape {arrays[k].shape}, expected {shape} (P = {n_pix} "
                      f"pixels, T = {n_terms} terms, L = {n_labels} labels)")
    train = arrays["training_labels"]
    if train.ndim != 2 or train.shape[1] != n_labels or train.shape[0] < 1:
        raise bad(f"training_labels have shape {train.shape}, expected (N >= 1, {n_labels})")
    if not isinstance(meta.get("training_hash"), str):
        raise bad("its metadata lacks the training_hash")


# ---------------------------------------------------------------------- validation
#: Most Gaussian components of the label prior in ``expected_true_labels``.
MAX_PRIOR_COMPONENTS = 4


def expected_true_labels(labels, errors, label_names=None,
                         max_components=MAX_PRIOR_COMPONENTS):
    """Expected true labels given noisy ones: regression calibration.

    For catalogue labels ``l_n = t_n + e_n`` with ``e_n ~ N(0, E_n)``,
    ``E_n = diag(errors_n²)``, and true labels drawn from a Gaussian of mean
    ``mu`` and covariance ``S``, the expectation is ``E[t_n | l_n] = mu + S (S +
    E_n)^-1 (l_n - mu)``. A regression of flux on these is not attenuated by the
    label errors, as one on ``l_n`` is.

    One Gaussian for a whole sample is wrong for the stars off its main locus: it
    moves the training labels of the few halo giants and dwarfs toward the giant
    branch, and the model then reads those populations cooler by as much
    (docs/measurements.md). So the prior is a
    mixture of Gaussians fitted to the noisy labels with their errors
    (extreme deconvolution, Bovy, Hogg & Roweis 2011), with 1 to
    ``max_components`` components chosen by the BIC (10 stars per parameter at
    least); the expectation is then the responsibility-weighted sum of each
    component's. One component is the formula above, ``mu`` and ``S`` the
    mean and the covariance less the mean error covariance.

    Parameters
    ----------
    labels, errors : array_like, (N, L)
    label_names : sequence of str, optional
        For the error message.
    max_components : int, optional

    Returns
    -------
    ndarray, (N, L)

    Raises
    ------
    ValueError
        When the errors are as large as the spread of the labels (``S`` not
        positive definite): the labels carry no usable information then.
    """
    labels = np.asarray(labels, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    names = list(label_names or [f"label {j}" for j in range(labels.shape[1])])
    err_var = errors ** 2
    cov_true = np.atleast_2d(np.cov(labels, rowvar=False)) - np.diag(err_var.mean(axis=0))
    spread = np.diag(cov_true)
    if np.any(spread <= 0) or np.linalg.eigvalsh(cov_true)[0] <= 0:
        j = int(np.argmin(spread / np.maximum(np.var(labels, axis=0), 1e-300)))
        raise ValueError(f"the label errors are as large as the spread of the labels (e.g. "
                         f"{names[j]}: error rms {np.sqrt(err_var[:, j].mean()):.4g}, spread "
                         f"{np.std(labels[:, j]):.4g}); they cannot be corrected for")
    # work in labels scaled to unit spread: one regularisation floor fits all labels
    sd = np.sqrt(spread)
    x, ev = (labels - labels.mean(axis=0)) / sd, err_var / sd ** 2
    n, d = x.shape
    # the mixture is fitted to at most XD_MAX_STARS stars (its cost grows as N K D³ per
    # iteration); every star's expectation then comes from one pass over all
    sub = np.sort(np.random.default_rng(0).permutation(n)[:XD_MAX_STARS])
    n_par = d + d * (d + 1) // 2  # per component
    # one component: the moment estimate above (any sample size; the classic formula)
    one = (np.ones(1), np.zeros((1, d)), (cov_true / np.outer(sd, sd))[None])
    best = (-2.0 * _xd_expectation(x[sub], ev[sub], *one)[0] + n_par * np.log(len(sub)), one)
    for k in range(2, int(max_components) + 1):
        if len(sub) < 10 * k * n_par:  # too few stars for k components
            break
        params, loglike = _extreme_deconvolution(x[sub], ev[sub], k)
        bic = -2.0 * loglike + (k * n_par + k - 1) * np.log(len(sub))
        if bic < best[0]:
            best = (bic, params)
    _, resp, post, _ = _xd_expectation(x, ev, *best[1])
    return labels.mean(axis=0) + sd * np.einsum("nk,nkl->nl", resp, post)


#: Stars the label prior of ``expected_true_labels`` is fitted to, at most.
XD_MAX_STARS = 3000


def _xd_expectation(x, err_var, weights, means, covs):
    """The E-step of extreme deconvolution.

    Returns the log-likelihood, the responsibilities (N, K), and each
    component's posterior mean (N, K, D) and covariance (N, K, D, D) of every star.
    """
    d = x.shape[1]
    t = covs[None] + err_var[:, None, :, None] * np.eye(d)  # (N, K, D, D)
    dev = x[:, None, :] - means[None]  # (N, K, D)
    t_inv = np.linalg.inv(t)
    t_inv_dev = np.einsum("nkij,nkj->nki", t_inv, dev)
    logp = np.log(weights)[None] - 0.5 * (np.einsum("nkd,nkd->nk", dev, t_inv_dev)
                                          + np.linalg.slogdet(t)[1] + d * np.log(2 * np.pi))
    top = logp.max(axis=1, keepdims=True)
    norm = top[:, 0] + np.log(np.exp(logp - top).sum(axis=1))
    resp = np.exp(logp - norm[:, None])
    post = means[None] + np.einsum("kij,nkj->nki", covs, t_inv_dev)
    post_cov = covs[None] - covs[None] @ t_inv @ covs[None]
    return float(norm.sum()), resp, post, post_cov


def _extreme_deconvolution(x, err_var, n_comp, max_iter=300, tol=1e-6, floor=1e-4, seed=0):
    """A Gaussian mixture for the true values of noisy data (Bovy, Hogg & Roweis 2011).

    ``x`` (N, D) with diagonal error variances ``err_var`` (N, D), in units of
    order one; ``floor`` is added to every component's variance so that none
    collapses onto a few stars. Deterministic: spread-out starts from ``seed``.
    Returns ((weights, means, covariances), log-likelihood).
    """
    n, d = x.shape
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, n_comp):  # k-means++ starts
        dist = np.min([np.sum((x - c) ** 2, axis=1) for c in centres], axis=0)
        centres.append(x[rng.choice(n, p=dist / dist.sum())])
    means = np.array(centres)
    covs = np.repeat((np.cov(x, rowvar=False) / n_comp)[None], n_comp, axis=0)
    weights = np.full(n_comp, 1.0 / n_comp)
    old = -np.inf
    for _ in range(max_iter):
        loglike, resp, post, post_cov = _xd_expectation(x, err_var, weights, means, covs)
        if loglike - old < tol * abs(loglike):
            break
        old = loglike
        nk = resp.sum(axis=0)
        weights = nk / n
        means = np.einsum("nk,nkd->kd", resp, post) / nk[:, None]
        dev = post - means[None]
        covs = (np.einsum("nk,nki,nkj->kij", resp, dev, dev)
                + np.einsum("nk,nkij->kij", resp, post_cov)) / nk[:, None, None]
        covs += floor * np.eye(d)
    return (weights, means, covs), loglike


def _pixel_block(n_stars, nbytes=1 << 22):
    """Pixels per block of ``train``'s passes: three (N, block) float64 arrays in ``nbytes``.

    Small enough that a block's arrays stay in cache between the products and kernels
    that use them, large enough that the products stay efficient and that the C
    kernels use all their threads (they split 256 pixels or more): at least 256.
    """
    return max(256, nbytes // (24 * max(n_stars, 1)))


def _check_training_set(flux, ivar, labels, label_names):
    """The training set as float64 arrays, and (flux, ivar) summed over stars; or ValueError."""
    flux = as_float64(flux, "flux", ndim=2)
    ivar = as_float64(ivar, "ivar", ndim=2)
    labels = as_float64(labels, "labels")
    if labels.ndim == 1 and len(label_names) == 1:
        labels = labels[:, None]
    if flux.shape[0] == 0:
        raise ValueError("the training set is empty (0 stars)")
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar shapes differ: {flux.shape} vs {ivar.shape}")
    if labels.ndim != 2 or labels.shape != (flux.shape[0], len(label_names)):
        raise ValueError(f"labels must have shape (N, L) = ({flux.shape[0]}, {len(label_names)}) "
                         f"for labels {label_names}, got {labels.shape}")
    column_sums = (flux.sum(axis=0), ivar.sum(axis=0))
    check_spectra(flux, ivar, column_sums)
    bad_lab = ~np.isfinite(labels)
    if bad_lab.any():
        n, l = np.argwhere(bad_lab)[0]
        raise ValueError(f"{int(bad_lab.any(axis=1).sum())} training star(s) have missing "
                         f"(non-finite) labels, e.g. star {n} label {label_names[l]}; remove "
                         "them or fill the labels")
    empty = ~(ivar.max(axis=1) > 0)  # ivar >= 0 by now
    if empty.any():
        raise ValueError(f"{int(empty.sum())} training star(s) are masked at every pixel "
                         f"(ivar = 0): {describe_bad(empty, 'star')}")
    return flux, ivar, labels, column_sums


#: Values catalogues use for "no label" (ASPCAP before DR17, astroNN); never a real label.
MISSING_LABEL_VALUES = (-9999.0, -999.0)
#: A label whose training spread is below this fraction of its typical size is constant
#: in all but rounding: the polynomial's terms in it would be noise.
MIN_RELATIVE_SPREAD = 1e-9


def _check_label_spread(labels, model_labels, scales, names):
    """Refuse placeholder values and labels without a usable spread.

    ``labels`` physical, ``model_labels`` those the polynomial is built in (whose
    ``scales`` these are).
    """
    for value in MISSING_LABEL_VALUES:
        hit = labels == value
        if hit.any():
            n, l = np.argwhere(hit)[0]
            raise ValueError(f"{int(hit.any(axis=1).sum())} training star(s) have the "
                             f"missing-value placeholder {value:g} as a label, e.g. star {n} "
                             f"{names[l]}; remove them or set the label to NaN")
    size = np.median(np.abs(model_labels), axis=0)
    size = np.where(size > 0, size, 1.0)
    const = ~(scales > MIN_RELATIVE_SPREAD * size)
    if const.any():
        bad = [names[i] for i in np.flatnonzero(const)]
        raise ValueError(f"label(s) {bad} are constant over the training set (spread "
                         f"{np.ptp(labels[:, const], axis=0).tolist()}): the model cannot "
                         "learn how the spectrum depends on them")


def _check_design(design, term_names):
    """Reject collinear polynomial terms (the normal equations would be singular)."""
    if design.shape[0] < design.shape[1]:
        raise ValueError(f"the training set has {design.shape[0]} stars but the model has "
                         f"{design.shape[1]} terms per pixel; add stars or lower the order")
    col = design / np.maximum(np.linalg.norm(design, axis=0), 1e-300)
    _, sv, vt = np.linalg.svd(col, full_matrices=False)
    if sv[-1] < 1e-8 * sv[0]:
        combo = np.argsort(np.abs(vt[-1]))[::-1][:3]
        raise ValueError("the training labels are degenerate: the polynomial terms "
                         f"{[term_names[i] for i in combo]} are (nearly) collinear "
                         f"(condition number {sv[0] / max(sv[-1], 1e-300):.2g})")


def _fingerprint(flux, ivar, labels, column_sums=None):
    """A cheap hash of the training set (labels and per-pixel sums of flux and ivar).

    ``column_sums``: those sums if the caller has them.
    """
    fsum, isum = column_sums if column_sums is not None else (flux.sum(axis=0),
                                                              ivar.sum(axis=0))
    h = hashlib.sha256()
    h.update(np.asarray(flux.shape, dtype=np.int64).tobytes())
    h.update(labels.tobytes())
    h.update(fsum.tobytes())
    h.update(isum.tobytes())
    return h.hexdigest()[:16]
