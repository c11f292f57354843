"""Options shared by every numba kernel (one place, as in numba-stats' ``_util.py``).

Every ``@nb.njit`` in ``_kernels`` takes exactly one of these dicts, so a
kernel's compilation options are read here and nowhere else:

``JIT``
    The base: on-disk cache, numpy's error model (a division by zero gives
    inf/NaN as in numpy, with no ZeroDivisionError branch in the loops), and
    the GIL released so Python threads can run kernels concurrently.
``JIT_PARALLEL``
    ``JIT`` for the kernels whose outer loop is an ``nb.prange`` (over pixels
    or stars); the iterations are independent, so results do not depend on
    the number of threads.
``JIT_FASTMATH``
    ``JIT`` with ``fastmath`` for the s² sums only: reassociation lets LLVM
    vectorize them, and the s² search needs the sign of ``g'`` and a bracket,
    not the last bits (see ``_reference.s2_grid`` for the tolerance).
``JIT_INLINE``
    ``JIT`` for tiny predicates inlined into their callers at the numba IR level.
"""

JIT = dict(cache=True, error_model="numpy", nogil=True)
JIT_PARALLEL = dict(JIT, parallel=True)
JIT_FASTMATH = dict(JIT, fastmath=True)
JIT_INLINE = dict(JIT, inline="always")
