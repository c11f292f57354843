"""The targets of the demo survey: everything about the stars that is not a spectrum.

Labels (:func:`~cannon_fast.demo.labels.sample_labels`), fields and sky positions,
2MASS-style APOGEE IDs, re-observations of some stars in an overlapping field,
photometry and the S/N it buys, visit epochs with barycentric corrections, and
companions on binary orbits. One seeded random stream draws it all, in a fixed order.
"""
from __future__ import annotations

import numpy as np

from .labels import _rgb_teff, sample_labels, vmacro_relation

__all__ = []

#: Demo fields: name -> (Galactic l, b) of the plate centre, degrees.
_FIELDS = {"060+00": (60.0, 0.0), "120+12": (120.0, 12.0), "K2_C4_168-21": (168.0, -21.0),
           "N6791": (69.96, 10.90)}
_MAX_VISITS = 6


def _twomass_id(ra, dec):
    ra_h = ra / 15.0
    hh = np.floor(ra_h)
    mm = np.floor((ra_h - hh) * 60)
    ss = ((ra_h - hh) * 60 - mm) * 60
    sign = np.where(dec < 0, "-", "+")
    ad = np.abs(dec)
    dd = np.floor(ad)
    dm = np.floor((ad - dd) * 60)
    ds = ((ad - dd) * 60 - dm) * 60
    return np.array([f"2M{int(a):02d}{int(b):02d}{int(c * 100):04d}{s}{int(d):02d}{int(e):02d}"
                     f"{int(f * 10):03d}"
                     for a, b, c, s, d, e, f in zip(hh, mm, ss, sign, dd, dm, ds)])


def _place_stars(rng, n_stars, seed, duplicate_fraction):
    """Labels, fields, sky positions and APOGEE IDs, duplicates included."""
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    n_dup = int(round(duplicate_fraction * n_stars)) if n_stars > 20 else 0
    n_uniq = n_stars - n_dup
    labels, pop = sample_labels(n_uniq, seed)
    names = list(_FIELDS)
    fidx = rng.choice(len(names), n_uniq, p=[0.3, 0.25, 0.25, 0.2])
    lb = np.array([_FIELDS[f] for f in names])[fidx]
    r = 1.5 * np.sqrt(rng.random(n_uniq))
    phi = rng.uniform(0, 2 * np.pi, n_uniq)
    glon = (lb[:, 0] + r * np.cos(phi) / np.cos(np.radians(lb[:, 1]))) % 360
    glat = lb[:, 1] + r * np.sin(phi)
    # duplicates: a second observation of a star in the overlapping field "168-21"
    dup_of = np.full(n_stars, -1)
    if n_dup:
        cand = np.flatnonzero(np.array(names)[fidx] == "K2_C4_168-21")
        if cand.size == 0:
            cand = np.arange(n_uniq)
        dup_of[n_uniq:] = rng.choice(cand, n_dup, replace=cand.size < n_dup)
    src = np.where(dup_of >= 0, dup_of, np.arange(n_stars))
    field = np.array(names)[fidx][src].astype(object)
    field[dup_of >= 0] = "168-21"
    labels, pop, glon, glat = labels[src], pop[src], glon[src], glat[src]
    icrs = SkyCoord(l=glon * u.deg, b=glat * u.deg, frame="galactic").icrs
    ra, dec = icrs.ra.deg, icrs.dec.deg
    apogee_id = _twomass_id(ra, dec)
    _, first = np.unique(apogee_id[dup_of < 0], return_index=True)
    if first.size != (dup_of < 0).sum():   # identical IDs by chance: nudge and recompute
        dec = dec + rng.uniform(-1e-3, 1e-3, n_stars) * (dup_of < 0)
        dec[dup_of >= 0] = dec[dup_of[dup_of >= 0]]
        apogee_id = _twomass_id(ra, dec)
    return dict(labels=labels, pop=pop, field=field.astype(str), apogee_id=apogee_id, ra=ra,
                dec=dec, glon=glon, glat=glat, dup_of=dup_of)


def _visit_epochs(rng, nvis, glon, glat):
    """Julian dates of the visits and their barycentric corrections, (N, 6) each (NaN-padded)."""
    n_stars = len(nvis)
    jd = np.full((n_stars, _MAX_VISITS), np.nan)
    t0 = rng.uniform(2456000.5, 2459400.5, n_stars)
    for i in range(n_stars):
        gaps = rng.choice([1.0, 3.0, 25.0, 60.0, 330.0], nvis[i] - 1, p=[0.3, 0.25, 0.25, 0.1, 0.1])
        jd[i, :nvis[i]] = t0[i] + np.concatenate([[0.0], np.cumsum(gaps * rng.uniform(0.9, 1.1,
                                                                                     gaps.size))])
    phase0 = np.radians(glon)
    bc = 28.0 * np.cos(2 * np.pi * (jd - 2456000.5) / 365.25 + phase0[:, None]) * \
        np.cos(np.radians(glat))[:, None]
    return jd, bc


