"""numba kernels: the same names and contracts as ``_reference``.

All njit options live in ``_jit.py``; kernels take C-contiguous float64 (the
continuum kernel also float32) arrays and write into caller-allocated ``*_out``
arrays.
"""
from .continuum import continuum_normalize
from .model_eval import (debias_steps, design, lm_fit, sandwich_covariance, star_weights,
                         training_sums, weighted_square_sum)
from .normal_equations import solve_normal_equations
from .s2_grid import s2_update, s2_update_warm

__all__ = ["debias_steps", "design", "lm_fit", "sandwich_covariance", "star_weights",
           "weighted_square_sum", "training_sums",
           "solve_normal_equations", "s2_update", "s2_update_warm",
           "continuum_normalize"]
