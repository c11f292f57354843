"""The demo survey's files: apStar and allStar FITS in the SDSS DR17 archive layout.

Each star gets an apStar file with the 11 HDUs of a DR17 file (header, flux, error,
bitmask, sky, sky error, telluric, telluric error, an empty LSF table, the visit RV
table and the combined RV table) and the primary-header keywords of one; the
allStar file holds the catalog, and ``truth.fits`` the true labels row by row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .._util import atomic_path
from ..core.grid import APSTAR_CDELT1, APSTAR_CRVAL1, APSTAR_NPIX
from .catalog import _ASPCAPFLAG, pass_lab_cuts
from .labels import LABEL_NAMES
from .observe import _STARFLAG
from .targets import _MAX_VISITS

__all__ = ["SURVEY_VERSION", "ALLSTAR_RELPATH", "APSTAR_RELDIR", "SurveyPaths"]

#: Bumped whenever the generated files change, so stale caches are not reused.
SURVEY_VERSION = 1

ALLSTAR_RELPATH = os.path.join("dr17", "apogee", "spectro", "aspcap", "dr17", "synspec_rev1",
                               "allStar-dr17-synspec_rev1.fits")
APSTAR_RELDIR = os.path.join("dr17", "apogee", "spectro", "redux", "dr17", "stars", "apo25m")


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class SurveyPaths:
    """Where a generated demo survey lives (the DR17 archive layout under ``root``).

    Attributes
    ----------
    root : str
        Top folder; ``root/dr17/apogee/...`` mirrors the SDSS archive.
    apstar_dirs : tuple of str
        One folder per field, ``root/dr17/apogee/spectro/redux/dr17/stars/apo25m/<FIELD>``.
    allstar : str
        ``root/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits``.
    truth : str
        ``root/truth.fits``: true labels, row-aligned with the allStar file.
    n_stars, seed : int
    params : dict
        The generation parameters (also stored in the completion marker).
    """

    root: str
    apstar_dirs: tuple
    allstar: str
    truth: str
    n_stars: int
    seed: int
    params: dict = field(default_factory=dict, compare=False)

    @property
    def apstar_root(self):
        """The ``.../stars/apo25m`` folder that holds the field folders."""
        return os.path.join(self.root, APSTAR_RELDIR)

    def apstar_path(self, apogee_id, field_name):
        """Path of one star's apStar file."""
        return os.path.join(self.apstar_root, str(field_name), f"apStar-dr17-{apogee_id}.fits")


def _paths(root, S_fields, params):
    fields = tuple(sorted(set(S_fields)))
    return SurveyPaths(root=os.path.abspath(root),
                       apstar_dirs=tuple(os.path.join(os.path.abspath(root), APSTAR_RELDIR, f)
                                         for f in fields),
                       allstar=os.path.join(os.path.abspath(root), ALLSTAR_RELPATH),
                       truth=os.path.join(os.path.abspath(root), "truth.fits"),
                       n_stars=int(params["n_stars"]), seed=int(params["seed"]), params=params)


def _apstar_file(root, S, i):
    """Path of star ``i``'s apStar file under ``root``."""
    return os.path.join(root, APSTAR_RELDIR, S["field"][i],
                        f"apStar-dr17-{S['apogee_id'][i]}.fits")


# ----------------------------------------------------------------------------- apStar header
_BUNITS = ("Flux (10^-17 erg/s/cm^2/Ang)", "Err (10^-17 erg/s/cm^2/Ang)", "Pixel bitmask",
           "Sky (10^-17 erg/s/cm^2/Ang)", "Sky error (10^-17 erg/s/cm^2/Ang)", "Telluric",
           "Telluric error")
_HDU_HISTORY = ("header", "flux", "flux uncertainty", "pixel bitmask", "sky", "sky uncertainty",
                "telluric", "telluric uncertainty", "LSF table", "RV table",
                "RV table for combined spectrum")
_RV_FLOATS = ("jd", "snr", "vhelio", "vrel", "vrelerr", "teff", "tefferr", "logg", "loggerr",
              "feh", "feherr", "chisq", "bc")


def _jd_to_iso(jd):
    from astropy.time import Time
    return Time(jd, format="jd").isot[:23]


def _card(name, value, comment=""):
    return {"name": name, "value": value, "comment": comment}


