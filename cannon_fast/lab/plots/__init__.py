"""Figures of the modeling lab (matplotlib, Agg backend; imported lazily).

Every figure is a function returning a :class:`matplotlib.figure.Figure`; nothing
here calls ``plt.show``. See :mod:`cannon_fast.lab.plots.lab`.
"""
