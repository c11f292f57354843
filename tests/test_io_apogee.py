"""apStar/allStar readers: tiny files written with fitsio, the real DR17 files, bad input."""
import gzip
import os

import fitsio
import numpy as np
import numpy.lib.recfunctions  # noqa: F401
import pytest

from cannon_fast.apogee import files as ap

NPIX = ap.NPIX


def _write_apstar(path, rows, nvisits, seed=0, npix=NPIX, hdus=11, header=None):
    """Write a minimal apStar-like file: primary header + flux/err/PIXMASK (+ filler HDUs)."""
    rng = np.random.default_rng(seed)
    shape = (npix,) if rows == 1 else (rows, npix)
    flux = rng.uniform(500, 1500, shape)
    err = rng.uniform(5, 15, shape)
    pm = rng.integers(0, 1 << 14, shape).astype(np.int32)
    hdr = {"OBJID": "2M00000001+0000001", "FIELD": "M15", "NVISITS": nvisits, "SNR": 123.5,
           "VHELIO": -10.25, "RA": 1.5, "DEC": -2.5, "CRVAL1": 4.179, "CDELT1": 6e-6,
           "NWAVE": npix}
    hdr.update(header or {})
    with fitsio.FITS(str(path), "rw", clobber=True) as fh:
        fh.write(None, header=[{"name": k, "value": v} for k, v in hdr.items()])
        for a in (flux, err, pm)[: max(0, hdus - 1)]:
            fh.write(a)
        for _ in range(max(0, hdus - 4)):
            fh.write(np.zeros(shape, np.float32))
    return flux, err, pm


def test_wavelength_grid_and_chips():
    w = ap.wavelength_grid()
    assert w.shape == (NPIX,)
    assert w[0] == pytest.approx(10 ** 4.179)
    assert w[-1] == pytest.approx(10 ** (4.179 + 6e-6 * 8574))
    np.testing.assert_allclose(np.diff(np.log10(w)), 6e-6, rtol=1e-6)
    assert ap.on_chip_mask().sum() == 7514
    c = ap.chip_of_pixel()
    assert c[0] == -1 and c[246] == 0 and c[3273] == 0 and c[3274] == -1 and c[8334] == 2


def test_grids():
    assert ap.grid_indices(7214).size == 7214 and ap.grid_indices(7514).size == 7514
    m = np.zeros(7214, bool)
    m[[0, 2919, 2920, 7213]] = True
    np.testing.assert_array_equal(np.flatnonzero(ap.to_apstar_grid(m)), [322, 3241, 3648, 8305])
    np.testing.assert_array_equal(np.flatnonzero(ap.to_apstar_grid([0, 3028], grid=7514)),
                                  [246, 3585])
    np.testing.assert_array_equal(np.flatnonzero(ap.to_apstar_grid([8000, 5])), [5, 8000])
    with pytest.raises(ValueError, match="ambiguous"):
        ap.to_apstar_grid([1, 2])
    with pytest.raises(ValueError, match="unknown APOGEE pixel grid of length 100"):
        ap.to_apstar_grid(np.zeros(100, bool))
    with pytest.raises(ValueError, match="outside the 7214"):
        ap.to_apstar_grid([7300], grid=7214)


@pytest.mark.parametrize("release,rows,nvis", [("dr17", 5, 3), ("dr17", 2, 1), ("r12", 1, 1),
                                               ("r12", 4, 2)])
def test_apstar_layouts_round_trip(tmp_path, release, rows, nvis):
    d = tmp_path / "stars" / "apo25m" / "M15"
    d.mkdir(parents=True)
    path = d / f"apStar-{release}-2M00000001+0000001.fits"
    flux, err, pm = _write_apstar(path, rows, nvis)
    s = ap.read_apstar(path, visits=True)
    f2, e2, p2 = (np.atleast_2d(a) for a in (flux, err, pm))
    np.testing.assert_array_equal(s.flux, f2[0])
    np.testing.assert_array_equal(s.err, e2[0])
    np.testing.assert_array_equal(s.pixmask, p2[0])
    assert s.pixmask.dtype == np.int64
    assert s.visit_flux.shape == (nvis, NPIX)
    np.testing.assert_array_equal(s.visit_flux, f2[2:] if nvis > 1 else f2[:1])
    assert s.meta["apogee_id"] == "2M00000001+0000001" and s.meta["nvisits"] == nvis
    assert s.meta["snr"] == 123.5 and s.meta["vhelio"] == -10.25 and s.meta["field"] == "M15"
    assert s.meta["telescope"] == "apo25m"   # from the SAS path
    assert s.meta["release"] == ("dr17" if release == "dr17" else "dr16")
    s1 = ap.read_apstar(path)   # combined row only
    np.testing.assert_array_equal(s1.flux, s.flux)
    assert s1.visit_flux is None
    assert ap.fits_check(path) == 11


