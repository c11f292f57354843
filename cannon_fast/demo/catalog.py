"""The demo survey's catalog: ASPCAP-like labels, their errors and flags, and the lab's cuts.

The catalog labels are the true labels plus errors that grow at low S/N, at the cool and
warm ends and at low metallicity, with mild ASPCAP-like systematics; binaries are pulled
towards their companion. ``APOGEE_ASPCAPFLAG``, ``PARAMFLAG`` and ``EXTRATARG`` bits
are set as DR17 sets them, and some labels are not derived (NaN).
"""
from __future__ import annotations

import numpy as np

__all__ = ["pass_lab_cuts"]

# APOGEE_ASPCAPFLAG, PARAMFLAG and EXTRATARG bits used (DR17 definitions)
_ASPCAPFLAG = {"TEFF_WARN": 0, "LOGG_WARN": 1, "M_H_WARN": 3, "STAR_WARN": 7, "CHI2_WARN": 8,
               "COLORTE_WARN": 9, "ROTATION_WARN": 10, "SN_WARN": 11, "TEFF_BAD": 16,
               "LOGG_BAD": 17, "STAR_BAD": 23, "CHI2_BAD": 24, "COLORTE_BAD": 25,
               "ROTATION_BAD": 26, "SN_BAD": 27, "NO_ASPCAP_RESULT": 31}
_PARAMFLAG_GRIDEDGE_BAD, _PARAMFLAG_TEFF_CUT, _PARAMFLAG_GRIDEDGE_WARN = 1, 1 << 6, 1 << 8
_EXTRATARG_DUPLICATE = 1 << 4


def _catalog(S, snr, starflag):
    """ASPCAP-like catalog labels (truth + errors, binaries biased), flags and NaNs."""
    n = S["n"]
    rng = np.random.default_rng([S["seed"], 5])
    truth = S["labels"]
    teff, logg, feh = truth[:, 0], truth[:, 1], truth[:, 2]
    lowsn = np.sqrt(1 + (60.0 / np.maximum(snr, 1.0)) ** 2)
    cool = (1 + 0.6 * np.clip((4000 - teff) / 400, 0, None)
            + 0.5 * np.clip((teff - 5500) / 800, 0, None))
    mpoor = 1 + 0.6 * np.clip(-1.0 - feh, 0, None)
    sig = np.array([25.0, 0.05, 0.012, 0.02, 0.025])[None, :] * (lowsn * cool * mpoor)[:, None]
    cat = truth + sig * rng.standard_normal((n, 5))
    cat[:, 0] += 8.0 * feh                   # mild ASPCAP-like systematics
    cat[:, 1] += np.where(logg > 3.8, 0.03, 0.0)
    isb = S["is_binary"]
    if isb.any():   # a composite spectrum pulls the labels towards the companion
        w = 0.5 * S["light_ratio"][isb] / (1 + S["light_ratio"][isb])
        cat[isb, 0] += w * (S["teff2"][isb] - teff[isb])
        cat[isb, 1] += w * (S["logg2"][isb] - logg[isb])
    rep = sig * 0.8 * np.exp(rng.normal(0, 0.1, (n, 5)))
    af = np.zeros(n, np.int64)

    def bit(name):
        return np.int64(1) << np.int64(_ASPCAPFLAG[name])

    af[snr < 70] |= bit("SN_WARN")
    af[snr < 30] |= bit("SN_BAD")
    af[S["vmacro"] > 10] |= bit("ROTATION_WARN")
    p_bad = 0.012 + 0.2 * (teff < 3950) + 0.03 * (snr < 40) + 0.15 * isb
    bad = rng.random(n) < p_bad
    cause = rng.choice(["CHI2_BAD", "COLORTE_BAD", "TEFF_BAD", "LOGG_BAD"], n,
                       p=[0.4, 0.2, 0.2, 0.2])
    for k in ("CHI2_BAD", "COLORTE_BAD", "TEFF_BAD", "LOGG_BAD"):
        af[bad & (cause == k)] |= bit(k)
    nores = rng.random(n) < 0.004
    af[nores] |= bit("NO_ASPCAP_RESULT")
    starbad = bad | nores
    af[starbad] |= bit("STAR_BAD")
    af[((af & (bit("SN_WARN") | bit("ROTATION_WARN"))) > 0) & ~starbad] |= bit("STAR_WARN")
    pflag = np.zeros((n, 5), np.int32)
    pflag[(af & bit("TEFF_BAD")) > 0, 0] |= _PARAMFLAG_GRIDEDGE_BAD
    pflag[(af & bit("LOGG_BAD")) > 0, 1] |= _PARAMFLAG_GRIDEDGE_BAD
    fe_bad = rng.random(n) < 0.004 + 0.02 * (teff < 3950)
    mg_bad = (rng.random(n) < 0.006 + 0.03 * (teff > 6000)) | fe_bad
    si_bad = (rng.random(n) < 0.008 + 0.05 * (feh < -1.7)) | fe_bad
    for j, b in ((2, fe_bad), (3, mg_bad), (4, si_bad)):
        pflag[b, j] |= np.where(teff[b] < 3950, _PARAMFLAG_TEFF_CUT, _PARAMFLAG_GRIDEDGE_BAD
                                ).astype(np.int32)
        cat[b, j] = rep[b, j] = np.nan
    pflag[rng.random((n, 5)) < 0.02] |= _PARAMFLAG_GRIDEDGE_WARN
    cat[starbad] = rep[starbad] = np.nan
    extratarg = np.zeros(n, np.int32)
    for j in np.flatnonzero(S["dup_of"] >= 0):   # the lower-S/N entry is the duplicate
        k = S["dup_of"][j]
        extratarg[j if snr[j] <= snr[k] else k] |= _EXTRATARG_DUPLICATE
    return dict(cat=cat, rep=rep, aspcapflag=af, paramflag=pflag, extratarg=extratarg,
                starflag=starflag)


def pass_lab_cuts(labels, snr):
    """The modeling lab's quality cuts applied to catalog labels.

    Parameters
    ----------
    labels : array_like, (N, 5)
        Catalog TEFF, LOGG, FE_H, MG_FE, SI_FE (NaN = not derived).
    snr : array_like, (N,)

    Returns
    -------
    keep : ndarray of bool, (N,)
        All labels finite, S/N >= 50, not a dwarf (log g <= 4 and Teff <= 5700 K) and
        [Fe/H] >= -1.
    """
    lab = np.asarray(labels, float)
    ok = np.all(np.isfinite(lab), axis=1) & (np.asarray(snr) >= 50)
    with np.errstate(invalid="ignore"):
        ok &= (lab[:, 1] <= 4) & (lab[:, 0] <= 5700) & (lab[:, 2] >= -1)
    return ok