def _visit_file(S, i, v):
    mjd = int(float(S["jd"][i, v]) - 2400000.5)
    return f"apVisit-dr17-{int(S['plate'][i])}-{mjd}-{int(S['fiber'][i, v]):03d}.fits"


def _target_cards(S, i, obs):
    """Wavelength grid, identity, photometry, targeting and STARFLAG cards."""
    nv = int(S["nvisits"][i])
    nul = -9999.990234375
    c = [
        _card("CRVAL1", APSTAR_CRVAL1, "Start log10(wavelength) in subsequent HDUs"),
        _card("CDELT1", APSTAR_CDELT1, "Dispersion in log10(wave) in subsequent HDUs"),
        _card("CRPIX1", 1, "Pixel of starting wavelength in subsequent HDUs"),
        _card("CTYPE1", "LOG-LINEAR", "Logarithmic wavelength scale in subsequent HDUs"),
        _card("DC-FLAG", 1, "Logarithmic wavelength scale in subsequent HDUs"),
        _card("NWAVE", APSTAR_NPIX, "Number of wavelengths in subsequent HDUs"),
        _card("FIELD", S["field"][i], "APOGEE field name"),
        _card("OBJID", S["apogee_id"][i], "APOGEE object name"),
        _card("SNR", obs["snr"], "Median S/N per apStar pixel"),
        _card("SNREV", obs["snrev"], "Median S/N per apStar pixel in middle chip"),
        _card("RA", round(float(S["ra"][i]), 6), "right ascension, deg, J2000"),
        _card("DEC", round(float(S["dec"][i]), 6), "declination, deg, J2000"),
        _card("GLON", float(S["glon"][i]), "Galactic longitude"),
        _card("GLAT", float(S["glat"][i]), "Galactic latitude"),
    ]
    for b in ("J", "H", "K"):
        c.append(_card(b, round(float(S[b][i]), 3), f"2MASS {b} magnitude"))
        c.append(_card(b + "_ERR", 0.02, f"2MASS {b} magnitude uncertainty"))
    k45 = float(S["K"][i]) - 0.05
    c += [_card("SRC_H", "2MASS", "source of H magnitude"), _card("WASH_M", nul),
          _card("WASH_T2", nul), _card("DDO51", nul), _card("IRAC_3_6", k45 - 0.3),
          _card("IRAC_4_5", k45), _card("IRAC_5_8", k45 - 0.3), _card("WISE_4_5", k45 + 0.1),
          _card("TARG_4_5", k45),
          _card("AKTARG", round(float(S["ak"][i]), 4), "Extinction used for targeting"),
          _card("AKMETHOD", "RJCE_IRAC", "Extinction method using for targeting"),
          _card("AKWISE", round(float(S["ak"][i]) * 1.1, 4), "WISE all-sky extinction"),
          _card("SFD_EBV", nul, "SFD E(B-V)"),
          _card("APTARG1", 0, "APOGEE_TARGET1 targeting flag"),
          _card("APTARG2", 0, "APOGEE_TARGET2 targeting flag"),
          _card("AP2TARG1", -2147467264, "APOGEE2_TARGET1 targeting flag"),
          _card("AP2TARG2", 0, "APOGEE2_TARGET2 targeting flag"),
          _card("AP2TARG3", 0, "APOGEE2_TARGET3 targeting flag"),
          _card("AP2TARG4", 0, "APOGEE2_TARGET4 targeting flag"),
          _card("NVISITS", nv, "Number of visit spectra combined flag"),
          _card("STARFLAG", int(np.bitwise_or.reduce(obs["vflags"])),
                "bitwise OR of individual visit starflags"),
          _card("ANDFLAG", int(np.bitwise_and.reduce(obs["vflags"])),
                "bitwise AND of individual visit starflags")]
    return c


