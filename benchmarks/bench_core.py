"""Benchmark of the core: training, label fitting and accuracy against the truth, per backend.

Run ``python benchmarks/bench_core.py`` (about 2-4 minutes on 2 cores). The data are
``make_dataset(seed=42, n_train, n_test, 8575)`` from ``../shared/tools/peer_bench.py``
(5 labels, SNR 80-120, intrinsic scatter on 30 % of pixels, 1 % bad pixels) and the
Cramer-Rao bound ``crb_errors`` computed there with the TRUE model. Without ``../shared``
the package's own ``cannon_fast.testing.make_synthetic`` (same recipe) is used and the
bound is computed here. Each backend runs in a child process so that its peak memory
is its own. With ``--peer-python`` (a Python that has ``annieslasso`` and ``TheCannon``
installed; see peer_bench.py's docstring for the venv), the peers run on the same data
and the ratios are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LABELS = ["TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE"]


def _shared_tools(shared):
    tools = Path(shared) / "tools"
    if (tools / "peer_bench.py").exists():
        sys.path.insert(0, str(tools))
        import peer_bench
        return peer_bench
    return None


def load_data(args):
    """(train, test, s_true, crb, source) on the benchmark recipe."""
    pb = _shared_tools(args.shared)
    if pb is not None:
        data = pb.make_dataset(args.seed, args.n_train, args.n_test, args.n_pix)
        crb = pb.crb_errors(data)
        return data["train"][:3], data["test"][:3], data["s_true"], crb, "peer_bench.make_dataset"


def true_model(args, training_labels):
    """The generating model of peer_bench's data as a CannonModel (None without ../shared).

    Fitting the test stars with it measures the floor of this benchmark: the CRB is a
    median over stars, so even the true model's fits scatter a few per cent above it.
    """
    from cannon_fast import CannonModel
    pb = _shared_tools(args.shared)
    if pb is None:
        return None
    data = pb.make_dataset(args.seed, 10, 10, args.n_pix)  # the coefficients depend on the seed only
    model = CannonModel(LABELS)
    # peer_bench: flux = 1 - quad_design(x) @ coeffs, x = (labels - mid) / half, with the
    # quadratic terms in upper-triangle order, which is our term order too
    theta = -data["coeffs"]
    theta[:, 0] += 1.0
    model.label_offsets = 0.5 * (pb.LABEL_LO + pb.LABEL_HI)
    model.label_scales = 0.5 * (pb.LABEL_HI - pb.LABEL_LO)
    model.theta, model.s2 = theta, data["s_true"] ** 2
    model.theta_cov = np.zeros((args.n_pix, theta.shape[1] * (theta.shape[1] + 1) // 2))
    model.pixel_flags = np.zeros(args.n_pix, dtype=np.uint8)
    model.training_labels = training_labels  # for the starting points and bounds only
    return model
    from cannon_fast.testing import make_synthetic
    tr = make_synthetic(args.n_train, args.n_pix, 5, seed=args.seed, masked_pixel=False)
    te = make_synthetic(args.n_test, args.n_pix, 5, seed=args.seed + 1, coeffs=tr.coeffs,
                        s2_true=tr.s2_true, masked_pixel=False)
    crb = crb_from_truth(tr, te)
    return ((tr.labels, tr.flux, tr.ivar), (te.labels, te.flux, te.ivar), np.sqrt(tr.s2_true),
            crb, "cannon_fast.testing.make_synthetic")


def crb_from_truth(tr, te, n_max=100):
    """Cramer-Rao bound with the true model (as peer_bench.crb_errors)."""
    from cannon_fast.core import vectorizer as vz
    from cannon_fast.testing import LABEL_RANGES
    e = vz.polynomial_exponents(5, 2)
    half = 0.5 * (LABEL_RANGES[:, 1] - LABEL_RANGES[:, 0])
    out = []
    for i in range(min(n_max, len(te.labels))):
        x = te.scale_labels(te.labels[i:i + 1])
        jac = -(vz.label_vector_jacobian(x, e)[0].T @ te.coeffs.T).T  # (P, L)
        good = te.ivar[i] > 0
        w = np.where(good, 1 / (1 / np.where(good, te.ivar[i], 1) + te.s2_true), 0)
        fisher = jac.T @ (w[:, None] * jac)
        out.append(np.sqrt(np.diag(np.linalg.inv(fisher))) * half)
    return dict(zip(LABELS, np.median(out, axis=0).tolist()))


def _best_time(fn, repeat=5, clock=time.perf_counter):
    best = np.inf
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def roof_figures(model, train_flux, train_ivar, train_labels, batch=512):
    """The BLAS work training and fitting cannot avoid, timed in this process.

    ``gram_unit``: one all-pixel product ``(P x N) . (N x T(T+1)/2)``, the normal
    matrices of every pixel at one s² (training is quoted in these units, so that
    runs on different machines or loads compare). ``fit_roof``: stars/s of the
    fit's three products over pixels alone (G in float32, h, and the model at the
    solution for chi²), on a batch of ``batch`` stars: the rate the fit would reach
    if everything after the products were free.
    """
    from cannon_fast.core import fitting
    from cannon_fast.core import vectorizer as vz
    design = vz.label_vector(model.scale_labels(train_labels), model.exponents)
    outer = np.ascontiguousarray(vz.packed_outer(design))  # (N, T2)
    weights_t = np.ascontiguousarray(train_ivar.T)  # (P, N)
    gram = _best_time(lambda: weights_t @ outer)
    # CPU time too: on a loaded machine the wall time of both stretches unevenly
    gram_cpu = _best_time(lambda: weights_t @ outer, clock=time.process_time)
    pre = fitting._precompute(model)
    rng = np.random.default_rng(0)
    n = min(batch, len(train_flux))
    w = rng.random((n, model.n_pixels)).astype(np.float32)
    wr = rng.random((n, model.n_pixels))
    v = rng.random((n, model.n_terms))
    m = np.empty((n, model.n_pixels))

    def products():
        w @ pre["theta_outer32"]
        wr @ pre["theta_rest"]
        np.matmul(v, pre["theta_rest"].T, out=m)
    return dict(gram_unit=gram, gram_unit_cpu=gram_cpu, fit_roof=n / _best_time(products))


def run_backend(args):
    """Child: train and fit with one backend, print one JSON line."""
    from cannon_fast import CannonModel
    (tl, tf, ti), (sl, sf, si), s_true, crb, source = load_data(args)
    n_test = args.n_test if args.backend != "numpy" else min(args.n_test, args.numpy_stars)
    sl, sf, si = sl[:n_test], sf[:n_test], si[:n_test]
    model = CannonModel(LABELS, backend=args.backend)
    model.train(tf[:60], ti[:60], tl[:60])  # warm-up: JIT compilation is not timed
    model.fit(sf[:8], si[:8])
    times, cpu = [], []
    for _ in range(args.repeat if args.backend != "numpy" else 1):
        t0, c0 = time.perf_counter(), time.process_time()
        model.train(tf, ti, tl)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = dict(backend=args.backend, source=source, n_train=len(tl), n_test=n_test,
               n_pix=tf.shape[1], t_train=min(times), t_train_cpu=min(cpu),
               train_info=model.train_info, crb=crb,
               **roof_figures(model, tf, ti, tl))
    from cannon_fast.lab.fit_steps import FIT_STEPS  # the lab's three label fits

    for step, options in FIT_STEPS.items():
        dt = np.inf
        for _ in range(args.repeat if args.backend != "numpy" else 1):  # best of repeats
            t0 = time.perf_counter()
            res = model.fit(sf, si, **options)
            dt = min(dt, time.perf_counter() - t0)
        d = res.labels - sl
        ok = res.ok
        out[step] = dict(
            stars_per_s=n_test / dt, t_fit=dt, n_flagged=int(np.count_nonzero(res.flags)),
            bias={n: float(np.median(d[ok, i])) for i, n in enumerate(LABELS)},
            std={n: float(np.std(d[ok, i])) for i, n in enumerate(LABELS)},
            pull={n: float(np.std(d[ok, i] / res.errors[ok, i])) for i, n in enumerate(LABELS)})
    oracle = true_model(args, tl) if args.backend != "numpy" else None
    if oracle is not None:
        res = oracle.fit(sf, si, debias=False)
        d = res.labels - sl
        out["true_model_std"] = {n: float(np.std(d[res.ok, i])) for i, n in enumerate(LABELS)}
    s_est = np.sqrt(model.s2)
    big = s_true >= 0.005  # half the typical noise (sigma ~ 0.01)
    out["s_ratio_median"] = float(np.median(s_est[big] / s_true[big]))
    out["s_zero_frac_where_true_gt0"] = float(np.mean(s_est[s_true > 0] < 1e-3))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def run_peers(args):
    tool = Path(args.shared) / "tools" / "peer_bench.py"
    cmd = [args.peer_python, str(tool), "--n-train", str(args.n_train), "--n-test",
           str(min(args.n_test, 200)), "--seed", str(args.seed), "--json", "/tmp/peers.json"]
    print("# running peers:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        print("# peers failed:", proc.stderr[-800:])
        return []
    return json.load(open("/tmp/peers.json"))["results"]


def dgemm_gflops(n=2000, repeat=3):
    """A yardstick for comparing runs on different machines: best-of-3 BLAS dgemm rate."""
    a = np.random.default_rng(0).random((n, n))
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def report(results, peers):
    crb = results[0]["crb"]
    print(f"\n# data: {results[0]['source']}, N_train={results[0]['n_train']}, "
          f"P={results[0]['n_pix']}, 5 labels, quadratic; CRB (true model): "
          + ", ".join(f"{k} {v:.4g}" for k, v in crb.items()))
    print(f"# machine: {os.cpu_count()} cores, BLAS dgemm {dgemm_gflops():.0f} GFLOP/s, load "
          f"average {os.getloadavg()[0]:.1f} at the end (the peers' ratios are the portable "
          "figures: absolute rates differ by 2x between machines of the same kind)")
    print(f"\n{'backend':8s} {'train s':>8s} {'fit stars/s':>12s} {'plain stars/s':>14s} "
          f"{'broadened stars/s':>18s} {'peak MB':>8s} {'s/s_true':>9s}")
    for r in results:
        print(f"{r['backend']:8s} {r['t_train']:8.3f} {r['debias']['stars_per_s']:12.0f} "
              f"{r['plain']['stars_per_s']:14.0f} {r['broadened']['stars_per_s']:18.0f} "
              f"{r['peak_rss_mb']:8.0f} {r['s_ratio_median']:9.3f}   (N_test={r['n_test']})")
    print("   (broadened: the plain fit, then labels + line broadening from it; its label "
          "std/CRB is below, the data have no broadening to find)")
    print("\n# the roof: the BLAS products the work cannot avoid, timed in each backend's process")
    print(f"{'backend':8s} {'Gram unit s':>11s} {'train in Gram units':>19s} "
          f"{'(CPU time)':>10s} {'fit roof stars/s':>16s} {'de-biased fit / roof':>20s}")
    for r in results:
        print(f"{r['backend']:8s} {r['gram_unit']:11.4f} {r['t_train'] / r['gram_unit']:19.1f} "
              f"{r['t_train_cpu'] / r['gram_unit_cpu']:10.1f} "
              f"{r['fit_roof']:16.0f} {r['debias']['stars_per_s'] / r['fit_roof']:20.2f}")
    print("   (Gram unit: one all-pixel (P x N).(N x T(T+1)/2) product, every pixel's normal "
          "matrix at one s²; fit roof: the fit's three products over pixels alone; CPU time: "
          "both timed by time.process_time, the figure to compare on a loaded machine when "
          "run with one thread)")
    for r in results:
        print(f"\n## {r['backend']}: label recovery (std / CRB, pull std); "
              f"flagged {r['debias']['n_flagged']} de-biased, {r['plain']['n_flagged']} plain")
        print(f"{'label':6s} {'bias':>10s} {'std':>9s} {'std/CRB':>8s} {'pull':>6s}   "
              f"{'plain std/CRB':>13s} {'plain pull':>10s} {'broadened std/CRB':>17s} "
              f"{'true model std/CRB':>19s}")
        floor = r.get("true_model_std")
        for n in LABELS:
            d, p, b = r["debias"], r["plain"], r["broadened"]
            tm = f"{floor[n] / crb[n]:19.3f}" if floor else f"{'n/a':>19s}"
            print(f"{n:6s} {d['bias'][n]:+10.4g} {d['std'][n]:9.4g} {d['std'][n] / crb[n]:8.3f} "
                  f"{d['pull'][n]:6.3f}   {p['std'][n] / crb[n]:13.3f} {p['pull'][n]:10.3f} "
                  f"{b['std'][n] / crb[n]:17.3f} {tm}")
        if floor:
            print("   (true model: the test stars fitted with the generating model itself -- the "
                  "floor of this benchmark, above 1 because the CRB is a median over stars)")
    for p in peers:
        if "error" in p:
            print(f"\n## peer {p['peer']}: failed ({p['error'][:200]})")
            continue
        best = results[0]
        ratio_fit = best["debias"]["stars_per_s"] * p["t_test_per_star_ms"] / 1e3
        print(f"\n## peer {p['peer']} {p['version']}: train {p['t_train_s']:.2f} s "
              f"({p['t_train_s'] / best['t_train']:.0f}x ours), fit {p['t_test_per_star_ms']:.2f} "
              f"ms/star ({ratio_fit:.0f}x slower than ours), peak {p['peak_rss_mb']:.0f} MB")
        for n in LABELS:
            s = p["recovery"][n]
            print(f"   {n:6s} std/CRB {s['std'] / crb[n]:.3f} (ours {best['debias']['std'][n] / crb[n]:.3f})"
                  f"  pull {p['pull_std'][n]:.2f}")
        print(f"   s recovered: median s/s_true {p['s2']['median_ratio_where_s_true_gt_0p005']:.3f}, "
              f"s = 0 where true > 0 on {100 * p['s2']['frac_s_est_zero_where_true_gt0']:.0f} % of pixels")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=900)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--n-pix", type=int, default=8575)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeat", type=int, default=3,
                    help="repeats of training and of each fit (the best time is shown)")
    ap.add_argument("--numpy-stars", type=int, default=200,
                    help="test stars for the (slow) numpy reference backend")
    ap.add_argument("--backends", default=None, help="comma list (default: all available)")
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--peer-python", default=None, help="a Python with the peer packages")
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend:
        run_backend(args)
        return
    from cannon_fast import available_backends
    backends = args.backends.split(",") if args.backends else available_backends()
    results = []
    for b in backends:
        cmd = [sys.executable, __file__, "--backend", b, "--n-train", str(args.n_train),
               "--n-test", str(args.n_test), "--n-pix", str(args.n_pix), "--seed", str(args.seed),
               "--repeat", str(args.repeat), "--numpy-stars", str(args.numpy_stars),
               "--shared", args.shared]
        print(f"# backend {b} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"# backend {b} failed:\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(lines[-1][7:]))
    peers = run_peers(args) if args.peer_python else []
    if results:
        report(results, peers)


if __name__ == "__main__":
    main()
