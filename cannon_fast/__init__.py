"""cannon_fast: fast, survey-scale stellar labels from APOGEE spectra.

The Cannon (Ness et al. 2015) with numpy, numba and C backends under one
contract, an APOGEE data layer, the figures of the modeling lab, neural
networks (optional, PyTorch) and out-of-core survey labeling.
"""
from .core.model import CannonModel
from .core.fitting import FitResult, fit_spectra
from .core.backends import available_backends
from ._compat import install as _install_old_paths

_install_old_paths()  # the flat layout's module paths, for one release

__version__ = "0.1.0"
__all__ = ["CannonModel", "FitResult", "fit_spectra", "available_backends", "__version__"]
__bibtex__ = r"""
@article{ness2015,
  author = {Ness, M. and Hogg, D. W. and Rix, H.-W. and Ho, A. Y. Q. and Zasowski, G.},
  title = {The Cannon: A data-driven approach to Stellar Label Determination},
  journal = {ApJ}, volume = {808}, pages = {16}, year = {2015}
}
"""