def test_wrong_release_layout(tmp_path):
    p = tmp_path / "apStar-dr17-2M1.fits"
    _write_apstar(p, 1, 1)
    with pytest.raises(ValueError, match=r"apStar-dr17-2M1.fits: 1-D .*wrong release layout"):
        ap.read_apstar(p)
    ap.read_apstar(p, release="dr16")  # the caller may say what it is
    q = tmp_path / "apStar-r12-2M2.fits"
    _write_apstar(q, 2, 1)
    with pytest.raises(ValueError, match="DR17 layout"):
        ap.read_apstar(q)
    r = tmp_path / "apStar-dr17-2M3.fits"
    _write_apstar(r, 4, 3)
    with pytest.raises(ValueError, match="4 spectrum rows do not fit NVISITS = 3"):
        ap.read_apstar(r)
    s = tmp_path / "apStar-dr17-2M4.fits"
    _write_apstar(s, 2, 1, header={"NWAVE": 8000})
    with pytest.raises(ValueError, match="NWAVE = 8000"):
        ap.read_apstar(s)


def test_bad_files(tmp_path):
    good = tmp_path / "apStar-dr17-2M1.fits"
    _write_apstar(good, 5, 3)
    raw = good.read_bytes()
    trunc = tmp_path / "apStar-dr17-2M2.fits"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"apStar-dr17-2M2.fits: truncated FITS file"):
        ap.read_apstar(trunc)
    with pytest.raises(ValueError, match="truncated"):
        ap.fits_check(trunc)
    junk = tmp_path / "apStar-dr17-2M3.fits"
    junk.write_bytes(os.urandom(5760))
    with pytest.raises(ValueError, match="apStar-dr17-2M3.fits: not a FITS file"):
        ap.read_apstar(junk)
    few = tmp_path / "apStar-dr17-2M4.fits"
    _write_apstar(few, 5, 3, hdus=3)
    with pytest.raises(ValueError, match="2M4.fits: has 3 HDUs.*missing HDU"):
        ap.read_apstar(few)
    with pytest.raises(FileNotFoundError, match="2M5.fits"):
        ap.read_apstar(tmp_path / "apStar-dr17-2M5.fits")
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "e.fits").write_bytes(b"")
        ap.fits_check(tmp_path / "e.fits")


def test_nan_pixels_are_masked(tmp_path):
    p = tmp_path / "apStar-dr17-2M1.fits"
    flux, err, pm = _write_apstar(p, 2, 1)
    with fitsio.FITS(str(p), "rw") as fh:
        f = fh[1].read()
        f[0, 1000:1010] = np.nan
        fh[1].write(f)
    s = ap.read_apstar(p)
    f, ivar, bad = s.masked(bits=[])
    assert bad[1000:1010].all() and (ivar[1000:1010] == 0).all() and np.isfinite(f).all()
    assert not bad[2000]


def test_gzip_falls_back_to_fitsio(tmp_path):
    p = tmp_path / "apStar-dr17-2M1.fits"
    flux, _, _ = _write_apstar(p, 5, 3)
    gz = tmp_path / "apStar-dr17-2M1.fits.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    s = ap.read_apstar(gz, visits=True)
    np.testing.assert_array_equal(s.flux, flux[0])
    assert s.visit_flux.shape == (3, NPIX)


def test_parse_paths():
    assert ap.parse_apstar_path("/a/stars/lco25m/060+00/apStar-dr17-2M1+2.fits") == (
        "dr17", "2M1+2", "lco25m", "060+00")
    assert ap.parse_apstar_path("apStar-r12-2M1.fits")[:2] == ("dr16", "2M1")
    with pytest.raises(ValueError, match="not an apStar file name"):
        ap.parse_apstar_path("/x/foo.fits")
    assert ap.apstar_filename("2M1", "dr16") == "apStar-r12-2M1.fits"
    assert ap.release_of("allStar-dr17-synspec_rev1.fits") == "dr17"
    assert ap.release_of("allStar-l31c.2.fits") == "dr14"


