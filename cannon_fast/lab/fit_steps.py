"""The label fits (test steps) the lab compares, and how the lab names them.

Shared by the pipeline, which runs them, and the report, which titles them.
"""
from __future__ import annotations

__all__ = ["FIT_STEPS", "FIT_STEP_NAMES", "fit_step_title"]

#: The label fits (test steps) the lab compares, as ``CannonModel.fit`` options:
#: de-biased, the plain chi², and the plain chi² with extra line broadening fitted and the
#: continuum refined against the model (then fitted again).
FIT_STEPS = {"debias": dict(debias=True), "plain": dict(debias=False),
             "broadened": dict(debias=False, broadening=True, refine_continuum=True)}
#: How figures, notes and the report name them.
FIT_STEP_NAMES = {"debias": "de-biased", "plain": "plain chi2",
                  "broadened": "plain chi2 + line broadening, continuum refined"}


def fit_step_title(step):
    """The name of a label fit and the call that makes it, e.g. for the report."""
    call = ", ".join(f"{k}={v}" for k, v in FIT_STEPS[step].items())
    return f"{FIT_STEP_NAMES[step]} fit (model.fit(..., {call}))"
