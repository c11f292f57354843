r"""Survey-scale benchmark: label a mock survey end to end, in one process and on Dask.

A plain script (not collected by pytest)::

    python benchmarks/bench_survey.py --mock-dir /tmp/mock100k            # existing mock
    python benchmarks/bench_survey.py --mock-dir /tmp/mock100k --n-stars 100000 \\
        --mock-tool ../shared/tools/mock_survey.py                          # make it first

Steps: (1) the mock survey (``mock_survey.py --format npz``: raw combined spectra,
float32 flux/ivar + uint16 PIXMASK, and ``truth.fits``); (2) a quadratic model
trained on ``--n-train`` stars that pass the lab's cuts, with their TRUE labels
from truth.fits and continuum pixels found from the data
(:func:`cannon_fast.core.continuum.find_continuum_pixels`); (3) every star labeled by
``cannon_fast.survey.label_survey`` (read + mask + normalize + fit + commit +
merge) in a child process, which reports its wall time and peak RSS; (4) the
same with a ``distributed.LocalCluster`` (``--workers`` single-threaded
processes), whose overhead is measured against (3) and whose catalogue is
compared with (3)'s.  Also printed: the fit alone on normalized spectra in
memory, the load average before and after (the machine may be shared), and
the cost per 10^6 stars in core-hours.

Targets (issue #6): >= 2000 stars/s including I/O, peak <= 2 GB, Dask within 80 %
of the single-process throughput.

``--repeat K`` instead labels K hard links of the survey file as one survey of K x N
stars (``label`` reads several ``.npz`` files as one survey) with the process pool
only: a 10^6-star job from a 10^5-star mock without 10x its disk. The same spectra
are read K times (from the page cache if it holds the file), and their IDs repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CHILD = r"""
import json, os, resource, sys, time
from cannon_fast import CannonModel
from cannon_fast.survey import label_survey
a = json.loads(sys.argv[1])
model = CannonModel.read(a["model"], backend=a["backend"])
t0 = time.perf_counter()
s = label_survey(model, a["inputs"], a["out"], chunk_size=a["chunk"], scheduler=a["scheduler"],
                 n_workers=a["workers"], fit_options=a["fit"])
wall = time.perf_counter() - t0
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's peak before exec)
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps(dict(wall=wall, n=s.n_read, fitted=s.n_fitted, flagged=s.n_flagged,
                      failed=s.n_failed, chunks=s.n_chunks, maxrss_self=hwm,
                      maxrss_children=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                      * 1024)))
