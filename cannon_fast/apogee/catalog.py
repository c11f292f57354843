"""Cross-match with the allStar catalogue and the lab's quality cuts, reported cut by cut.

The cuts of the modeling lab (step 2) keep giants with every label derived and
a good spectrum:

1. ``missing_labels``: any of TEFF, LOGG, FE_H, MG_FE, SI_FE not derived (NaN),
2. ``low_snr``: SNR < 50,
3. ``dwarf``: LOGG > 4 or TEFF > 5700 K,
4. ``metal_poor``: FE_H < -1.

:func:`select` applies them in order and returns a :class:`CutReport` that says,
for each cut, how many stars fail it on their own and how many it removes
after the cuts before it, and how many remain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .files import LAB_LABELS, match_ids

__all__ = ["Cut", "CutReport", "TooFewStarsError", "lab_cuts", "select", "crossmatch",
           "distance_training_cuts", "PARALLAX_COLUMNS", "read_distance_catalog", "flag_cuts"]


@dataclass
class Cut:
    """One selection step.

    Attributes
    ----------
    name : str
        Short name used in reports (``low_snr``).
    description : str
        What it removes, for people (``SNR < 50``).
    fails : callable
        ``fails(table) -> (N,) bool``, True for the stars the cut removes.
    columns : tuple of str
        Catalogue columns it needs (checked before any cut is applied).
    """

    name: str
    description: str
    fails: object
    columns: tuple = ()


def _col(table, name):
    return np.asarray(table[name], dtype=float)


def flag_cuts(names):
    """One cut per named catalogue flag bit (ASPCAPFLAG or STARFLAG), each counted.

    Parameters
    ----------
    names : sequence of str
        Flag names (:func:`cannon_fast.apogee.bitmask.flag_bit`), e.g.
        :data:`cannon_fast.apogee.bitmask.ASTRONN_TRAINING_FLAGS`.

    Returns
    -------
    list of Cut
        Named after the flag; the star fails when the bit is set.
    """
    from .bitmask import flag_bit

    cuts = []
    for name in names:
        column, bit = flag_bit(name)

        def fails(t, column=column, bit=bit):
            return (np.asarray(t[column]).astype(np.int64) >> np.int64(bit)) & 1 == 1
        cuts.append(Cut(str(name).strip().upper().split(":")[-1], f"{column} bit {bit} set",
                        fails, (column,)))
    return cuts


def lab_cuts(labels=LAB_LABELS, snr_min=50.0, logg_max=4.0, teff_max=5700.0, feh_min=-1.0,
             keep_missing=False, flags=()):
    """Return the modeling lab's cuts, with every threshold configurable.

    Parameters
    ----------
    labels : sequence of str
        Labels that must all be derived (finite).
    snr_min : float or None
        Minimum SNR (None drops the cut).
    logg_max, teff_max : float or None
        Dwarf cut: LOGG > logg_max or TEFF > teff_max (None drops that part).
    feh_min : float or None
        Minimum FE_H (None drops the cut).
    keep_missing : bool
        Keep stars with some of ``labels`` missing (NaN), for a loss that ignores
        missing labels (:class:`cannon_fast.nn.SpectrumRegressor`); only stars
        with every label missing are cut. The other cuts keep a star whose
        label they test is missing.
    flags : sequence of str
        Catalogue flag bits that remove a star, one counted cut each
        (:func:`flag_cuts`), e.g. ``bitmask.ASTRONN_TRAINING_FLAGS``.

    Returns
    -------
    list of Cut
    """
    labels = tuple(labels)
    present = lambda t: np.column_stack([np.isfinite(_col(t, c)) for c in labels])  # noqa: E731
    if keep_missing:
        cuts = [Cut("no_labels", "every one of " + ", ".join(labels) + " not derived",
                    lambda t: ~np.any(present(t), axis=1), labels)]
    else:
        cuts = [Cut("missing_labels", "any of " + ", ".join(labels) + " not derived",
                    lambda t: ~np.all(present(t), axis=1), labels)]
    cuts += flag_cuts(flags)
    if snr_min is not None:
        cuts.append(Cut("low_snr", f"SNR < {snr_min:g}",
                        lambda t: ~(_col(t, "SNR") >= snr_min), ("SNR",)))
    parts, cols = [], []
    if logg_max is not None:
        parts.append(("LOGG", logg_max))
        cols.append("LOGG")
    if teff_max is not None:
        parts.append(("TEFF", teff_max))
        cols.append("TEFF")
    if parts:
        def dwarf(t):
            with np.errstate(invalid="ignore"):
                return np.any(np.column_stack([_col(t, c) > v for c, v in parts]), axis=1)
        desc = " or ".join(f"{c} > {v:g}" for c, v in parts)
        cuts.append(Cut("dwarf", desc, dwarf, tuple(cols)))
    if feh_min is not None:
        def poor(t):
            with np.errstate(invalid="ignore"):
                return _col(t, "FE_H") < feh_min
        cuts.append(Cut("metal_poor", f"FE_H < {feh_min:g}", poor, ("FE_H",)))
    return cuts


def companion_cuts(labels=("TEFF", "LOGG", "FE_H", "MG_FE"), snr_min=50.0, logg_min=3.5,
                   teff_min=5500.0, feh_min=-1.0):
    """Return cuts that keep the dwarfs and hot stars a binary's companion looks like.

    The lab's cuts keep giants; the companions of giants are mostly main-sequence
    stars. A model trained on the stars kept here makes the secondary's spectrum in
    the binary screen's composite fit (:func:`cannon_fast.core.binaries.screen_binaries`).
    The limits overlap the lab's dwarf cut (LOGG > 4, TEFF > 5700) so the two sets
    meet.

    Parameters
    ----------
    labels : sequence of str
        Labels that must all be derived.
    snr_min, feh_min : float or None
        As in :func:`lab_cuts`.
    logg_min, teff_min : float
        A star is kept when LOGG > logg_min or TEFF > teff_min.

    Returns
    -------
    list of Cut
    """
    cuts = lab_cuts(labels, snr_min=snr_min, logg_max=None, teff_max=None, feh_min=feh_min)

    def giant(t):
        with np.errstate(invalid="ignore"):
            return ~((_col(t, "LOGG") > logg_min) | (_col(t, "TEFF") > teff_min))
    cuts.append(Cut("giant", f"LOGG <= {logg_min:g} and TEFF <= {teff_min:g}", giant,
                    ("LOGG", "TEFF")))
    return cuts


#: The allStar's Gaia EDR3 parallax columns (DR17), what distance training needs.
PARALLAX_COLUMNS = ("GAIAEDR3_PARALLAX", "GAIAEDR3_PARALLAX_ERROR")


def _missing_value(t, name):
    """NaN, inf and DR17's -9999 sentinel are missing."""
    x = _col(t, name)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(x) | (x < -9000)


