"""The demo survey's old module, kept for one release: import from :mod:`cannon_fast.demo`.

The generator is split by what each part does: :mod:`~cannon_fast.demo.labels` (the
population), :mod:`~cannon_fast.demo.spectra` (the synthesis),
:mod:`~cannon_fast.demo.targets` (positions, photometry, visits, binaries),
:mod:`~cannon_fast.demo.observe` (instrument, noise, bad pixels, visit combination),
:mod:`~cannon_fast.demo.catalog` (ASPCAP-like labels and flags),
:mod:`~cannon_fast.demo.archive` (the DR17 files) and :mod:`~cannon_fast.demo.survey`
(generation and cache). This module re-exports the names it used to define; the line
list lives in :mod:`cannon_fast.apogee.lines` and the apStar grid in
:mod:`cannon_fast.core.grid`.
"""
from ..apogee.lines import air_to_vacuum, line_list  # noqa: F401
from ..core.grid import APSTAR_CDELT1 as CDELT1  # noqa: F401
from ..core.grid import APSTAR_CRVAL1 as CRVAL1  # noqa: F401
from ..core.grid import APSTAR_NPIX as NPIX  # noqa: F401
from ..core.grid import SPEED_OF_LIGHT as C_KMS  # noqa: F401
from .archive import ALLSTAR_RELPATH, APSTAR_RELDIR, SURVEY_VERSION, SurveyPaths  # noqa: F401
from .catalog import pass_lab_cuts
from .labels import GIANT_LABEL_RANGE, LABEL_NAMES, sample_labels, vmacro_relation
from .observe import (BADDARK, BADERR, BADFLAT, BADPIX, CRPIX, NOSKY,  # noqa: F401
                      PERSIST_HIGH, PERSIST_LOW, PERSIST_MED, SATPIX, SIG_SKYLINE, SIG_TELLURIC,
                      UNFIXABLE)
from .spectra import CHIP_PIXELS, DV_PIX, apstar_wavelength, continuum_mask  # noqa: F401
from .spectra import synthesize_spectra
from .survey import demo_survey, make_demo_survey

__all__ = [
    "LABEL_NAMES", "SurveyPaths", "make_demo_survey", "demo_survey", "synthesize_spectra",
    "continuum_mask", "apstar_wavelength", "sample_labels",
    "GIANT_LABEL_RANGE", "CHIP_PIXELS", "SURVEY_VERSION", "pass_lab_cuts", "vmacro_relation",
]
