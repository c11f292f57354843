"""The lab on harder mock surveys: calibrated errors per S/N bin, binaries found and corrected.

Runs ``run_lab`` (no extras) on mock surveys written by ``../shared/tools/mock_survey.py``
and prints the figures the error and binary targets are about:

* pull standard deviation (fit - true) / error per label and S/N bin, formal and calibrated
  (target 0.8-1.25 in every bin, on a clean survey and one with ``--snr-min 10``);
* with binaries: the true singles' scatter against the truth, the share of bright, fast
  binaries (FLUX_RATIO_H > 0.3, K_REL > 15 km/s) flagged, the share of singles flagged, the
  flagged binaries' composite-fit primary labels against the truth, the screen's rate.

Usage::

    python benchmarks/bench_lab_trust.py --mock DIR [--mock DIR2 ...] [--out OUT]
    python benchmarks/bench_lab_trust.py --screen-rate STORE   # a prepared store (prepare)
    python benchmarks/bench_lab_trust.py --generate clean,lowsnr,binaries --work /tmp/mocks

``--generate`` writes the three surveys with the shared tool first (seeds 7, 7, 11;
~1-3 min each). Each lab run takes ~3-15 min on 2 cores.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
KINDS = {"clean": [], "lowsnr": ["--snr-min", "10"], "binaries": ["--binary-fraction", "0.3"]}
LABELS = ("TEFF", "LOGG", "FE_H")


def _generate(kinds, work):
    out = []
    for kind in kinds:
        d = Path(work) / f"mock_{kind}"
        if not d.exists():
            subprocess.run([sys.executable, str(SHARED / "tools" / "mock_survey.py"), "--out",
                            str(d), "--seed", "11" if kind == "binaries" else "7",
                            *KINDS[kind]], check=True, stdout=subprocess.DEVNULL)
        out.append(d)
    return out


def _report(name, s):
    p = s["primary_fit"]
    v = s["validation"][p]
    print(f"\n== {name}: {s['cuts']['n_kept']} stars kept, model {s['choice']['model']}, "
          f"{p} fit, errors calibrated against {(s.get('error_calibration') or {}).get('reference')}")
    st = v.get("vs_true", {})
    print("validation vs true (bias / scatter): " + ", ".join(
        f"{n} {st[n]['bias']:+.4g} / {st[n]['scatter']:.4g}" for n in LABELS if n in st))
    pulls = v["pulls"].get("vs_true") or v["pulls"]["vs_catalog"]
    print(f"{'pull std':10s} " + " ".join(f"{b:>16s}" for b in v["pulls"]["snr_bins"]))
    for n in pulls:
        row = []
        for b in v["pulls"]["snr_bins"]:
            e = pulls[n][b]
            cal = e.get("calibrated")
            row.append(f"{e['formal'] or float('nan'):5.2f}->{cal if cal is not None else float('nan'):5.2f}"
                       f" n{e['n']:<4d}")
        print(f"{n:10s} " + " ".join(f"{r:>16s}" for r in row))
    b = s.get("binaries", {}).get("validation")
    if not b:
        return
    tr = s["binaries"].get("training", {})
    print(f"binary screen: training {tr.get('n_flagged')}/{tr.get('n_screened')} flagged and "
          f"left out; validation {b['n_flagged']}/{b['n_screened']} flagged, "
          f"{b['stars_per_second']:.0f} stars/s")
    t = b.get("truth")
    if t:
        bf = t.get("n_bright_fast", 0)
        print(f"  bright, fast binaries flagged: {t.get('n_bright_fast_flagged')}/{bf}"
              f" ({100 * t.get('n_bright_fast_flagged', 0) / max(bf, 1):.0f} %); all binaries "
              f"{t['n_binaries_flagged']}/{t['n_binaries']}; singles flagged "
              f"{t['n_singles_flagged']}/{t['n_singles']} "
              f"({100 * t['n_singles_flagged'] / max(t['n_singles'], 1):.1f} %)")
    for key in ("true_singles_vs_true", "singles_vs_true", "flagged_single_fit_vs_true",
                "flagged_composite_fit_vs_true"):
        if key in b:
            print(f"  {key:32s} " + ", ".join(
                f"{n} {b[key][n]['bias']:+.4g} / {b[key][n]['scatter']:.4g} (n={b[key][n]['n']})"
                for n in LABELS))


def _screen_rate(store_path):
    """The screen's rate on a prepared store: wall and CPU seconds (a loaded machine
    stretches the wall time, not the CPU time)."""
    import time

    import numpy as np

    from cannon_fast import CannonModel
    from cannon_fast.core.binaries import screen_binaries
    from cannon_fast.store import SpectraStore

    st = SpectraStore(store_path)
    flux, ivar = np.asarray(st.flux), np.asarray(st.ivar)
    labels = np.asarray(st.labels, float)
    half = len(flux) // 2
    m = CannonModel(st.label_names).train(flux[:half], ivar[:half], labels[:half])
    single = m.fit(flux[half:], ivar[half:], debias=False)
    for n_refine in (0, 4):
        w0, c0 = time.perf_counter(), time.process_time()
        scr = screen_binaries(m, flux[half:], ivar[half:], single.labels, n_refine=n_refine)
        w, c = time.perf_counter() - w0, time.process_time() - c0
        n = len(flux) - half
        print(f"screen of {n} stars (n_refine={n_refine}, {int(scr.flagged.sum())} flagged): "
              f"{w:.1f} s wall = {n / w:.0f} stars/s; {c:.1f} s CPU = {2 * n / c:.0f} stars/s "
              f"on 2 idle cores; load {os.getloadavg()[0]:.1f}")


def main(argv=None):
    from cannon_fast.lab.pipeline import run_lab

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mock", action="append", default=[], help="a mock survey folder")
    ap.add_argument("--generate", default=None, help="comma-separated: clean,lowsnr,binaries")
    ap.add_argument("--work", default="bench_lab_trust", help="where generated surveys go")
    ap.add_argument("--out", default="bench_lab_trust_reports")
    ap.add_argument("--screen-rate", default=None, metavar="STORE",
                    help="only time the binary screen on a prepared store")
    a = ap.parse_args(argv)
    if a.screen_rate:
        return _screen_rate(a.screen_rate)
    mocks = [Path(m) for m in a.mock]
    if a.generate:
        mocks += _generate(a.generate.split(","), a.work)
    cont = SHARED / "data" / "real" / "lab2" / "cannon_continuum_apogee.npz"
    for m in mocks:
        s = run_lab(data_dir=m, out_dir=os.path.join(a.out, m.name), continuum=cont,
                    extras=False, force=True, show_progress=False, log=None)
        _report(m.name, s)


if __name__ == "__main__":
    main()
