"""Fits with an emulator, and what it learns of its misfit to real spectra (both emulators).

An emulator of model spectra (The Payne's MLP, TransformerPayne) fits observed stars with a
reduced chi² of many and formal errors of a few K, and knows nothing of it. The mixin gives
both the same ``fit`` (errors as honest as the emulator can make them) and ``calibrate``
(:func:`cannon_fast.core.errors.calibrate_forward_model` on reference stars), and the arrays
that keep the calibration in their files.
"""
import json

import numpy as np

__all__ = ["EmulatorFits"]


class EmulatorFits:
    """``fit``, ``calibrate`` and their file arrays; needs ``s2``, ``train_info``, ``error_model``.

    A class with a fast fit of its own sets ``_fast_fit`` (``fit(emulator, flux, ivar,
    **kwargs) -> FitResult``); otherwise ``method="fast"`` is the generic fit.
    """

    _fast_fit = None

    def fit(self, flux, ivar, method="fast", calibrated_errors=True, recalibrate_labels=True,
            **kwargs):
        """Fit labels to normalized spectra; errors as honest as the emulator can make them.

        Parameters
        ----------
        flux, ivar : array_like, (N, P)
        method : {"fast", "generic"}
            The emulator's own fast fit (The Payne's:
            :func:`cannon_fast.nn.fast_fit.fit_emulator`, moments of chi² in the output
            layer's low-rank basis; the generic one for an emulator without) or
            :func:`cannon_fast.fit_spectra`'s Levenberg-Marquardt on the full Jacobian.
        calibrated_errors : bool
            With an ``error_model`` (:meth:`calibrate`), ``errors`` are the
            calibrated ones; without one and without ``s2`` (an emulator of model
            spectra, which knows nothing of its misfit to real ones; s² all 0 alike) they
            are the formal errors times sqrt(max(1, reduced chi²)). ``formal_errors``
            keeps the fit's own either way. False: the formal errors alone.
        recalibrate_labels : bool
            Apply :meth:`calibrate`'s linear recalibration of the labels (if any).
        **kwargs
            Passed to the fitting function.

        Returns
        -------
        FitResult
        """
        from ..core.errors import recalibrate_labels as _recalibrate
        from ..core.errors import scale_by_reduced_chi2
        from ..core.fitting import fit_generic

        if method not in ("fast", "generic"):
            raise ValueError(f"unknown method {method!r}; choose 'fast' or 'generic'")
        fast = type(self)._fast_fit
        fitter = fast if method == "fast" and fast is not None else fit_generic
        res = fitter(self, flux, ivar, **kwargs)
        coef = self.train_info.get("recalibration")
        if coef is not None and recalibrate_labels:
            res = _recalibrate(res, coef)
        if not calibrated_errors:
            return res
        if self.error_model is not None:
            return self.error_model.apply(res)
        # s² all zero (an emulator of model spectra): no variance for its misfit either
        return res if self.s2 is not None and np.any(self.s2 > 0) else scale_by_reduced_chi2(res)

    @property
    def calibrated(self):
        """True when :meth:`calibrate` has taught the emulator its misfit to real spectra."""
        return self.error_model is not None

    def calibrate(self, flux, ivar, labels, label_errors=None, n_rounds=2, linear=True,
                  method="fast"):
        """Learn the emulator's misfit to real spectra from stars of known labels.

        Sets ``s2`` (per-pixel model variance), POOR_FIT's limit and the linear
        recalibration (in ``train_info``) and ``error_model`` from fits to these reference
        stars (:func:`cannon_fast.core.errors.calibrate_forward_model`); ``write`` keeps
        them. The stars must be normalized as the stars the emulator will fit, and should
        span their labels.

        Parameters
        ----------
        flux, ivar : array_like, (N, P)
        labels : array_like, (N, L)
            The reference labels, in the emulator's label order.
        label_errors : array_like, (N, L), optional
        n_rounds : int
            Fit / s² rounds (0: keep ``s2`` as it is).
        linear : bool
            Also learn a linear recalibration of the labels (the reference labels
            regressed on all fitted labels), which :meth:`fit` applies.
        method : {"fast", "generic"}

        Returns
        -------
        ErrorModel
        """
        from ..core.errors import calibrate_forward_model

        return calibrate_forward_model(
            self, flux, ivar, labels, reference_errors=label_errors, n_rounds=n_rounds,
            linear=linear, fit=lambda f, iv: self.fit(f, iv, method=method,
                                                      calibrated_errors=False,
                                                      recalibrate_labels=False))

    def _calibration_arrays(self):
        """What ``write`` keeps of the calibration (JSON, no pickle) and ``s2``."""
        return {"s2": np.zeros(0) if self.s2 is None else self.s2,
                "has_s2": np.array(self.s2 is not None),
                "train_info": np.array(json.dumps(self.train_info)),
                "error_model": np.array(json.dumps(None if self.error_model is None
                                                   else self.error_model.to_dict()))}

    def _read_calibration(self, data):
        """The inverse of ``_calibration_arrays`` (files without them keep the defaults)."""
        if "has_s2" in data.files:
            self.s2 = np.array(data["s2"], np.float64) if bool(data["has_s2"]) else None
        if "train_info" in data.files:
            self.train_info = json.loads(str(data["train_info"]))
            record = json.loads(str(data["error_model"]))
            if record is not None:
                from ..core.errors import ErrorModel
                self.error_model = ErrorModel.from_dict(record)
