"""Build the optional C extension ``cannon_fast._ccannon``.

All metadata lives in pyproject.toml; this file only declares the extension.
The extension is optional: without a compiler, or with ``CANNON_FAST_NO_EXT=1``,
the package installs and runs on its numba and numpy backends.
"""
import os

from setuptools import Extension, setup


def _extensions():
    if os.environ.get("CANNON_FAST_NO_EXT", "") not in ("", "0"):
        return []
    import numpy as np

    return [
        Extension(
            "cannon_fast._ccannon",
            sources=["csrc/_ccannon.c", "csrc/cannon.c"],
            include_dirs=["csrc", np.get_include()],
            extra_compile_args=["-O3", "-std=c99"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            optional=True,
        )
    ]


setup(ext_modules=_extensions())
