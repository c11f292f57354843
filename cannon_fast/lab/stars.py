"""Stars named by the user (``--star APOGEE_ID``): found in the data, or a clear error.

The lab's checkpoints name real DR17 stars (2M19395986+2341280 for the continuum
figure, 2M03533659+2512012 for data against the model). They are in a download
of the lab's fields, not in the embedded synthetic survey or a mock one, whose
IDs are made up: the error says which case it is and lists the nearest IDs the
data do have.
"""
from __future__ import annotations

import difflib

__all__ = ["near_matches", "find_stars"]


def near_matches(apogee_id, ids, n=5):
    """The ``n`` IDs most like ``apogee_id`` (``difflib`` similarity, best first)."""
    return difflib.get_close_matches(str(apogee_id).strip().upper(), list(ids), n=n, cutoff=0.5)


def find_stars(stars, ids, where, hint=""):
    """Check that every named star is among ``ids``; return them as the data spell them.

    Parameters
    ----------
    stars : sequence of str
        APOGEE IDs as typed (case and surrounding spaces are ignored).
    ids : iterable of str
        The IDs the data have (e.g. from the apStar file names).
    where : str
        What the data are, for the message (e.g. ``"the embedded synthetic survey"``).
    hint : str, optional
        Said after the nearest IDs (e.g. where such a star could be found).

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        One line naming the first unknown star, the data and its nearest IDs.
    """
    by_upper = {str(i).strip().upper(): str(i) for i in ids}
    found = []
    for star in stars or ():
        key = str(star).strip().upper()
        if key in by_upper:
            if by_upper[key] not in found:
                found.append(by_upper[key])
            continue
        near = near_matches(key, by_upper)
        raise ValueError(f"--star {str(star).strip()}: not in {where} ({len(by_upper)} stars); "
                         + ("nearest IDs: " + ", ".join(by_upper[k] for k in near)
                            if near else "no similar ID") + (f"; {hint}" if hint else ""))
    return found