def distance_training_cuts(columns, snr_min=200.0, ruwe_max=1.4, parallax_error_max=0.1,
                           vscatter_max=1.0, k_column="K", ak_column="AK_TARG"):
    """AstroNNDist's training cuts (Astra's DR17 training set), for :func:`select`.

    S/N > ``snr_min``, no STARFLAG bit set, RUWE < ``ruwe_max`` (only when the
    catalogue has ``GAIAEDR3_RUWE``: DR17's allStar does not, a user adds it
    from Gaia), parallax error < ``parallax_error_max`` mas, VSCATTER <
    ``vscatter_max`` km/s (when present), Ks and A_K present. The parallax
    itself is not cut on: negative parallaxes are measurements.

    Parameters
    ----------
    columns : sequence of str
        The catalogue's column names (decides the optional cuts).
    snr_min, ruwe_max, parallax_error_max, vscatter_max : float or None
        None drops that cut.
    k_column, ak_column : str
        Apparent Ks and its extinction.

    Returns
    -------
    list of Cut

    Raises
    ------
    ValueError
        If ``columns`` lacks the parallax columns (naming them).
    """
    columns = set(columns)
    missing = [c for c in PARALLAX_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"the catalogue has no {', '.join(missing)} column(s): distance "
                         "training needs Gaia EDR3 parallaxes (DR17 allStar columns "
                         f"{', '.join(PARALLAX_COLUMNS)})")
    cuts = []
    if snr_min is not None:
        cuts.append(Cut("low_snr", f"SNR <= {snr_min:g}", lambda t: ~(_col(t, "SNR") > snr_min),
                        ("SNR",)))
    if "STARFLAG" in columns:
        cuts.append(Cut("starflag", "any STARFLAG bit set",
                        lambda t: np.asarray(t["STARFLAG"]).astype(np.int64) != 0, ("STARFLAG",)))
    if ruwe_max is not None and "GAIAEDR3_RUWE" in columns:
        cuts.append(Cut("ruwe", f"GAIAEDR3_RUWE >= {ruwe_max:g} or missing",
                        lambda t: ~(_col(t, "GAIAEDR3_RUWE") < ruwe_max), ("GAIAEDR3_RUWE",)))
    if vscatter_max is not None and "VSCATTER" in columns:
        cuts.append(Cut("vscatter", f"VSCATTER >= {vscatter_max:g} km/s",
                        lambda t: ~(_col(t, "VSCATTER") < vscatter_max), ("VSCATTER",)))
    cuts.append(Cut("parallax", "parallax or its error missing, or error <= 0",
                    lambda t: _missing_value(t, PARALLAX_COLUMNS[0])
                    | ~(_col(t, PARALLAX_COLUMNS[1]) > 0), PARALLAX_COLUMNS))
    if parallax_error_max is not None:
        cuts.append(Cut("parallax_error", f"parallax error >= {parallax_error_max:g} mas",
                        lambda t: ~(_col(t, PARALLAX_COLUMNS[1]) < parallax_error_max),
                        PARALLAX_COLUMNS[1:]))
    cuts.append(Cut("missing_photometry", f"{k_column} missing",
                    lambda t: _missing_value(t, k_column), (k_column,)))
    cuts.append(Cut("missing_extinction", f"{ak_column} missing",
                    lambda t: _missing_value(t, ak_column), (ak_column,)))
    return cuts


