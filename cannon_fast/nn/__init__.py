"""Neural networks for stellar labels (PyTorch; optional extra ``nn``).

* :class:`SpectrumRegressor` -- spectrum -> labels: a StarNet-style 1-D CNN
  (Fabbro et al. 2018) or a plain MLP, with astroNN-style uncertainties
  (Leung & Bovy 2019): Monte-Carlo dropout combined with a predicted
  (heteroscedastic) variance, and a loss that ignores missing labels.
* :class:`PayneEmulator` -- labels -> normalized spectrum: The Payne's MLP
  (Ting et al. 2019) exported to plain numpy arrays, with an analytic Jacobian,
  usable as a forward model by :func:`cannon_fast.fit_spectra`; trained by
  :func:`train_emulator`.
* :class:`SharedLatent` -- encoders and decoders of two instruments around one
  latent space with a label head: labels from either instrument's spectrum, and
  one instrument's spectrum generated from the other's.
* :mod:`cannon_fast.nn.evaluate` -- bias, RMSE, MAD, R^2, calibration, plots and
  a side-by-side table against the Cannon.

Importing this package needs torch: ``pip install cannon_fast[nn]``.
"""
try:
    import torch  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "cannon_fast.nn needs PyTorch, which is not installed; install the optional "
        "extra with `pip install cannon_fast[nn]`") from err

from .emulator import PayneEmulator, train_emulator
from .latent import SharedLatent
from .evaluate import (calibration_fraction, calibration_scale, comparison_table, label_metrics,
                       three_cornered_hat)
from .regressor import STARNET_TRAINING, NNResult, SpectrumRegressor, format_layer_summary

__all__ = ["SpectrumRegressor", "NNResult", "STARNET_TRAINING", "format_layer_summary",
           "PayneEmulator", "train_emulator", "SharedLatent",
           "label_metrics", "calibration_fraction", "calibration_scale", "three_cornered_hat",
           "comparison_table"]
