"""The module paths of the flat layout, kept for one release.

``MOVED`` is the one table of old module path -> new module path. A module
below a moved package moves with it (``cannon_fast._kernels.s2_grid`` ->
``cannon_fast.core._kernels.s2_grid``). :class:`MovedModuleFinder`, which
``cannon_fast/__init__.py`` puts on ``sys.meta_path``, makes an import of an old
path return the new module itself (the same object, private names included)
and warn with a ``DeprecationWarning`` that says where it moved.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings

__all__ = ["MOVED", "new_name", "MovedModuleFinder", "install"]

#: Old module path -> new module path (the layout before core/, apogee/, lab/, demo/).
MOVED = {
    "cannon_fast.model": "cannon_fast.core.model",
    "cannon_fast.fitting": "cannon_fast.core.fitting",
    "cannon_fast.continuum": "cannon_fast.core.continuum",
    "cannon_fast.vectorizer": "cannon_fast.core.vectorizer",
    "cannon_fast.backends": "cannon_fast.core.backends",
    "cannon_fast._kernels": "cannon_fast.core._kernels",
    "cannon_fast._reference": "cannon_fast.core._reference",
    "cannon_fast.io": "cannon_fast.apogee",
    "cannon_fast.io.apogee": "cannon_fast.apogee.files",
    "cannon_fast.io.bitmask": "cannon_fast.apogee.bitmask",
    "cannon_fast.io.download": "cannon_fast.apogee.download",
    "cannon_fast.catalog": "cannon_fast.apogee.catalog",
    "cannon_fast.prepare": "cannon_fast.apogee.prepare",
    "cannon_fast.pipeline": "cannon_fast.lab.pipeline",
    "cannon_fast.report": "cannon_fast.lab.report",
    "cannon_fast.mcmc": "cannon_fast.lab.mcmc",
    "cannon_fast.binaries": "cannon_fast.lab.binaries",
    "cannon_fast.isochrones": "cannon_fast.lab.isochrones",
    "cannon_fast.plots": "cannon_fast.lab.plots",
    "cannon_fast.datasets": "cannon_fast.demo.datasets",
}


def new_name(old):
    """Return the module path an old path now names, or None if it did not move.

    The longest moved prefix wins: ``cannon_fast.io.apogee`` -> ``cannon_fast.apogee.files``,
    ``cannon_fast.plots.lab`` -> ``cannon_fast.lab.plots.lab``.
    """
    parts = old.split(".")
    for i in range(len(parts), 1, -1):
        new = MOVED.get(".".join(parts[:i]))
        if new is not None:
            return ".".join([new, *parts[i:]])
    return None


class _AliasLoader(importlib.abc.Loader):
    """Load an old path as the module at its new path (no second copy)."""

    def __init__(self, old, new):
        self.old, self.new = old, new
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just set module.__spec__ to the old path's spec; the
        # module keeps its own (relative imports and reloads go by it).
        module.__spec__ = self._spec
        warnings.warn(f"{self.old} moved to {self.new}; the old path is kept for one "
                      f"release: import {self.new}", DeprecationWarning,
                      stacklevel=_importer_stacklevel())


# importlib.import_module and the package's __getattr__ (cannon_fast.fitting) import
# for someone else
_IMPORT_WRAPPERS = (os.path.join("importlib", "__init__.py"),
                    os.path.join("cannon_fast", "__init__.py"))


def _importer_stacklevel():
    """The ``stacklevel`` at which a warning from ``exec_module`` names the importing line.

    Frames are counted as ``warnings.warn`` counts them, without the import system's
    own (``importlib._bootstrap``) frames.
    """
    frame, level = sys._getframe(2), 1  # the caller of exec_module
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            level += 1
            if not name.endswith(_IMPORT_WRAPPERS):
                break
        frame = frame.f_back
    return level


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Find old module paths (``MOVED``) and load them as their new modules."""

    def find_spec(self, fullname, path=None, target=None):
        """Return a spec that loads ``fullname``'s new module, or None if it did not move."""
        new = new_name(fullname)
        if new is None or importlib.util.find_spec(new) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new))


def install():
    """Put one :class:`MovedModuleFinder` first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
