"""Readers of any instrument's spectra onto a pixel grid, and cross-matching of star sets."""
import fitsio
import numpy as np
import pytest

from cannon_fast import PixelGrid
from cannon_fast.instruments import (crossmatch_sets, parse_row_index, read_spectra,
                                     read_spectrum_tables, resample_spectra, row_index_name)

N, P = 5, 400


def _spectra(seed=0):
    rng = np.random.default_rng(seed)
    wave = np.linspace(9000.0, 18000.0, P)
    flux = 1.0 - 0.3 * np.exp(-0.5 * ((wave - 12000.0) / 5.0) ** 2) + rng.normal(0, 0.01, (N, P))
    ivar = np.full((N, P), 1e4)
    ivar[2, 10:20] = 0.0
    labels = rng.normal(size=(N, 3)) * [500, 1, 0.3] + [4800, 2.5, -0.2]
    return wave, flux, ivar, labels


def _write_fits(path, wave, flux, ivar, labels, ids, wave_hdu=True, header=None):
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(None)
        f.write(flux.astype(np.float32), extname="FLUX", header=header)
        f.write(ivar.astype(np.float32), extname="IVAR")
        if wave_hdu:
            f.write(wave, extname="WAVE")
        tab = np.zeros(len(ids), dtype=[("INDEX", "U9"), ("TEFF", "f8"), ("LOGG", "f8"),
                                        ("FE_H", "f8")])
        tab["INDEX"] = ids
        tab["TEFF"], tab["LOGG"], tab["FE_H"] = labels.T
        f.write(tab, extname="LABELS")


# ----------------------------------------------------------------------------- readers
def test_fits_round_trip_on_its_own_grid(tmp_path):
    wave, flux, ivar, labels = _spectra()
    ids = row_index_name([0, 1, 2, 4, 7])
    _write_fits(tmp_path / "s.fits", wave, flux, ivar, labels, ids)
    s = read_spectra(tmp_path / "s.fits", resolution=2700.0)
    assert s.grid == PixelGrid.linear(9000.0, 18000.0, P, resolution=2700.0)
    assert s.grid.spacing == "linear"
    np.testing.assert_allclose(s.flux[ivar > 0], flux[ivar > 0].astype(np.float32))
    assert np.all(s.ivar[2, 10:20] == 0) and np.all(s.flux[2, 10:20] == 1.0)
    assert list(s.ids) == list(ids)
    np.testing.assert_allclose(s.labels(["TEFF", "LOGG", "FE_H"]), labels)
    with pytest.raises(KeyError, match=r"s\.fits: no column\(s\) MG_FE"):
        s.labels(["TEFF", "MG_FE"])


def test_npz_with_errors_and_a_header_only_log_grid(tmp_path):
    wave, flux, _, labels = _spectra()
    err = np.full((N, P), 0.02)
    err[0, 5] = 0.0
    np.savez(tmp_path / "s.npz", flux=flux, error=err, wavelength=wave,
             ids=np.array(["a", "b", "c", "d", "e"]), labels=labels,
             label_names=np.array(["TEFF", "LOGG", "FE_H"]))
    s = read_spectra(tmp_path / "s.npz")
    np.testing.assert_allclose(s.ivar[1], 2500.0, rtol=1e-6)
    assert s.ivar[0, 5] == 0
    np.testing.assert_allclose(s.table["LOGG"], labels[:, 1])
    # LAMOST-style header: log10 lambda = COEFF0 + COEFF1 * i
    _write_fits(tmp_path / "l.fits", wave, flux, np.ones((N, P)), labels, list("abcde"),
                wave_hdu=False, header={"COEFF0": 3.5682, "COEFF1": 1e-4})
    g = read_spectra(tmp_path / "l.fits").grid
    assert g.spacing == "log"
    np.testing.assert_allclose(g.wavelength, 10 ** (3.5682 + 1e-4 * np.arange(P)))


