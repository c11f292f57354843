"""Cross-match two sets of stars by identifier or by an index rule.

Two sets (a catalogue and a set of spectra, or two sets of spectra) are matched
by a key per row: an identifier column (``APOGEE_ID``), or a key computed from
it by a rule. The JWST-like sets name a star ``'<row>_<visit>'`` (``'011215_00'``
is row 11,215 of the catalogue): :func:`parse_row_index` turns such names into
rows and :func:`row_index_name` back.

The result says which stars are in one set only (the seed's "which star is
missing, and its labels"), which keys occur more than once, and whether the
labels of matched stars agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .._util import key_rows

__all__ = ["CrossMatch", "crossmatch_sets", "parse_row_index", "row_index_name",
           "ROW_INDEX_PATTERN"]

#: ``'<row>_<visit>'``: the zero-padded catalogue row, an underscore, a two-digit visit.
ROW_INDEX_PATTERN = re.compile(r"^\s*(\d+)_(\d+)\s*$")


def parse_row_index(names, source="the set"):
    """Catalogue rows (and visit numbers) from ``'<row>_<visit>'`` names.

    Parameters
    ----------
    names : sequence of str, (N,)
    source : str
        Named in the error (a file name).

    Returns
    -------
    rows, visits : ndarray of int64, (N,)

    Raises
    ------
    ValueError
        Naming the first name that is not of the form (and its position).
    """
    names = np.asarray(names).astype(str)
    rows = np.empty(names.size, np.int64)
    visits = np.empty(names.size, np.int64)
    for i, s in enumerate(names):
        m = ROW_INDEX_PATTERN.match(s)
        if m is None:
            raise ValueError(f"{source}: star {i} is named {str(s)!r}, not '<row>_<visit>' "
                             "(e.g. '011215_00')")
        rows[i], visits[i] = int(m.group(1)), int(m.group(2))
    return rows, visits


def row_index_name(rows, visit=0, width=6):
    """``'<row>_<visit>'`` names of catalogue rows (the inverse of :func:`parse_row_index`)."""
    return np.array([f"{int(r):0{width}d}_{int(visit):02d}" for r in np.atleast_1d(rows)])


@dataclass
class CrossMatch:
    """The outcome of :func:`crossmatch_sets`.

    Attributes
    ----------
    rows_a, rows_b : ndarray of int64, (M,)
        Matched pairs: row ``rows_a[k]`` of set A is the star of row ``rows_b[k]`` of B.
    keys : ndarray, (M,)
        The key of each pair.
    only_a, only_b : ndarray of int64
        Rows of A (B) whose key is not in the other set.
    duplicates_a, duplicates_b : dict
        Key -> rows, for keys that occur more than once in that set.
    label_agreement : dict
        Per label: ``max_abs_diff``, ``rms_diff``, ``n_disagree`` (beyond the
        tolerance) and ``tolerance``; empty without labels.
    disagree : ndarray of int64
        Pair indices (into ``rows_a``) where some label differs beyond tolerance.
    names : (str, str)
        What the two sets are called in messages.
    """

    rows_a: np.ndarray
    rows_b: np.ndarray
    keys: np.ndarray
    only_a: np.ndarray
    only_b: np.ndarray
    duplicates_a: dict = field(default_factory=dict)
    duplicates_b: dict = field(default_factory=dict)
    label_agreement: dict = field(default_factory=dict)
    disagree: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    names: tuple = ("A", "B")

    @property
    def n_matched(self):
        """M, the matched pairs."""
        return len(self.rows_a)

    @property
    def labels_agree(self):
        """True when every matched pair's labels agree within tolerance (or none given)."""
        return len(self.disagree) == 0

    def as_dict(self, ids_a=None, labels_a=None, label_names=()):
        """A JSON-able summary; with ``ids_a``/``labels_a``, the A-only stars in full."""
        a, b = self.names
        out = dict(n_matched=self.n_matched, n_only_a=len(self.only_a),
                   n_only_b=len(self.only_b), sets=[a, b],
                   n_duplicate_keys_a=len(self.duplicates_a),
                   n_duplicate_keys_b=len(self.duplicates_b),
                   label_agreement=self.label_agreement, n_disagree=len(self.disagree))
        stars = []
        for r in self.only_a[:50]:
            star = dict(row=int(r))
            if ids_a is not None:
                star["id"] = str(np.asarray(ids_a)[r])
            if labels_a is not None:
                star.update({n: float(v) for n, v in zip(label_names, np.asarray(labels_a)[r])})
            stars.append(star)
        out["only_a"] = stars
        out["only_b_rows"] = self.only_b[:50].tolist()
        return out

    def describe(self, ids_a=None, labels_a=None, label_names=()):
        """A few lines for people: counts, the one-set-only stars, duplicates, agreement."""
        a, b = self.names
        lines = [f"{self.n_matched} stars in both {a} and {b}; {len(self.only_a)} in {a} only, "
                 f"{len(self.only_b)} in {b} only"]
        for r in self.only_a[:10]:
            who = f"row {r}" + (f" ({np.asarray(ids_a)[r]})" if ids_a is not None else "")
            labs = "" if labels_a is None else ": " + ", ".join(
                f"{n} {v:.6g}" for n, v in zip(label_names, np.asarray(labels_a)[r]))
            lines.append(f"  in {a} only: {who}{labs}")
        for side, dup in ((a, self.duplicates_a), (b, self.duplicates_b)):
            if dup:
                ex = "; ".join(f"{k} at rows {v}" for k, v in list(dup.items())[:3])
                lines.append(f"  {len(dup)} key(s) repeat in {side}, e.g. {ex}")
        for n, s in self.label_agreement.items():
            lines.append(f"  {n}: matched labels differ by at most {s['max_abs_diff']:.3g} "
                         f"(rms {s['rms_diff']:.3g}); {s['n_disagree']} beyond "
                         f"{s['tolerance']:.3g}")
        return "\n".join(lines)


