"""cannon_fast: fast, survey-scale stellar labels from APOGEE spectra.

The Cannon (Ness et al. 2015) with numpy, numba and C backends under one
contract, an APOGEE data layer, the figures of the modeling lab, neural
networks (optional, PyTorch) and out-of-core survey labeling.

The names below are imported on first use (PEP 562), so ``import cannon_fast``
does not load numba, scipy or fitsio.
"""
import importlib

from . import _compat

__version__ = "0.1.0"
__all__ = ["CannonModel", "FitResult", "fit_spectra", "available_backends", "PixelGrid",
           "__version__", "__bibtex__"]
__bibtex__ = r"""
@article{ness2015,
  author = {Ness, M. and Hogg, D. W. and Rix, H.-W. and Ho, A. Y. Q. and Zasowski, G.},
  title = {The Cannon: A data-driven approach to Stellar Label Determination},
  journal = {ApJ}, volume = {808}, pages = {16}, year = {2015}
}
"""

#: Public name -> the module that defines it.
_LAZY = {
    "CannonModel": "cannon_fast.core.model",
    "FitResult": "cannon_fast.core.fitting",
    "fit_spectra": "cannon_fast.core.fitting",
    "available_backends": "cannon_fast.core.backends",
    "PixelGrid": "cannon_fast.core.grid",
}

_compat.install()  # the flat layout's module paths, for one release


def __getattr__(name):
    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    if _compat.new_name(f"{__name__}.{name}") is not None:
        # cannon_fast.fitting and the like, which the flat package imported eagerly
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
