"""Observing the demo survey: what the instrument and the sky do to a normalized spectrum.

A continuum ``B_lambda(Teff)`` x a smooth per-chip instrument response x a scale set
by the H magnitude (flux in 1e-17 erg/s/cm^2/Å), photon + read noise from the visit
S/N, sky lines and telluric absorption, chip coverage that moves with the visit radial
velocity, flagged bad pixels (``APOGEE_PIXMASK`` bits) with corrupted flux, and 1-6
visits per star combined as in DR17 (row 0 pixel-weighted, row 1 globally weighted,
then the visits), with the ``APOGEE_STARFLAG`` bits of each visit.
"""
from __future__ import annotations

import functools

import numpy as np

from ..core.grid import APSTAR_CDELT1, APSTAR_CRVAL1, APSTAR_NPIX
from .spectra import CHIP_PIXELS, DV_PIX, apstar_wavelength

__all__ = ["BADPIX", "CRPIX", "SATPIX", "UNFIXABLE", "BADDARK", "BADFLAT", "BADERR", "NOSKY",
           "PERSIST_HIGH", "PERSIST_MED", "PERSIST_LOW", "SIG_SKYLINE", "SIG_TELLURIC"]

# APOGEE_PIXMASK bits (DR17 definitions)
BADPIX, CRPIX, SATPIX, UNFIXABLE, BADDARK, BADFLAT, BADERR, NOSKY = (1 << b for b in range(8))
PERSIST_HIGH, PERSIST_MED, PERSIST_LOW = (1 << b for b in (9, 10, 11))
SIG_SKYLINE, SIG_TELLURIC = 1 << 12, 1 << 13
_HUGE_BITS = BADPIX | CRPIX | SATPIX | UNFIXABLE | BADDARK | BADFLAT | BADERR
# APOGEE_STARFLAG bits used (DR17 definitions)
_STARFLAG = {"BAD_PIXELS": 0, "BRIGHT_NEIGHBOR": 2, "LOW_SNR": 4, "PERSIST_LOW": 11,
             "SUSPECT_RV_COMBINATION": 16, "SUSPECT_BROAD_LINES": 17}


# ----------------------------------------------------------------------------- instrument
def _chip_of_pixel():
    mid = [(CHIP_PIXELS[0][1] + CHIP_PIXELS[1][0]) / 2, (CHIP_PIXELS[1][1] + CHIP_PIXELS[2][0]) / 2]
    return np.digitize(np.arange(APSTAR_NPIX), mid)


@functools.lru_cache(maxsize=1)
def _instrument():
    """Fixed instrument and site templates (observed frame, apStar pixel grid)."""
    rng = np.random.default_rng(19700101)
    pix = np.arange(APSTAR_NPIX)
    chip = _chip_of_pixel()
    lo = np.array([c[0] for c in CHIP_PIXELS])[chip]
    hi = np.array([c[1] for c in CHIP_PIXELS])[chip]
    u = np.clip(2.0 * (pix - lo) / (hi - lo) - 1.0, -1.2, 1.2)           # chip coordinate
    throughput = np.array([0.82, 1.0, 0.9])[chip] * (1.0 - 0.35 * np.clip(np.abs(u), 0, 1) ** 6)
    # airglow OH emission lines (relative units, LSF-broadened) and a faint sky continuum
    centres = rng.uniform(150, 8425, 140)
    amps = np.exp(rng.normal(np.log(8.0), 1.2, centres.size))
    sky_lines = np.zeros(APSTAR_NPIX)
    for c, a in zip(centres, amps):
        sl = slice(int(c) - 6, int(c) + 7)
        sky_lines[sl] += a * np.exp(-0.5 * ((pix[sl] - c) / 1.35) ** 2)
    # telluric absorption (H2O at the band edges, CO2 groups near 1.575 and 1.605 um)
    tell = np.zeros(APSTAR_NPIX)
    groups = [(15100, 15300, 40, 0.05), (16750, 17000, 40, 0.06), (15700, 15800, 15, 0.03),
              (15990, 16090, 20, 0.04)]
    for w0, w1, nl, dmax in groups:
        for c in rng.uniform(w0, w1, nl):
            x = (np.log10(c) - APSTAR_CRVAL1) / APSTAR_CDELT1
            sl = slice(max(int(x) - 6, 0), min(int(x) + 7, APSTAR_NPIX))
            tell[sl] += rng.uniform(0.1, 1.0) * dmax * np.exp(-0.5 * ((pix[sl] - x) / 1.4) ** 2)
    return dict(chip=chip, u=u, throughput=throughput, sky_lines=sky_lines, tell_depth=tell)


