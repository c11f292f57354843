"""Readers and downloads for APOGEE files: apStar, allStar, PIXMASK bits, archive layouts."""