def _duplicates(keys, order, lo, hi, uniq_pos):
    out = {}
    for u in uniq_pos:
        if hi[u] - lo[u] > 1:
            out[keys[order[lo[u]]].item()] = sorted(order[lo[u]:hi[u]].tolist())
    return out


def crossmatch_sets(keys_a, keys_b, *, duplicates="error", labels_a=None, labels_b=None,
                    label_names=None, tolerance=None, names=("A", "B")):
    """Match two sets of stars by key; report one-set-only stars, repeats, label agreement.

    Parameters
    ----------
    keys_a, keys_b : array_like, (N_A,), (N_B,)
        One key per row (IDs, or catalogue rows from :func:`parse_row_index`).
    duplicates : {"error", "first", "all"}
        A key that occurs more than once in a set: ``"error"`` raises naming the
        key and rows; ``"first"`` matches its first row only (the rest are
        reported in ``duplicates_a``/``_b``); ``"all"`` matches every pair
        (repeat visits of a star).
    labels_a, labels_b : array_like, (N_A, L), (N_B, L), optional
        Labels to compare over the matched pairs.
    label_names : sequence of str, optional
    tolerance : float or array_like (L,), optional
        Largest difference that still agrees; default ``1e-5`` times the
        label's typical size (+ 1e-8).
    names : (str, str)
        What the sets are called in messages (e.g. file names).

    Returns
    -------
    CrossMatch

    Raises
    ------
    ValueError
        No key in common (naming both sets and an example key of each), or a
        repeated key with ``duplicates="error"``.
    """
    if duplicates not in ("error", "first", "all"):
        raise ValueError(f"duplicates must be 'error', 'first' or 'all', got {duplicates!r}")
    ka = np.asarray(keys_a)
    kb = np.asarray(keys_b)
    if ka.dtype.kind in "USO" or kb.dtype.kind in "USO":
        ka = np.char.strip(ka.astype(str))
        kb = np.char.strip(kb.astype(str))
    a_name, b_name = names
    if ka.size == 0 or kb.size == 0:
        raise ValueError(f"{a_name if ka.size == 0 else b_name} has no stars to match")
    order_a, lo_a, hi_a = key_rows(ka, ka)
    order_b, lo_b, hi_b = key_rows(kb, ka)          # where each A key is in B
    own_b, lob, hib = key_rows(kb, kb)
    first_a = order_a[lo_a] == np.arange(ka.size)   # the first row of each A key
    first_b = own_b[lob] == np.arange(kb.size)
    dup_a = _duplicates(ka, order_a, lo_a, hi_a, np.flatnonzero(first_a))
    dup_b = _duplicates(kb, own_b, lob, hib, np.flatnonzero(first_b))
    in_b = hi_b > lo_b
    if not in_b.any():
        raise ValueError(f"{a_name} and {b_name} have no star in common (e.g. {a_name} "
                         f"{str(ka[0])!r}, {b_name} {str(kb[0])!r}): wrong ID column or "
                         "index rule?")
    if duplicates == "error":
        for side, dup in ((a_name, dup_a), (b_name, dup_b)):
            if dup:
                k, rows = next(iter(dup.items()))
                raise ValueError(f"{side}: {len(dup)} ID(s) match more than once, e.g. {k!r} "
                                 f"at rows {rows}; pass duplicates='first' or 'all'")
    pairs_a, pairs_b = [], []
    for i in np.flatnonzero(in_b & (first_a if duplicates != "all" else True)):
        rows_b = order_b[lo_b[i]:hi_b[i]]
        rows_b = np.sort(rows_b)
        if duplicates != "all":
            rows_b = rows_b[:1]
        pairs_a += [i] * len(rows_b)
        pairs_b += rows_b.tolist()
    rows_a = np.asarray(pairs_a, np.int64)
    rows_b = np.asarray(pairs_b, np.int64)
    _, lo_ba, hi_ba = key_rows(ka, kb)
    out = CrossMatch(rows_a, rows_b, ka[rows_a], np.flatnonzero(~in_b).astype(np.int64),
                     np.flatnonzero(hi_ba == lo_ba).astype(np.int64), dup_a, dup_b,
                     names=(a_name, b_name))
    if labels_a is not None and labels_b is not None:
        _compare_labels(out, labels_a, labels_b, label_names, tolerance)
    return out