def _rv_cards(S, i, obs):
    """Velocity and Doppler-fit cards; also the measured visit velocities and their errors."""
    nv = int(S["nvisits"][i])
    lab = S["labels"][i]
    rng = obs["rng"]
    verr = np.clip(2.0 / np.maximum(obs["snrvis"], 1.0), 0.01, 5.0)
    meas = rng.normal(0.0, verr)                   # measured = true + RV error
    vh = S["vhelio_v"][i, :nv] + meas
    vrad = S["vrad_v"][i, :nv] + meas
    wts = 1.0 / verr ** 2
    ncomp = 2 if S["is_binary"][i] and S["light_ratio"][i] > 0.3 and S["k_rel"][i] > 20 else 1
    c = [_card("N_COMP", ncomp, "Maximum number of components in RV CCFs"),
         _card("VHELIO", float(np.sum(wts * vh) / np.sum(wts)),
               "S/N weighted mean barycentric RV"),
         _card("VSCATTER", float(np.std(vh)) if nv > 1 else 0.0,
               "standard deviation of visit RVs"),
         _card("VERR", float(1 / np.sqrt(np.sum(wts))), "weighted error in VHELIO"),
         _card("VERR_MED", float(np.median(verr)), "median error in VHELIO"),
         _card("RV_TEFF", float(lab[0] + rng.normal(0, 80)), "Effective temperature from RV fit"),
         _card("RV_LOGG", float(lab[1] + rng.normal(0, 0.2)), "Surface gravity from RV fit"),
         _card("RV_FEH", float(lab[2] + rng.normal(0, 0.1)), "Metallicity from RV fit"),
         _card("RV_CHI2", float(rng.uniform(1.5, 20)), "chisq from Doppler RV fit"),
         _card("CCFWHM", float(17 + S["vmacro"][i] * 0.3),
               "FWHM of RV CCF of star with template (km/s)"),
         _card("AUTOFWHM", 12.4, "FWHM of RV CCF of template with template (km/s)"),
         _card("MEANFIB", float(np.mean(S["fiber"][i, :nv])), "S/N weighted mean fiber number"),
         _card("SIGFIB", float(np.std(S["fiber"][i, :nv], ddof=1)) if nv > 1 else 0.0,
               "standard deviation (unweighted) of fiber number"),
         _card("NRES", " 5.00 4.25 3.50", "number of pixels/resolution used for sinc"),
         _card("MIN_H", 7.0, "minimum H mag of cohort"),
         _card("MAX_H", 12.2, "maximum H mag of cohort"),
         _card("MIN_JK", 0.5, "minimum J-K of cohort"),
         _card("MAX_JK", 9999.990234375, "maximum J-K of cohort")]
    return c, vrad, verr, vh


def _coverage_cards(obs):
    """The pixels each chip contributes to: in any visit (xMIN/xMAX), in all (xOVERMIN/MAX)."""
    c = []
    ce = obs["cov_ext"]
    for key, ch, fn, what in (("RMIN", 2, 0, "Min pixel of red chip contrib, any frame"),
                              ("RMAX", 2, 1, "Maxmm pixel of red chip contrib, any frame"),
                              ("GMIN", 1, 0, "Min pixel of green chip contrib, any frame"),
                              ("GMAX", 1, 1, "Maxm pixel of green chip contrib, any frame"),
                              ("BMIN", 0, 0, "Min pixel of blue chip contrib, any frame"),
                              ("BMAX", 0, 1, "Maxm pixel of blue chip contrib, any frame")):
        c.append(_card(key, int(ce[:, ch, fn].min() if fn == 0 else ce[:, ch, fn].max()), what))
    for key, ch, fn, what in (("ROVERMIN", 2, 0, "Min pixel of red chip contrib, all frames"),
                              ("ROVERMAX", 2, 1, "Max pixel of red chip contrib, all frames"),
                              ("GOVERMIN", 1, 0, "Min pixel of green chip contrib, all frames"),
                              ("GOVERMAX", 1, 1, "Max pixel of green chip contrib, all frames"),
                              ("BOVERMIN", 0, 0, "Minimum pixel of blue chip contrib, all frames"),
                              ("BOVERMAX", 0, 1, "Maximum pixel of blue chip contrib, all frames")):
        c.append(_card(key, int(ce[:, ch, fn].max() if fn == 0 else ce[:, ch, fn].min()), what))
    return c


