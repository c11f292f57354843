"""The embedded demo survey: a synthetic APOGEE survey made by the package's own code.

See :mod:`cannon_fast.demo.datasets`; its public names are re-exported here.
"""
from .datasets import (CHIP_PIXELS, GIANT_LABEL_RANGE, LABEL_NAMES, SURVEY_VERSION, SurveyPaths,
                       apstar_wavelength, continuum_mask, demo_survey, make_demo_survey,
                       pass_lab_cuts, sample_labels, synthesize_spectra, vmacro_relation)

__all__ = ["LABEL_NAMES", "SurveyPaths", "make_demo_survey", "demo_survey", "synthesize_spectra",
           "continuum_mask", "apstar_wavelength", "sample_labels", "GIANT_LABEL_RANGE",
           "CHIP_PIXELS", "SURVEY_VERSION", "pass_lab_cuts", "vmacro_relation"]
