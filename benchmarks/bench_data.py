"""Data-layer benchmarks: downloads, read+mask+normalize, normalization alone, continuum choice.

Run as a plain script (it prints its figures)::

    nice python benchmarks/bench_data.py [--mock DIR] [--n-files 1000] [--skip-download]

``--mock`` is a mock SAS tree from ``../shared/tools/mock_survey.py --format sas``
(made in a temporary directory with 300 stars when omitted).  The download
benchmark serves the mock files from memory on 127.0.0.1, each under several
names to reach ``--n-files``, and compares ``download_files`` (8 keep-alive
connections) with a plain single-threaded ``urllib`` loop.
"""
from __future__ import annotations

import argparse
import http.server
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("CANNON_FAST_SHARED", os.path.join(HERE, "..", "..", "shared"))
ALLSTAR = "dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits"


def make_mock(n, out):
    """Write an n-star mock SAS tree into ``out``."""
    subprocess.run([sys.executable, os.path.join(SHARED, "tools", "mock_survey.py"), "--format",
                    "sas", "--n-stars", str(n), "--out", out], check=True, capture_output=True)
    return out


def apstar_files(root):
    """List the apStar files of a mock tree."""
    from cannon_fast.apogee.prepare import find_apstar_files

    return find_apstar_files(os.path.join(root, "dr17"))


# ----------------------------------------------------------------------------- downloads
def bench_download(files, n_files):
    """Concurrent download_files vs a plain urllib loop, from an in-memory local server."""
    blobs = [open(p, "rb").read() for p in files]
    names = [f"apStar-dr17-X{i:05d}.fits" for i in range(n_files)]
    data = {nm: blobs[i % len(blobs)] for i, nm in enumerate(names)}

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            body = data.get(os.path.basename(self.path))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    urls = [f"{base}/f/{nm}" for nm in names]
    total_mb = sum(len(data[nm]) for nm in names) / 1e6
    from cannon_fast.apogee.download import download_files

    out = {}
    for label, fn in (("plain loop (urllib, 1 thread)", None), ("download_files, 8 workers", 8),
                      ("download_files, 4 workers", 4)):
        dest = tempfile.mkdtemp(prefix="bench_dl_")
        t0 = time.perf_counter()
        if fn is None:
            for u in urls:
                with urllib.request.urlopen(u) as r, open(os.path.join(dest, os.path.basename(u)),
                                                          "wb") as fh:
                    shutil.copyfileobj(r, fh)
        else:
            rep = download_files(urls, dest, workers=fn, show_progress=False)
            assert rep.ok, str(rep)
        dt = time.perf_counter() - t0
        shutil.rmtree(dest)
        out[label] = (n_files / dt, total_mb / dt)
        print(f"  {label:34s} {n_files / dt:8.1f} files/s {total_mb / dt:8.1f} MB/s "
              f"({n_files} files, {total_mb:.0f} MB, {dt:.1f} s)")
    srv.shutdown()
    srv.server_close()
    return out


# ----------------------------------------------------------------------------- reading
def bench_read(files, cont, repeat):
    """Read + mask (+ normalize) apStar files from a warm page cache."""
    from cannon_fast.core.continuum import normalize
    from cannon_fast.apogee.prepare import load_spectra

    paths = (files * repeat)
    load_spectra(paths[:50])  # warm the page cache and imports
    normalize(np.ones((2, 8575), np.float32), np.ones((2, 8575), np.float32), cont)
    n = len(paths)
    for workers in (1, 2):
        t0, c0 = time.perf_counter(), time.process_time()
        flux, ivar, ok, err = load_spectra(paths, workers=workers, chunk=128,
                                           show_progress=False)
        t1, c1 = time.perf_counter(), time.process_time()
        normalize(flux, ivar, cont)
        t2, c2 = time.perf_counter(), time.process_time()
        print(f"  read+mask, {workers} process(es):  {n / (t1 - t0):7.0f} files/s wall; "
              f"+ normalize: {n / (t2 - t0):7.0f} files/s wall ({n} files)")
        if workers == 1:
            print(f"    per CPU-second of this process: read+mask {n / (c1 - c0):7.0f} files, "
                  f"read+mask+normalize {n / (c2 - c0):7.0f} files")
    return flux, ivar