def _companions(rng, labels, jd, binary_fraction):
    """Which stars are binaries, their companions and the companion's velocity per visit."""
    n_stars = len(labels)
    # binaries: a fainter companion on the same isochrone, light ratio from R^2 B_H(Teff)
    is_bin = rng.random(n_stars) < binary_fraction
    dlogg = rng.uniform(0.15, 1.5, n_stars)
    logg2 = np.clip(labels[:, 1] + dlogg, None, 4.7)
    teff2 = np.where(logg2 > 3.8, 6300.0 - 2400.0 * (logg2 - 4.1),
                     _rgb_teff(logg2, labels[:, 2], labels[:, 3])) + rng.normal(0, 60, n_stars)
    teff2 = np.clip(teff2, 3900, 6500)
    c2 = 1.4387769e8  # hc/k, Å K; equal masses: R^2 ~ 1/g
    light = 10 ** (labels[:, 1] - logg2) * np.expm1(c2 / (16000 * labels[:, 0])) \
        / np.expm1(c2 / (16000 * teff2))
    k_rel = rng.uniform(10, 60, n_stars)
    period = 10 ** rng.uniform(0.7, 3.0, n_stars)
    orb_phase = rng.uniform(0, 1, n_stars)
    dv = k_rel[:, None] * np.sin(2 * np.pi * ((jd - jd[:, :1]) / period[:, None]
                                              + orb_phase[:, None]))
    return dict(is_binary=is_bin, teff2=teff2, logg2=logg2, light_ratio=light, k_rel=k_rel,
                period=period, dv=dv)


def _draw_survey(n_stars, seed, visits, binary_fraction, duplicate_fraction):
    """Everything about the stars that is not a spectrum: labels, photometry, visits, orbits."""
    rng = np.random.default_rng([int(seed), 2])
    T = _place_stars(rng, n_stars, seed, duplicate_fraction)
    labels, glat = T["labels"], T["glat"]
    # photometry and S/N: S/N ~ sqrt(visits) x flux; faint stars give the low-S/N tail
    nvis = rng.choice(np.arange(1, _MAX_VISITS + 1), n_stars,
                      p=[0.3, 0.24, 0.2, 0.12, 0.08, 0.06]) if visits else np.ones(n_stars, int)
    hmag = np.clip(rng.normal(10.6, 0.9, n_stars), 7.0, 12.6)
    snr_target = 165.0 * 10 ** (-0.2 * (hmag - 10.6)) * np.sqrt(nvis / 2.0) \
        * np.exp(rng.normal(0, 0.25, n_stars))
    jk = 0.55 + 0.25 * (4800 - labels[:, 0]) / 1000 + rng.normal(0, 0.03, n_stars)
    ak = np.abs(rng.normal(0.15, 0.1, n_stars)) * (1 + 3 * (np.abs(glat) < 3))
    vsys = rng.normal(np.where(np.abs(glat) < 5, -10.0, -40.0), 45.0)
    vmac = vmacro_relation(labels[:, 0], labels[:, 1]) + rng.normal(0, 0.3, n_stars)
    jd, bc = _visit_epochs(rng, nvis, T["glon"], glat)
    B = _companions(rng, labels, jd, binary_fraction)
    is_bin, light, dv = B["is_binary"], B["light_ratio"], B["dv"]
    q = 1.0 / (1.0 + light ** 0.25)            # crude mass fraction of the secondary
    v_primary = np.where(is_bin[:, None], -q[:, None] * dv, 0.0)
    vhelio_v = vsys[:, None] + v_primary
    vrad_v = vhelio_v - bc
    valid = np.arange(_MAX_VISITS)[None, :] < nvis[:, None]
    for a in (jd, bc, dv, vhelio_v, vrad_v):
        a[~valid] = np.nan
    return dict(
        T, n=n_stars, seed=int(seed),
        nvisits=nvis, H=hmag, J=hmag + jk, K=hmag - 0.35 * jk - 0.05, ak=ak,
        snr_target=snr_target, vsys=vsys, vmacro=vmac, jd=jd, bc=bc, vhelio_v=vhelio_v,
        vrad_v=vrad_v, is_binary=is_bin,
        **{k: np.where(is_bin, B[k], np.nan)
           for k in ("teff2", "logg2", "light_ratio", "k_rel", "period")},
        dv=np.where(is_bin[:, None], dv, np.nan),
        fiber=rng.integers(1, 301, (n_stars, _MAX_VISITS)),
        plate=rng.integers(5000, 12000, n_stars),
        chip_jitter=rng.integers(-2, 3, (n_stars, 3)),
        bright_neighbor=rng.random(n_stars) < 0.01,
    )
