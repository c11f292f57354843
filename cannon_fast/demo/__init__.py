"""The embedded demo survey: a synthetic APOGEE survey made by the package's own code.

A physically motivated, seeded synthetic survey, so the demo (and the tests) run with
no network and go through exactly the reading, masking and normalization code used
for downloaded DR17 data. Its parts, in the order the generator uses them:

* :mod:`~cannon_fast.demo.labels`: the labels and the population they are drawn from;
* :mod:`~cannon_fast.demo.spectra`: noise-free, normalized spectra from the line list;
* :mod:`~cannon_fast.demo.targets`: fields, IDs, photometry, visits and binaries;
* :mod:`~cannon_fast.demo.observe`: continuum, noise, sky, bad pixels, visit combination;
* :mod:`~cannon_fast.demo.catalog`: ASPCAP-like catalog labels and flags;
* :mod:`~cannon_fast.demo.archive`: the apStar and allStar files in the DR17 layout;
* :mod:`~cannon_fast.demo.survey`: :func:`make_demo_survey` and the cached :func:`demo_survey`.

(:mod:`cannon_fast.demo.datasets`, the module they were split from, re-exports them for
one release.)
"""
from .archive import SURVEY_VERSION, SurveyPaths
from .catalog import pass_lab_cuts
from .labels import GIANT_LABEL_RANGE, LABEL_NAMES, sample_labels, vmacro_relation
from .spectra import CHIP_PIXELS, apstar_wavelength, continuum_mask, synthesize_spectra
from .survey import demo_survey, make_demo_survey

__all__ = ["LABEL_NAMES", "SurveyPaths", "make_demo_survey", "demo_survey", "synthesize_spectra",
           "continuum_mask", "apstar_wavelength", "sample_labels", "GIANT_LABEL_RANGE",
           "CHIP_PIXELS", "SURVEY_VERSION", "pass_lab_cuts", "vmacro_relation"]