def _planck_ratio(teff, wave):
    """B_lambda(T, wave) / B_lambda(T, 16000 Å), (N, P)."""
    c2 = 1.4387769e8  # hc/k in Å K
    t = np.asarray(teff, float)[:, None]
    return (16000.0 / wave) ** 5 * np.expm1(c2 / (16000.0 * t)) / np.expm1(c2 / (wave * t))


# ----------------------------------------------------------------------------- one star
def _star_continuum(S, i, rng, ins):
    """Stellar x instrument continuum of star ``i`` (1e-17 erg/s/cm^2/Å), (P,)."""
    scale = 800.0 * 10 ** (-0.4 * (S["H"][i] - 10.3))
    # per-chip quadratic response
    resp_c = np.array([0.9, 1.0, 0.95]) * np.exp(rng.normal(0, 0.04, 3))
    a1, a2 = rng.normal(0, 0.04, 3), rng.normal(-0.05, 0.03, 3)
    chip, u = ins["chip"], np.clip(ins["u"], -1, 1)
    response = resp_c[chip] * (1 + a1[chip] * u + a2[chip] * u * u)
    return scale * _planck_ratio([S["labels"][i, 0]], apstar_wavelength())[0] * response


def _chip_coverage(S, i, shift):
    """Rest-frame pixel range each chip covers in a visit, (3, 2), and the covered pixels."""
    cov_ext = np.zeros((3, 2), int)
    cover = np.zeros(APSTAR_NPIX, bool)
    for c, (lo, hi) in enumerate(CHIP_PIXELS):
        lo_r = int(np.ceil(lo + S["chip_jitter"][i, c] - shift))
        hi_r = int(np.floor(hi + S["chip_jitter"][i, c] - shift))
        cov_ext[c] = lo_r, hi_r
        cover[max(lo_r, 0):min(hi_r, APSTAR_NPIX - 1) + 1] = True
    return cov_ext, cover


def _add_defects(rng, fv, mv, cont, sky_rel, shift, bad_cols, cov_ext):
    """Corrupt and flag one visit's flux ``fv`` and bits ``mv`` in place.

    Returns the pixels whose error becomes huge (flagged unusable), (P,) bool.
    """
    pix = np.arange(APSTAR_NPIX)
    huge = np.zeros(APSTAR_NPIX, bool)
    # cosmic rays (flux spike), bad detector columns (dead/hot), saturated sky lines
    cr = rng.integers(0, APSTAR_NPIX, rng.poisson(2.0))
    fv[cr] += rng.uniform(0.5, 5.0, cr.size) * cont[cr]
    mv[cr] |= CRPIX
    huge[cr] = True
    bc_rest = np.round(bad_cols - shift).astype(int)
    bc_rest = bc_rest[(bc_rest >= 0) & (bc_rest < APSTAR_NPIX)]
    fv[bc_rest] *= rng.uniform(0.0, 0.4, bc_rest.size)
    mv[bc_rest] |= BADPIX | UNFIXABLE
    huge[bc_rest] = True
    if rng.random() < 0.03:
        sat = np.flatnonzero(sky_rel > 40)
        fv[sat] = rng.uniform(0.0, 0.3, sat.size) * cont[sat]
        mv[sat] |= SATPIX | BADPIX
        huge[sat] = True
    for c in range(3):   # flat-field trouble at the very chip ends
        for edge in (cov_ext[c, 0] + np.arange(2), cov_ext[c, 1] - np.arange(2)):
            e = edge[(edge >= 0) & (edge < APSTAR_NPIX)]
            mv[e] |= BADFLAT
            fv[e] *= rng.uniform(0.5, 1.5, e.size)
            huge[e] = True
    if rng.random() < 0.05:  # persistence in the blue chip (flagged, mildly high)
        pers = (pix < CHIP_PIXELS[0][1]) & (rng.random(APSTAR_NPIX) < 0.3)
        mv[pers] |= PERSIST_LOW
    return huge


