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

__all__ = ["Cut", "CutReport", "TooFewStarsError", "lab_cuts", "select", "crossmatch"]


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


def lab_cuts(labels=LAB_LABELS, snr_min=50.0, logg_max=4.0, teff_max=5700.0, feh_min=-1.0):
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

    Returns
    -------
    list of Cut
    """
    labels = tuple(labels)
    cuts = [Cut("missing_labels", "any of " + ", ".join(labels) + " not derived",
                lambda t: ~np.all(np.column_stack([np.isfinite(_col(t, c)) for c in labels]),
                                  axis=1),
                labels)]
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
