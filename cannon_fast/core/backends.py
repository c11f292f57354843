"""Backend registry: which implementations of the kernels are available, and which to use.

Three implementations share one contract (see ``_reference``): ``"numpy"`` is
the plain reference, ``"numba"`` the JIT kernels, ``"c"`` the optional C
extension. ``"auto"`` resolves to the fastest available (c > numba > numpy)
unless the ``CANNON_FAST_BACKEND`` environment variable names one. Only
``"auto"`` falls back: asking for a backend that is not available is an error.
"""
from __future__ import annotations

import importlib.util
import os

try:  # the C extension is optional (no compiler, or CANNON_FAST_NO_EXT=1)
    from .. import _ccannon
except ImportError:  # pragma: no cover - depends on the build
    _ccannon = None

# Found, not imported: importing numba takes a fifth of a second, so the numba
# kernels (and numba with them) are imported when they are first asked for.
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None

__all__ = ["BACKENDS", "available_backends", "resolve_backend"]

#: Every backend name, fastest first.
BACKENDS = ("c", "numba", "numpy")


def available_backends():
    """Return the names of the backends usable on this machine, fastest first.

    Returns
    -------
    list of str
    """
    out = []
    if _ccannon is not None:
        out.append("c")
    if _HAVE_NUMBA:
        out.append("numba")
    out.append("numpy")
    return out


def resolve_backend(backend="auto"):
    """Resolve a backend request to an available backend name.

    Parameters
    ----------
    backend : {"auto", "c", "numba", "numpy"}
        ``"auto"`` picks ``CANNON_FAST_BACKEND`` if set, else the fastest available.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        If the name is unknown or the backend is not available here.
    """
    if backend == "auto":
        env = os.environ.get("CANNON_FAST_BACKEND", "").strip().lower()
        if env and env != "auto":
            return resolve_backend(env)
        return available_backends()[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))
    if backend not in available_backends():
        why = {"c": "the C extension cannot be imported (built without a compiler, or with "
                    "CANNON_FAST_NO_EXT=1); reinstall with a C compiler present",
               "numba": "numba is not installed"}[backend]
        raise ValueError(f"backend {backend!r} is not available: {why}. "
                         f"Available: {available_backends()}")
    return backend


def kernels(backend):
    """Return the kernel module for a resolved backend name.

    Every module exposes ``solve_normal_equations``, ``s2_update``, ``lm_fit``,
    ``star_weights``, ``weighted_square_sum``, ``debias_steps``, ``sandwich_covariance``,
    ``design`` and ``continuum_normalize``
    with the signatures and contracts of ``_reference``.
    """
    if backend == "c":
        if _ccannon is None:  # resolve_backend("c") already refuses this
            raise ValueError(f"backend 'c' is not available. Available: {available_backends()}")
        return _ccannon  # the extension takes the kernels' arguments unchanged
    if backend == "numba":
        from . import _kernels
        return _kernels
    from . import _reference
    return _reference
