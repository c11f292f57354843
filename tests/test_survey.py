"""Survey runner: chunked labeling, resuming, refusals, bad inputs, apStar visits, the CLI."""
import errno
import json
import os

import fitsio
import numpy as np
import pytest

from cannon_fast import CannonModel
from cannon_fast import survey as sv
from cannon_fast.cli import main
from cannon_fast.apogee.files import CHIP_RANGES, NPIX
from cannon_fast.core.backends import available_backends
from cannon_fast.store import SpectraStore
from cannon_fast.testing import make_synthetic

LABEL_COLS = ("TEFF", "LOGG", "FE_H")


@pytest.fixture(scope="module")
def small():
    """Train a model (P = 200) on 300 stars; keep 700 other stars of the same set."""
    s = make_synthetic(n_stars=1000, n_pix=200, n_labels=3, seed=7)
    model = CannonModel(s.label_names, backend="numba", grid=s.grid).train(
        s.flux[:300], s.ivar[:300], s.labels[:300])
    return model, s.flux[300:], s.ivar[300:], s.labels[300:]


@pytest.fixture
def npz(tmp_path, small):
    _, flux, ivar, _ = small
    path = tmp_path / "survey.npz"
    ids = np.array([f"STAR{i:04d}" for i in range(len(flux))])
    np.savez(path, flux=flux.astype(np.float32), ivar=ivar.astype(np.float32), ids=ids)
    return path


def _labels(path):
    t = sv.read_catalog(path)
    return t, {k: np.asarray(t[k]) for k in t.colnames}