def test_no_wavelengths_builtin_grid_or_a_clear_error(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "apstar.npz", flux=rng.normal(1, 0.01, (2, 8575)),
             ivar=np.ones((2, 8575)))
    s = read_spectra(tmp_path / "apstar.npz")
    assert s.grid == PixelGrid.apstar() and len(s.grid.segments) == 3
    np.savez(tmp_path / "odd.npz", flux=np.ones((2, 4000)), ivar=np.ones((2, 4000)))
    with pytest.raises(ValueError, match=r"odd\.npz: the 4000-pixel spectra carry no "
                                         r"wavelengths.*match no built-in grid"):
        read_spectra(tmp_path / "odd.npz")
    grid = PixelGrid.linear(5000, 6000, 4000)
    assert read_spectra(tmp_path / "odd.npz", grid).grid == grid


def test_wavelengths_not_increasing_name_the_file_and_star(tmp_path):
    wave, flux, ivar, _ = _spectra()
    per_star = np.tile(wave, (N, 1))
    per_star[3, 100] = per_star[3, 99]
    np.savez(tmp_path / "w.npz", flux=flux, ivar=ivar, wave=per_star,
             ids=np.array(["s0", "s1", "s2", "s3", "s4"]))
    with pytest.raises(ValueError, match=r"w\.npz: star s3: wavelengths must increase, but "
                                         r"pixel 100 .* does not follow pixel 99"):
        read_spectra(tmp_path / "w.npz")
    bad = wave[::-1].copy()
    np.savez(tmp_path / "r.npz", flux=flux, ivar=ivar, wave=bad)
    with pytest.raises(ValueError, match=r"r\.npz: wavelengths must increase"):
        read_spectra(tmp_path / "r.npz")
    np.savetxt(tmp_path / "star9.txt", np.column_stack([bad, flux[0], np.full(P, 0.01)]))
    with pytest.raises(ValueError, match=r"star9\.txt: star star9: wavelengths must increase"):
        read_spectrum_tables([tmp_path / "star9.txt"])


def test_per_star_wavelengths_and_tables_are_interpolated_onto_the_grid(tmp_path):
    # a flux linear in wavelength is interpolated exactly; shifted grids land on the target
    grid = PixelGrid.linear(10000.0, 11000.0, 201)
    paths = []
    for k, shift in enumerate((0.0, 1.7, -2.3)):
        w = np.linspace(9990.0, 11010.0, 300) + shift
        f = 1.0 + 1e-4 * (w - 10000.0) * (k + 1)
        paths.append(tmp_path / f"star{k}.csv")
        np.savetxt(paths[-1], np.column_stack([w, f, np.full_like(w, 0.01)]), delimiter=",")
    s = read_spectrum_tables(paths, grid)
    assert list(s.ids) == ["star0", "star1", "star2"] and s.grid == grid
    for k in range(3):
        np.testing.assert_allclose(s.flux[k], 1.0 + 1e-4 * (grid.wavelength - 1e4) * (k + 1),
                                   rtol=1e-6)
    # the variance of an interpolated pixel: weights squared times the neighbours'
    f, iv = resample_spectra([0.0, 1.0, 2.0], [[1.0, 3.0, 5.0]], [[1.0, 4.0, 1.0]],
                             [0.5, 1.0, 2.5])
    np.testing.assert_allclose(f[0, :2], [2.0, 3.0])
    np.testing.assert_allclose(iv[0], [1.0 / (0.25 * 1.0 + 0.25 * 0.25), 4.0, 0.0])


def test_continuum_normalized_per_segment(tmp_path):
    # two chips with a gap, each with its own smooth continuum: divided out separately
    wave = np.concatenate([np.linspace(15000, 15800, 300), np.linspace(15900, 16900, 300)])
    grid = PixelGrid(wave, name="two chips")
    assert grid.segments == ((0, 300), (300, 600))
    x = (wave - 16000.0) / 1000.0
    cont = np.where(wave < 15850, 2.0 + 0.5 * x, 7.0 - 1.0 * x + 0.3 * x ** 2)
    flux = np.tile(cont, (3, 1))
    np.savez(tmp_path / "c.npz", flux=flux, ivar=np.ones_like(flux), wave=wave)
    s = read_spectra(tmp_path / "c.npz", normalize=True)
    assert s.normalized
    np.testing.assert_allclose(s.flux, 1.0, atol=1e-6)
    np.testing.assert_allclose(s.ivar, np.tile(cont ** 2, (3, 1)), rtol=1e-5)