def _visit_cards(S, i, obs, vrad, verr, vh):
    """The VISIT n INFORMATION block of each visit."""
    c = []
    for v in range(int(S["nvisits"][i])):
        n = v + 1
        jd = float(S["jd"][i, v])
        c += [{"name": "COMMENT", "value": f"VISIT {n} INFORMATION"},
              _card(f"SFILE{n}", _visit_file(S, i, v), f" Visit #{n} spectrum file"),
              _card(f"DATE{n}", _jd_to_iso(jd), f"DATE-OBS of visit {n}"),
              _card(f"JD{n}", round(jd, 5), f"Julian date of visit {n}"),
              _card(f"FIBER{n}", int(S["fiber"][i, v]), f"Fiber, visit {n}"),
              _card(f"BC{n}", float(S["bc"][i, v]), f"Barycentric correction (km/s), visit {n}"),
              _card(f"VRAD{n}", float(vrad[v]), f"Radial velocity (km/s) of visit {n}"),
              _card(f"VERR{n}", float(verr[v]), "Uncertainty in radial velocity (km/s)"),
              _card(f"VHELIO{n}", float(vh[v]), f"Barycentric velocity (km/s), visit {n}"),
              _card(f"SNRVIS{n}", float(obs["snrvis"][v]),
                    f"Median S/N per apStar pixel,, visit {n}"),
              _card(f"FLAG{n}", int(obs["vflags"][v]), f"STARFLAG for visit {n}")]
    return c


def _primary_header(S, i, obs):
    """The cards of an apStar primary header, in the order of a DR17 file."""
    c = _target_cards(S, i, obs)
    rv, vrad, verr, vh = _rv_cards(S, i, obs)
    c += rv + _coverage_cards(obs) + _visit_cards(S, i, obs, vrad, verr, vh)
    c.append({"name": "HISTORY", "value": "APOGEE Reduction Pipeline Version: 0.17.22"})
    c += [{"name": "HISTORY", "value": f"HDU{k} : {t}"} for k, t in enumerate(_HDU_HISTORY)]
    # (the files name the module that first wrote them; renaming it would change every file)
    c.append({"name": "HISTORY", "value": f"SYNTHETIC: cannon_fast.demo.datasets v{SURVEY_VERSION} "
              f"seed {S['seed']}; not an SDSS spectrum"})
    return c


# ----------------------------------------------------------------------------- apStar file
def _rv_dtype(nlag):
    return ([("filename", "S72")] + [(c, "f8") for c in _RV_FLOATS]
            + [(c, "f8", (nlag,)) for c in ("x_ccf", "ccf", "ccferr")]
            + [(c, "f8") for c in ("xcorr_vrel", "xcorr_vrelerr", "xcorr_vhelio", "ccpfwhm",
                                   "autofwhm")]
            + [("autoccf", "f8", (nlag,))])


def _rv_tables(S, i, obs):
    rng = obs["rng"]
    nv = int(S["nvisits"][i])

    def ccf(x, v0, fwhm, snr):
        return (0.6 * np.exp(-0.5 * ((x - v0) / (fwhm / 2.3548)) ** 2) - 0.02
                + rng.normal(0, 0.5 / max(snr, 1.0), x.size))

    vis = np.zeros(nv, dtype=_rv_dtype(765))
    lab = S["labels"][i]
    for v in range(nv):
        x = (np.arange(765) - 382) * 2.6211 + float(S["bc"][i, v])
        vr = float(S["vrad_v"][i, v])
        vis[v] = (_visit_file(S, i, v).encode(), S["jd"][i, v], obs["snrvis"][v] * 0.75,
                  S["vhelio_v"][i, v], vr, 0.02 + 1.5 / max(obs["snrvis"][v], 1), lab[0],
                  rng.uniform(3, 30), lab[1], rng.uniform(0.01, 0.1), lab[2],
                  rng.uniform(0.005, 0.05), rng.uniform(1.5, 6), S["bc"][i, v], x,
                  ccf(x, vr, 19.0, obs["snrvis"][v]), np.full(765, 0.01), vr,
                  rng.uniform(0.005, 0.05), S["vhelio_v"][i, v], 19.0, 17.0,
                  ccf(x, 0.0, 17.0, 300.0))
    comb = np.zeros(1, dtype=_rv_dtype(243))
    x = (np.arange(243) - 121) * 4.1414
    vres = float(rng.normal(0, 0.1))
    comb[0] = (b"", np.nan, obs["snr"], vres, vres, 0.02, lab[0], 10.0, lab[1], 0.03, lab[2],
               0.01, 5.0, 0.0, x, ccf(x, vres, 18.0, obs["snr"]), np.full(243, 0.002), vres,
               0.02, vres, 18.0, 12.4, ccf(x, 0.0, 12.4, 300.0))
    return vis, comb


