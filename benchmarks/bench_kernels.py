"""Benchmark of the kernels: each kernel x backend on survey-sized inputs (a plain script).

Run ``nice python benchmarks/bench_kernels.py`` (about a minute on 2 cores; the numpy
reference takes most of it). Sizes follow the apStar grid and the benchmark recipe:
P = 8575 pixels, L = 5 labels (T = 21 quadratic terms), N = 900 training stars for
the training kernels (``solve_normal_equations``, ``s2_update``) and N = 2000 stars
for the fitting kernels (``star_weights``, ``lm_fit`` with 32 starts and 2 polish
runs, ``design``). The inputs are the real intermediate arrays of ``CannonModel.train``
(its first pass) and ``fit_cannon`` on ``cannon_fast.testing.make_synthetic`` data.

Every backend gets one warm-up call (JIT compilation and caches are not timed); the
time is the best of ``--repeat`` calls (one for the numpy reference, which is the
baseline of the speed-up columns). ``--threads 1`` compares the kernels themselves
(the numba and C kernels run their loops over pixels or stars in parallel).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cannon_fast import CannonModel, available_backends
from cannon_fast.core import vectorizer as vz
from cannon_fast.core.backends import kernels
from cannon_fast.core.fitting import _precompute
from cannon_fast.testing import make_synthetic

N_LABELS = 5


def train_inputs(n_stars, n_pix, seed):
    """Arguments of the training kernels at the first pass of ``CannonModel.train`` (s² = 0)."""
    tr = make_synthetic(n_stars, n_pix, N_LABELS, seed=seed, masked_pixel=False)
    exponents = vz.polynomial_exponents(N_LABELS, 2)
    x = tr.scale_labels(tr.labels)
    design = vz.label_vector(x, exponents)  # (N, T)
    a_packed = np.ascontiguousarray((vz.packed_outer(design).T @ tr.ivar).T)  # (P, T2)
    b = np.ascontiguousarray((design.T @ (tr.ivar * tr.flux)).T)  # (P, T)
    theta = np.empty_like(b)
    kernels("numpy").solve_normal_equations(a_packed, b, theta, np.empty((0, a_packed.shape[1])),
                                            np.empty(n_pix, np.int8))
    resid = np.ascontiguousarray(tr.flux - design @ theta.T)  # (N, P)
    return tr, dict(a_packed=a_packed, b=b, resid=resid, ivar=tr.ivar)


def fit_inputs(tr, n_stars, n_starts, seed):
    """Arguments of the fitting kernels as ``fit_cannon`` builds them (plain objective)."""
    model = CannonModel(list(tr.label_names), backend=available_backends()[0])
    model.train(tr.flux, tr.ivar, tr.labels)
    te = make_synthetic(n_stars, tr.flux.shape[1], N_LABELS, seed=seed, coeffs=tr.coeffs,
                        s2_true=tr.s2_true, masked_pixel=False)
    pre = _precompute(model)
    sw = (te.flux, te.ivar, model.s2, pre["good_pix"], pre["theta0"], pre["t_pix"])
    w = np.empty(te.flux.shape, np.float32)
    wr, c = np.empty(te.flux.shape), np.empty(n_stars)
    kernels("numpy").star_weights(*sw, w, wr, c, np.empty(n_stars, np.int64),
                                  np.empty((n_stars, 3)), np.empty(n_stars, np.int64))
    g = np.ascontiguousarray((w @ pre["theta_outer32"]).astype(np.float64))  # (N, T2)
    h = np.ascontiguousarray(wr @ pre["theta_rest"])  # (N, T)
    starts = model.starting_points(n_starts)
    starts = np.ascontiguousarray(np.broadcast_to(starts, (n_stars,) + starts.shape))
    bounds = model.scale_labels(model.label_bounds.T)
    lo, hi = np.ascontiguousarray(bounds[0]), np.ascontiguousarray(bounds[1])
    lm = (g, h, c, model.exponents, starts, lo, hi, 2, 100, 1e-6, 9.0)
    x = np.ascontiguousarray(model.scale_labels(te.labels))
    return dict(star_weights=sw, lm_fit=lm, design=(x, model.exponents))


def calls(train, fit, n_train, n_fit, n_pix):
    """(kernel, N, function of the kernel module that runs it once with fresh outputs)."""
    a_packed, b = train["a_packed"], train["b"]
    n_terms = b.shape[1]
    n_labels = fit["design"][1].shape[1]

    def solve(k):
        k.solve_normal_equations(a_packed, b, np.empty_like(b), np.empty_like(a_packed),
                                 np.empty(n_pix, np.int8))

    def s2(k):
        k.s2_update(train["resid"], train["ivar"], np.empty(n_pix), np.empty(n_pix, np.int8))

    def weights(k):
        k.star_weights(*fit["star_weights"], np.empty((n_fit, n_pix), np.float32),
                       np.empty((n_fit, n_pix)), np.empty(n_fit), np.empty(n_fit, np.int64),
                       np.empty((n_fit, 3)), np.empty(n_fit, np.int64))

    def lm(k):
        k.lm_fit(*fit["lm_fit"], np.empty((n_fit, n_labels)), np.empty(n_fit),
                 np.empty(n_fit, np.int64), np.empty(n_fit, np.int64))

    def design(k):
        k.design(*fit["design"], np.empty((n_fit, n_terms)),
                 np.empty((n_fit, n_terms, n_labels)))

    return [("solve_normal_equations", n_train, solve), ("s2_update", n_train, s2),
            ("star_weights", n_fit, weights), ("lm_fit", n_fit, lm), ("design", n_fit, design)]


def best_time(fn, repeat):
    """Best wall time of ``repeat`` calls of ``fn()`` after one untimed call."""
    fn()  # warm-up: JIT compilation, caches, first-touch page faults
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _set_threads(n):
    if "numba" in available_backends():
        import numba
        numba.set_num_threads(n)
    if "c" in available_backends():
        from cannon_fast import _ccannon
        _ccannon.set_num_threads(n)


def _threads():
    out = [f"cores={os.cpu_count()}"]
    if "numba" in available_backends():
        import numba
        out.append(f"numba threads={numba.get_num_threads()} ({numba.threading_layer()})")
    if "c" in available_backends():
        from cannon_fast import _ccannon
        out.append(f"C threads={_ccannon.max_threads()} (OpenMP={_ccannon.OPENMP})")
    return ", ".join(out)


def main():
    """Build the inputs, time every kernel on every backend, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-pix", type=int, default=8575)
    ap.add_argument("--n-train", type=int, default=900)
    ap.add_argument("--n-fit", type=int, default=2000)
    ap.add_argument("--n-starts", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per fast backend")
    ap.add_argument("--backends", default=None, help="comma list (default: all available)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of the numba and C kernels (default: all cores)")
    args = ap.parse_args()
    if args.threads > 0:
        _set_threads(args.threads)
    backends = args.backends.split(",") if args.backends else available_backends()
    if "numpy" not in backends:
        backends.append("numpy")  # the baseline
    backends = ["numpy"] + [b for b in backends if b != "numpy"]

    t0 = time.perf_counter()
    tr, train = train_inputs(args.n_train, args.n_pix, args.seed)
    fit = fit_inputs(tr, args.n_fit, args.n_starts, args.seed + 1)
    print(f"# inputs ready in {time.perf_counter() - t0:.1f} s; P={args.n_pix} "
          f"T={train['b'].shape[1]} L={N_LABELS}; {_threads()}")

    rows = []
    for name, n, fn in calls(train, fit, args.n_train, args.n_fit, args.n_pix):
        times = {}
        for b in backends:
            k = kernels(b)
            times[b] = best_time(lambda: fn(k), 1 if b == "numpy" else args.repeat)
        rows.append((name, n, times))
        print(f"# {name} done", flush=True)

    head = f"{'kernel':24s} {'N':>5s}" + "".join(
        f" {b + ' ms':>11s}" + ("" if b == "numpy" else f" {'x numpy':>8s}") for b in backends)
    print()
    print(head)
    print("-" * len(head))
    for name, n, times in rows:
        line = f"{name:24s} {n:5d}"
        for b in backends:
            line += f" {1e3 * times[b]:11.2f}"
            if b != "numpy":
                line += f" {times['numpy'] / times[b]:8.1f}"
        print(line)


if __name__ == "__main__":
    main()
