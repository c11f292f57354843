"""Isochrones for the Kiel diagram and the giant-branch movie (lab steps 2, 11 and 14).

Readers for the two formats a student downloads:

* MIST (``.iso`` and ``.iso.cmd``, Choi et al. 2016): ``#`` header lines, then
  one block per age and [Fe/H], each introduced by ``# number of EEPs, cols``
  and a ``# EEP ...`` column-name line (``log_Teff``, ``log_g``, ``phase``;
  the age is ``log10_isochrone_age_yr`` in ``.iso`` and ``isochrone_age_yr``
  in ``.iso.cmd``). [Fe/H] comes from the ``[Fe/H]`` column or the header.
* PARSEC (CMD web interface output, Bressan et al. 2012): a ``# Zini ...``
  column-name line (``Zini``, ``Age`` or ``logAge``, ``Mini``, ``logTe``,
  ``logg``, ``label`` ...), one block per age/metallicity, ``#isochrone
  terminated`` lines between them. [M/H] is the ``MH``/``[M/H]`` column when
  present, else ``log10(Zini / 0.0152)`` (PARSEC v1.2S's solar Z).

Evolutionary phases are mapped to common names: ``"PMS"``, ``"MS"``,
``"SGB"`` (PARSEC only), ``"RGB"``, ``"CHeB"`` (red clump / horizontal
branch), ``"EAGB"``, ``"TPAGB"``, ``"postAGB"``, ``"WD"``, ``"WR"``.

Also here: :func:`giant_branch`, the survey's own giant branch fitted from
labels (used when no isochrone is given), and :func:`surface_gravity`.

References
----------
Choi et al. 2016, ApJ 823, 102 (MIST); Dotter 2016, ApJS 222, 8 (EEPs).
Bressan et al. 2012, MNRAS 427, 127 (PARSEC); Marigo et al. 2017, ApJ 835, 77 (CMD).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

__all__ = ["Isochrone", "GiantBranch", "read_isochrones", "read_mist", "read_parsec",
           "select_isochrone", "load_isochrone", "giant_branch", "surface_gravity",
           "MIST_PHASES", "PARSEC_PHASES", "G_CGS", "MSUN_G", "RSUN_CM"]

#: MIST ``phase`` codes (Choi et al. 2016, Table 2 / the MIST README).
MIST_PHASES = {-1: "PMS", 0: "MS", 2: "RGB", 3: "CHeB", 4: "EAGB", 5: "TPAGB", 6: "postAGB",
               9: "WR"}
#: PARSEC ``label`` codes (the CMD output documentation).
PARSEC_PHASES = {0: "PMS", 1: "MS", 2: "SGB", 3: "RGB", 4: "CHeB", 5: "CHeB", 6: "CHeB",
                 7: "EAGB", 8: "TPAGB", 9: "postAGB", 10: "WD"}
#: PARSEC v1.2S solar metallicity (Bressan et al. 2012), used when a file has no [M/H] column.
PARSEC_ZSUN = 0.0152
G_CGS = 6.674e-8          # cm^3 g^-1 s^-2
MSUN_G = 1.98847e33       # g (IAU 2015 nominal G M_sun / G)
RSUN_CM = 6.957e10        # cm (IAU 2015 nominal solar radius)


def surface_gravity(mass_msun, radius_rsun):
    """Surface gravity ``log10(g / cm s^-2)`` of a star: ``g = G M / R²``.

    Parameters
    ----------
    mass_msun : float or array_like
        Mass in solar masses.
    radius_rsun : float or array_like
        Radius in solar radii.

    Returns
    -------
    float or ndarray
        log g in cgs (the Sun: 4.44).

    Examples
    --------
    >>> from cannon_fast.lab.isochrones import surface_gravity
    >>> [round(float(surface_gravity(1.0, r)), 2) for r in (1, 15, 100)]
    [4.44, 2.09, 0.44]
    """
    m = np.asarray(mass_msun, dtype=np.float64)
    r = np.asarray(radius_rsun, dtype=np.float64)
    if np.any(m <= 0) or np.any(r <= 0):
        raise ValueError("mass and radius must be positive")
    out = np.log10(G_CGS * m * MSUN_G / (r * RSUN_CM) ** 2)
    return float(out) if out.ndim == 0 else out


@dataclasses.dataclass
class Isochrone:
    """One isochrone: a single age and metallicity.

    Attributes
    ----------
    teff : ndarray, (K,)
        Effective temperature (K).
    logg : ndarray, (K,)
        Surface gravity (log10 cgs).
    phase : ndarray of str, (K,)
        Common phase names (module docstring).
    phase_code : ndarray of int, (K,)
        The file's own code (MIST ``phase`` or PARSEC ``label``).
    mass : ndarray, (K,)
        Initial mass (Msun).
    age_gyr : float
    feh : float
        [Fe/H] (MIST) or [M/H] (PARSEC).
    source : {"MIST", "PARSEC"}
    path : str
    columns : dict of ndarray
        Every column of the block, by the file's names.
    """

    teff: np.ndarray
    logg: np.ndarray
    phase: np.ndarray
    phase_code: np.ndarray
    mass: np.ndarray
    age_gyr: float
    feh: float
    source: str
    path: str
    columns: dict

    def __len__(self):
        return len(self.teff)

    @property
    def label(self):
        """Legend text, e.g. ``MIST 12 Gyr [Fe/H] = -1.35``."""
        met = "[Fe/H]" if self.source == "MIST" else "[M/H]"
        return f"{self.source} {self.age_gyr:.3g} Gyr {met} = {self.feh:+.2f}"

    def select(self, mask):
        """Return a new Isochrone with only the points where ``mask`` is True."""
        mask = np.asarray(mask, bool)
        return dataclasses.replace(
            self, teff=self.teff[mask], logg=self.logg[mask], phase=self.phase[mask],
            phase_code=self.phase_code[mask], mass=self.mass[mask],
            columns={k: v[mask] for k, v in self.columns.items()})

    def giants(self, phases=("RGB", "CHeB"), logg_max=3.9):
        """Return the red giant branch and red clump (by phase), with ``logg <= logg_max``.

        Parameters
        ----------
        phases : sequence of str, optional
            Phases to keep (``("RGB",)`` for the branch alone).
        logg_max : float or None, optional

        Returns
        -------
        Isochrone
        """
        keep = np.isin(self.phase, list(phases))
        if logg_max is not None:
            keep &= self.logg <= logg_max
        if not keep.any():
            raise ValueError(f"{self.path}: the isochrone {self.label} has no points in phases "
                             f"{list(phases)}" + (f" with log g <= {logg_max}"
                                                  if logg_max is not None else ""))
        return self.select(keep)

    def teff_at(self, logg, phases=("RGB",)):
        """Teff along the giant branch at the given log g (linear interpolation).

        Parameters
        ----------
        logg : float or array_like
        phases : sequence of str, optional
            The part of the track to follow (the RGB by default: log g falls
            monotonically along it).

        Returns
        -------
        ndarray
            NaN outside the track's log g range.
        """
        g = self.giants(phases=phases, logg_max=None)
        order = np.argsort(g.logg)
        return np.interp(np.asarray(logg, float), g.logg[order], g.teff[order],
                         left=np.nan, right=np.nan)


# ----------------------------------------------------------------------------- reading
def _open_text(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: isochrone file not found")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not an isochrone file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the isochrone file ({err.strerror})") from None
    if b"\x00" in raw[:4096]:
        raise ValueError(f"{path}: not a text file (binary content at the start); expected a "
                         "MIST .iso/.iso.cmd or PARSEC CMD isochrone table")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return path, text.splitlines()


def _sniff(lines):
    for line in lines[:200]:
        low = line.lower()
        if "mist" in low or "mesa" in low or line.lstrip("# ").startswith("EEP"):
            return "MIST"
        if "parsec" in low or "cmd" in low or line.lstrip("# ").startswith("Zini"):
            return "PARSEC"
    return None


def read_isochrones(path, kind="auto"):
    """Read every isochrone (one per age and metallicity) in a MIST or PARSEC file.

    Parameters
    ----------
    path : str or os.PathLike
    kind : {"auto", "mist", "parsec"}
        File format; ``"auto"`` recognises it from the header.

    Returns
    -------
    list of Isochrone

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is unreadable or malformed; the message names the file and line.
    """
    path, lines = _open_text(path)
    kind = kind.lower()
    if kind == "auto":
        found = _sniff(lines)
        if found is None:
            raise ValueError(f"{path}: not a recognised isochrone file (no MIST 'EEP' or PARSEC "
                             "'Zini' column header in the first 200 lines)")
        kind = found.lower()
    if kind == "mist":
        return _parse_mist(path, lines)
    if kind == "parsec":
        return _parse_parsec(path, lines)
    raise ValueError(f"unknown isochrone kind {kind!r}; use 'auto', 'mist' or 'parsec'")


def read_mist(path):
    """Read a MIST ``.iso`` or ``.iso.cmd`` file (see ``read_isochrones``)."""
    return read_isochrones(path, "mist")


def read_parsec(path):
    """Read a PARSEC (CMD) isochrone table (see ``read_isochrones``)."""
    return read_isochrones(path, "parsec")


def _rows(path, lines, start, names):
    """Numeric rows from line index ``start`` until the next comment; (line_numbers, array)."""
    rows, nums = [], []
    i = start
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s:
            i += 1
            continue
        if s.startswith("#"):
            break
        parts = s.split()
        if len(parts) != len(names):
            raise ValueError(f"{path}, line {i + 1}: {len(parts)} values but the column header "
                             f"has {len(names)} names ({' '.join(names[:6])} ...)")
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            bad = next(p for p in parts if not _isfloat(p))
            raise ValueError(f"{path}, line {i + 1}: cannot parse {bad!r} as a number") from None
        nums.append(i + 1)
        i += 1
    return i, nums, np.array(rows, dtype=np.float64).reshape(-1, len(names))


def _isfloat(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def _column(path, names, candidates, what, line_no):
    for c in candidates:
        if c in names:
            return names.index(c)
    raise ValueError(f"{path}, line {line_no}: no {what} column (looked for "
                     f"{', '.join(candidates)}) in the header: {' '.join(names)}")


def _parse_mist(path, lines):
    header_feh = None
    out = []
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        if s.startswith("#") and "Yinit" in s and "[Fe/H]" in s and i + 1 < len(lines):
            keys = s.lstrip("#").split()
            vals = lines[i + 1].lstrip("#").split()
            try:
                header_feh = float(vals[keys.index("[Fe/H]")])
            except (ValueError, IndexError):
                raise ValueError(f"{path}, line {i + 2}: cannot read [Fe/H] from the header "
                                 "values line") from None
        if s.startswith("#") and s.lstrip("# ").startswith("EEP"):
            names = s.lstrip("#").split()
            hdr_line = i + 1
            i, nums, data = _rows(path, lines, i + 1, names)
            if len(data) == 0:
                raise ValueError(f"{path}, line {hdr_line}: an isochrone block with no rows")
            it = _column(path, names, ("log_Teff",), "log_Teff", hdr_line)
            ig = _column(path, names, ("log_g",), "log_g", hdr_line)
            ip = _column(path, names, ("phase",), "phase", hdr_line)
            im = _column(path, names, ("initial_mass", "star_mass"), "mass", hdr_line)
            if "log10_isochrone_age_yr" in names:
                age = 10 ** data[0, names.index("log10_isochrone_age_yr")] / 1e9
            elif "isochrone_age_yr" in names:
                age = data[0, names.index("isochrone_age_yr")] / 1e9
            else:
                raise ValueError(f"{path}, line {hdr_line}: no age column "
                                 "(log10_isochrone_age_yr or isochrone_age_yr)")
            if "[Fe/H]_init" in names:
                feh = float(data[0, names.index("[Fe/H]_init")])
            elif header_feh is not None:
                feh = header_feh
            else:
                raise ValueError(f"{path}, line {hdr_line}: no [Fe/H] in the header or columns")
            code = data[:, ip].astype(int)
            out.append(Isochrone(
                teff=10 ** data[:, it], logg=data[:, ig].copy(),
                phase=np.array([MIST_PHASES.get(c, f"phase{c}") for c in code]),
                phase_code=code, mass=data[:, im].copy(), age_gyr=float(age), feh=feh,
                source="MIST", path=path,
                columns={n: data[:, k].copy() for k, n in enumerate(names)}))
            continue
        i += 1
    if not out:
        raise ValueError(f"{path}: no MIST isochrone block (a '# EEP ...' column header "
                         "followed by rows) found")
    return out


def _parse_parsec(path, lines):
    names = None
    hdr_line = None
    blocks = []
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        if s.startswith("#") and s.lstrip("# ").startswith("Zini"):
            names = s.lstrip("#").split()
            hdr_line = i + 1
            i += 1
            continue
        if not s or s.startswith("#"):
            i += 1
            continue
        if names is None:
            raise ValueError(f"{path}, line {i + 1}: data before a '# Zini ...' column header")
        i, nums, data = _rows(path, lines, i, names)
        blocks.append((hdr_line, nums, data, names))
    if not blocks:
        raise ValueError(f"{path}: no PARSEC isochrone rows (a '# Zini ...' column header "
                         "followed by rows) found")
    out = []
    for hdr_line, nums, data, names in blocks:
        it = _column(path, names, ("logTe",), "logTe", hdr_line)
        ig = _column(path, names, ("logg",), "logg", hdr_line)
        ip = _column(path, names, ("label",), "label (phase)", hdr_line)
        im = _column(path, names, ("Mini", "Mass", "int_IMF"), "mass", hdr_line)
        iz = _column(path, names, ("Zini", "Z"), "Zini", hdr_line)
        if "logAge" in names:
            age = 10 ** data[:, names.index("logAge")] / 1e9
        elif "Age" in names:
            age = data[:, names.index("Age")] / 1e9
        else:
            raise ValueError(f"{path}, line {hdr_line}: no Age or logAge column")
        if "MH" in names or "[M/H]" in names:
            mh = data[:, names.index("MH" if "MH" in names else "[M/H]")]
        else:
            if np.any(data[:, iz] <= 0):
                raise ValueError(f"{path}, line {nums[int(np.argmax(data[:, iz] <= 0))]}: "
                                 "Zini <= 0")
            mh = np.log10(data[:, iz] / PARSEC_ZSUN)
        # a CMD table may hold several ages/metallicities without separators: split on changes
        key = np.round(np.column_stack([age, mh]), 6)
        cut = np.flatnonzero(np.any(np.diff(key, axis=0) != 0, axis=1)) + 1
        for sl in np.split(np.arange(len(data)), cut):
            d = data[sl]
            code = d[:, ip].astype(int)
            out.append(Isochrone(
                teff=10 ** d[:, it], logg=d[:, ig].copy(),
                phase=np.array([PARSEC_PHASES.get(c, f"label{c}") for c in code]),
                phase_code=code, mass=d[:, im].copy(), age_gyr=float(age[sl[0]]),
                feh=float(mh[sl[0]]), source="PARSEC", path=path,
                columns={n: d[:, k].copy() for k, n in enumerate(names)}))
    return out


def select_isochrone(isochrones, age_gyr=None, feh=None, tolerance=None):
    """Pick the isochrone closest in age (log) and metallicity.

    Parameters
    ----------
    isochrones : list of Isochrone
    age_gyr, feh : float, optional
        Wanted age and [Fe/H] ([M/H]); ``None`` ignores that coordinate.
    tolerance : dict, optional
        Largest accepted differences, e.g. ``{"feh": 0.1, "log_age": 0.05}``;
        a larger miss raises ValueError listing what the file has.

    Returns
    -------
    Isochrone
    """
    if not isochrones:
        raise ValueError("no isochrones to select from")
    ages = np.array([iso.age_gyr for iso in isochrones])
    fehs = np.array([iso.feh for iso in isochrones])
    d = np.zeros(len(isochrones))
    if age_gyr is not None:
        d += (np.log10(ages) - np.log10(age_gyr)) ** 2 / 0.05 ** 2
    if feh is not None:
        d += (fehs - feh) ** 2 / 0.1 ** 2
    best = isochrones[int(np.argmin(d))]
    tol = tolerance or {}
    have = ", ".join(f"({a:.3g} Gyr, {f:+.2f})" for a, f in zip(ages, fehs))
    if feh is not None and "feh" in tol and abs(best.feh - feh) > tol["feh"]:
        raise ValueError(f"{best.path}: no isochrone within {tol['feh']} dex of [Fe/H] = {feh}; "
                         f"the file has (age, [Fe/H]): {have}")
    if age_gyr is not None and "log_age" in tol \
            and abs(np.log10(best.age_gyr / age_gyr)) > tol["log_age"]:
        raise ValueError(f"{best.path}: no isochrone near {age_gyr} Gyr; the file has "
                         f"(age, [Fe/H]): {have}")
    return best


def load_isochrone(path, age_gyr=None, feh=None, giants=True, kind="auto"):
    """Read a file and return one isochrone (nearest in age and [Fe/H]), optionally its giants.

    Parameters
    ----------
    path : str or os.PathLike
    age_gyr, feh : float, optional
    giants : bool, optional
        Keep only the RGB and red clump (``Isochrone.giants``).
    kind : {"auto", "mist", "parsec"}

    Returns
    -------
    Isochrone
    """
    iso = select_isochrone(read_isochrones(path, kind), age_gyr=age_gyr, feh=feh)
    return iso.giants() if giants else iso


# ----------------------------------------------------------------------------- survey branch
@dataclasses.dataclass
class GiantBranch:
    """The survey's own giant branch ``Teff(log g)`` at fixed [Fe/H], fitted from labels.

    Attributes
    ----------
    coeffs : ndarray
        Polynomial in ``logg`` (highest power first, ``numpy.polyval``).
    feh_slope : float
        dTeff/d[Fe/H] (K/dex) fitted at the same time.
    feh : float
        The [Fe/H] it is evaluated at.
    logg_range : (float, float)
        log g range of the stars used (no extrapolation beyond it is meant).
    n_stars : int
    scatter : float
        Robust (MAD) scatter in Teff about the fit (K).
    description : str
    """

    coeffs: np.ndarray
    feh_slope: float
    feh: float
    logg_range: tuple
    n_stars: int
    scatter: float
    description: str

    def teff(self, logg, feh=None):
        """Teff (K) of the branch at ``logg`` (scalar or array), at ``self.feh`` by default."""
        shift = 0.0 if feh is None else self.feh_slope * (float(feh) - self.feh)
        return np.polyval(self.coeffs, np.asarray(logg, float)) + shift

    def track(self, n=100):
        """``(teff, logg)`` arrays along the branch over ``logg_range``."""
        g = np.linspace(self.logg_range[0], self.logg_range[1], n)
        return self.teff(g), g


def giant_branch(labels, label_names=("TEFF", "LOGG", "FE_H"), feh=0.0, feh_window=0.3,
                 logg_range=(0.8, 3.6), degree=2, clump=(2.2, 2.7), n_clip=5, clip=2.5):
    """Fit the survey's giant branch ``Teff(log g)`` at a given [Fe/H] from its labels.

    Stars with ``|[Fe/H] - feh| < feh_window`` and ``log g`` within ``logg_range``
    are fitted with ``Teff = poly(log g) + b ([Fe/H] - feh)`` by iterative
    sigma clipping. The red clump is warmer than the branch at the same log g;
    stars in the ``clump`` log g window warmer than the branch are clipped,
    so the fit follows the red giant branch.

    Parameters
    ----------
    labels : array_like (N, L), astropy Table or dict of arrays
    label_names : sequence of str, optional
        Names of the columns of an (N, L) array (the first three used must
        include TEFF, LOGG and FE_H).
    feh : float, optional
    feh_window : float, optional
    logg_range : (float, float), optional
    degree : int, optional
    clump : (float, float) or None, optional
    n_clip : int, optional
    clip : float, optional
        Clip at this many robust sigmas.

    Returns
    -------
    GiantBranch
    """
    teff, logg, fe = _get_labels(labels, label_names)
    ok = np.isfinite(teff) & np.isfinite(logg) & np.isfinite(fe)
    sel = ok & (np.abs(fe - feh) < feh_window) & (logg >= logg_range[0]) & (logg <= logg_range[1])
    if sel.sum() < 3 * (degree + 2):
        raise ValueError(f"only {int(sel.sum())} stars within {feh_window} dex of [Fe/H] = {feh} "
                         f"and log g {logg_range[0]}-{logg_range[1]}: too few to fit the giant "
                         "branch (widen feh_window or pass an isochrone)")
    g, t, z = logg[sel], teff[sel], fe[sel] - feh
    use = np.ones(len(g), bool)
    for _ in range(max(1, n_clip)):
        a = np.column_stack([np.vander(g[use], degree + 1), z[use]])
        sol, *_ = np.linalg.lstsq(a, t[use], rcond=None)
        pred = np.vander(g, degree + 1) @ sol[:-1] + sol[-1] * z
        r = t - pred
        sig = 1.4826 * np.median(np.abs(r[use] - np.median(r[use])))
        new = np.abs(r) < clip * max(sig, 1.0)
        if clump is not None:
            new &= ~((g > clump[0]) & (g < clump[1]) & (r > 1.0 * max(sig, 1.0)))
        if np.array_equal(new, use) or new.sum() < degree + 3:
            break
        use = new
    coeffs = sol[:-1].copy()
    return GiantBranch(
        coeffs=coeffs, feh_slope=float(sol[-1]), feh=float(feh),
        logg_range=(float(g[use].min()), float(g[use].max())), n_stars=int(use.sum()),
        scatter=float(sig),
        description=(f"survey giant branch: Teff(log g) fitted to {int(use.sum())} stars with "
                     f"|[Fe/H] - {feh:+.2f}| < {feh_window} (degree {degree}, red clump "
                     f"clipped), evaluated at [Fe/H] = {feh:+.2f}"))


def _get_labels(labels, label_names):
    want = ("TEFF", "LOGG", "FE_H")
    if isinstance(labels, dict) or hasattr(labels, "colnames") or (
            isinstance(labels, np.ndarray) and labels.dtype.names):
        cols = []
        for w in want:
            try:
                cols.append(np.asarray(labels[w], dtype=np.float64))
            except (KeyError, ValueError):
                raise ValueError(f"labels have no {w} column") from None
        return cols
    arr = np.asarray(labels, dtype=np.float64)
    names = [str(n) for n in label_names]
    if arr.ndim != 2 or arr.shape[1] != len(names):
        if arr.ndim == 2 and arr.shape[1] >= 3 and names == list(want):
            names = list(want) + [f"_{k}" for k in range(arr.shape[1] - 3)]
        else:
            raise ValueError(f"labels must be (N, {len(names)}) for {names}, got {arr.shape}")
    missing = [w for w in want if w not in names]
    if missing:
        raise ValueError(f"label_names {names} lack {missing}")
    return [arr[:, names.index(w)] for w in want]