def _observe_visit(S, i, v, rng, ins, cont_star, snr_v, norm_visit, bad_cols):
    """One visit of star ``i``: its flux, error, bits, sky and telluric rows (rest frame)."""
    pix = np.arange(APSTAR_NPIX)
    u = np.clip(ins["u"], -1, 1)
    shift = S["vrad_v"][i, v] / DV_PIX            # observed pixel = rest pixel + shift
    obs = pix + shift
    cov_ext, cv = _chip_coverage(S, i, shift)
    cont = cont_star * (1 + rng.normal(0, 0.01) + rng.normal(0, 0.01) * u)
    thr = np.interp(obs, pix, ins["throughput"])
    sky_rel = np.interp(obs, pix, ins["sky_lines"]) * rng.uniform(0.5, 2.0)
    sky_v = (20.0 + 30.0 * sky_rel) * rng.uniform(0.7, 1.3)               # flux units
    airmass = rng.uniform(1.0, 1.6)
    t_v = np.exp(-airmass * np.interp(obs, pix, ins["tell_depth"]))
    f_true = cont * norm_visit
    var_ph = (f_true + sky_v) * cont / (snr_v ** 2 * (1 + 20.0 / cont)) / thr
    sig = np.sqrt(var_ph) / np.sqrt(t_v)
    fv = f_true + sig * rng.standard_normal(APSTAR_NPIX)
    mv = np.zeros(APSTAR_NPIX, np.int64)
    # sky-line residuals: imperfect subtraction (3% of the line), flagged where the line
    # is bright against the star; the pipeline's error includes the residual term
    resid = 0.03 * 30.0 * sky_rel
    fv += rng.standard_normal(APSTAR_NPIX) * resid
    sig = np.hypot(sig, resid)
    mv[30.0 * sky_rel * rng.uniform(0.7, 1.3) > 0.08 * cont] |= SIG_SKYLINE
    mv[t_v < 0.97] |= SIG_TELLURIC
    huge = _add_defects(rng, fv, mv, cont, sky_rel, shift, bad_cols, cov_ext)
    ev = sig.copy()
    ev[huge] = 1e10 * cont[huge] / 800.0 * rng.uniform(0.95, 1.05)
    return dict(flux=np.where(cv, fv, 0.0), err=np.where(cv, ev, 0.0), mask=np.where(cv, mv, 0),
                sky=np.where(cv, sky_v, 0.0), skyerr=np.where(cv, np.sqrt(sky_v) * 0.6, 0.0),
                tell=np.where(cv, t_v, 0.0), tellerr=np.where(cv, 2e-4 + 0.02 * (1 - t_v), 0.0),
                cover=cv, cov_ext=cov_ext)