# ----------------------------------------------------------------------------- cross-match
def test_crossmatch_by_row_index_finds_the_missing_star_and_checks_labels():
    rng = np.random.default_rng(3)
    cat_labels = rng.normal(size=(8, 3)) * [500, 1, 0.3] + [4800, 2.5, -0.2]
    names = row_index_name([0, 1, 2, 3, 5, 6, 7])            # row 4 is missing
    rows, visits = parse_row_index(names, "jwst.fits")
    assert rows.tolist() == [0, 1, 2, 3, 5, 6, 7] and set(visits) == {0}
    jw_labels = cat_labels[rows].copy()
    jw_labels[5, 2] += 0.01                                  # row 6's [Fe/H] is off
    cm = crossmatch_sets(np.arange(8), rows, labels_a=cat_labels, labels_b=jw_labels,
                         label_names=["TEFF", "LOGG", "FE_H"], names=("allStar", "jwst"))
    assert cm.n_matched == 7 and cm.only_a.tolist() == [4] and cm.only_b.size == 0
    np.testing.assert_array_equal(cat_labels[cm.rows_a], cat_labels[rows[cm.rows_b]])
    assert cm.label_agreement["TEFF"]["n_disagree"] == 0
    assert cm.label_agreement["FE_H"]["n_disagree"] == 1
    np.testing.assert_allclose(cm.label_agreement["FE_H"]["max_abs_diff"], 0.01)
    assert cm.rows_a[cm.disagree].tolist() == [6] and not cm.labels_agree
    text = cm.describe(row_index_name(np.arange(8)), cat_labels, ["TEFF", "LOGG", "FE_H"])
    assert "in allStar only: row 4 (000004_00): TEFF " + f"{cat_labels[4, 0]:.6g}" in text
    d = cm.as_dict(labels_a=cat_labels, label_names=["TEFF", "LOGG", "FE_H"])
    assert d["only_a"][0]["row"] == 4 and d["only_a"][0]["LOGG"] == cat_labels[4, 1]
    with pytest.raises(ValueError, match=r"jwst\.fits: star 1 is named 'x_1', not"):
        parse_row_index(["000001_00", "x_1"], "jwst.fits")


def test_crossmatch_duplicates_and_nothing_in_common():
    a = np.array(["2MA", "2MB", "2MC", "2MD"])
    b = np.array(["2MB", "2MC", "2MB", "2MX"])
    with pytest.raises(ValueError, match=r"lamost: 1 ID\(s\) match more than once, e.g. "
                                         r"'2MB' at rows \[0, 2\]"):
        crossmatch_sets(a, b, names=("allStar", "lamost"))
    first = crossmatch_sets(a, b, duplicates="first")
    assert sorted(zip(first.rows_a.tolist(), first.rows_b.tolist())) == [(1, 0), (2, 1)]
    assert first.duplicates_b == {"2MB": [0, 2]}
    assert first.only_a.tolist() == [0, 3] and first.only_b.tolist() == [3]
    every = crossmatch_sets(a, b, duplicates="all")
    assert sorted(zip(every.rows_a.tolist(), every.rows_b.tolist())) == [(1, 0), (1, 2), (2, 1)]
    with pytest.raises(ValueError, match=r"allStar and jwst have no star in common"):
        crossmatch_sets(a, np.array(["000001_00"]), names=("allStar", "jwst"))


def test_bad_pixels_from_the_files_bitmask(tmp_path):
    wave, flux, ivar, _ = _spectra()
    bits = np.zeros((N, P), np.int32)
    bits[1, 50:53] = 4
    bits[3, 7] = 1
    np.savez(tmp_path / "m.npz", flux=flux, ivar=ivar, wavelength=wave, bitmask=bits)
    s = read_spectra(tmp_path / "m.npz", bad_pixels=lambda b: (b & 4) != 0)
    assert np.flatnonzero(s.ivar[1] == 0).tolist() == [50, 51, 52]
    assert s.ivar[3, 7] > 0 and np.all(s.flux[1, 50:53] == 1.0)
    np.savez(tmp_path / "n.npz", flux=flux, ivar=ivar, wavelength=wave)
    with pytest.raises(ValueError, match=r"n\.npz: bad_pixels given but the file has no BITMASK"):
        read_spectra(tmp_path / "n.npz", bad_pixels=lambda b: b != 0)
