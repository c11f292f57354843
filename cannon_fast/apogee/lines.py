"""The H-band line list and the air-to-vacuum conversion.

Physical data, not survey data: the demo survey's synthetic spectra are made from
this list (:mod:`cannon_fast.demo.datasets`), and the lab's figures mark its lines on
gradient and s² spectra (:mod:`cannon_fast.lab.plots.lab`).

The list (:func:`line_list`): named atomic lines of Fe I, Mg I, Si I, Al I, Ca I,
Ti I, K I, Mn I, Ni I, C I, Na I, S I, Cr I, V I, Co I at their laboratory
wavelengths (air, converted to vacuum), H I Brackett lines, the second-overtone CO
bands (6 heads, R and P branches with a rotational intensity law), OH doublets and
weak forests of CN and Fe I lines placed deterministically, each with the label
coefficients of its log line strength.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["air_to_vacuum", "line_list", "read_element_windows"]


def read_element_windows(path):
    """Wavelength windows of one element from an ASPCAP ``<El>.wind`` file (DR17).

    Each line holds start, end (vacuum Å) and a flag; windows with flag 0 are
    skipped.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    ndarray, (W, 2)
        Start and end of each window, vacuum Å.

    Raises
    ------
    ValueError
        For a malformed line (naming the file and the line number) or no window.
    """
    import os

    path = os.fspath(path)
    out = []
    with open(path) as fh:
        for no, line in enumerate(fh, 1):
            text = line.split("#", 1)[0].split()
            if not text:
                continue
            try:
                lo, hi = float(text[0]), float(text[1])
                flag = float(text[2]) if len(text) > 2 else 1.0
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{no}: expected 'start end [flag]' in vacuum Å, got "
                                 f"{line.strip()!r}") from None
            if not (lo < hi and lo > 1000):
                raise ValueError(f"{path}:{no}: window {lo}-{hi} is not an increasing range "
                                 "in Å")
            if flag != 0:
                out.append((lo, hi))
    if not out:
        raise ValueError(f"{path}: no window")
    return np.array(out)


def air_to_vacuum(wave_air):
    """Convert air wavelengths to vacuum (Morton 2000 / Ciddor 1996 refractive index).

    Parameters
    ----------
    wave_air : float or array_like
        Air wavelengths in Å (valid above 2000 Å).

    Returns
    -------
    wave_vac : float or ndarray
        Vacuum wavelengths in Å.
    """
    wave_air = np.asarray(wave_air, dtype=np.float64)
    if np.any(wave_air < 2000):
        raise ValueError("air_to_vacuum: wavelengths must be in Å and above 2000 Å")
    vac = wave_air.copy()
    for _ in range(3):  # n depends on the vacuum wavenumber: fixed-point iteration
        s2 = (1e4 / vac) ** 2
        n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
        vac = wave_air * n
    return vac


# ----------------------------------------------------------------------------- line list
# Named atomic lines: (species, air wavelength Å, lower excitation eV, tau0 at the
# reference star (Teff 4500, log g 2.5, solar), Lorentzian fraction of a strong line).
_NAMED_LINES = [
    ("Mg I", 15740.716, 5.93, 5.0, 0.25), ("Mg I", 15748.988, 5.93, 6.5, 0.25),
    ("Mg I", 15765.842, 5.93, 8.0, 0.30), ("Mg I", 15879.5, 5.95, 0.5, 0.0),
    ("Mg I", 15886.2, 5.95, 1.0, 0.0), ("Mg I", 15954.477, 6.52, 1.8, 0.1),
    ("Mg I", 16364.75, 5.79, 0.6, 0.0),
    ("Si I", 15361.16, 5.95, 0.7, 0.0), ("Si I", 15376.83, 6.22, 0.9, 0.0),
    ("Si I", 15557.79, 5.96, 1.3, 0.05), ("Si I", 15833.6, 6.22, 0.8, 0.0),
    ("Si I", 15888.41, 5.08, 2.5, 0.1), ("Si I", 15960.06, 5.98, 4.0, 0.15),
    ("Si I", 16060.01, 5.95, 2.5, 0.1), ("Si I", 16094.79, 5.96, 3.0, 0.1),
    ("Si I", 16129.0, 5.96, 0.8, 0.0), ("Si I", 16215.67, 5.95, 2.2, 0.1),
    ("Si I", 16380.15, 5.86, 2.2, 0.1), ("Si I", 16680.77, 5.98, 3.5, 0.15),
    ("Si I", 16828.16, 5.98, 1.6, 0.05),
    ("Al I", 16718.96, 4.09, 4.0, 0.2), ("Al I", 16750.56, 4.09, 6.0, 0.25),
    ("Al I", 16763.36, 4.09, 2.5, 0.1),
    ("Ca I", 16136.82, 4.53, 0.8, 0.0), ("Ca I", 16150.76, 4.53, 1.5, 0.05),
    ("Ca I", 16155.24, 4.53, 1.1, 0.0), ("Ca I", 16157.36, 4.55, 1.3, 0.0),
    ("Ca I", 16197.07, 4.54, 1.9, 0.05),
    ("Ti I", 15543.76, 1.88, 0.6, 0.0), ("Ti I", 15602.84, 2.27, 0.4, 0.0),
    ("Ti I", 15698.98, 1.89, 0.5, 0.0), ("Ti I", 15715.57, 1.89, 0.8, 0.0),
    ("Ti I", 16635.16, 2.34, 0.35, 0.0),
    ("K I", 15163.07, 2.67, 1.2, 0.0), ("K I", 15168.38, 2.67, 1.6, 0.0),
    ("Mn I", 15159.20, 4.89, 0.5, 0.0), ("Mn I", 15217.74, 4.89, 0.9, 0.0),
    ("Mn I", 15262.49, 4.89, 0.7, 0.0),
    ("Ni I", 15605.68, 5.30, 0.5, 0.0), ("Ni I", 15632.65, 5.30, 0.4, 0.0),
    ("Ni I", 16584.44, 5.47, 0.45, 0.0), ("Ni I", 16673.71, 6.03, 0.7, 0.0),
    ("Ni I", 16815.47, 5.30, 0.6, 0.0),
    ("C I", 15784.5, 9.63, 0.25, 0.0), ("C I", 16004.9, 9.63, 0.2, 0.0),
    ("C I", 16021.7, 9.63, 0.25, 0.0), ("C I", 16890.4, 9.00, 0.45, 0.0),
    ("Na I", 16373.85, 3.75, 0.45, 0.0), ("Na I", 16388.85, 3.75, 0.35, 0.0),
    ("S I", 15403.79, 8.70, 0.15, 0.0), ("S I", 15469.82, 8.05, 0.3, 0.0),
    ("S I", 15478.48, 8.05, 0.4, 0.0),
    ("Cr I", 15680.06, 4.70, 0.35, 0.0), ("Cr I", 15860.21, 4.70, 0.3, 0.0),
    ("V I", 15924.80, 2.14, 0.2, 0.0), ("Co I", 16757.64, 3.41, 0.3, 0.0),
]
# Stronger Fe I lines of the H band (air Å, lower excitation eV, tau0).
_FE_LINES = [
    (15194.49, 2.22, 1.6), (15207.53, 5.39, 1.8), (15244.97, 5.59, 1.0), (15294.56, 5.31, 2.2),
    (15395.72, 5.62, 0.9), (15490.34, 2.20, 1.1), (15501.32, 6.29, 0.9), (15531.75, 5.64, 1.2),
    (15534.26, 5.64, 1.1), (15591.49, 6.24, 1.7), (15621.65, 5.54, 2.6), (15631.95, 5.35, 2.2),
    (15648.51, 5.43, 1.7), (15652.87, 6.25, 1.6), (15662.02, 5.83, 1.9), (15692.75, 5.39, 2.5),
    (15723.59, 5.62, 1.1), (15769.42, 5.54, 1.5), (15818.14, 5.59, 1.3), (15822.82, 5.64, 1.2),
    (15835.17, 6.31, 1.9), (15837.64, 6.33, 0.9), (15868.52, 5.59, 1.7), (15878.44, 5.62, 1.0),
    (15895.23, 6.26, 0.8), (15906.04, 5.62, 1.0), (15910.94, 6.22, 0.5), (15934.02, 6.31, 0.5),
    (15964.87, 5.92, 1.2), (15980.73, 6.26, 2.0), (16009.61, 5.43, 1.6), (16040.65, 5.87, 1.1),
    (16042.72, 6.26, 0.9), (16071.40, 6.29, 0.6), (16102.41, 5.87, 1.3), (16115.97, 5.59, 1.4),
    (16125.90, 6.35, 1.5), (16153.25, 5.35, 0.9), (16165.03, 6.32, 1.1), (16174.98, 6.38, 0.9),
    (16180.90, 6.28, 1.3), (16195.06, 5.54, 0.6), (16198.50, 5.41, 0.9), (16207.75, 6.33, 0.8),
    (16225.62, 6.38, 0.6), (16231.65, 6.29, 1.3), (16284.77, 6.40, 0.8), (16316.32, 6.28, 1.3),
    (16324.45, 5.39, 0.6), (16331.53, 5.98, 0.7), (16394.39, 5.96, 0.7), (16407.77, 6.37, 0.6),
    (16436.62, 5.92, 0.8), (16440.40, 6.29, 0.6), (16444.82, 5.83, 1.2), (16466.92, 6.39, 0.8),
    (16486.67, 5.83, 1.0), (16517.23, 6.29, 1.2), (16524.47, 6.34, 0.9), (16541.43, 5.95, 0.6),
    (16561.77, 5.98, 0.7), (16645.87, 5.96, 0.7), (16665.49, 6.34, 0.5), (16793.40, 6.20, 0.5),
]
# Known OH lines (air Å), complemented by a deterministic doublet forest.
_OH_LINES = [15002.15, 15266.17, 15278.52, 15391.00, 15409.17, 15568.78, 15572.08, 16052.76,
             16055.46, 16061.70, 16065.06, 16069.52, 16074.16, 16190.13, 16192.13, 16204.08,
             16207.19, 16352.22, 16354.58, 16364.59, 16368.13, 16581.27, 16605.46, 16866.69,
             16871.90, 16895.18, 16904.28, 16909.29]
# Second-overtone (Delta v = 3) CO band heads, vacuum Å: 3-0, 4-1, ..., 8-5.
_CO_HEADS = (15581.0, 15780.0, 15978.0, 16185.0, 16400.0, 16610.0)
# Brackett series H I lines (n -> 4), vacuum Å, n = 11 ... 20.
_BRACKETT = (16811.1, 16411.7, 16113.7, 15884.9, 15704.9, 15560.7, 15443.1, 15345.9, 15264.7,
             15196.0)

# first ionization potentials (eV) and atomic masses (amu)
_ION = {"Fe": 7.90, "Mg": 7.65, "Si": 8.15, "Al": 5.99, "Ca": 6.11, "Ti": 6.83, "K": 4.34,
        "Mn": 7.43, "Ni": 7.64, "C": 11.26, "Na": 5.14, "S": 10.36, "Cr": 6.77, "V": 6.75,
        "Co": 7.88}
_MASS = {"Fe": 55.8, "Mg": 24.3, "Si": 28.1, "Al": 27.0, "Ca": 40.1, "Ti": 47.9, "K": 39.1,
         "Mn": 54.9, "Ni": 58.7, "C": 12.0, "Na": 23.0, "S": 32.1, "Cr": 52.0, "V": 50.9,
         "Co": 58.9, "H": 1.0, "CO": 28.0, "CN": 26.0, "OH": 17.0}
# [X/Fe] of the tied elements as multiples of [Mg/Fe] (the alpha elements track Mg).
_ALPHA_TIE = {"Mg": 1.0, "Ca": 0.7, "Ti": 0.6, "S": 0.8, "O": 1.0, "Al": 0.5, "K": 0.3}

# Effective d log10(tau) / d [X/H]: below 1 because the H- continuum opacity also grows with
# the metals (more free electrons) in cool giant atmospheres; and the fraction of the
# Saha-Boltzmann temperature sensitivity that survives the temperature structure.
_ABUND_SENS = 0.5
_THETA_SENS = 0.6

_LINE_DTYPE = [("wavelength", "f8"), ("species", "U8"), ("kind", "U8"), ("chi", "f8"),
               ("tau0", "f8"), ("lorentz", "f8"), ("mass", "f8"), ("c_theta", "f8"),
               ("c_logg", "f8"), ("c_feh", "f8"), ("c_mgfe", "f8"), ("c_sife", "f8")]


def _atomic_coeffs(element, chi):
    """Label coefficients of ln(tau) for a neutral atomic line.

    Returns (c_theta, c_logg, c_feh, c_mgfe, c_sife), all in natural-log units per
    unit of ``theta = 5040/Teff``, dex of log g and dex of abundance.
    """
    ln10 = np.log(10.0)
    ion = _ION[element]
    if ion > 9.5:
        # majority-neutral species (C, S): lines strengthen with Teff (H- opacity drops)
        c_theta = -ln10 * 0.45 * (chi - 0.75)
    else:
        # majority-ionized species: Saha x Boltzmann / H- ~ 10**(theta (chi_ion - chi - 0.75)),
        # damped by the temperature structure (factor 0.6)
        c_theta = ln10 * _THETA_SENS * (ion - chi - 0.75 + 2.2)
    # a mild gravity dependence of the line-to-continuum opacity ratio
    c_logg = -0.06 if ion <= 9.5 else 0.12
    c_feh = ln10 * _ABUND_SENS            # effective abundance sensitivity of a weak line
    c_mg = ln10 * _ABUND_SENS * _ALPHA_TIE.get(element, 0.0)
    c_si = ln10 * _ABUND_SENS if element == "Si" else 0.0
    if element == "C":  # [C/Fe] drops after the first dredge-up: 0.08 dex per dex of log g
        c_logg += ln10 * _ABUND_SENS * 0.08
    return c_theta, c_logg, c_feh, c_mg, c_si


@functools.lru_cache(maxsize=1)
def _line_table():
    rng = np.random.default_rng(20170101)   # fixed: the line list never depends on a survey seed
    rows = []
    ln10 = np.log(10.0)

    def atom(species, wave_vac, chi, tau0, lor, kind="atom"):
        el = species.split()[0]
        rows.append((wave_vac, species, kind, chi, tau0, lor, _MASS[el])
                    + _atomic_coeffs(el, chi))

    for sp, wair, chi, tau0, lor in _NAMED_LINES:
        atom(sp, float(air_to_vacuum(wair)), chi, tau0, lor)
    for wair, chi, tau0 in _FE_LINES:
        atom("Fe I", float(air_to_vacuum(wair)), chi, tau0, 0.05 if tau0 > 2 else 0.0)
    # weak Fe I forest: high-excitation lines spread over the whole range
    for w in np.sort(rng.uniform(15120, 16980, 220)):
        atom("Fe I", float(w), float(rng.uniform(4.5, 6.6)),
             float(np.exp(rng.normal(np.log(0.12), 0.6))), 0.0, kind="forest")
    # H I Brackett: strong only in warm stars (n=4 level at 12.75 eV)
    for w in _BRACKETT:
        rows.append((w, "H I", "brackett", 12.75, 0.012, 0.9, 1.0, -ln10 * 3.0, -0.25,
                     0.0, 0.0, 0.0))
    # CO second overtone: Fortrat parabola per band, Boltzmann rotational intensities.
    # ln tau_CO: C abundance ([Fe/H] and the dredge-up term), strongly favoured by low Teff
    # and low gravity (molecular equilibrium against the H- continuum).
    be, alpha_e, t_rot = 1.9313, 0.0175, 4000.0
    band_scale = (1.0, 0.8, 0.62, 0.48, 0.37, 0.28)
    co_coef = (ln10 * 1.3, -0.25 + ln10 * _ABUND_SENS * 0.08, ln10 * _ABUND_SENS, 0.0, 0.0)
    for vlow, (head, bscale) in enumerate(zip(_CO_HEADS, band_scale)):
        b_low = be - alpha_e * (vlow + 0.5)
        b_up = be - alpha_e * (vlow + 3.5)
        s, d = b_up + b_low, b_up - b_low
        nu_head = 1e8 / head
        nu0 = nu_head + s * s / (4.0 * d)
        j = np.arange(0, 61)
        for branch, m, jlow in (("R", j + 1, j), ("P", -j[1:], j[1:])):
            inten = np.abs(m) * np.exp(-b_low * jlow * (jlow + 1) * 1.4388 / t_rot)
            inten /= 17.5   # peak of |m| exp(...) at t_rot
            keep = inten > 0.06
            nu = nu0 + s * m + d * m * m
            for wv, it in zip(1e8 / nu[keep], inten[keep]):
                rows.append((float(wv), "CO", "CO", 0.0, 0.55 * bscale * float(it), 0.0,
                             _MASS["CO"]) + co_coef)
    # OH: known lines plus doublets; O tracks [Mg/Fe]; very temperature sensitive
    oh_coef = (ln10 * 1.8, -0.2, ln10 * _ABUND_SENS, ln10 * _ABUND_SENS, 0.0)
    oh_waves = list(air_to_vacuum(np.array(_OH_LINES)))
    for w in rng.uniform(15100, 16950, 45):
        sep = rng.uniform(0.8, 4.0)
        oh_waves += [w, w + sep]
    for w in oh_waves:
        rows.append((float(w), "OH", "OH", 0.0, float(np.exp(rng.normal(np.log(0.35), 0.4))),
                     0.0, _MASS["OH"]) + oh_coef)
    # CN red system: many weak lines; C x N with N enhanced on the upper giant branch
    cn_coef = (ln10 * 1.2, -0.2 - ln10 * _ABUND_SENS * 0.04, ln10 * 1.25 * _ABUND_SENS, 0.0, 0.0)
    for w in rng.uniform(15120, 16980, 260):
        rows.append((float(w), "CN", "CN", 0.0, float(np.exp(rng.normal(np.log(0.07), 0.6))),
                     0.0, _MASS["CN"]) + cn_coef)
    table = np.array(rows, dtype=_LINE_DTYPE)
    table = table[(table["wavelength"] > 15080) & (table["wavelength"] < 17020)]
    return np.sort(table, order="wavelength")


def line_list():
    """Return the line list of the synthetic spectra.

    Returns
    -------
    lines : ndarray, structured, (n_lines,)
        Fields: ``wavelength`` (vacuum Å), ``species`` (e.g. ``"Mg I"``, ``"CO"``),
        ``kind`` (``"atom"`` for named laboratory lines, ``"forest"``, ``"CO"``, ``"OH"``,
        ``"CN"``, ``"brackett"``), ``chi`` (lower excitation, eV), ``tau0`` (line-centre
        optical depth of the reference giant: Teff 4500 K, log g 2.5, solar), ``lorentz``
        (Lorentzian fraction at log g 2.5), ``mass`` (amu) and the coefficients
        ``c_theta``, ``c_logg``, ``c_feh``, ``c_mgfe``, ``c_sife`` of the log-strength
        offset ``u = c_theta (5040/Teff - 5040/4500) + c_logg (log g - 2.5)
        + c_feh [Fe/H] + c_mgfe [Mg/Fe] + c_sife [Si/Fe]``; the line-centre optical depth
        is ``tau0 * (1 + u/4)**4``.
    """
    return _line_table().copy()
