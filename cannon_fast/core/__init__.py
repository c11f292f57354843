"""The Cannon itself: the model, label fits, continuum normalization and the kernels.

Nothing here knows APOGEE files, the modeling lab, the survey runner, figures,
neural networks or the command line; they all build on this package.
"""
