"""Options shared by every numba kernel (one place, as in numba-stats' ``_util.py``)."""

JIT = dict(cache=True, error_model="numpy", nogil=True)