def test_real_dr17_and_mystery(shared_dir):
    real = shared_dir / "data" / "real"
    three = ap.read_apstar(real / "apogee_dr17" / "apStar-dr17-2M17335483-2753043.fits",
                           visits=True)
    one = ap.read_apstar(real / "apogee_dr17" / "apStar-dr17-2M19485057+5005279.fits",
                         visits=True)
    myst = ap.read_apstar(real / "lab2" / "mystery_spec_wiped.fits", visits=True)
    assert three.meta["nvisits"] == 3 and three.visit_flux.shape == (3, NPIX)
    assert three.meta["layout_rows"] == 5 and one.meta["layout_rows"] == 2
    assert three.meta["snr"] == pytest.approx(154.155, abs=1e-3)
    assert one.meta["apogee_id"] == "2M19485057+5005279" and one.meta["field"] == "K04_083+13"
    assert myst.meta["apogee_id"] == "2M16333217+3942519" and myst.meta["layout_rows"] == 1
    assert myst.meta["telescope"] == "apo25m" and myst.meta["snr"] == pytest.approx(366.512)
    for s, f in ((three, "apogee_dr17/apStar-dr17-2M17335483-2753043.fits"),
                 (myst, "lab2/mystery_spec_wiped.fits")):
        ref = np.atleast_2d(fitsio.read(str(real / f), 1))[0]
        np.testing.assert_array_equal(s.flux, ref)
        np.testing.assert_allclose(s.wavelength, ap.wavelength_grid())
    # DR17 combined rows are NaN where not every visit contributes: masked, not propagated
    for s in (three, one, myst):
        f, ivar, bad = s.masked()
        assert np.isfinite(f).all() and np.isfinite(ivar).all()
        assert 0.6 < (ivar > 0).mean() < 0.9        # most of the 7514 on-chip pixels survive
        assert np.all(ivar[np.isnan(s.flux)] == 0)
    # the combined spectrum is the ivar-weighted mean of the visits where all are unflagged
    v = three.visit_flux
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(three.visit_err > 0, 1 / three.visit_err ** 2, 0)
    ok = np.isfinite(three.flux) & (three.pixmask == 0) & (three.visit_pixmask == 0).all(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (w * v).sum(0) / w.sum(0)
    assert np.median(np.abs(mean[ok] / three.flux[ok] - 1)) < 0.01


def _write_allstar(path, release):
    miss = np.nan if release == "dr17" else -9999.0
    t = np.zeros(5, dtype=[("APOGEE_ID", "S20"), ("TELESCOPE", "S8"), ("FIELD", "S12"),
                           ("SNR", "f4"), ("TEFF", "f4"), ("LOGG", "f4"), ("FE_H", "f4"),
                           ("MG_FE", "f4"), ("SI_FE", "f4"), ("EXTRA", "f8")])
    t["APOGEE_ID"] = [b"2MA ", b"2MB", b"2MB", b"2MC", b"2MD"]
    t["TELESCOPE"] = [b"apo25m", b"apo25m", b"lco25m", b"apo25m", b"apo1m"]
    t["FIELD"] = [b"M15", b"N6791", b"N6791", b"060+00", b"M15"]
    t["SNR"] = [100, 80, 120, 30, 60]
    t["TEFF"] = [4800, 4700, 4710, miss, 5000]
    t["LOGG"] = [2.5, 2.0, 2.1, 3.0, miss]
    t["FE_H"] = [0.1, -0.2, -0.21, 0.0, 0.0]
    fitsio.write(str(path), t, clobber=True)


@pytest.mark.parametrize("name,release", [("allStar-dr17-synspec_rev1.fits", "dr17"),
                                          ("allStar-r12-l33.fits", "dr16")])
def test_allstar_missing_values_and_columns(tmp_path, name, release):
    p = tmp_path / name
    _write_allstar(p, release)
    t = ap.read_allstar(p)
    assert t.meta["release"] == release
    assert list(t["APOGEE_ID"]) == ["2MA", "2MB", "2MB", "2MC", "2MD"]
    assert np.isnan(t["TEFF"][3]) and np.isnan(t["LOGG"][4]) and np.isfinite(t["TEFF"][0])
    assert "EXTRA" not in t.colnames
    t2 = ap.read_allstar(p, columns=["APOGEE_ID", "EXTRA"], rows=[1, 3])
    assert t2.colnames == ["APOGEE_ID", "EXTRA"] and list(t2["APOGEE_ID"]) == ["2MB", "2MC"]
    with pytest.raises(ValueError, match=rf"{name}: allStar lacks column\(s\) NOPE"):
        ap.read_allstar(p, columns=["APOGEE_ID", "NOPE"])
    with pytest.raises(FileNotFoundError, match="allStar catalogue not found"):
        ap.read_allstar(tmp_path / "missing.fits")


def test_match_ids_repeats(tmp_path):
    p = tmp_path / "allStar-dr17-x.fits"
    _write_allstar(p, "dr17")
    t = ap.read_allstar(p)
    idx = ap.match_ids(t, ["2MB", "2MB", "2MB", "2MA", "2MX"],
                       telescopes=["apo25m", "lco25m", None, None, None])
    # telescope decides; without it the highest SNR (lco25m, row 2) wins
    np.testing.assert_array_equal(idx, [1, 2, 2, 0, -1])
    idx = ap.match_ids(t, ["2MB"], fields=["N6791"], telescopes=["apo25m"])
    assert idx[0] == 1


def test_match_ids_tied_rows_with_other_labels_are_ambiguous(tmp_path):
    """Tied repeated IDs that disagree in a label match nothing, with a reason and a count."""
    from astropy.table import Table
    from cannon_fast.apogee.prepare import prepare_dataset

    t = Table(dict(APOGEE_ID=["2MA", "2MA", "2MB", "2MB"], SNR=[90.0, 90.0, 50.0, 50.0],
                   TEFF=[4500.0, 4600.0, 4800.0, 4800.0], LOGG=[2.0, 2.0, 2.5, 2.5]))
    # 2MA's two rows tie on SNR and disagree in TEFF; 2MB's tie but agree
    assert list(ap.match_ids(t, ["2MA", "2MB"])) == [0, 2]   # without labels: as before
    idx = ap.match_ids(t, ["2MA", "2MB"], labels=["TEFF", "LOGG"])
    assert list(idx) == [ap.AMBIGUOUS_MATCH, 2]
    why = ap.match_conflicts(t, "2MA", ["TEFF", "LOGG"])
    assert "2 allStar rows" in why and "TEFF 4500 vs 4600" in why and "LOGG" not in why
    # through prepare: the star is left out, named, and counted in the cut report
    stars, allstar, cont = _prepare_inputs(tmp_path)
    cat = fitsio.read(str(allstar))
    dup = cat[np.char.strip(cat["APOGEE_ID"].astype(str)) == "2M4"].copy()
    dup["TEFF"] = 5100
    fitsio.write(str(allstar), np.concatenate([cat, dup]), clobber=True)
    res = prepare_dataset(stars, allstar, tmp_path / "out.store", cont,
                          labels=("TEFF", "LOGG", "FE_H"))
    assert list(res.store.ids) == ["2M1"]
    msg = {os.path.basename(f): m for f, m in res.failures}["apStar-dr17-2M4.fits"]
    assert "TEFF 4800 vs 5100" in msg and "ambiguous" in msg
    rows = {r["name"]: r["removed"] for r in res.report.rows}
    assert rows["ambiguous_catalog_match"] == 1 and rows["no_catalog_match"] == 1


def _prepare_inputs(tmp_path):
    """Five apStar files (two bad, one not in the catalogue), an allStar, continuum pixels."""
    d = tmp_path / "stars" / "apo25m" / "F1"
    d.mkdir(parents=True)
    ids = ["2M1", "2M2", "2M3", "2M4", "2M5"]
    rng = np.random.default_rng(3)
    for i, sid in enumerate(ids):
        p = d / f"apStar-dr17-{sid}.fits"
        _write_apstar(p, 2, 1, seed=i, header={"OBJID": sid})
        with fitsio.FITS(str(p), "rw") as fh:       # smooth spectra, clean masks
            fh[1].write(np.vstack([1000 + rng.normal(0, 5, NPIX), np.zeros(NPIX)]))
            fh[2].write(np.full((2, NPIX), 5.0))
            fh[3].write(np.zeros((2, NPIX), np.int32))
    raw = (d / "apStar-dr17-2M2.fits").read_bytes()
    (d / "apStar-dr17-2M2.fits").write_bytes(raw[:20000])                # truncated
    _write_apstar(d / "apStar-dr17-2M3.fits", 1, 1, header={"OBJID": "2M3"})  # DR16 layout
    t = np.zeros(4, dtype=[("APOGEE_ID", "S8"), ("TELESCOPE", "S8"), ("FIELD", "S8"),
                           ("SNR", "f4"), ("TEFF", "f4"), ("LOGG", "f4"), ("FE_H", "f4")])
    t["APOGEE_ID"] = [b"2M1", b"2M2", b"2M3", b"2M4"]     # 2M5 is not in the catalogue
    t["TELESCOPE"], t["FIELD"] = b"apo25m", b"F1"
    t["SNR"], t["TEFF"], t["LOGG"], t["FE_H"] = 100, 4800, 2.5, 0.0
    fitsio.write(str(tmp_path / "allStar-dr17-x.fits"), t)
    cont = np.zeros(NPIX, bool)
    cont[ap.on_chip_mask()] = True
    cont[1::7] = False
    return tmp_path / "stars", tmp_path / "allStar-dr17-x.fits", cont


def test_prepare_dataset_bad_input_goes_on(tmp_path):
    """A truncated file, a wrong layout and an unknown star are listed; the rest is prepared."""
    from cannon_fast.apogee.prepare import prepare_dataset

    stars, allstar, cont = _prepare_inputs(tmp_path)
    res = prepare_dataset(stars, allstar, tmp_path / "out.store", cont,
                          labels=("TEFF", "LOGG", "FE_H"))
    assert list(res.store.ids) == ["2M1", "2M4"]
    why = {os.path.basename(f): m for f, m in res.failures}
    assert set(why) == {"apStar-dr17-2M2.fits", "apStar-dr17-2M3.fits", "apStar-dr17-2M5.fits"}
    assert "truncated" in why["apStar-dr17-2M2.fits"]
    assert "wrong release layout" in why["apStar-dr17-2M3.fits"]
    assert "star 2M5 is not in the allStar catalogue" in why["apStar-dr17-2M5.fits"]
    rows = {r["name"]: r["removed"] for r in res.report.rows}
    assert rows["no_catalog_match"] == 1 and rows["unreadable"] == 2 and res.report.rows[-1][
        "remaining"] == 2
    g = res.store.ivar[0] > 0
    assert abs(np.median(res.store.flux[0][g]) - 1) < 0.01
    assert res.store.meta["cut_report"] == {"input": 5, "no_catalog_match": 1, "missing_labels": 0,
                                            "low_snr": 0, "dwarf": 0, "metal_poor": 0,
                                            "unreadable": 2, "normalization_failed": 0,
                                            "kept": 2}
    assert len(res.store.meta["failures"]) == 3


def test_prepare_overwrite_keeps_the_old_store_until_the_new_one_is_complete(tmp_path,
                                                                             monkeypatch):
    """An interrupted --overwrite leaves the old store whole and no partial store anywhere."""
    from cannon_fast.apogee import prepare
    from cannon_fast.store import SpectraStore

    stars, allstar, cont = _prepare_inputs(tmp_path)
    out = tmp_path / "out.store"
    kw = dict(labels=("TEFF", "LOGG", "FE_H"), chunk_size=1)
    with pytest.raises(FileExistsError, match="not a SpectraStore"):
        (tmp_path / "notes").mkdir()
        prepare.prepare_dataset(stars, allstar, tmp_path / "notes", cont, overwrite=True, **kw)
    prepare.prepare_dataset(stars, allstar, out, cont, **kw)
    with pytest.raises(FileExistsError, match="use --overwrite"):
        prepare.prepare_dataset(stars, allstar, out, cont, **kw)
    before = sorted(os.listdir(tmp_path))
    real, calls = prepare.normalize, []

    def interrupted(*a, **k):   # the second chunk is never normalized: Ctrl-C
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(prepare, "normalize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(stars, allstar, out, cont, overwrite=True, **kw)
    assert sorted(os.listdir(tmp_path)) == before           # no leftover temporary store
    assert list(SpectraStore(out).ids) == ["2M1", "2M4"]   # the old store, whole
    monkeypatch.setattr(prepare, "normalize", real)
    res = prepare.prepare_dataset(stars, allstar, out, cont, overwrite=True, **kw)
    assert list(res.store.ids) == ["2M1", "2M4"] and res.store.complete
    assert sorted(os.listdir(tmp_path)) == before


def _set_card(path, hdu, key, value):
    """Rewrite one integer card of HDU ``hdu`` in place (a crafted, corrupt header)."""
    raw = bytearray(path.read_bytes())
    start = 0
    for _ in range(hdu):
        start = raw.find(b"XTENSION=", start + 1)
    j = raw.find(key.ljust(8).encode() + b"=", start)
    raw[j:j + 80] = f"{key:<8}= {value:>20}".ljust(80).encode()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("key,value,why", [
    ("NAXIS1", 2**62, "NAXIS1 = 4611686018427387904, an impossible size"),
    ("NAXIS1", 2**46, r"declares 2251799813685248 bytes of data \(NAXISn = 70368744177664, 4\)"),
    ("NAXIS1", -8575, "NAXIS1 = -8575"),
    ("BITPIX", 12, "BITPIX = 12, not a FITS data type"),
    ("PCOUNT", 2**70, "PCOUNT = 1180591620717411303424"),
])
def test_absurd_header_sizes_are_a_failed_star(tmp_path, key, value, why):
    """A header whose sizes wrap int64 or go negative is a ValueError naming the file."""
    from cannon_fast.apogee.prepare import _load_chunk
    from cannon_fast.survey.inputs import _apstar_rows

    p = tmp_path / "apStar-dr17-2M1.fits"
    _write_apstar(p, 4, 2)
    _set_card(p, 1, key, value)  # NAXIS1 = 2**62 x NAXIS2 = 4 rows = 2**64 pixels: wraps to 0
    with pytest.raises(ValueError, match=rf"apStar-dr17-2M1.fits: HDU 1 .*{why}"):
        ap.read_apstar(p)
    with pytest.raises(ValueError, match="corrupt header"):
        ap.fits_check(p)
    errors = _load_chunk(([str(p)], 0, None))[4]          # prepare: listed, goes on
    assert len(errors) == 1 and "corrupt header" in errors[0][1]
    (row,) = _apstar_rows(str(p), 0, False, None)         # label: a row with a REASON
    assert "corrupt header" in row[5] and not row[1].any()


def test_prepare_filters_named_flag_bits_and_keeps_missing_labels(tmp_path):
    """prepare_dataset(flags=, keep_missing=): counted flag cuts, NaN labels stored as NaN."""
    from cannon_fast.apogee.prepare import prepare_dataset

    stars, allstar, cont = _prepare_inputs(tmp_path)
    t = fitsio.read(str(allstar))
    t = np.lib.recfunctions.append_fields(t, "ASPCAPFLAG", np.array([0, 0, 0, 1 << 23], np.int64),
                                          usemask=False)
    t["LOGG"][0] = np.nan
    fitsio.write(str(allstar), t, clobber=True)
    res = prepare_dataset(stars, allstar, tmp_path / "s", cont, labels=("TEFF", "LOGG", "FE_H"),
                          flags=("STAR_BAD",), keep_missing=True)
    assert list(res.store.ids) == ["2M1"] and np.isnan(res.store.labels[0, 1])
    assert res.store.meta["cut_report"]["STAR_BAD"] == 1
    assert res.store.meta["cut_report"]["no_labels"] == 0


def test_prepare_takes_the_continuum_a_model_recorded(tmp_path, capsys):
    """Prepare --model: the store is normalized with the model's continuum pixels and degree."""
    from cannon_fast import CannonModel
    from cannon_fast.cli import main
    from cannon_fast.core.continuum import record_continuum
    from cannon_fast.store import SpectraStore

    stars, allstar, cont = _prepare_inputs(tmp_path)
    rng = np.random.default_rng(0)
    labels = rng.normal(size=(12, 2))
    flux = 1 + 0.01 * rng.normal(size=(12, NPIX))
    model = CannonModel(["TEFF", "LOGG"], order=1).train(flux, np.full_like(flux, 1e4), labels)
    model.write(tmp_path / "bare.npz")
    record_continuum(model, cont, degree=2)
    model.write(tmp_path / "m.npz")
    args = ["prepare", "-q", "--apstar", str(stars), "--allstar", str(allstar),
            "--labels", "TEFF,LOGG,FE_H"]
    assert main(args + ["--model", str(tmp_path / "m.npz"), "--out", str(tmp_path / "s")]) == 0
    meta = SpectraStore(tmp_path / "s").meta
    assert meta["continuum_pixels"] == np.flatnonzero(cont).tolist()
    assert meta["continuum_degree"] == 2
    capsys.readouterr()
    assert main(args + ["--model", str(tmp_path / "bare.npz"), "--out", str(tmp_path / "t")]) == 1
    assert "records no continuum pixels" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
