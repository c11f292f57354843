"""The modeling lab: the pipeline, its report and figures, MCMC, binaries, isochrones."""
