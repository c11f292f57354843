"""SpectraStore: round trips, memory mapping, chunked appends, crash safety."""
import json
import os

import numpy as np
import pytest

from cannon_fast.store import SpectraStore


def _data(n, p=50, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(1, 0.1, (n, p)).astype(np.float32), rng.uniform(0, 9, (n, p)),
            rng.normal(size=(n, 2)), [f"2M{seed}-{i}" for i in range(n)], rng.integers(0, 9, n))


def test_round_trip_and_mmap(tmp_path):
    f, v, lab, ids, fl = _data(7)
    w = np.linspace(15000, 17000, 50)
    s = SpectraStore.write(tmp_path / "s", f, v, w, lab, ["TEFF", "LOGG"], ids, fl,
                           meta={"cuts": {"kept": 7}})
    s = SpectraStore(tmp_path / "s")
    assert len(s) == 7 and s.n_pixels == 50 and s.label_names == ["TEFF", "LOGG"]
    assert isinstance(s.flux, np.memmap) and s.flux.dtype == np.float32
    np.testing.assert_array_equal(s.flux, f)
    np.testing.assert_array_equal(s.ivar, v.astype(np.float32))
    np.testing.assert_array_equal(s.labels, lab)
    assert list(s.ids) == ids and list(s.flags) == list(fl) and s.meta == {"cuts": {"kept": 7}}
    np.testing.assert_array_equal(s.wavelength, w)
    rows = s[2:5]
    np.testing.assert_array_equal(rows["flux"], f[2:5])
    assert list(rows["ids"]) == ids[2:5]
    # plain .npy files, no pickle
    a = np.load(tmp_path / "s" / "flux.npy", mmap_mode="r", allow_pickle=False)
    assert a.shape == (7, 50)
    with pytest.raises(ValueError, match="read-only"):
        s.append(f, v)
    with pytest.raises(FileExistsError):
        SpectraStore.write(tmp_path / "s", f, v, w)


def test_append_in_chunks(tmp_path):
    s = SpectraStore.create(tmp_path / "s", np.arange(50.0), ["A", "B"])
    assert len(s) == 0 and s.flux.shape == (0, 50)
    parts = [_data(n, seed=k) for k, n in enumerate((3, 1, 5))]
    for f, v, lab, ids, fl in parts:
        s.append(f, v, lab, ids, fl)
    r = SpectraStore(tmp_path / "s")
    np.testing.assert_array_equal(r.flux, np.concatenate([p[0] for p in parts]))
    assert list(r.ids) == sum((p[3] for p in parts), [])
    s.append(np.ones((2, 50)), np.ones((2, 50)))  # labels NaN, ids empty, flags 0
    r = SpectraStore(tmp_path / "s")
    assert len(r) == 11 and np.isnan(r.labels[-1]).all() and r.ids[-1] == "" and r.flags[-1] == 0
    with pytest.raises(ValueError, match="store has 50 pixels"):
        s.append(np.ones((1, 49)), np.ones((1, 49)))
    with pytest.raises(ValueError, match=r"labels shape \(1, 3\)"):
        s.append(np.ones((1, 50)), np.ones((1, 50)), np.ones((1, 3)))


def test_interrupted_append_is_invisible(tmp_path):
    s = SpectraStore.create(tmp_path / "s", np.arange(50.0), ["A", "B"])
    f, v, lab, ids, fl = _data(4)
    s.append(f, v, lab, ids, fl)
    # simulate a writer killed after writing rows but before committing index.json
    with open(tmp_path / "s" / "flux.npy", "ab") as fh:
        fh.write(np.zeros((3, 50), np.float32).tobytes())
    r = SpectraStore(tmp_path / "s")
    assert len(r) == 4 and r.flux.shape == (4, 50)
    s2 = SpectraStore(tmp_path / "s", mode="a")
    s2.append(f[:1] + 5, v[:1], lab[:1], ["new"], [1])   # overwrites the stale tail
    r = SpectraStore(tmp_path / "s")
    assert len(r) == 5 and r.ids[-1] == "new"
    np.testing.assert_array_equal(r.flux[4], f[0] + 5)
    assert json.loads((tmp_path / "s" / "index.json").read_text())["n_stars"] == 5
    assert not [x for x in os.listdir(tmp_path) if x.endswith(".part")]


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a SpectraStore"):
        SpectraStore(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a SpectraStore index"):
        SpectraStore(tmp_path)


def test_label_errors_round_trip_and_older_stores(tmp_path):
    f, v, lab, ids, fl = _data(6)
    err = np.abs(lab) * 0.1
    w = np.arange(50.0)
    s = SpectraStore.write(tmp_path / "s", f, v, w, lab, ["TEFF", "LOGG"], ids, fl,
                           label_errors=err)
    np.testing.assert_array_equal(s.label_errors, err)
    np.testing.assert_array_equal(s[1:3]["label_errors"], err[1:3])
    # a store written before label errors were kept: read as NaN, and appending still works
    os.remove(tmp_path / "s" / "label_errors.npy")
    old = SpectraStore(tmp_path / "s", mode="a")
    assert old.label_errors.shape == (6, 2) and np.isnan(old.label_errors).all()
    old.append(f[:2], v[:2], lab[:2], ids[:2], label_errors=err[:2])
    again = SpectraStore(tmp_path / "s")
    assert np.isnan(again.label_errors[:6]).all()
    np.testing.assert_array_equal(again.label_errors[6:], err[:2])
    with pytest.raises(ValueError, match="label_errors shape"):
        SpectraStore(tmp_path / "s", mode="a").append(f[:2], v[:2], lab[:2],
                                                      label_errors=err[:2, :1])


def test_incomplete_store_is_refused(tmp_path):
    """A store built with complete=False reads only once mark_complete() committed it."""
    f, v, lab, ids, fl = _data(3)
    s = SpectraStore.create(tmp_path / "s", np.arange(50.0), ["A", "B"], complete=False)
    s.append(f, v, lab, ids, fl)
    with pytest.raises(ValueError, match=r"s: incomplete: prepare was interrupted; rerun it"):
        SpectraStore(tmp_path / "s")
    assert not SpectraStore(tmp_path / "s", mode="a").complete   # the writer may go on
    s.mark_complete()
    r = SpectraStore(tmp_path / "s")
    assert r.complete and len(r) == 3
    assert SpectraStore.create(tmp_path / "t", np.arange(5.0)).complete   # the default
