"""Spectra of any instrument: readers onto a pixel grid, and cross-matching of star sets.

Builds only on the core (:class:`~cannon_fast.core.grid.PixelGrid`, the
continuum) and ``_util``: nothing here knows APOGEE's files, the lab or networks.
"""
from .crossmatch import (ROW_INDEX_PATTERN, CrossMatch, crossmatch_sets, parse_row_index,
                         row_index_name)
from .read import Spectra, read_spectra, read_spectrum_tables, resample_spectra

__all__ = ["Spectra", "read_spectra", "read_spectrum_tables", "resample_spectra", "CrossMatch",
           "crossmatch_sets", "parse_row_index", "row_index_name", "ROW_INDEX_PATTERN"]
