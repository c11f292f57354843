"""The flat layout's module paths still import, as the moved modules themselves, and warn."""
import importlib
import sys

import pytest

from cannon_fast import _compat

OLD_NEW = [
    ("cannon_fast.model", "cannon_fast.core.model"),
    ("cannon_fast._kernels.s2_grid", "cannon_fast.core._kernels.s2_grid"),
    ("cannon_fast.io.apogee", "cannon_fast.apogee.files"),
    ("cannon_fast.pipeline", "cannon_fast.lab.pipeline"),
    ("cannon_fast.plots.lab", "cannon_fast.lab.plots.lab"),
    ("cannon_fast.datasets", "cannon_fast.demo.datasets"),
]


def _forget(monkeypatch, name):
    """Drop an old path (and its old parents) from sys.modules, so that it imports afresh."""
    parts = name.split(".")
    for i in range(2, len(parts) + 1):
        head = ".".join(parts[:i])
        if _compat.new_name(head) is not None:
            monkeypatch.delitem(sys.modules, head, raising=False)


def _messages(record):
    return " | ".join(str(w.message) for w in record)


@pytest.mark.parametrize("old, new", OLD_NEW)
def test_old_path_is_the_new_module_and_warns(old, new, monkeypatch):
    _forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning) as record:  # also for an old parent: cannon_fast.io
        mod = importlib.import_module(old)
    assert f"{old} moved to {new}; the old path is kept for one release" in _messages(record)
    assert {w.filename for w in record} == {__file__}  # the importing line, not importlib's
    assert mod is importlib.import_module(new)
    assert mod.__name__ == new and mod.__spec__.name == new


def test_from_import_of_an_old_path_gives_private_names_too(monkeypatch):
    _forget(monkeypatch, "cannon_fast.io.apogee")
    with pytest.warns(DeprecationWarning) as record:
        from cannon_fast.io.apogee import NPIX, _grid
    assert "cannon_fast.io.apogee moved to cannon_fast.apogee.files" in _messages(record)
    from cannon_fast.apogee import files
    assert NPIX == files.NPIX and _grid is files._grid


def test_every_old_path_maps_to_a_module():
    for old, new in _compat.MOVED.items():
        assert importlib.util.find_spec(new) is not None, (old, new)
    assert _compat.new_name("cannon_fast.survey") is None
    assert _compat.new_name("cannon_fast.plots.movies") == "cannon_fast.lab.plots.movies"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("cannon_fast.io.nothing_here")


def test_old_module_attribute_of_the_package(monkeypatch):
    import cannon_fast
    from cannon_fast.core import fitting

    monkeypatch.delitem(vars(cannon_fast), "fitting", raising=False)  # no __getattr__
    _forget(monkeypatch, "cannon_fast.fitting")
    with pytest.warns(DeprecationWarning, match="cannon_fast.fitting moved") as record:
        assert cannon_fast.fitting is fitting
    assert record[0].filename == __file__
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cannon_fast.nothing  # noqa: B018