def read_distance_catalog(path, apogee_ids, ak_column="AK_TARG", parallax=True):
    """The allStar columns distances need, one row per star (cross-matched by APOGEE_ID).

    Parameters
    ----------
    path : str or os.PathLike
        allStar catalogue.
    apogee_ids : sequence of str, (N,)
    ak_column : str
        The extinction column (DR17: ``AK_TARG`` or ``AK_WISE``).
    parallax : bool
        Require the Gaia parallax columns (training, or checking against Gaia).

    Returns
    -------
    rows : astropy.table.Table
        N rows; a star not in the catalogue has NaN photometry (and is reported
        by ``found``).
    found : ndarray of bool, (N,)

    Raises
    ------
    ValueError
        If the catalogue lacks a needed column (the message names it).
    """
    from .files import read_allstar

    required = ["APOGEE_ID", "SNR", "K", ak_column] + (list(PARALLAX_COLUMNS) if parallax
                                                       else [])
    cat = read_allstar(path, columns=required, labels=(),
                       optional=("STARFLAG", "K_ERR", "GAIAEDR3_RUWE", "VSCATTER")
                       + (() if parallax else PARALLAX_COLUMNS))
    idx = match_ids(cat, [str(s).strip() for s in apogee_ids])
    found = idx >= 0
    rows = cat[np.where(found, idx, 0)]
    for c in rows.colnames:
        if rows[c].dtype.kind == "f":
            rows[c][~found] = np.nan
    return rows, found


class TooFewStarsError(ValueError):
    """Raised by :func:`select` when fewer stars than asked for survive the cuts."""


