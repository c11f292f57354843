"""Build the optional C extension ``cannon_fast._ccannon``.

All metadata lives in pyproject.toml; this file only declares the extension.
The extension is optional: without a compiler, or with ``CANNON_FAST_NO_EXT=1``,
the package installs and runs on its numba and numpy backends.

OpenMP (parallel loops over pixels and stars) is used when a test program
compiles and links with the compiler's OpenMP flag; otherwise, or with
``CANNON_FAST_NO_OPENMP=1``, the extension is built single-threaded. No
``-march``: wheels must run on any CPU of their platform.
"""
import os
import shutil
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_OMP_TEST = """
#include <omp.h>
int main(void) {
    int n = 0;
#pragma omp parallel reduction(+:n)
    n += 1;
    return n == omp_get_max_threads() ? 0 : 1;
}
"""


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


class _BuildExt(build_ext):
    """build_ext that picks per-compiler flags and adds OpenMP when it works."""

    def _openmp_flags(self):
        if _flag("CANNON_FAST_NO_OPENMP"):
            return [], []
        if self.compiler.compiler_type == "msvc":
            return ["/openmp"], []
        flags = ["-fopenmp"]
        tmp = tempfile.mkdtemp(prefix="cannon_fast_omp_")
        try:
            src = os.path.join(tmp, "omp_test.c")
            with open(src, "w") as fh:
                fh.write(_OMP_TEST)
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            self.compiler.link_executable(objs, "omp_test", output_dir=tmp,
                                          extra_postargs=flags)
        except Exception:  # noqa: BLE001 - any failure means "no OpenMP here"
            print("cannon_fast: OpenMP not available, building _ccannon single-threaded")
            return [], []
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return flags, flags

    def build_extension(self, ext):
        if ext.name == "cannon_fast._ccannon":
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args = ["/O2"]
            cflags, lflags = self._openmp_flags()
            ext.extra_compile_args = list(ext.extra_compile_args) + cflags
            ext.extra_link_args = list(ext.extra_link_args or []) + lflags
        super().build_extension(ext)


def _extensions():
    if _flag("CANNON_FAST_NO_EXT"):
        return []
    import numpy as np

    return [
        Extension(
            "cannon_fast._ccannon",
            sources=["csrc/_ccannon.c", "csrc/cannon.c"],
            depends=["csrc/cannon.h"],
            include_dirs=["csrc", np.get_include()],
            # no FMA contraction: the same results from gcc and clang, x86 and arm
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            optional=True,
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": _BuildExt})