def _compare_labels(out, labels_a, labels_b, label_names, tolerance):
    la = np.atleast_2d(np.asarray(labels_a, float))[out.rows_a]
    lb = np.atleast_2d(np.asarray(labels_b, float))[out.rows_b]
    if la.shape != lb.shape:
        raise ValueError(f"labels of {out.names[0]} ({la.shape[1]}) and {out.names[1]} "
                         f"({lb.shape[1]}) have different numbers of columns")
    names = list(label_names) if label_names is not None else [f"label{j}"
                                                               for j in range(la.shape[1])]
    d = np.abs(la - lb)
    size = np.nanmedian(np.abs(la), axis=0)
    tol = (1e-5 * size + 1e-8) if tolerance is None else np.broadcast_to(
        np.asarray(tolerance, float), (la.shape[1],))
    both = np.isfinite(la) & np.isfinite(lb)
    off = (d > tol) & both
    for j, n in enumerate(names):
        dj = d[both[:, j], j]
        out.label_agreement[n] = dict(
            max_abs_diff=float(dj.max()) if dj.size else float("nan"),
            rms_diff=float(np.sqrt(np.mean(dj ** 2))) if dj.size else float("nan"),
            n_disagree=int(off[:, j].sum()), tolerance=float(tol[j]), n=int(dj.size))
    out.disagree = np.flatnonzero(off.any(axis=1)).astype(np.int64)