def bench_normalize(flux, ivar, cont, n=20000):
    """Time normalization alone: numba with 1 and 2 threads, and the numpy reference."""
    import numba
    from cannon_fast.core.continuum import normalize

    reps = -(-n // len(flux))
    F = np.ascontiguousarray(np.tile(flux, (reps, 1))[:n])
    V = np.ascontiguousarray(np.tile(ivar, (reps, 1))[:n])
    normalize(F[:10], V[:10], cont)
    for threads in (1, 2):
        numba.set_num_threads(threads)
        best = cbest = np.inf
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            normalize(F, V, cont)
            best = min(best, time.perf_counter() - t0)
            cbest = min(cbest, time.process_time() - c0)
        print(f"  normalize (numba, {threads} thread(s), float32): {n / best:8.0f} spectra/s "
              f"wall, {n / cbest:8.0f} per CPU-second")
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    t0 = time.perf_counter()
    normalize(F[:200], V[:200], cont, backend="numpy")
    print(f"  normalize (numpy reference):              "
          f"{200 / (time.perf_counter() - t0):8.0f} spectra/s")


# ----------------------------------------------------------------------------- continuum choice
def _spline_normalize(flux, ivar, cont, spacing):
    """Weighted least-squares cubic spline per chip (knots every ``spacing`` pixels)."""
    from scipy.interpolate import make_lsq_spline

    from cannon_fast.apogee.files import CHIP_RANGES

    out = np.ones_like(flux, dtype=float)
    oiv = np.zeros_like(flux, dtype=float)
    for s in range(len(flux)):
        for a, b in CHIP_RANGES:
            x = np.arange(a, b)
            use = cont[a:b] & (ivar[s, a:b] > 0)
            xu = x[use]
            inner = np.arange(a + spacing, b - spacing, spacing)
            inner = inner[(inner > xu.min()) & (inner < xu.max())]
            t = np.r_[[xu.min()] * 4, inner, [xu.max()] * 4]
            try:
                spl = make_lsq_spline(xu, flux[s, a:b][use], t, k=3,
                                      w=np.sqrt(ivar[s, a:b][use]))
            except (ValueError, np.linalg.LinAlgError):
                continue
            c = spl(np.clip(x, xu.min(), xu.max()))
            g = (ivar[s, a:b] > 0) & (c > 0)
            out[s, a:b][g] = flux[s, a:b][g] / c[g]
            oiv[s, a:b][g] = ivar[s, a:b][g] * c[g] ** 2
    return out, oiv


def bench_continuum_choice(mock, cont_files):
    """Chebyshev degrees and splines against the mock survey's true normalized spectra."""
    from astropy.table import Table

    from cannon_fast.core.continuum import load_continuum_pixels, normalize
    from cannon_fast.apogee.prepare import load_spectra

    spec = importlib.util.spec_from_file_location("_ms", os.path.join(SHARED, "tools",
                                                                      "mock_survey.py"))
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inp = ms.load_inputs(ms.DEFAULT_INPUTS)
    t = Table.read(os.path.join(mock, "truth.fits"))
    tid = np.char.strip(np.asarray(t["APOGEE_ID"]).astype(str))
    pos = {s: i for i, s in enumerate(tid)}
    files = apstar_files(mock)
    rows = np.array([pos[os.path.basename(p)[12:-5]] for p in files])
    keep = np.asarray(t["PASS_LAB_CUTS"][rows], bool) & ~np.asarray(t["IS_BINARY"][rows], bool)
    files = [f for f, k in zip(files, keep) if k]
    rows = rows[keep]
    flux, ivar, ok, _ = load_spectra(files, show_progress=False)
    c = {k: np.asarray(t[k][rows], float) for k in ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE")}
    deriv = np.column_stack([np.clip(c["TEFF"], 3900, 5300), np.clip(c["LOGG"], 0.8, 3.8),
                             np.clip(c["FE_H"], -2.3, 0.4), np.clip(c["MG_FE"], -0.1, 0.4)])
    f1 = ms.emulate(inp, np.asarray(t["EMU_LABELS"][rows], float)) + ms.si_response(
        inp, deriv, np.clip(c["SI_FE"] - c["MG_FE"], -0.4, 0.4))
    T = np.ones((len(rows), ms.NPIX))
    T[:, ms.GRID_IDX] = f1
    T = np.clip(T, 0.02, 1.3)
    grid = np.zeros(ms.NPIX, bool)
    grid[ms.GRID_IDX] = True
    # pairs of stars with nearly the same true labels: their normalized spectra should agree
    lab = np.column_stack([c["TEFF"] / 100, c["LOGG"] / 0.2, c["FE_H"] / 0.05, c["MG_FE"] / 0.05])
    d = np.sqrt(((lab[:, None] - lab[None]) ** 2).sum(-1))
    i, j = np.nonzero(np.triu(d < 1.0, 1))
    print(f"  {len(rows)} survivors of the cuts; {len(i)} pairs with |dTeff|~<100 K, "
          "|dlogg|~<0.2, |d[Fe/H]|,|d[Mg/Fe]|~<0.05")

    def score(nf, niv):
        g = (niv > 0) & grid[None]
        chi = (nf - T) * np.sqrt(niv)
        std = np.median([chi[k, g[k]].std() for k in range(len(T))])
        r = np.where(g, nf - T, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            blk = np.median(np.nanmax(np.abs(np.nanmedian(r[:, :8500].reshape(len(T), -1, 100),
                                                          axis=2)), axis=1))
            # pair scatter: robust std of (f_i - f_j) over pixels, smoothed over 50 px (wiggles)
            diffs = []
            for a, b in zip(i, j):
                gg = g[a] & g[b]
                dd = np.where(gg, nf[a] - nf[b], np.nan)
                sm = np.nanmedian(dd[:8550].reshape(-1, 50), axis=1)
                diffs.append(np.nanstd(sm))
        return std, blk, np.median(diffs) if diffs else np.nan

    for cf in cont_files:
        cont = load_continuum_pixels(cf)
        print(f"  continuum pixels: {os.path.basename(cf)} ({cont.sum()})")
        print("    method           median std(chi vs truth)  median max|100px resid|  "
              "similar-pair smooth scatter")
        for deg in (1, 2, 3, 4, 5):
            ns = normalize(flux, ivar, cont, degree=deg, dtype=np.float64)
            s, b, p = score(ns.flux, ns.ivar)
            print(f"    Chebyshev deg {deg}  {s:24.3f}  {b:23.4f}  {p:27.4f}")
        for spacing in (800, 400):
            nf, niv = _spline_normalize(flux, ivar, cont, spacing)
            s, b, p = score(nf, niv)
            print(f"    spline /{spacing:3d} px  {s:24.3f}  {b:23.4f}  {p:27.4f}")


def main(argv=None):
    """Run the benchmarks and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mock", help="mock SAS tree (default: make 300 stars in a temp dir)")
    ap.add_argument("--n-files", type=int, default=1000, help="files in the download benchmark")
    ap.add_argument("--skip-download", action="store_true")
    ap.add_argument("--skip-choice", action="store_true")
    args = ap.parse_args(argv)
    tmp = None
    mock = args.mock
    if mock is None:
        tmp = tempfile.mkdtemp(prefix="bench_mock_")
        mock = make_mock(300, tmp)
    try:
        files = apstar_files(mock)
        from cannon_fast.core.continuum import load_continuum_pixels

        lab = os.path.join(SHARED, "data", "real", "lab2", "cannon_continuum_apogee.npz")
        cont = load_continuum_pixels(lab)
        print(f"cannon_fast data benchmarks ({os.cpu_count()} CPUs, {len(files)} mock apStar "
              f"files)")
        if not args.skip_download:
            print("download from a local server:")
            bench_download(files, args.n_files)
        print("read + mask + normalize (warm page cache):")
        flux, ivar = bench_read(files, cont, repeat=max(1, 3000 // len(files)))
        print("normalization alone:")
        bench_normalize(flux, ivar, cont)
        if not args.skip_choice:
            print("continuum choice (mock survey, against the true normalized spectra):")
            bench_continuum_choice(mock, [lab, os.path.join(SHARED, "data", "real", "masks",
                                                             "dr17_contmask.npy")])
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