"""


def _gb(x):
    return f"{x / 1e9:.2f} GB"


def _load():
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def make_mock(args):
    """Run the mock generator unless the survey is already there."""
    path = os.path.join(args.mock_dir, "survey.npz")
    if os.path.exists(path):
        return path
    if not args.mock_tool:
        sys.exit(f"{path} not found; pass --mock-tool path/to/mock_survey.py to make it")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, args.mock_tool, "--format", "npz", "--n-stars",
                    str(args.n_stars), "--out", args.mock_dir], check=True)
    print(f"mock survey: {args.n_stars} stars in {time.perf_counter() - t0:.0f} s")
    return path


def train_model(args, npz):
    """Quadratic model on n_train stars passing the cuts, true labels, data-driven continuum."""
    import fitsio

    from cannon_fast import CannonModel
    from cannon_fast.core.continuum import find_continuum_pixels, normalize
    from cannon_fast.survey.inputs import _npz_member

    out = os.path.join(args.work, "model.npz")
    if os.path.exists(out):
        return out
    truth = fitsio.read(os.path.join(args.mock_dir, "truth.fits"), ext=1)
    names = ["TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE"]
    rows = np.flatnonzero(truth["PASS_LAB_CUTS"])[: args.n_train]
    flux = np.array(_npz_member(npz, "flux")[rows], dtype=np.float32)
    ivar = np.array(_npz_member(npz, "ivar")[rows], dtype=np.float32)
    bm = np.array(_npz_member(npz, "bitmask")[rows])
    from cannon_fast.survey.chunk import _mask_raw
    from cannon_fast.apogee.bitmask import DEFAULT_BAD_BITS, bit_value

    _mask_raw(flux, ivar, bm, bit_value(DEFAULT_BAD_BITS))
    labels = np.column_stack([truth[n][rows] for n in names]).astype(np.float64)
    t0 = time.perf_counter()
    cont, hist = find_continuum_pixels(flux, ivar, labels, lambda: CannonModel(
        names, backend=args.backend), n_iter=2)
    ns = normalize(flux, ivar, cont)
    model = CannonModel(names, backend=args.backend).train(ns.flux, ns.ivar, labels)
    model.train_info["continuum_pixels"] = np.flatnonzero(cont).tolist()
    model.write(out)
    print(f"model: {len(rows)} training stars, {int(cont.sum())} continuum pixels (changes "
          f"per round {hist}), trained in {time.perf_counter() - t0:.0f} s")
    return out


def fit_only(args, model_path, npz, n=4096):
    """Throughput of the fit alone (normalized spectra in memory)."""
    from cannon_fast import CannonModel
    from cannon_fast.core.continuum import model_continuum, normalize
    from cannon_fast.apogee.bitmask import DEFAULT_BAD_BITS, bit_value
    from cannon_fast.survey.chunk import _mask_raw
    from cannon_fast.survey.inputs import _npz_member

    model = CannonModel.read(model_path, backend=args.backend)
    flux = np.array(_npz_member(npz, "flux")[:n], dtype=np.float32)
    ivar = np.array(_npz_member(npz, "ivar")[:n], dtype=np.float32)
    bm = np.array(_npz_member(npz, "bitmask")[:n])
    pixels, degree, _ = model_continuum(model)  # as label_survey does
    # as label_survey does it: the PIXMASK read by the normalization, one pass, into kept
    # buffers (the first call pays their page faults, as a job's first chunk does)
    out = (np.empty_like(flux), np.empty_like(ivar))
    for _ in range(2):
        t0 = time.perf_counter()
        ns = normalize(flux, ivar, pixels, degree=degree, bitmask=bm,
                       bad_bits=bit_value(DEFAULT_BAD_BITS), out=out)
        t1 = time.perf_counter()
    _mask_raw(flux, ivar, bm, bit_value(DEFAULT_BAD_BITS))  # the separate passes, for scale
    t2 = time.perf_counter()
    model.fit(ns.flux[:512], ns.ivar[:512], **_fit_options(args))  # warm-up (JIT, caches)
    t3 = time.perf_counter()
    model.fit(ns.flux, ns.ivar, **_fit_options(args))
    t4 = time.perf_counter()
    n = len(flux)
    print(f"in memory, {n} stars: mask + normalize {n / (t1 - t0):.0f}/s (one pass; a mask "
          f"alone {n / (t2 - t1):.0f}/s), fit {n / (t4 - t3):.0f} stars/s")


def _fit_options(args):
    """The label fit: de-biased (the default), or plain + line broadening."""
    return dict(debias=False, broadening=True) if args.broadening else {}


def run_child(args, model_path, npz, out, scheduler):
    """Label the survey in a fresh child process; return its figures (dict)."""
    for p in (out, out + ".parts"):
        if os.path.isdir(p):
            import shutil
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)
    spec = dict(model=model_path, inputs=npz, out=out, chunk=args.chunk_size,
                scheduler=scheduler, workers=args.workers, backend=args.backend,
                fit=_fit_options(args))
    env = dict(os.environ, CANNON_FAST_PROGRESS="0")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    total = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(res.stderr)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["process_wall"] = total
    return r


def repeated(args, model_path, npz):
    """The process pool on ``--repeat`` hard links of the survey file: one K x N job."""
    links = []
    for k in range(args.repeat):
        links.append(os.path.join(args.work, f"repeat{k}.npz"))
        if not os.path.exists(links[-1]):
            os.link(npz, links[-1])
    print(_load())
    r = run_child(args, model_path, links, os.path.join(args.work, "repeat.fits"), "processes")
    rate = r["n"] / r["wall"]
    print(f"process pool ({args.workers} single-threaded workers) on {args.repeat} files: "
          f"{r['n']} stars in {r['wall']:.1f} s = {rate:.0f} stars/s ({1e6 / rate / 60:.2f} min "
          f"per 10^6); peak RSS driver {_gb(r['maxrss_self'])}, largest worker "
          f"{_gb(r['maxrss_children'])}; fitted {r['fitted']}, flagged {r['flagged']}, failed "
          f"{r['failed']}; catalogue "
          f"{_gb(os.path.getsize(os.path.join(args.work, 'repeat.fits')))}")
    print(_load())


def main(argv=None):
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mock-dir", required=True, help="mock survey directory (npz format)")
    ap.add_argument("--mock-tool", help="mock_survey.py, to make the survey if it is missing")
    ap.add_argument("--n-stars", type=int, default=100_000)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--work", default=None, help="work directory (default: MOCK_DIR/bench)")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument("--broadening", action="store_true",
                    help="fit line broadening with the labels (plain chi2 + broadening)")
    ap.add_argument("--repeat", type=int, default=None, metavar="K",
                    help="label K hard links of the survey file as one survey (process pool "
                         "only; see the module)")
    args = ap.parse_args(argv)
    args.work = args.work or os.path.join(args.mock_dir, "bench")
    os.makedirs(args.work, exist_ok=True)
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, {_load()}")
    npz = make_mock(args)
    print(f"survey file {npz}: {_gb(os.path.getsize(npz))}")
    model_path = train_model(args, npz)
    if args.repeat:
        return repeated(args, model_path, npz)
    fit_only(args, model_path, npz)
    print(_load())
    single = run_child(args, model_path, npz, os.path.join(args.work, "single.fits"), None)
    rate = single["n"] / single["wall"]
    print(f"single process: {single['n']} stars in {single['wall']:.1f} s = {rate:.0f} stars/s "
          f"(incl. read, mask, normalize, fit, commit, merge; process incl. imports "
          f"{single['process_wall']:.1f} s); peak RSS {_gb(single['maxrss_self'])}; fitted "
          f"{single['fitted']}, flagged {single['flagged']}, failed {single['failed']}")
    cores = os.cpu_count() or 1
    print(f"cost per 10^6 stars: {1e6 / rate / 60:.1f} min wall on this machine = "
          f"{1e6 / rate * cores / 3600:.2f} core-hours ({cores} cores)")
    print(_load())
    pp = run_child(args, model_path, npz, os.path.join(args.work, "processes.fits"), "processes")
    prate = pp["n"] / pp["wall"]
    print(f"process pool ({args.workers} single-threaded workers, no Dask): {pp['n']} stars in "
          f"{pp['wall']:.1f} s = {prate:.0f} stars/s ({100 * prate / rate:.0f} % of one "
          f"process); peak RSS driver {_gb(pp['maxrss_self'])}, largest worker "
          f"{_gb(pp['maxrss_children'])}; cost per 10^6 stars "
          f"{1e6 / prate / 60:.1f} min = {1e6 / prate * cores / 3600:.2f} core-hours")
    print(_load())
    if not args.skip_dask:
        dk = run_child(args, model_path, npz, os.path.join(args.work, "dask.fits"), "dask")
        drate = dk["n"] / dk["wall"]
        print(f"dask LocalCluster ({args.workers} workers x 1 thread): {dk['n']} stars in "
              f"{dk['wall']:.1f} s = {drate:.0f} stars/s = {100 * drate / rate:.0f} % of one "
              f"process, {100 * drate / prate:.0f} % of the process pool (overhead "
              f"{dk['wall'] - pp['wall']:+.1f} s vs the pool, incl. cluster start); "
              f"peak RSS driver {_gb(dk['maxrss_self'])}, largest worker (upper bound: "
              f"ru_maxrss) {_gb(dk['maxrss_children'])}")
        from cannon_fast.survey import read_catalog

        a = read_catalog(os.path.join(args.work, "single.fits"))
        b = read_catalog(os.path.join(args.work, "dask.fits"))
        for other in ("processes", "dask"):
            b = read_catalog(os.path.join(args.work, f"{other}.fits"))
            same = all(np.asarray(a[c]).tobytes() == np.asarray(b[c]).tobytes()
                       for c in a.colnames if a[c].dtype.kind == "f")
            print(f"{other} catalogue byte-identical to the one-process one: {same}")
        print(_load())
    truth = None
    try:
        import fitsio

        truth = fitsio.read(os.path.join(args.mock_dir, "truth.fits"), ext=1)
    except OSError:
        pass
    if truth is not None:
        from cannon_fast.survey import read_catalog

        cat = read_catalog(os.path.join(args.work, "single.fits"))
        from cannon_fast.core.fitting import INFORMATIONAL_FLAGS

        # SPARSE_TRAINING says where a fit was done, not that it is bad
        ok = (np.asarray(cat["FLAGS"]) & ~INFORMATIONAL_FLAGS) == 0
        ok &= np.asarray(truth["PASS_LAB_CUTS"])[np.asarray(cat["INDEX"])]
        d = np.asarray(cat["TEFF"])[ok] - np.asarray(truth["TEFF"])[np.asarray(cat["INDEX"])[ok]]
        dfe = (np.asarray(cat["FE_H"])[ok]
               - np.asarray(truth["FE_H"])[np.asarray(cat["INDEX"])[ok]])
        def mad(x):
            return 1.4826 * np.median(np.abs(x - np.median(x)))

        print(f"accuracy (unflagged stars passing the cuts, n={int(ok.sum())}), fitted - true: "
              f"Teff std {np.std(d):.0f} K / 1.4826 MAD {mad(d):.0f} K, [Fe/H] std "
              f"{np.std(dfe):.3f} / {mad(dfe):.3f}")


if __name__ == "__main__":
    main()