def _write_apstar(path, S, i, obs):
    import fitsio

    # the header draws from the star's random stream before the RV tables do
    hdr = _primary_header(S, i, obs)
    vis, comb = _rv_tables(S, i, obs)
    r = obs["rows"]
    with atomic_path(path) as tmp:
        with fitsio.FITS(tmp, "rw", clobber=True, ignore_empty=True) as f:
            f.write(None)
            f[0].delete_key("COMMENT")   # cfitsio's two boilerplate COMMENT cards
            f[0].delete_key("COMMENT")
            f[0].write_keys(hdr)
            for k, key in enumerate(("flux", "err", "mask", "sky", "skyerr", "tell", "tellerr")):
                f.write(r[key], header=[_card("CRVAL1", APSTAR_CRVAL1),
                                        _card("CDELT1", APSTAR_CDELT1),
                                        _card("CRPIX1", 1), _card("CTYPE1", "LOG-LINEAR"),
                                        _card("BUNIT", _BUNITS[k])])
            f.write(None)   # LSF table: empty, as in the DR17 files
            for tab, nlag in ((vis, 765), (comb, 243)):
                f.write(tab)
                for j, name in enumerate(tab.dtype.names, start=1):
                    if tab.dtype[name].shape:
                        f[-1].write_key(f"TDIM{j}", f"({nlag})")


# ----------------------------------------------------------------------------- allStar, truth
def _flag_names(value, bits):
    return ",".join(name for name, b in sorted(bits.items(), key=lambda kv: kv[1])
                    if (int(value) >> b) & 1)


def _allstar_table(S, C, snr, snrev):
    """The allStar rows: catalog labels and flags ``C`` of the stars ``S``."""
    n = S["n"]
    cat, rep = C["cat"].astype(np.float32), C["rep"].astype(np.float32)
    cols = [("FILE", "S64"), ("APOGEE_ID", "S30"), ("TELESCOPE", "S8"), ("FIELD", "S20"),
            ("RA", "f8"), ("DEC", "f8"), ("GLON", "f8"), ("GLAT", "f8"),
            ("J", "f4"), ("J_ERR", "f4"), ("H", "f4"), ("H_ERR", "f4"), ("K", "f4"),
            ("K_ERR", "f4"), ("AK_TARG", "f4"), ("EXTRATARG", "i4"), ("NVISITS", "i4"),
            ("SNR", "f4"), ("SNREV", "f4"), ("STARFLAG", "i8"), ("STARFLAGS", "S132"),
            ("ANDFLAG", "i8"), ("VHELIO_AVG", "f4"), ("VSCATTER", "f4"), ("VERR", "f4"),
            ("ASPCAPFLAG", "i8"), ("ASPCAPFLAGS", "S256"),
            ("TEFF", "f4"), ("TEFF_ERR", "f4"), ("TEFF_FLAG", "i4"),
            ("LOGG", "f4"), ("LOGG_ERR", "f4"), ("LOGG_FLAG", "i4"),
            ("M_H", "f4"), ("M_H_ERR", "f4"), ("ALPHA_M", "f4"), ("ALPHA_M_ERR", "f4"),
            ("VMICRO", "f4"), ("VMACRO", "f4"),
            ("FE_H", "f4"), ("FE_H_ERR", "f4"), ("FE_H_FLAG", "i4"),
            ("MG_FE", "f4"), ("MG_FE_ERR", "f4"), ("MG_FE_FLAG", "i4"),
            ("SI_FE", "f4"), ("SI_FE_ERR", "f4"), ("SI_FE_FLAG", "i4")]
    t = np.zeros(n, dtype=cols)
    t["FILE"] = [f"apStar-dr17-{a}.fits" for a in S["apogee_id"]]
    t["APOGEE_ID"] = S["apogee_id"]
    t["TELESCOPE"] = "apo25m"
    t["FIELD"] = S["field"]
    for k in ("RA", "DEC", "GLON", "GLAT", "J", "H", "K"):
        t[k] = S[k.lower()] if k in ("RA", "DEC", "GLON", "GLAT") else S[k]
    t["J_ERR"] = t["H_ERR"] = t["K_ERR"] = 0.02
    t["AK_TARG"] = S["ak"]
    t["EXTRATARG"] = C["extratarg"]
    t["NVISITS"] = S["nvisits"]
    t["SNR"], t["SNREV"] = snr, snrev
    t["STARFLAG"] = C["starflag"]
    t["STARFLAGS"] = [_flag_names(v, _STARFLAG) for v in C["starflag"]]
    t["VHELIO_AVG"] = S["vsys"]
    t["VSCATTER"] = [np.std(S["vhelio_v"][i, :S["nvisits"][i]]) for i in range(n)]
    t["VERR"] = 0.05
    t["ASPCAPFLAG"] = C["aspcapflag"]
    t["ASPCAPFLAGS"] = [_flag_names(v, _ASPCAPFLAG) for v in C["aspcapflag"]]
    for j, name in enumerate(LABEL_NAMES):
        t[name], t[name + "_ERR"], t[name + "_FLAG"] = cat[:, j], rep[:, j], C["paramflag"][:, j]
    rng = np.random.default_rng([S["seed"], 6])
    t["M_H"] = cat[:, 2] + rng.normal(0, 0.02, n)
    t["M_H_ERR"] = rep[:, 2] * 1.2
    t["ALPHA_M"] = 0.5 * (cat[:, 3] + cat[:, 4]) + rng.normal(0, 0.015, n)
    t["ALPHA_M_ERR"] = rep[:, 3]
    t["VMICRO"] = np.where(np.isfinite(cat[:, 0]), 1.1 + 0.2 * (3.0 - S["labels"][:, 1]), np.nan)
    t["VMACRO"] = np.where(np.isfinite(cat[:, 0]), S["vmacro"], np.nan)
    return t