def test_npz_labels_match_a_direct_fit(tmp_path, small, npz):
    model, flux, ivar, truth = small
    out = tmp_path / "cat.fits"
    s = sv.label_survey(model, npz, out, chunk_size=256)
    assert (s.n_read, s.n_spectra, s.n_chunks, s.n_resumed) == (700, 700, 3, 0)
    assert s.n_fitted + s.n_failed == 700 and s.n_failed == 0
    assert not os.path.exists(f"{out}.parts")  # merged and cleaned up
    t, c = _labels(out)
    direct = model.fit(flux.astype(np.float32), ivar.astype(np.float32))
    # other batches than the direct fit: the fit's float32 products round differently
    for i, name in enumerate(LABEL_COLS):
        np.testing.assert_allclose(c[name], direct.labels[:, i], rtol=1e-6)
        np.testing.assert_allclose(c[name + "_ERR"], direct.errors[:, i], rtol=1e-6)
    np.testing.assert_allclose(c["COV_TEFF_LOGG"], direct.covariance[:, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(c["CHI2"], direct.chi2, rtol=1e-6)
    assert np.mean(c["FLAGS"] == direct.flags) > 0.99  # a threshold flag may flip
    assert list(c["ID"][:2]) == ["STAR0000", "STAR0001"]
    np.testing.assert_array_equal(c["INDEX"], np.arange(700))
    meta = t.meta["cannon_fast"]
    assert meta["model_hash"] == sv.model_hash(model) == c["MODEL_HASH"][0]
    assert meta["counts"]["n_read"] == 700 and meta["label_names"] == list(LABEL_COLS)
    assert fitsio.read_header(str(out), ext=1)["MODELHSH"] == sv.model_hash(model)
    # the labels are right, not only self-consistent
    assert np.median(np.abs(c["TEFF"] - truth[:, 0]) / c["TEFF_ERR"]) < 1.5


def test_store_input_and_parquet_output_agree(tmp_path, small, npz):
    pytest.importorskip("pyarrow")
    model, flux, ivar, _ = small
    store = SpectraStore.write(tmp_path / "s.store", flux, ivar, np.arange(200.0),
                               ids=[f"STAR{i:04d}" for i in range(len(flux))])
    sv.label_survey(model, store.path, tmp_path / "a.parquet", chunk_size=300)
    sv.label_survey(model, npz, tmp_path / "b.fits", chunk_size=300)
    _, a = _labels(tmp_path / "a.parquet")
    _, b = _labels(tmp_path / "b.fits")
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert list(a[k]) == list(b[k]), k


class _DiskFillsUp:
    """A part writer that works ``n`` times, then fails as a full disk does."""

    def __init__(self, n):
        self.n = n
        self.real = sv.catalog._write_part

    def __call__(self, path, columns):
        if self.n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.n -= 1
        self.real(path, columns)


def test_full_disk_keeps_committed_chunks_and_resumes_identically(tmp_path, small, npz,
                                                                  monkeypatch):
    model = small[0]
    sv.label_survey(model, npz, tmp_path / "ref.fits", chunk_size=100)
    out = tmp_path / "cat.fits"
    monkeypatch.setattr(sv.catalog, "_write_part", _DiskFillsUp(3))
    with pytest.raises(sv.SurveyError, match=r"disk full .* 3 of 7 chunks are committed"):
        sv.label_survey(model, npz, out, chunk_size=100)
    parts = sorted(os.listdir(f"{out}.parts"))
    assert parts == ["chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz",
                     "manifest.json"]  # no half-written file left behind
    assert not out.exists()
    monkeypatch.undo()
    s = sv.label_survey(model, npz, out, chunk_size=100)
    assert (s.n_resumed, s.n_chunks, s.n_read) == (3, 7, 700)
    _, ref = _labels(tmp_path / "ref.fits")
    _, got = _labels(out)
    for k in ref:
        if ref[k].dtype.kind == "f":
            assert ref[k].tobytes() == got[k].tobytes(), k  # byte-identical


def test_refuses_other_model_and_other_options(tmp_path, small, npz, monkeypatch):
    model, flux, ivar, labels = small
    other = CannonModel(model.label_names, backend="numba").train(flux[:200], ivar[:200],
                                                                  labels[:200])
    out = tmp_path / "cat.fits"
    sv.label_survey(model, npz, out, chunk_size=300)
    with pytest.raises(sv.SurveyError, match="refusing to append.*holds labels from model "
                       + sv.model_hash(model)):
        sv.label_survey(other, npz, out)
    # a partial run made with another model or chunk size is not mixed with this one
    out2 = tmp_path / "cat2.fits"
    monkeypatch.setattr(sv.catalog, "_write_part", _DiskFillsUp(1))
    with pytest.raises(sv.SurveyError):
        sv.label_survey(model, npz, out2, chunk_size=100)
    monkeypatch.undo()
    with pytest.raises(sv.SurveyError, match="started with model"):
        sv.label_survey(other, npz, out2, chunk_size=100)
    with pytest.raises(sv.SurveyError, match="chunk_size: 100 then, 50 now"):
        sv.label_survey(model, npz, out2, chunk_size=50)


def test_appending_and_rerunning(tmp_path, small, npz):
    model, flux, ivar, _ = small
    out = tmp_path / "cat.fits"
    sv.label_survey(model, npz, out, chunk_size=300)
    more = tmp_path / "more.npz"
    np.savez(more, flux=flux[:50], ivar=ivar[:50])
    s = sv.label_survey(model, more, out)
    assert s.catalog_rows == 750 and s.n_read == 50
    t, c = _labels(out)
    assert len(t) == 750 and c["ID"][700] == "row0"  # IDs default to the row number
    np.testing.assert_allclose(c["TEFF"][700:], c["TEFF"][:50], rtol=1e-6)  # other batches
    assert t.meta["cannon_fast"]["counts"]["n_read"] == 750
    again = sv.label_survey(model, more, out)
    assert again.already_done and again.catalog_rows == 750 and again.n_read == 50


def test_several_npz_files_are_one_survey(tmp_path, small, npz):
    """A survey split over files: chunks straddle them, rows keep the files' order and IDs."""
    model, flux, ivar, _ = small
    parts = [(0, 250), (250, 260), (260, 700)]  # one file shorter than a chunk
    paths = []
    for k, (a, b) in enumerate(parts):
        paths.append(tmp_path / f"part{k}.npz")
        np.savez(paths[-1], flux=flux[a:b].astype(np.float32), ivar=ivar[a:b].astype(np.float32),
                 ids=np.array([f"STAR{i:04d}" for i in range(a, b)]))
    whole, split = tmp_path / "whole.fits", tmp_path / "split.fits"
    sv.label_survey(model, npz, whole, chunk_size=256)
    s = sv.label_survey(model, paths, split, chunk_size=256)
    assert (s.n_read, s.n_chunks) == (700, 3)
    (_, a), (_, b) = _labels(whole), _labels(split)
    np.testing.assert_array_equal(b["ID"], a["ID"])
    np.testing.assert_array_equal(b["INDEX"], np.arange(700))
    np.testing.assert_array_equal(b["TEFF"], a["TEFF"])  # the same chunks, the same fits
    again = sv.label_survey(model, paths, split, chunk_size=256)
    assert again.already_done  # the job knows its files
    # the same file twice, and files of different grids, are refused by name
    with pytest.raises(ValueError, match="part0.npz is given twice"):
        sv.label_survey(model, [paths[0], paths[1], str(paths[0])], tmp_path / "x.fits")
    np.savez(tmp_path / "other.npz", flux=flux[:5, :100], ivar=ivar[:5, :100])
    with pytest.raises(ValueError, match=r"other.npz \(5 x 100, normalized\) does not go with"):
        sv.label_survey(model, [paths[0], tmp_path / "other.npz"], tmp_path / "y.fits")
    np.savez(tmp_path / "masked.npz", flux=flux[:5].astype(np.float32),
             ivar=ivar[:5].astype(np.float32), bitmask=np.zeros((5, flux.shape[1]), np.uint16),
             normalized=True)
    with pytest.raises(ValueError, match="masked.npz has bitmask and .*part0.npz has none"):
        sv.label_survey(model, [paths[0], tmp_path / "masked.npz"], tmp_path / "z.fits")


def test_rerun_with_other_options_is_refused_or_forced(tmp_path, small, npz, capsys):
    """The same inputs with other options never add a second set of rows; --force replaces."""
    model = small[0]
    out = tmp_path / "cat.fits"
    sv.label_survey(model, npz, out, chunk_size=350)
    before = out.read_bytes()
    with pytest.raises(sv.SurveyError, match=r"already holds these inputs labeled with other "
                       r"options \(chunk_size: 350 then, 100 now\).*another --out.*--force"):
        sv.label_survey(model, npz, out, chunk_size=100)
    with pytest.raises(sv.SurveyError, match=r"fit.debias: True then, False now"):
        sv.label_survey(model, npz, out, chunk_size=350, fit_options=dict(debias=False))
    assert out.read_bytes() == before and not os.path.exists(f"{out}.parts")
    assert sv.label_survey(model, npz, out, chunk_size=350).already_done   # identical: no-op
    s = sv.label_survey(model, npz, out, chunk_size=100, fit_options=dict(debias=False),
                        force=True)
    t, c = _labels(out)
    assert s.catalog_rows == 700 and len(t) == 700       # replaced, not appended
    assert [j["chunk_size"] for j in t.meta["cannon_fast"]["jobs"]] == [100]
    mpath = tmp_path / "model.npz"
    model.write(mpath)
    assert main(["label", str(mpath), str(npz), "--out", str(out), "-q", "--backend", "numba",
                 "--chunk-size", "100"]) == 1
    err = capsys.readouterr().err
    assert "fit.debias: False then, True now" in err and len(err.strip().splitlines()) == 1
    assert len(sv.read_catalog(out)) == 700
    # other inputs are appended only when measured the same way
    more = tmp_path / "more.npz"
    np.savez(more, flux=small[1][:20], ivar=small[2][:20])
    with pytest.raises(sv.SurveyError, match=r"holds labels measured with other options "
                       r"\(fit.debias: False then, True now\).*--force"):
        sv.label_survey(model, more, out)
    assert len(sv.read_catalog(out)) == 700
    assert sv.label_survey(model, more, out, chunk_size=7,
                           fit_options=dict(debias=False)).catalog_rows == 720
    s = sv.label_survey(model, more, out, force=True)   # replaced by this job alone
    assert s.catalog_rows == 20 and len(sv.read_catalog(out)) == 20


def test_bad_grid_and_visits_of_arrays(tmp_path, small):
    model, flux, ivar, _ = small
    path = tmp_path / "short.npz"
    np.savez(path, flux=flux[:10, :150], ivar=ivar[:10, :150])
    with pytest.raises(ValueError, match="trained on 200 pixels but the input spectra have 150"):
        sv.label_survey(model, path, tmp_path / "x.fits")
    with pytest.raises(ValueError, match="only available from apStar files"):
        sv.label_survey(model, path, tmp_path / "x.fits", visits=True)
    assert not os.path.exists(tmp_path / "x.fits.parts")


def test_unfittable_star_is_kept_with_a_reason(tmp_path, small):
    model, flux, ivar, _ = small
    iv = ivar[:20].copy()
    iv[5] = 0.0
    fl = flux[:20].copy()
    fl[7, :50] = np.nan  # NaN flux where ivar > 0: those pixels are dropped, not the star
    path = tmp_path / "holes.npz"
    np.savez(path, flux=fl, ivar=iv)
    s = sv.label_survey(model, path, tmp_path / "c.fits")
    assert (s.n_read, s.n_failed) == (20, 1)
    assert s.failures[0][0] == "row5" and "TOO_FEW_PIXELS" in s.failures[0][1]
    _, c = _labels(tmp_path / "c.fits")
    assert np.isnan(c["TEFF"][5]) and c["FLAGS"][5] & sv.ALL_FLAGS["TOO_FEW_PIXELS"]
    assert "0 usable pixels" in c["REASON"][5] and c["REASON"][4] == ""
    assert np.isfinite(c["TEFF"][7]) and c["N_PIXELS"][7] <= c["N_PIXELS"][8] - 45


# ---------------------------------------------------------------------------- raw spectra
@pytest.fixture(scope="module")
def full_grid():
    """Train a 2-label model on the 8575-pixel grid; return it, continuum pixels, stars."""
    s = make_synthetic(n_stars=160, n_pix=NPIX, n_labels=2, seed=3, snr=(150.0, 200.0))
    model = CannonModel(s.label_names, backend="numba").train(s.flux[:120], s.ivar[:120],
                                                              s.labels[:120])
    cont = (s.coeffs[:, 0] < 1e-3) & (s.s2_true == 0)  # the flat pixels of make_synthetic
    return model, cont, s


def _continuum(n, seed):
    """Draw a smooth positive per-chip continuum, (n, 8575)."""
    rng = np.random.default_rng(seed)
    c = np.ones((n, NPIX))
    for a, b in CHIP_RANGES:
        u = np.linspace(-1, 1, b - a)
        coef = rng.uniform([800, -100, -40], [1200, 100, 40], (n, 3))
        c[:, a:b] = coef[:, :1] + coef[:, 1:2] * u + coef[:, 2:3] * (2 * u * u - 1)
    return c


def test_raw_npz_is_masked_and_normalized(tmp_path, full_grid):
    model, cont, s = full_grid
    flux, ivar = s.flux[120:], s.ivar[120:]
    c = _continuum(len(flux), 1)
    bm = np.zeros(flux.shape, np.uint16)
    raw = flux * c
    raw[:, 4000:4010] = 1e6  # garbage at pixels the PIXMASK flags as bad (bit 0)
    bm[:, 4000:4010] = 1
    bm[:, 5000:5010] = 1 << 9  # a harmless bit (PERSIST_HIGH): not masked by default
    path = tmp_path / "raw.npz"
    np.savez(path, flux=raw.astype(np.float32), ivar=(ivar / c ** 2).astype(np.float32),
             bitmask=bm)
    s1 = sv.label_survey(model, path, tmp_path / "raw.fits", continuum_pixels=cont)
    assert s1.n_failed == 0
    _, got = _labels(tmp_path / "raw.fits")
    # the flagged pixels are ignored: the same spectra without the garbage give the same labels
    clean = tmp_path / "clean.npz"
    np.savez(clean, flux=(flux * c).astype(np.float32),
             ivar=(ivar / c ** 2).astype(np.float32), bitmask=bm)
    sv.label_survey(model, clean, tmp_path / "clean.fits", continuum_pixels=cont)
    _, same = _labels(tmp_path / "clean.fits")
    for name in model.label_names:
        np.testing.assert_array_equal(got[name], same[name])
    # and close to the labels of the truly normalized spectra (the continuum pixels of
    # make_synthetic lie up to 0.1 % below 1, which biases the normalization slightly)
    norm = tmp_path / "norm.npz"
    np.savez(norm, flux=flux.astype(np.float32), ivar=ivar.astype(np.float32))
    sv.label_survey(model, norm, tmp_path / "norm.fits")
    _, ref = _labels(tmp_path / "norm.fits")
    np.testing.assert_allclose(got["TEFF"], ref["TEFF"], rtol=0.01)
    np.testing.assert_allclose(got["LOGG"], ref["LOGG"], atol=0.05)


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_raw_chunks_label_as_the_masking_then_normalizing_pipeline(tmp_path, full_grid,
                                                                   backend):
    """One pass over raw chunks labels as masking a copy, normalizing and cleaning it did.

    One pass: the bitmask read by the normalization, spectra viewed in the file, buffers
    kept from chunk to chunk. Bit for bit, with every kind of bad pixel: flagged bits
    (one bit beyond what a uint16 holds is asked for), NaN flux, infinite and negative
    ivar, and a finite float32 ivar so large that its normalized value overflows to inf
    (the fit refuses the slice, which is then cleaned). Chunks of 17 rows: the last one
    is shorter than the kept buffers.
    """
    from cannon_fast.apogee.bitmask import bit_value
    from cannon_fast.core.continuum import normalize
    from cannon_fast.survey.chunk import _fittable, _mask_raw

    if backend not in available_backends():
        pytest.skip(f"backend {backend} not available")
    model, cont, s = full_grid
    flux, ivar = s.flux[120:], s.ivar[120:]
    n = len(flux)
    c = _continuum(n, 2)
    rng = np.random.default_rng(4)
    raw = (flux * c).astype(np.float32)
    riv = (ivar / c ** 2).astype(np.float32)
    bm = rng.choice(np.array([0, 0, 0, 1, 1 << 9, 1 << 12], np.uint16), size=raw.shape)
    raw[3, 5000:5005] = np.nan
    riv[4, 6000:6003] = np.inf
    riv[5, 7000:7003] = -1.0
    on_line = np.flatnonzero(~cont & (np.arange(NPIX) > 4000) & (np.arange(NPIX) < 6000))[:2]
    riv[6, on_line] = 3e38  # finite, but x continuum² overflows float32
    bm[6, on_line] = 0
    path = tmp_path / "raw.npz"
    np.savez(path, flux=raw, ivar=riv, bitmask=bm)
    bits = bit_value([0, 12]) | (1 << 20)
    m = CannonModel.read(_write_model(model, tmp_path), backend=backend)
    sv.label_survey(m, path, tmp_path / "cat.fits", continuum_pixels=cont, chunk_size=17,
                    bad_bits=[0, 12])
    _, got = _labels(tmp_path / "cat.fits")
    # the pipeline before, chunk by chunk (the fit's float32 products depend on the
    # batch): a masked copy, normalized, cleaned, fitted
    f, v = raw.copy(), riv.copy()
    _mask_raw(f, v, bm, bits)
    ns = normalize(f, v, cont, backend=backend)
    assert not np.all(np.isfinite(ns.ivar[6]))  # the overflow is there
    want = [m.fit(*_fittable(ns.flux[a:a + 17], ns.ivar[a:a + 17], np.ones(17, bool)[:n - a]),
                  progress_bar=False) for a in range(0, n, 17)]
    assert np.all(np.isfinite(got["TEFF"]))
    for i, name in enumerate(model.label_names):
        np.testing.assert_array_equal(got[name], np.concatenate([w.labels[:, i] for w in want]))
        np.testing.assert_array_equal(got[name + "_ERR"],
                                      np.concatenate([w.errors[:, i] for w in want]))
    np.testing.assert_array_equal(got["CHI2"], np.concatenate([w.chi2 for w in want]))
    np.testing.assert_array_equal(got["CONTINUUM_FLAGS"], ns.flags)


def _write_model(model, tmp_path):
    path = tmp_path / "model.npz"
    if not path.exists():
        model.write(path)
    return path


def _three_apstar_stars(root, s, continuum_seed):
    """Stars 140-142 of ``s`` (noise-free, S/N 250) as apStar files under ROOT/apo25m/F1."""
    d = root / "apo25m" / "F1"
    d.mkdir(parents=True)
    c = _continuum(3, continuum_seed)
    ids = [f"2M0000000{i}+0000000" for i in range(3)]
    for i, sid in enumerate(ids):
        _write_apstar(d / f"apStar-dr17-{sid}.fits", s.true_flux[140 + i] * c[i],
                      0.004 * c[i], nvis=1, apogee_id=sid, seed=i)
    return ids


def _write_apstar(path, flux, err, nvis, apogee_id, seed):
    """Write a minimal DR17-like apStar: combined, global-weighted, ``nvis`` visit rows."""
    rng = np.random.default_rng(seed)
    rows = 2 + nvis if nvis > 1 else 2
    f = np.zeros((rows, NPIX), np.float32)
    e = np.zeros((rows, NPIX), np.float32)
    f[0], e[0] = flux, err
    f[1], e[1] = flux, err
    for v in range(nvis if nvis > 1 else 0):
        f[2 + v] = flux + err * np.sqrt(nvis) * rng.standard_normal(NPIX)
        e[2 + v] = err * np.sqrt(nvis)
    pm = np.zeros((rows, NPIX), np.int32)
    hdr = {"OBJID": apogee_id, "NVISITS": nvis, "SNR": 150.0, "CRVAL1": 4.179,
           "CDELT1": 6e-6, "NWAVE": NPIX}
    for v in range(1, nvis + 1):
        hdr.update({f"SFILE{v}": f"apVisit-dr17-1234-5900{v}-{100 + v:03d}.fits",
                    f"JD{v}": 2459000.5 + v, f"FIBER{v}": 100 + v})
    with fitsio.FITS(str(path), "rw", clobber=True) as fh:
        fh.write(None, header=[{"name": k, "value": v} for k, v in hdr.items()])
        for a in (f, e, pm):
            fh.write(a)


def test_apstar_files_visits_and_bad_files(tmp_path, full_grid):
    model, cont, s = full_grid
    d = tmp_path / "stars"
    d.mkdir()
    c = _continuum(3, 2)
    paths = []
    for i in range(3):
        sid = f"2M0000000{i}+0000000"
        p = d / f"apStar-dr17-{sid}.fits"
        flux = s.true_flux[130 + i] * c[i]
        err = 0.004 * c[i]
        _write_apstar(p, flux, err, nvis=2 if i < 2 else 1, apogee_id=sid, seed=i)
        paths.append(p)
    broken = d / "apStar-dr17-2M99999999+9999999.fits"
    broken.write_bytes(paths[0].read_bytes()[:5000])  # a truncated download
    listing = tmp_path / "list.txt"
    listing.write_text("stars/apStar-dr17-2M00000000+0000000.fits\n"
                       "stars/apStar-dr17-2M88888888+8888888.fits  # not downloaded\n")
    out = tmp_path / "visits.fits"
    summ = sv.label_survey(model, [listing, paths[1], paths[2], broken], out, visits=True,
                           continuum_pixels=cont)
    assert (summ.n_read, summ.n_failed) == (5, 2)
    assert summ.n_spectra == 3 + 2 + 3 + 2  # combined + visits (the 1-visit star: itself)
    _, t = _labels(out)
    why = dict(zip(t["ID"], t["REASON"]))
    assert "not found" in why["2M88888888+8888888"]
    assert "truncated" in why["2M99999999+9999999"]
    failed = (t["FLAGS"] & sv.SURVEY_FLAGS["READ_FAILED"]) != 0
    assert failed.sum() == 2 and np.all(np.isnan(t["TEFF"][failed]))
    first = t["ID"] == "2M00000000+0000000"
    np.testing.assert_array_equal(t["VISIT"][first], [0, 1, 2])
    assert list(t["VISIT_FILE"][first]) == ["", "apVisit-dr17-1234-59001-101.fits",
                                            "apVisit-dr17-1234-59002-102.fits"]
    np.testing.assert_array_equal(t["VISIT_FIBER"][first], [-1, 101, 102])
    # the combined spectra recover the true labels (to the small bias of normalizing on
    # make_synthetic's not-quite-flat continuum pixels); the visits scatter around them
    comb = (t["VISIT"] == 0) & ~failed
    truth = s.labels[[130, 131, 132]]
    np.testing.assert_allclose(t["TEFF"][comb], truth[:, 0], rtol=0.01)
    np.testing.assert_allclose(t["LOGG"][comb], truth[:, 1], atol=0.05)
    vis = (t["VISIT"] > 0) & ~failed & (t["ID"] != "2M00000002+0000000")
    assert np.all(np.abs(t["TEFF"][vis] - np.repeat(t["TEFF"][comb][:2], 2))
                  < 5 * t["TEFF_ERR"][vis])


# ---------------------------------------------------------------------------- CLI
def test_cli_label(tmp_path, small, npz, capsys):
    model = small[0]
    mpath = tmp_path / "model.npz"
    model.write(mpath)
    out = tmp_path / "cat.fits"
    assert main(["label", str(mpath), str(npz), "--out", str(out), "--chunk-size", "350",
                 "--backend", "numba", "-q"]) == 0
    text = capsys.readouterr().out
    assert "read 700 stars (700 spectra): fitted 700" in text and "2 chunks" in text
    other = CannonModel(model.label_names, backend="numba").train(
        small[1][:200], small[2][:200], small[3][:200])
    opath = tmp_path / "other.npz"
    other.write(opath)
    assert main(["label", str(opath), str(npz), "--out", str(out), "-q",
                 "--backend", "numba"]) == 1
    assert "refusing to append" in capsys.readouterr().err
    broad = tmp_path / "broad.fits"
    assert main(["label", str(mpath), str(npz), "--out", str(broad), "--broadening", "-q",
                 "--backend", "numba"]) == 0
    _, c = _labels(broad)
    assert np.isfinite(c["BROADENING"]).mean() > 0.99 and np.all(c["BROADENING_ERR"][
        np.isfinite(c["BROADENING"])] > 0)


def test_cli_quiet_leaves_the_environment_alone(tmp_path, small, npz, capsys, monkeypatch):
    from cannon_fast import _util

    mpath = tmp_path / "model.npz"
    small[0].write(mpath)
    monkeypatch.setenv("CANNON_FAST_PROGRESS", "1")  # bars on, even off a terminal
    env = dict(os.environ)
    args = ["label", str(mpath), str(npz), "--chunk-size", "350", "--backend", "numba"]
    assert main(args + ["--out", str(tmp_path / "loud.fits")]) == 0
    assert "star/s" in capsys.readouterr().err  # a progress bar
    assert main(args + ["--out", str(tmp_path / "quiet.fits"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "fitted 700" in captured.out
    assert dict(os.environ) == env and not _util._QUIET  # -q held for that command only


def test_cli_help_states_the_memory_bound(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "memory is bounded by it" in text and "0.85 GB" in text


def test_model_hash_tracks_coefficients(small):
    model = small[0]
    h = sv.model_hash(model)
    theta = model.theta.copy()
    model.theta[0, 0] += 1e-12
    try:
        assert sv.model_hash(model) != h
    finally:
        model.theta[:] = theta
    assert sv.model_hash(model) == h


def test_catalog_records_the_job(tmp_path, small, npz):
    sv.label_survey(small[0], npz, tmp_path / "c.fits", chunk_size=700)
    with fitsio.FITS(str(tmp_path / "c.fits")) as fh:
        meta = json.loads(fh["JOBS"].read().tobytes().decode())
    assert meta["jobs"][0]["chunk_size"] == 700
    assert meta["flags"]["READ_FAILED"] == 1 << 16
    assert set(meta["flags"].values()) >= {1, 2, 4, 8, 16, 128, 256, 1 << 16, 1 << 17, 1 << 18}


def test_fittable_spectra_copied_only_where_they_need_cleaning():
    """Clean spectra go to the fit as they are, spoiled ones are cleaned in a copy.

    Spoiled: non-finite values, negative ivar or an unusable row (weight 0, flux 1).
    """
    from cannon_fast.survey.chunk import _fittable
    rng = np.random.default_rng(0)
    f = rng.normal(1, 0.1, (4, 50)).astype(np.float32)
    v = rng.uniform(0, 100, (4, 50)).astype(np.float32)
    v[:, ::7] = 0.0
    usable = np.ones(4, bool)
    f2, v2 = _fittable(f, v, usable)
    assert f2 is f and v2 is v
    for spoil in ("nan_flux", "inf_ivar", "negative", "unusable"):
        fb, vb, ub = f.copy(), v.copy(), usable.copy()
        if spoil == "nan_flux":
            fb[1, 3] = np.nan
        elif spoil == "inf_ivar":
            vb[2, 4] = np.inf
        elif spoil == "negative":
            vb[0, 5] = -1.0
        else:
            ub[3] = False
        f2, v2 = _fittable(fb, vb, ub)
        ok = ub[:, None] & np.isfinite(fb) & np.isfinite(vb) & (vb > 0)
        np.testing.assert_array_equal(f2, np.where(ok, fb, 1.0))
        np.testing.assert_array_equal(v2, np.where(ok, vb, 0.0))
        assert np.all(np.isfinite(f2)) and np.all(v2 >= 0) and np.all(v2 < np.inf)


def test_flag_bits_are_distinct():
    from cannon_fast.core.fitting import FLAGS

    assert len(set(sv.ALL_FLAGS.values())) == len(sv.ALL_FLAGS)
    assert min(sv.SURVEY_FLAGS.values()) > max(FLAGS.values())


def test_process_pool_gives_the_same_catalog(tmp_path, small, npz):
    model = small[0]
    threads = _thread_settings()
    sv.label_survey(model, npz, tmp_path / "one.fits", chunk_size=100)
    s = sv.label_survey(model, npz, tmp_path / "pool.fits", chunk_size=100,
                        scheduler="processes", n_workers=2)
    assert _thread_settings() == threads  # the workers limit their own threads, not ours
    assert (s.n_read, s.n_chunks) == (700, 7)
    _, a = _labels(tmp_path / "one.fits")
    _, b = _labels(tmp_path / "pool.fits")
    for k in a:
        if a[k].dtype.kind == "f":
            assert a[k].tobytes() == b[k].tobytes(), k


def test_raw_spectra_use_the_models_continuum_record(tmp_path, full_grid):
    from cannon_fast.core.continuum import record_continuum
    model, cont, s = full_grid
    flux, ivar = s.flux[120:130], s.ivar[120:130]
    c = _continuum(len(flux), 5)
    path = tmp_path / "raw.npz"
    np.savez(path, flux=(flux * c).astype(np.float32), ivar=(ivar / c ** 2).astype(np.float32))
    sv.label_survey(model, path, tmp_path / "given.fits", continuum_pixels=cont)
    _, given = _labels(tmp_path / "given.fits")
    model.write(tmp_path / "m.npz")
    recorded = record_continuum(CannonModel.read(tmp_path / "m.npz", backend="numba"), cont)
    lines = []
    sv.label_survey(recorded, path, tmp_path / "rec.fits", log=lines.append)
    _, got = _labels(tmp_path / "rec.fits")
    assert any("the model's record" in line for line in lines), lines
    for name in model.label_names:  # the same pixels, so the same labels
        np.testing.assert_array_equal(got[name], given[name])


def test_broadening_columns_match_a_direct_fit(tmp_path, small, npz):
    model, flux, ivar, _ = small
    out = tmp_path / "cat.fits"
    sv.label_survey(model, npz, out, chunk_size=256,
                    fit_options=dict(debias=False, broadening=True))
    _, c = _labels(out)
    direct = model.fit(flux.astype(np.float32), ivar.astype(np.float32), debias=False,
                       broadening=True)
    np.testing.assert_allclose(c["BROADENING"], direct.broadening, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c["BROADENING_ERR"], direct.broadening_error, rtol=1e-5)
    np.testing.assert_allclose(c["FE_H"], direct.labels[:, 2], rtol=1e-6)
    with pytest.raises(ValueError, match="pass debias=False too"):
        sv.label_survey(model, npz, tmp_path / "cat2.fits", fit_options=dict(broadening=True))
    assert not os.path.exists(tmp_path / "cat2.fits.parts")


# ---------------------------------------------------------------------------- thread limits
def _thread_settings():
    """numba's thread count (of this thread), the C extension's cap, the threadpool limits."""
    import numba
    from threadpoolctl import threadpool_info

    from cannon_fast.core import backends

    cap = None
    if backends._ccannon is not None:  # no getter: set_num_threads returns the cap it replaces
        cap = backends._ccannon.set_num_threads(0)
        backends._ccannon.set_num_threads(cap)
    return (numba.get_num_threads(), cap,
            sorted((info["filepath"], info["num_threads"]) for info in threadpool_info()))


@pytest.fixture
def c_thread_cap():
    """A C thread cap of 3 (not the 1 a chunk sets) for the test; the old one afterwards."""
    from cannon_fast.core import backends

    ext = backends._ccannon
    old = ext.set_num_threads(3) if ext is not None else None
    yield
    if ext is not None:
        ext.set_num_threads(old)


def test_thread_limits_are_put_back(small, npz, c_thread_cap):
    from cannon_fast.core.threads import limited_threads

    before = _thread_settings()
    with pytest.raises(KeyError):
        with limited_threads(1):
            n, cap, pools = _thread_settings()
            assert n == 1 and cap in (None, 1) and all(t == 1 for _, t in pools)
            raise KeyError("a chunk that fails")
    assert _thread_settings() == before
    # a chunk run in this process with n_threads (as on a Dask worker) leaves them as found
    model = small[0]
    source = sv.open_inputs(npz)
    options = dict(model_hash=sv.model_hash(model), degree=None, bad_bits=0, fit={},
                   backend=model.backend)
    limited = sv.process_chunk(model, source.chunk(0, 40), dict(options, n_threads=1))
    assert _thread_settings() == before
    plain = sv.process_chunk(model, source.chunk(0, 40), options)
    for k in plain:
        assert plain[k].tobytes() == limited[k].tobytes(), k


def test_fit_and_label_read_apstar_files_as_prepare_normalizes_them(tmp_path, full_grid,
                                                                    capsys):
    """The same labels from apStar files by fit, by label, and by prepare --model + fit."""
    from cannon_fast.core.continuum import record_continuum
    model, cont, s = full_grid
    mpath = tmp_path / "m.npz"
    record_continuum(model.__class__.read(_write(model, tmp_path / "bare.npz"),
                                          backend="numba"), cont, degree=3).write(mpath)
    ids = _three_apstar_stars(tmp_path / "stars", s, continuum_seed=7)
    cat = np.zeros(3, dtype=[("APOGEE_ID", "S20"), ("TELESCOPE", "S8"), ("FIELD", "S8"),
                             ("SNR", "f4"), ("TEFF", "f4"), ("LOGG", "f4"), ("FE_H", "f4")])
    cat["APOGEE_ID"], cat["TELESCOPE"], cat["FIELD"] = ids, "apo25m", "F1"
    cat["SNR"], cat["TEFF"], cat["LOGG"], cat["FE_H"] = 150, 4800, 2.5, 0.0
    fitsio.write(str(tmp_path / "allStar-dr17-x.fits"), cat)
    run = ["-q", "--backend", "numba"]
    assert main(["prepare", "--apstar", str(tmp_path / "stars"), "--allstar",
                 str(tmp_path / "allStar-dr17-x.fits"), "--labels", "TEFF,LOGG,FE_H", "--model",
                 str(mpath), "--out", str(tmp_path / "store")] + run) == 0
    assert main(["fit", str(tmp_path / "store"), "--model", str(mpath), "--out",
                 str(tmp_path / "from_store.fits")] + run) == 0
    assert main(["fit", str(tmp_path / "stars"), "--model", str(mpath), "--out",
                 str(tmp_path / "from_files.fits")] + run) == 0
    assert main(["label", "--model", str(mpath), str(tmp_path / "stars"), "--out",
                 str(tmp_path / "cat.fits")] + run) == 0
    from astropy.table import Table
    a, b = Table.read(tmp_path / "from_store.fits"), Table.read(tmp_path / "from_files.fits")
    _, lab = _labels(tmp_path / "cat.fits")
    assert list(a["ID"]) == list(b["ID"]) == list(lab["ID"]) == ids
    for name in model.label_names:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_allclose(lab[name], a[name], rtol=1e-6)   # float32 catalogue
    np.testing.assert_allclose(a["TEFF"], s.labels[140:143, 0], rtol=0.01)
    # a file that cannot be read is named and skipped; nothing readable is an error
    capsys.readouterr()
    assert main(["fit", str(tmp_path / "nope.fits"), "--model", str(mpath), "--out",
                 str(tmp_path / "none.fits")] + run) == 1
    err = capsys.readouterr().err
    assert "nope.fits" in err and "not found" in err and not (tmp_path / "none.fits").exists()


def test_fit_with_an_emulator_reads_apstar_files(tmp_path, full_grid):
    """fit --model EMULATOR on apStar files: masked, normalized with continuum pixels picked
    from the emulator, and the labels of a direct fit to the noise-free normalized flux."""
    pytest.importorskip("torch")
    from astropy.table import Table

    from cannon_fast.core.continuum import continuum_pixels_from_model
    from cannon_fast.nn import train_emulator
    from cannon_fast.nn.fast_fit import fit_emulator
    _, cont, s = full_grid
    emu = train_emulator(s.flux[:120], s.ivar[:120], s.labels[:120], s.label_names,
                         hidden=(16, 16), epochs=120, batch_size=32, learning_rate=3e-3,
                         patience=20, seed=0)
    picked = continuum_pixels_from_model(emu)
    # the emulator's flat, label-insensitive pixels are mostly make_synthetic's flat ones
    # (as for the Cannon's pick on the same stars: about half, 4x their share of pixels)
    assert picked.sum() > 100 and cont[picked].mean() > 3 * cont.mean()
    epath = tmp_path / "emu.npz"
    emu.write(epath)
    ids = _three_apstar_stars(tmp_path / "stars", s, continuum_seed=8)
    np.save(tmp_path / "cont.npy", cont)
    for tag, extra in (("given", ["--continuum", str(tmp_path / "cont.npy")]), ("picked", [])):
        assert main(["fit", str(tmp_path / "stars"), "--model", str(epath), "--out",
                     str(tmp_path / f"{tag}.fits"), "-q"] + extra) == 0
    given, picked = Table.read(tmp_path / "given.fits"), Table.read(tmp_path / "picked.fits")
    assert list(given["ID"]) == list(picked["ID"]) == ids
    direct = fit_emulator(emu, s.true_flux[140:143], np.full((3, NPIX), 1e4))
    spread = s.labels.std(axis=0)
    for j, name in enumerate(s.label_names):
        # the true flat pixels give the direct fit's labels within the noise (S/N 250);
        # the picked ones, half of them lines, a pseudo-continuum a little low
        np.testing.assert_allclose(given[name], direct.labels[:, j], atol=0.06 * spread[j])
        np.testing.assert_allclose(picked[name], direct.labels[:, j], atol=0.15 * spread[j])
    # prepared-spectra options are still refused for a prepared input
    np.savez(tmp_path / "p.npz", flux=s.flux[140:143], ivar=s.ivar[140:143])
    assert main(["fit", str(tmp_path / "p.npz"), "--model", str(epath), "--continuum",
                 str(tmp_path / "c.txt"), "--out", str(tmp_path / "x.fits"), "-q"]) == 1


def _write(model, path):
    model.write(path)
    return path


_SLOW_READER = '''
import os, time
class SlowReader:
    def __init__(self, flag):
        self.flag = flag
    def read(self):
        with open(self.flag + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(self.flag + ".tmp", self.flag)
        time.sleep(120)
'''

_DRIVER = '''
import sys
from slowreader import SlowReader
from cannon_fast import CannonModel
from cannon_fast.survey.schedulers import run_chunks
from cannon_fast.testing import make_synthetic
s = make_synthetic(n_stars=30, n_pix=40, n_labels=2, seed=1)
model = CannonModel(s.label_names, backend="numpy").train(s.flux, s.ivar, s.labels)
run_chunks(model, [(0, SlowReader(sys.argv[1]))], {}, lambda k, c: None,
           scheduler="processes", n_workers=1)
'''


@pytest.mark.skipif(not os.path.exists("/proc"), reason="needs /proc to find the worker")
def test_pool_workers_end_when_the_driver_is_killed(tmp_path):
    """SIGKILL of the label driver leaves no worker running (each held a model and a chunk)."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "slowreader.py").write_text(_SLOW_READER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path)] + [p for p in sys.path if p]), OMP_NUM_THREADS="1")
    flag = tmp_path / "worker.pid"
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(flag)], env=env,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
        assert flag.exists(), "the worker never started its chunk"
        worker = int(flag.read_text())
        assert os.path.exists(f"/proc/{worker}")
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = _alive(worker)
        if alive:
            os.kill(worker, signal.SIGKILL)
        assert not alive, "the worker outlived its driver"
    finally:
        if driver.poll() is None:
            driver.kill()


def _alive(pid):
    """Whether ``pid`` runs (a zombie, reaped by init soon, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_python_and_command_line_jobs_share_one_vocabulary(tmp_path, small, npz, capsys):
    """label_survey's keywords are label's options: the same job either way, old names kept."""
    model = small[0]
    mpath = tmp_path / "model.npz"
    model.write(mpath)
    out = tmp_path / "cat.fits"
    sv.label_survey(CannonModel.read(mpath, backend="numba"), npz, out, chunk_size=350,
                    workers=1, format="fits", debias=False, backend="numba")
    capsys.readouterr()
    assert main(["label", "--model", str(mpath), str(npz), "--out", str(out), "--chunk-size",
                 "350", "--workers", "1", "--format", "fits", "--no-debias", "--backend",
                 "numba"]) == 0
    assert "already in the catalogue" in capsys.readouterr().out
    assert len(sv.read_catalog(out)) == 700
    with pytest.raises(TypeError, match="workers= or its older name n_workers="):
        sv.label_survey(model, npz, tmp_path / "x.fits", workers=1, n_workers=2)
    with pytest.raises(TypeError, match="debias=False and fit_options"):
        sv.label_survey(model, npz, tmp_path / "x.fits", debias=False,
                        fit_options=dict(debias=True))
    assert not (tmp_path / "x.fits").exists()


def test_bad_bits_apply_to_apstar_files(tmp_path, full_grid):
    """The --bad-bits of label mask apStar pixels too (they were masked with the default bits)."""
    model, cont, s = full_grid
    c = _continuum(1, 9)[0]
    sid = "2M00000001+0000000"
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    for d in (clean, dirty):
        d.mkdir()
        _write_apstar(d / f"apStar-dr17-{sid}.fits", s.true_flux[150] * c, 0.004 * c,
                      nvis=1, apogee_id=sid, seed=0)
    with fitsio.FITS(str(dirty / f"apStar-dr17-{sid}.fits"), "rw") as fh:
        flux, pm = fh[1].read(), fh[3].read()
        flux[:, 5000:5040] *= 3.0        # garbage where PIXMASK bit 9 (PERSIST_HIGH) is set
        pm[:, 5000:5040] = 1 << 9
        fh[1].write(flux)
        fh[3].write(pm)
    bits = list(range(8)) + [9, 12]
    lab = {}
    for name, d, b in (("clean", clean, bits), ("default", dirty, None), ("bits", dirty, bits)):
        sv.label_survey(model, d, tmp_path / f"{name}.fits", continuum=cont, bad_bits=b)
        lab[name] = _labels(tmp_path / f"{name}.fits")[1]["TEFF"]
    assert lab["default"][0] != lab["clean"][0]          # bit 9 is not masked by default
    masked = sv.read_normalized(model, dirty, continuum=cont, bad_bits=bits)
    assert np.all(masked["ivar"][0, 5000:5040] == 0)
    np.testing.assert_allclose(lab["bits"], lab["clean"], rtol=1e-4)


def test_binary_columns_with_a_secondary_model(tmp_path, small, npz, monkeypatch):
    """Label with --binaries and a secondary model: the columns a direct screen gives.

    The secondary model is part of the job's identity; one for other pixels is refused.
    """
    from cannon_fast.core.binaries import screen_binaries

    model, flux, ivar, _ = small
    # (the fixture's family of spectra, another training set: a model with its own hash)
    d = make_synthetic(n_stars=1000, n_pix=200, n_labels=3, seed=7)
    dwarfs = CannonModel(d.label_names, backend="numba", grid=d.grid).train(
        d.flux[300:], d.ivar[300:], d.labels[300:])
    # 60 of the stars get a companion, 30 % of the light, 30 km/s away
    wave = model.grid.wavelength
    f32, v32 = flux.astype(np.float32), ivar.astype(np.float32)
    for k in range(60):
        s2 = np.interp(wave / (1 + 30.0 / 299792.458), wave, dwarfs.predict(d.labels[k]))
        f32[k] = 0.7 * f32[k] + 0.3 * s2
    npz = tmp_path / "binaries.npz"
    np.savez(npz, flux=f32, ivar=v32, ids=np.array([f"STAR{i:04d}" for i in range(len(f32))]))
    out = tmp_path / "cat.fits"
    sv.label_survey(model, npz, out, chunk_size=700, binaries=dwarfs)   # one chunk
    _, c = _labels(out)
    scr = screen_binaries(model, f32, v32, model.fit(f32, v32).labels, secondary_model=dwarfs)
    assert scr.flagged[:60].mean() > 0.5 and scr.flagged[60:].mean() < 0.05
    np.testing.assert_array_equal(c["BINARY_FLAG"], scr.flagged)
    np.testing.assert_allclose(c["BINARY_DELTA_CHI2"], scr.delta_chi2, rtol=1e-4)
    np.testing.assert_allclose(c["BINARY_PRIMARY_TEFF"], scr.primary_labels[:, 0], rtol=1e-5)
    # the same inputs screened with the model's own secondaries are another job
    with pytest.raises(sv.SurveyError, match="binaries"):
        sv.label_survey(model, npz, out, chunk_size=700, binaries=True)
    # and so is a job of another version of the screen: no catalogue holds rows of both
    import cannon_fast.core.binaries as cb

    monkeypatch.setattr(cb, "SCREEN_VERSION", cb.SCREEN_VERSION + 1)
    with pytest.raises(sv.SurveyError, match="binary_screen"):
        sv.label_survey(model, npz, out, chunk_size=700, binaries=dwarfs)
    wide = make_synthetic(n_stars=100, n_pix=150, n_labels=3, seed=9)
    other_pixels = CannonModel(wide.label_names, grid=wide.grid).train(wide.flux, wide.ivar,
                                                                       wide.labels)
    with pytest.raises(ValueError, match="150.*200"):
        sv.label_survey(model, npz, tmp_path / "x.fits", binaries=other_pixels)
