"""How labels are written on figures: one table for every plot module."""
from __future__ import annotations

import numpy as np

__all__ = ["LABEL_TEXT", "axis_label", "label_name", "value_title"]

#: Axis text of the usual labels: name and unit.
LABEL_TEXT = {"TEFF": r"$T_\mathrm{eff}$ [K]", "LOGG": r"$\log g$ [cgs]",
              "FE_H": "[Fe/H] [dex]", "MG_FE": "[Mg/Fe] [dex]", "SI_FE": "[Si/Fe] [dex]",
              "M_H": "[M/H] [dex]", "ALPHA_M": r"[$\alpha$/M] [dex]"}
#: Labels shown with at most this many decimals (Teff to the kelvin).
_MAX_DECIMALS = {"TEFF": 0}


def axis_label(name):
    """Axis text (name and unit) of a label; unknown labels as they are."""
    return LABEL_TEXT.get(str(name).upper(), str(name))


def _name_and_unit(name):
    text = axis_label(name)
    if text.endswith("]") and " [" in text:
        return tuple(text[:-1].rsplit(" [", 1))
    return text, ""


def label_name(name):
    """A label's name without its unit, e.g. ``[Fe/H]``."""
    return _name_and_unit(name)[0]


def value_title(name, med, lo, hi):
    r"""``name = median`` with asymmetric errors to 2 significant digits, and the unit.

    E.g. ``$T_\mathrm{eff}$ = 4669$^{+8}_{-8}$ K`` or ``[Fe/H] = 0.1930$^{+0.0071}_{-0.0068}$``:
    the median and both errors have the same number of decimals, set by the smaller
    error; "dex" and "cgs" are left out.
    """
    text, unit = _name_and_unit(name)
    unit = "" if unit in ("", "dex", "cgs") else f" {unit}"
    errs = [e for e in (lo, hi) if np.isfinite(e) and e > 0]
    dec = int(np.clip(1 - np.floor(np.log10(min(errs))), 0, 4)) if errs else 3
    dec = min(dec, _MAX_DECIMALS.get(str(name).upper(), dec))
    return f"{text} = {med:.{dec}f}$^{{+{hi:.{dec}f}}}_{{-{lo:.{dec}f}}}${unit}"
