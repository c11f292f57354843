"""What the model, the label fits and the continuum share, in a module of its own.

The pixel rule (which pixels a fit uses), the label scaling and the check of
input spectra: ``fitting`` and ``continuum`` need them, and ``model`` imports
``fitting``, so they cannot live in ``model`` without an import cycle.
:mod:`cannon_fast.core.model` re-exports the public ones.
"""
from __future__ import annotations

import numpy as np

from .._util import describe_bad

__all__ = ["PIXEL_FLAGS", "UNUSABLE_PIXEL_FLAGS", "fitted_pixels", "label_scaling",
           "check_spectra"]

#: Bits of ``CannonModel.pixel_flags``. TOO_FEW_STARS and SINGULAR pixels have a
#: constant model and no scatter; S2_UNRESOLVED (s² still moving after ``max_iter``)
#: is informational: the pixel's model is a solved one.
PIXEL_FLAGS = {"TOO_FEW_STARS": 1, "SINGULAR": 2, "S2_UNRESOLVED": 4}
#: The flags that keep a pixel out of every label fit, MCMC and binary fit.
UNUSABLE_PIXEL_FLAGS = PIXEL_FLAGS["TOO_FEW_STARS"] | PIXEL_FLAGS["SINGULAR"]


def fitted_pixels(model, n_pixels):
    """Where fits of labels to spectra use a model: the one pixel rule.

    Parameters
    ----------
    model : CannonModel or any forward model
        A model without ``pixel_flags`` (an emulator) is usable everywhere.
    n_pixels : int
        Pixels of the spectra it is fitted to (the model's own count).

    Returns
    -------
    ndarray of bool, (n_pixels,)
    """
    flags = getattr(model, "pixel_flags", None)
    if flags is None:
        return np.ones(n_pixels, dtype=bool)
    return (np.asarray(flags) & UNUSABLE_PIXEL_FLAGS) == 0


def label_scaling(values):
    """Offsets and scales of the scaled labels ``x = (value - offset) / scale``.

    The median and half the 2.5-97.5 % range of each column of ``values`` (N, L);
    the full range for a column whose central 95 % is constant (0 if it is
    constant throughout).
    """
    lo, med, hi = np.percentile(values, [2.5, 50.0, 97.5], axis=0)
    scales = (hi - lo) / 2.0
    const = scales <= 0
    scales[const] = np.ptp(values, axis=0)[const]
    return med, scales


def check_spectra(flux, ivar, column_sums=None):
    """Raise ValueError for non-finite or negative ivar, or non-finite flux where ivar > 0.

    NaN flux is accepted where ``ivar = 0`` (a masked pixel). ``column_sums``:
    ``(flux.sum(axis=0), ivar.sum(axis=0))`` if the caller has them (training
    does, for its fingerprint), which spares two passes over the data.
    """
    # Fast path, three reductions and no (N, P) temporaries: a finite sum has no NaN or
    # inf in it, and min() propagates NaN. Only data that fail it are looked at in detail.
    with np.errstate(all="ignore"):
        fsum, isum = column_sums if column_sums is not None else (flux, ivar)
        ivar_ok = bool(np.isfinite(isum.sum()) and ivar.min(initial=0.0) >= 0)
        if ivar_ok and np.isfinite(fsum.sum()):
            return
    bad = ~np.isfinite(ivar)
    if bad.any():
        raise ValueError(f"ivar has non-finite values at {describe_bad(bad)}")
    neg = ivar < 0
    if neg.any():
        raise ValueError(f"ivar has negative values at {describe_bad(neg)}")
    badf = ~np.isfinite(flux) & (ivar > 0)
    if badf.any():
        raise ValueError(f"flux is NaN/inf where ivar > 0 at {describe_bad(badf)}; set ivar = 0 "
                         "there to mask those pixels")