def _combine_visits(V, snr_v):
    """DR17 combination of the visits ``V`` (dict of (nv, P) arrays) and the S/N it reaches."""
    flux, err, mask, cover = V["flux"], V["err"], V["mask"], V["cover"]
    nv = len(flux)
    inter = cover.all(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        wpix = np.where(cover, 1.0 / np.where(cover, err, 1.0) ** 2, 0.0)
        sw = wpix.sum(0)
        row0_f = np.where(inter, (wpix * flux).sum(0) / sw, np.nan)
        row0_e = np.where(inter, 1.0 / np.sqrt(sw), np.nan)
        good = cover & ~((mask & _HUGE_BITS) > 0)
        wg = np.where(good, (snr_v ** 2)[:, None], 0.0)
        swg = wg.sum(0)
        ok1 = inter & (swg > 0)
        row1_f = np.where(ok1, (wg * flux).sum(0) / np.where(swg > 0, swg, 1), row0_f)
        row1_e = np.where(ok1, np.sqrt((wg ** 2 * err ** 2).sum(0)) / np.where(swg > 0, swg, 1),
                          row0_e)
        snrvis = np.array([np.median(flux[v][good[v]] / err[v][good[v]]) for v in range(nv)])
        q = row0_f / row0_e
    row0_m = np.where(inter, np.bitwise_and.reduce(mask, axis=0), 0)
    gp = inter & ~((row0_m & _HUGE_BITS) > 0)
    pix = np.arange(APSTAR_NPIX)
    green = (pix >= CHIP_PIXELS[1][0]) & (pix <= CHIP_PIXELS[1][1])
    return dict(flux=(row0_f, row1_f), err=(row0_e, row1_e), mask=row0_m, snrvis=snrvis,
                snr=float(np.median(q[gp])), snrev=float(np.median(q[gp & green])))


def _apstar_rows(V, comb, f32):
    """The image HDUs of an apStar file: combined rows, then the visits (DR17 row layout)."""
    nv = len(V["flux"])
    nrow = 2 if nv == 1 else nv + 2
    rows = {}
    for key, comb0, comb1 in (("flux", *comb["flux"]), ("err", *comb["err"]),
                              ("sky", 0.0, 0.0), ("skyerr", 0.0, 0.0),
                              ("tell", 0.0, 0.0), ("tellerr", 0.0, 0.0)):
        arr = np.zeros((nrow, APSTAR_NPIX), f32)
        arr[0] = comb0
        if nv > 1:
            arr[1] = comb1
            arr[2:] = V[key]
        rows[key] = arr
    m = np.zeros((nrow, APSTAR_NPIX), np.int32 if f32 == np.float32 else np.int64)
    m[0] = comb["mask"]
    if nv > 1:
        m[2:] = V["mask"]
    rows["mask"] = m
    return rows


def _visit_flags(S, i, mask, snrvis):
    """APOGEE_STARFLAG of each visit of star ``i``, (nv,)."""
    nv = len(mask)
    vflags = np.zeros(nv, np.int64)
    for v in range(nv):
        if ((mask[v] & _HUGE_BITS) > 0).mean() > 0.02:
            vflags[v] |= 1 << _STARFLAG["BAD_PIXELS"]
        if ((mask[v] & PERSIST_LOW) > 0).mean() > 0.05:
            vflags[v] |= 1 << _STARFLAG["PERSIST_LOW"]
        if snrvis[v] < 5:
            vflags[v] |= 1 << _STARFLAG["LOW_SNR"]
    if S["bright_neighbor"][i]:
        vflags |= 1 << _STARFLAG["BRIGHT_NEIGHBOR"]
    if S["vmacro"][i] > 11:
        vflags |= 1 << _STARFLAG["SUSPECT_BROAD_LINES"]
    if S["is_binary"][i] and nv > 1 and np.nanstd(S["dv"][i, :nv]) > 5:
        vflags |= 1 << _STARFLAG["SUSPECT_RV_COMBINATION"]
    return vflags


def _observe_star(S, i, norm_visits, f32):
    """Visit and combined rows of one apStar file, plus per-visit metadata.

    The star's own random stream (returned as ``rng``) goes on to draw its header's
    measured velocities and RV tables (:mod:`cannon_fast.demo.archive`).
    """
    ins = _instrument()
    rng = np.random.default_rng([S["seed"], 3, i])
    nv = int(S["nvisits"][i])
    cont_star = _star_continuum(S, i, rng, ins)
    # per-visit S/N with conditions: sum of squares = target^2
    w = rng.gamma(4.0, 1.0, nv)
    snr_v = S["snr_target"][i] * np.sqrt(w / w.sum())
    bad_cols = rng.integers(CHIP_PIXELS[0][0], CHIP_PIXELS[2][1], rng.poisson(5))  # per fiber
    visits = [_observe_visit(S, i, v, rng, ins, cont_star, snr_v[v], norm_visits[v], bad_cols)
              for v in range(nv)]
    V = {key: np.array([vis[key] for vis in visits]) for key in visits[0]}
    comb = _combine_visits(V, snr_v)
    return dict(rows=_apstar_rows(V, comb, f32), snr=comb["snr"], snrev=comb["snrev"],
                snrvis=comb["snrvis"], cov_ext=V["cov_ext"],
                vflags=_visit_flags(S, i, V["mask"], comb["snrvis"]), rng=rng)
