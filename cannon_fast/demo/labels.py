"""The stellar labels of the demo survey and the population they are drawn from.

The labels follow a giant-dominated population (red giant branch and red clump along
an approximate isochrone, a metal-poor tail, alpha-enhanced thick disc and halo), plus
dwarfs, subgiants and faint stars so that the lab's quality cuts have work to do.
"""
from __future__ import annotations

import numpy as np

__all__ = ["LABEL_NAMES", "GIANT_LABEL_RANGE", "sample_labels", "vmacro_relation"]

#: Labels of the demo survey, in the order used by every array here.
LABEL_NAMES = ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE")
#: Approximate label box of the survey's giants (the range the demo trains on).
GIANT_LABEL_RANGE = np.array([[3900.0, 5300.0], [0.8, 3.7], [-1.0, 0.5], [-0.1, 0.4],
                              [-0.1, 0.35]])
# the log g the label relations (and the line strengths) are expanded around
_LOGG_REF = 2.5
_POPULATIONS = ("rgb", "red_clump", "dwarf", "subgiant")


def _as_labels(labels):
    """Validate labels: (N, 5) float64 in ``LABEL_NAMES`` order, and whether one star was given."""
    lab = np.asarray(labels, dtype=np.float64)
    single = lab.ndim == 1
    lab = np.atleast_2d(lab)
    if lab.ndim != 2 or lab.shape[1] != len(LABEL_NAMES):
        raise ValueError(f"labels must have shape (N, {len(LABEL_NAMES)}) with columns "
                         f"{LABEL_NAMES}, got {np.shape(labels)}")
    if not np.all(np.isfinite(lab)):
        raise ValueError("labels must be finite")
    if np.any(lab[:, 0] < 2500) or np.any(lab[:, 0] > 9000):
        raise ValueError("TEFF must be within 2500-9000 K (is the column order "
                         f"{LABEL_NAMES}?)")
    return lab, single


def vmacro_relation(teff, logg):
    """Macroturbulence (km/s, Gaussian FWHM) of the synthetic stars as a smooth label function.

    Parameters
    ----------
    teff, logg : array_like
        Effective temperature (K) and surface gravity (dex).

    Returns
    -------
    vmacro : ndarray
        Broader lines in luminous and warm stars, ~6 km/s for a clump giant.
    """
    teff, logg = np.asarray(teff, float), np.asarray(logg, float)
    return 6.0 + 0.9 * (_LOGG_REF - logg) + 1.2 * (teff - 4500.0) / 1000.0


def _rgb_teff(logg, feh, mgfe):
    """Approximate giant-branch Teff(log g, [Fe/H]) of a ~1.2 Msun, few-Gyr isochrone."""
    g = logg - _LOGG_REF
    return 4640.0 + 330.0 * g - 30.0 * g * g - 270.0 * feh - 100.0 * (mgfe - 0.05)


def sample_labels(n, seed=0):
    """Draw true labels of a giant-dominated APOGEE-like population.

    Red giant branch stars (log g 0.9-3.7, more of them at high log g) along
    :func:`_rgb_teff` with 50 K scatter, red clump stars (log g ~2.4), and a few
    dwarfs and subgiants; [Fe/H] from a thin disc, a thick disc and a metal-poor
    halo tail; [Mg/Fe] alpha-enhanced at low [Fe/H] (two sequences); [Si/Fe]
    correlated with [Mg/Fe].

    Parameters
    ----------
    n : int
        Number of stars.
    seed : int
        Seed of the random generator.

    Returns
    -------
    labels : ndarray, (n, 5)
        TEFF, LOGG, FE_H, MG_FE, SI_FE.
    population : ndarray of str, (n,)
        ``"rgb"``, ``"red_clump"``, ``"dwarf"`` or ``"subgiant"``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng([int(seed), 1])
    pop = rng.choice(4, n, p=[0.6, 0.26, 0.11, 0.03])
    comp = rng.choice(3, n, p=[0.68, 0.24, 0.08])          # thin, thick, halo
    feh = np.where(comp == 0, rng.normal(-0.05, 0.2, n),
                   np.where(comp == 1, rng.normal(-0.45, 0.22, n), rng.normal(-1.3, 0.35, n)))
    feh = np.clip(feh, -2.3, 0.5)
    mgfe = np.where(comp == 0, 0.03 - 0.12 * feh + rng.normal(0, 0.025, n),
                    np.where(comp == 1, 0.27 - 0.2 * np.clip(feh + 0.7, 0, None)
                             + rng.normal(0, 0.03, n), rng.normal(0.3, 0.05, n)))
    sife = 0.65 * mgfe + 0.02 + rng.normal(0, 0.025, n)
    # giant branch: dN/dlogg rises towards the base of the branch (slower evolution)
    u = rng.random(n)
    a, lo, hi = 0.9, 0.9, 3.7
    logg = np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a
    teff = _rgb_teff(logg, feh, mgfe) + rng.normal(0, 50, n)
    rc = pop == 1
    logg[rc] = rng.normal(2.42, 0.08, rc.sum())
    teff[rc] = 4720.0 - 320.0 * feh[rc] + rng.normal(0, 60, rc.sum())
    dw = pop == 2
    logg[dw] = rng.uniform(4.1, 4.7, dw.sum())
    teff[dw] = np.clip(6300.0 - 2400.0 * (logg[dw] - 4.1) + rng.normal(0, 250, dw.sum()),
                       4000, 6800)
    sg = pop == 3
    logg[sg] = rng.uniform(3.8, 4.25, sg.sum())
    teff[sg] = rng.uniform(4900, 5900, sg.sum())
    labels = np.column_stack([teff, logg, feh, mgfe, sife])
    return labels, np.array(_POPULATIONS)[pop]