@dataclass
class CutReport:
    """Per-cut counts of a selection.

    Attributes
    ----------
    n_input : int
        Stars before any cut.
    rows : list of dict
        One per cut, in order: ``name``, ``description``, ``fails`` (stars that
        fail this cut, whatever the others say), ``removed`` (stars it removes
        after the earlier cuts), ``remaining``.
    keep : ndarray of bool, shape (N,)
        Stars that pass every cut.
    """

    n_input: int
    rows: list = field(default_factory=list)
    keep: np.ndarray | None = None

    @property
    def n_kept(self):
        """Stars passing every cut."""
        return self.rows[-1]["remaining"] if self.rows else self.n_input

    def as_dict(self):
        """``{cut name: stars removed}`` plus ``input`` and ``kept`` (JSON-friendly)."""
        out = {"input": int(self.n_input)}
        out.update({r["name"]: int(r["removed"]) for r in self.rows})
        out["kept"] = int(self.n_kept)
        return out

    def __str__(self):
        w = max([len(r["name"]) + len(r["description"]) + 3 for r in self.rows] + [20])
        lines = [f"{'cut':<{w}} {'fails':>7} {'removed':>8} {'remaining':>10}",
                 f"{'input':<{w}} {'':>7} {'':>8} {self.n_input:>10d}"]
        for r in self.rows:
            label = f"{r['name']} ({r['description']})"
            lines.append(f"{label:<{w}} {r['fails']:>7d} {r['removed']:>8d} {r['remaining']:>10d}")
        lines.append(f"{'kept':<{w}} {'':>7} {'':>8} {self.n_kept:>10d}")
        return "\n".join(lines)


def select(table, cuts=None, min_remaining=1, **cut_options):
    """Apply quality cuts in order; return the kept-star mask and a report.

    Parameters
    ----------
    table : astropy.table.Table or mapping of arrays
        The (cross-matched) catalogue rows, one per star.
    cuts : list of Cut, optional
        Default :func:`lab_cuts` with ``cut_options``.
    min_remaining : int
        Raise :class:`TooFewStarsError` (listing the per-cut counts) when fewer
        stars survive.
    **cut_options
        Passed to :func:`lab_cuts` (``snr_min=``, ``feh_min=``, ...).

    Returns
    -------
    keep : ndarray of bool, shape (N,)
    report : CutReport

    Raises
    ------
    ValueError
        If the table lacks a column a cut needs (naming it and the cut).
    TooFewStarsError
        If fewer than ``min_remaining`` stars remain.
    """
    if cuts is None:
        cuts = lab_cuts(**cut_options)
    elif cut_options:
        raise ValueError("pass either cuts= or threshold options, not both")
    names = table.colnames if hasattr(table, "colnames") else list(table.keys())
    for cut in cuts:
        missing = [c for c in cut.columns if c not in names]
        if missing:
            src = getattr(table, "meta", {}).get("path", "the catalogue")
            raise ValueError(f"{src} lacks column(s) {', '.join(missing)} needed by cut "
                             f"{cut.name!r} ({cut.description})")
    n = len(table[names[0]]) if names else 0
    keep = np.ones(n, bool)
    report = CutReport(n_input=n)
    for cut in cuts:
        fails = np.asarray(cut.fails(table), bool)
        if fails.shape != (n,):
            raise ValueError(f"cut {cut.name!r} returned shape {fails.shape}, expected ({n},)")
        removed = int(np.sum(keep & fails))
        keep &= ~fails
        report.rows.append(dict(name=cut.name, description=cut.description,
                                fails=int(fails.sum()), removed=removed,
                                remaining=int(keep.sum())))
    report.keep = keep
    if int(keep.sum()) < min_remaining:
        raise TooFewStarsError(f"only {int(keep.sum())} of {n} stars pass the quality cuts "
                               f"(need {min_remaining}):\n{report}")
    return keep, report


def crossmatch(catalog, apogee_ids, telescopes=None, fields=None, labels=None):
    """Catalogue rows for a list of stars, and which stars were found.

    Parameters
    ----------
    catalog : astropy.table.Table
        From :func:`cannon_fast.apogee.files.read_allstar`.
    apogee_ids : sequence of str, shape (N,)
    telescopes, fields : sequence of str, shape (N,), optional
        Used to pick among repeated IDs.
    labels : sequence of str, optional
        A repeated ID whose tied rows disagree in one of these columns is not
        found (:func:`cannon_fast.apogee.files.match_ids`).

    Returns
    -------
    rows : astropy.table.Table
        The matched rows, in the order of the found stars.
    found : ndarray of bool, shape (N,)
    index : ndarray of int64, shape (N,)
        Catalogue row per star, -1 if absent, -2 if ambiguous.
    """
    idx = match_ids(catalog, apogee_ids, telescopes, fields, labels=labels)
    found = idx >= 0
    return catalog[idx[found]], found, idx
