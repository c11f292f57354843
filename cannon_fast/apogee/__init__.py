"""The APOGEE data layer: files, bitmasks, downloads, catalogue cuts, data preparation.

``files`` (apStar/allStar readers; re-exports the apStar grid of the core), ``bitmask``
(PIXMASK bits -> masks), ``download`` (SAS layouts), ``catalog`` (cross-match, the lab's
cuts), ``prepare`` (files -> cuts -> masks -> continuum -> spectra store) and ``lines``
(the H-band line list, air -> vacuum). Builds on :mod:`cannon_fast.core`.
"""