def _truth_table(S, C, snr):
    """The true labels and what the survey did to each star, row-aligned with the allStar."""
    tcols = [("APOGEE_ID", "S30"), ("FIELD", "S20"), ("TELESCOPE", "S8"), ("POPULATION", "S12")] \
        + [(name, "f8") for name in LABEL_NAMES] \
        + [("VMACRO", "f8"), ("H", "f8"), ("NVISITS", "i4"), ("SNR_TARGET", "f8"), ("SNR", "f8"),
           ("IS_BINARY", "bool"), ("TEFF2", "f8"), ("LOGG2", "f8"), ("LIGHT_RATIO", "f8"),
           ("K_REL", "f8"), ("PERIOD", "f8"), ("DV_VISITS", "f8", (_MAX_VISITS,)),
           ("VHELIO_SYS", "f8"), ("DUPLICATE_OF", "i4"), ("CAT_LABELS", "f8", (5,)),
           ("PASS_LAB_CUTS", "bool")]
    tr = np.zeros(S["n"], dtype=tcols)
    tr["APOGEE_ID"], tr["FIELD"], tr["TELESCOPE"] = S["apogee_id"], S["field"], "apo25m"
    tr["POPULATION"] = S["pop"]
    for j, name in enumerate(LABEL_NAMES):
        tr[name] = S["labels"][:, j]
    tr["VMACRO"], tr["H"], tr["NVISITS"] = S["vmacro"], S["H"], S["nvisits"]
    tr["SNR_TARGET"], tr["SNR"] = S["snr_target"], snr
    tr["IS_BINARY"], tr["TEFF2"], tr["LOGG2"] = S["is_binary"], S["teff2"], S["logg2"]
    tr["LIGHT_RATIO"], tr["K_REL"], tr["PERIOD"] = S["light_ratio"], S["k_rel"], S["period"]
    tr["DV_VISITS"] = S["dv"]
    tr["VHELIO_SYS"], tr["DUPLICATE_OF"] = S["vsys"], S["dup_of"]
    tr["CAT_LABELS"] = C["cat"]
    tr["PASS_LAB_CUTS"] = pass_lab_cuts(C["cat"], snr)
    return tr


def _write_table(path, table, comment):
    import fitsio

    with atomic_path(path) as tmp:
        with fitsio.FITS(tmp, "rw", clobber=True) as f:
            f.write(table, header=[{"name": "COMMENT", "value": comment}])


def _write_tables(root, S, C, snr, snrev):
    """Write the allStar file and ``truth.fits`` of the survey under ``root``."""
    _write_table(os.path.join(root, ALLSTAR_RELPATH), _allstar_table(S, C, snr, snrev),
                 f"SYNTHETIC allStar (cannon_fast.demo.datasets v{SURVEY_VERSION}, "
                 f"seed {S['seed']}): not SDSS data")
    _write_table(os.path.join(root, "truth.fits"), _truth_table(S, C, snr),
                 "True labels of the synthetic demo survey, row-aligned with the allStar file; "
                 "LIGHT_RATIO = H-band flux of the companion / primary")
