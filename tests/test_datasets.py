"""The embedded demo survey: physics, learnability, files, parity with DR17, caching."""
import os

import fitsio
import numpy as np
import pytest

from cannon_fast.apogee.lines import air_to_vacuum, line_list
from cannon_fast import demo as ds
from cannon_fast.demo.spectra import DV_PIX

REAL = ("apStar-dr17-2M17335483-2753043.fits", "apStar-dr17-2M19485057+5005279.fits")


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A small multi-visit survey with binaries and duplicates, generated once."""
    root = tmp_path_factory.mktemp("demo") / "survey"
    return ds.make_demo_survey(root, n_stars=40, seed=3, binary_fraction=0.2,
                               duplicate_fraction=0.05, progress=False)


def _files(paths):
    tab = fitsio.read(paths.allstar, columns=["APOGEE_ID", "FIELD"])
    return [paths.apstar_path(a.strip().decode() if isinstance(a, bytes) else a.strip(),
                              f.strip().decode() if isinstance(f, bytes) else f.strip())
            for a, f in zip(tab["APOGEE_ID"], tab["FIELD"])]


# ----------------------------------------------------------------------------- physics
def test_air_to_vacuum_known_value():
    # the Mg I 15765.842 Å (air) line lies at 15770.15 Å in vacuum
    assert air_to_vacuum(15765.842) == pytest.approx(15770.15, abs=0.03)
    with pytest.raises(ValueError):
        air_to_vacuum(1.5765)


def test_wavelength_grid():
    w = ds.apstar_wavelength()
    assert w.shape == (8575,)
    assert w[0] == pytest.approx(10 ** 4.179)
    np.testing.assert_allclose(np.diff(np.log10(w)), 6e-6, rtol=1e-6)


def test_line_list_contents():
    lines = line_list()
    assert 300 <= len(lines) <= 2000
    assert np.all(np.diff(lines["wavelength"]) >= 0)
    assert lines["wavelength"].min() > 15000 and lines["wavelength"].max() < 17100
    species = set(lines["species"])
    for sp in ("Fe I", "Mg I", "Si I", "Al I", "Ca I", "Ti I", "K I", "Mn I", "Ni I", "C I",
               "CO", "OH", "CN"):
        assert sp in species, sp
    # CO second-overtone band heads: the bluest CO line of each band sits at its head
    co = np.sort(lines["wavelength"][lines["species"] == "CO"])
    for head in (15581.0, 15780.0, 15978.0, 16185.0, 16400.0, 16610.0):
        assert np.min(np.abs(co - head)) < 1.0
    # Mg and Si lines respond to their own abundance labels only
    mg, si = lines[lines["species"] == "Mg I"], lines[lines["species"] == "Si I"]
    assert np.all(mg["c_mgfe"] > 0) and np.all(mg["c_sife"] == 0)
    assert np.all(si["c_sife"] > 0) and np.all(si["c_mgfe"] == 0)


REF = np.array([4600.0, 2.4, -0.1, 0.08, 0.06])


def _depth(labels, species):
    """Sum of line depths at the pixels of one species' lines."""
    w = ds.apstar_wavelength()
    lines = line_list()
    centres = lines["wavelength"][(lines["species"] == species) & (lines["kind"] == "atom")]
    pix = np.unique(np.searchsorted(w, centres))
    return (1 - ds.synthesize_spectra(labels))[..., pix].sum(axis=-1)


@pytest.mark.parametrize("species", ["Fe I", "Mg I", "Si I", "Al I", "Ti I"])
def test_line_depth_responses(species):
    def shifted(k, dx):
        lab = REF.copy()
        lab[k] += dx
        return lab

    base = _depth(REF, species)
    assert base > 0.05
    # metal lines deepen with [Fe/H] and weaken with Teff (ionization + excitation)
    assert _depth(shifted(2, 0.2), species) > base
    assert _depth(shifted(0, 200.0), species) < base
    mg_up, si_up = _depth(shifted(3, 0.1), species), _depth(shifted(4, 0.1), species)
    # each abundance label moves its own lines; other species move only through blends
    if species == "Mg I":
        assert mg_up > base * 1.01 and si_up == pytest.approx(base, rel=3e-3)
    elif species == "Si I":
        assert si_up > base * 1.01 and mg_up == pytest.approx(base, rel=3e-3)
    elif species == "Fe I":
        assert mg_up == pytest.approx(base, rel=3e-3) and si_up == pytest.approx(base, rel=3e-3)


def test_molecules_stronger_in_cool_giants():
    lines = line_list()
    w = ds.apstar_wavelength()
    cool, warm = np.array([4000.0, 1.2, 0.0, 0.05, 0.03]), np.array([5000.0, 3.0, 0.0, 0.05, 0.03])
    f = ds.synthesize_spectra(np.vstack([cool, warm]))
    for sp in ("CO", "OH", "CN"):
        pix = np.unique(np.searchsorted(w, lines["wavelength"][lines["species"] == sp]))
        pix = pix[(pix > 0) & (pix < len(w))]
        assert (1 - f[0, pix]).mean() > 1.5 * (1 - f[1, pix]).mean(), sp
    # C I (majority-neutral carbon) goes the other way: stronger in warmer stars
    ci = np.unique(np.searchsorted(w, lines["wavelength"][lines["species"] == "C I"]))
    assert (1 - f[1, ci]).sum() > (1 - f[0, ci]).sum()


def test_resolution_and_velocity():
    w = ds.apstar_wavelength()
    f_lo = ds.synthesize_spectra(REF, resolution=10000.0)
    f_hi = ds.synthesize_spectra(REF)
    assert f_lo.min() > f_hi.min()          # a broader LSF makes lines shallower
    # equivalent width is conserved by the convolution (flux is pixel integrated)
    ew_lo, ew_hi = np.sum(1 - f_lo), np.sum(1 - f_hi)
    assert ew_lo == pytest.approx(ew_hi, rel=2e-3)
    shifted = ds.synthesize_spectra(REF, velocity=DV_PIX * 3)
    np.testing.assert_allclose(shifted[3003:6000], f_hi[3000:5997], atol=2e-3)
    sub = ds.synthesize_spectra(REF, wavelength=w[1000:1200])
    np.testing.assert_allclose(sub, f_hi[1000:1200], atol=1e-6)


def test_synthesize_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ds.synthesize_spectra(np.ones((3, 4)))
    with pytest.raises(ValueError, match="TEFF"):
        ds.synthesize_spectra([2.4, 4600.0, 0, 0, 0])
    with pytest.raises(ValueError, match="wavelength"):
        ds.synthesize_spectra(REF, wavelength=[5000.0, 5001.0])
    with pytest.raises(ValueError, match="finite"):
        ds.synthesize_spectra([np.nan, 2.4, 0, 0, 0])


def _design(x):
    iu = np.triu_indices(x.shape[1])
    return np.hstack([np.ones((len(x), 1)), x, (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]])


def test_survey_is_learnable_by_a_quadratic_model():
    labels, pop = ds.sample_labels(700, seed=11)
    lo, hi = ds.GIANT_LABEL_RANGE.T
    giants = np.all((labels >= lo) & (labels <= hi), axis=1) & np.isin(pop, ["rgb", "red_clump"])
    labels = labels[giants][:400]
    assert len(labels) > 300
    flux = ds.synthesize_spectra(labels)
    x = (labels - labels.mean(0)) / labels.std(0)
    design = _design(x)
    coeffs = np.linalg.lstsq(design, flux, rcond=None)[0]
    resid = flux - design @ coeffs
    assert np.sqrt(np.mean(resid ** 2)) < 0.003
    # and the spectra carry real information: lines tens of percent deep that vary
    assert flux.min() < 0.6
    assert np.median(flux.std(axis=0)[flux.mean(axis=0) < 0.9]) > 0.01


def test_continuum_mask():
    mask = ds.continuum_mask()
    assert mask.shape == (8575,)
    assert 300 < mask.sum() < 4000
    for lo, hi in ds.CHIP_PIXELS:       # every chip has continuum pixels; gaps never do
        assert mask[lo:hi + 1].sum() > 100
    assert not mask[: ds.CHIP_PIXELS[0][0]].any()
    flux = ds.synthesize_spectra([[3980.0, 1.1, 0.35, 0.0, 0.0], [5100.0, 3.2, -0.8, 0.3, 0.2],
                                  [4700.0, 2.4, 0.0, 0.05, 0.05]])
    assert np.all(flux[:, mask] > 1 - 0.003)
    assert (flux[:, ~mask] < 1 - 0.003).mean() > 0.3


def test_sample_labels_population():
    labels, pop = ds.sample_labels(3000, seed=0)
    teff, logg, feh, mgfe, _ = labels.T
    giants = np.isin(pop, ["rgb", "red_clump"])
    assert giants.mean() > 0.75
    assert np.median(feh) == pytest.approx(-0.15, abs=0.15)
    assert (feh < -1).mean() > 0.02                 # a metal-poor tail for the cuts
    # alpha-enhanced at low metallicity
    assert np.median(mgfe[feh < -0.7]) > np.median(mgfe[feh > 0]) + 0.1
    # giant branch: cooler at lower gravity
    rgb = pop == "rgb"
    assert np.corrcoef(teff[rgb], logg[rgb])[0, 1] > 0.6
    with pytest.raises(ValueError):
        ds.sample_labels(0)


def test_old_module_path_re_exports_the_same_objects():
    import cannon_fast.apogee.lines
    import cannon_fast.core.grid as grid
    from cannon_fast.demo import datasets

    assert sorted(datasets.__all__) == sorted(ds.__all__)
    for name in ds.__all__:
        assert getattr(datasets, name) is getattr(ds, name), name
    # defined once: the line list in apogee/, the apStar grid in core/
    assert datasets.line_list is cannon_fast.apogee.lines.line_list
    assert datasets.air_to_vacuum is cannon_fast.apogee.lines.air_to_vacuum
    assert (datasets.NPIX, datasets.CRVAL1, datasets.CDELT1) == (
        grid.APSTAR_NPIX, grid.APSTAR_CRVAL1, grid.APSTAR_CDELT1)
    assert datasets.DV_PIX == DV_PIX


# ----------------------------------------------------------------------------- files
def test_layout_and_catalog(survey):
    assert os.path.isfile(survey.allstar) and os.path.isfile(survey.truth)
    assert survey.allstar.endswith(os.path.join("dr17", "apogee", "spectro", "aspcap", "dr17",
                                                "synspec_rev1", "allStar-dr17-synspec_rev1.fits"))
    files = _files(survey)
    assert len(files) == 40 and all(os.path.isfile(f) for f in files)
    assert all(os.sep + os.path.join("stars", "apo25m") + os.sep in f for f in files)
    cat = fitsio.read(survey.allstar)
    truth = fitsio.read(survey.truth)
    for col in ("APOGEE_ID", "TELESCOPE", "FIELD", "SNR", "ASPCAPFLAG", "STARFLAG", "EXTRATARG",
                "TEFF", "TEFF_ERR", "TEFF_FLAG", "LOGG", "FE_H", "FE_H_ERR", "MG_FE", "SI_FE",
                "SI_FE_ERR"):
        assert col in cat.dtype.names, col
    assert cat["TEFF"].dtype.kind == "f" and cat["TEFF"].dtype.itemsize == 4
    np.testing.assert_array_equal(cat["APOGEE_ID"], truth["APOGEE_ID"])
    # duplicates share an APOGEE_ID, live in another field, and one of them is flagged
    dup = truth["DUPLICATE_OF"] >= 0
    assert dup.sum() == 2
    for j in np.flatnonzero(dup):
        k = truth["DUPLICATE_OF"][j]
        assert cat["APOGEE_ID"][j] == cat["APOGEE_ID"][k] and cat["FIELD"][j] != cat["FIELD"][k]
        assert ((cat["EXTRATARG"][[j, k]] & 16) > 0).sum() == 1
    # catalog = truth + modest errors where present
    ok = np.isfinite(cat["TEFF"])
    assert np.abs(cat["TEFF"][ok] - truth["TEFF"][ok]).max() < 400
    assert truth["IS_BINARY"].sum() > 0
    b = truth["IS_BINARY"]
    assert np.all(truth["LIGHT_RATIO"][b] > 0) and np.all(np.isnan(truth["LIGHT_RATIO"][~b]))


def test_header_and_hdu_parity_with_real_dr17(survey, shared_dir):
    from astropy.io import fits

    real_dir = shared_dir / "data" / "real" / "apogee_dr17"
    real = {}
    for name in REAL:
        with fitsio.FITS(str(real_dir / name)) as f:
            real[f[0].read_header()["NVISITS"] == 1] = [
                (h.get_exttype(), set(h.read_header().keys()) - {"COMMENT", "HISTORY"})
                for h in f]
    truth = fitsio.read(survey.truth)
    files = _files(survey)
    picks = [int(np.flatnonzero(truth["NVISITS"] == 1)[0]), int(np.argmax(truth["NVISITS"]))]
    for i in picks:
        nv = int(truth["NVISITS"][i])
        with fitsio.FITS(files[i]) as f:
            assert len(f) == 11
            ref = real[nv == 1]
            for k, h in enumerate(f):
                exttype, keys = ref[k]
                assert h.get_exttype() == exttype
                mine = set(h.read_header().keys()) - {"COMMENT", "HISTORY"}
                visit_keys = {key for key in keys | mine if key[-1].isdigit() and key[:-1] in (
                    "SFILE", "DATE", "JD", "FIBER", "BC", "VRAD", "VERR", "VHELIO", "SNRVIS",
                    "FLAG")}
                assert (keys - visit_keys) == (mine - visit_keys), (k, keys ^ mine)
            hdr = f[0].read_header()
            assert hdr["NVISITS"] == nv and f[9].get_nrows() == nv and f[10].get_nrows() == 1
            for key in range(1, nv + 1):
                assert f"VHELIO{key}" in hdr
            assert hdr["CRVAL1"] == 4.179 and hdr["CDELT1"] == 6e-6 and hdr["NWAVE"] == 8575
            flux, err, mask = f[1].read(), f[2].read(), f[3].read()
            # DR17 rows: one-visit files hold (combined, zeros); else combined x2 + visits
            assert flux.shape == ((2, 8575) if nv == 1 else (nv + 2, 8575))
            assert flux.dtype == np.float32 and mask.dtype.kind == "i"
            assert f[1].read_header()["BUNIT"].startswith("Flux (10^-17")
        with fits.open(files[i]) as h:   # astropy reads it too, with the same numbers
            np.testing.assert_array_equal(h[1].data, flux)
            assert isinstance(h[0].header["H"], float)
            assert h[9].data["ccf"].shape == (nv, 765)


def test_spectra_content(survey):
    truth = fitsio.read(survey.truth)
    files = _files(survey)
    i = int(np.argmax(truth["NVISITS"]))
    flux, err, mask = (fitsio.read(files[i], ext=k) for k in (1, 2, 3))
    hdr = fitsio.read_header(files[i], 0)
    nv = hdr["NVISITS"]
    comb = flux[0]
    # chip gaps: NaN in the combined rows, zeros in the visit rows, never flagged
    assert np.isnan(comb[:150]).all() and np.isnan(comb[3400:3480]).all()
    assert np.all(flux[2:, :150] == 0) and np.all(mask[:, :150] == 0)
    inside = np.isfinite(comb)
    assert 7600 < inside.sum() < 8300     # the real 3-visit DR17 file has 7791
    # flagged bad pixels carry huge errors; SIG_SKYLINE (bit 12) pixels exist
    huge = (mask[2:] & 0b1111) > 0
    assert huge.any() and np.all(err[2:][huge] > 1e6)
    assert ((mask & (1 << 12)) > 0).any()
    # the header S/N is the median flux/err of the good combined pixels
    good = inside & ((mask[0] & 0xFF) == 0)
    assert np.median(comb[good] / err[0][good]) == pytest.approx(hdr["SNR"], rel=1e-5)
    # the combined row is the inverse-variance mean of the visits
    vis, ev = flux[2:2 + nv].astype(float), err[2:2 + nv].astype(float)
    pix = np.flatnonzero(good & np.all(ev > 0, axis=0))[::97]
    w = 1 / ev[:, pix] ** 2
    vis = vis[:, pix]
    np.testing.assert_allclose(comb[pix], (w * vis).sum(0) / w.sum(0), rtol=1e-4)
    # continuum-normalized combined flux follows the noise-free model to the noise level
    model = ds.synthesize_spectra([truth[k][i] for k in ds.LABEL_NAMES],
                                  vmacro=None)
    ratio = comb[good] / model[good]
    rel = (ratio / np.median(ratio))
    assert 0.7 < np.percentile(rel, 5) and np.percentile(rel, 95) < 1.3
    # per-chip continuum levels are blackbody x response, in 1e-17 erg/s/cm^2/Å units
    assert 10 < np.median(comb[good]) < 1e5


def test_seeded_reproducibility(tmp_path, survey):
    a = ds.make_demo_survey(tmp_path / "a", n_stars=6, seed=5, progress=False)
    b = ds.make_demo_survey(tmp_path / "b", n_stars=6, seed=5, progress=False)
    c = ds.make_demo_survey(tmp_path / "c", n_stars=6, seed=6, progress=False, workers=2)
    for fa, fb in zip(_files(a), _files(b)):
        for k in (1, 2, 3, 4, 6, 9):
            np.testing.assert_array_equal(fitsio.read(fa, ext=k), fitsio.read(fb, ext=k))
    for path_a, path_b in ((a.allstar, b.allstar), (a.truth, b.truth)):
        ta, tb = fitsio.read(path_a), fitsio.read(path_b)
        for name in ta.dtype.names:   # field by field: NaN == NaN here
            np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert not np.array_equal(fitsio.read(a.truth)["TEFF"], fitsio.read(c.truth)["TEFF"])


def test_workers_do_not_change_the_files(tmp_path):
    # 24 stars: chunks of 6 stars with one worker, of 4 with two
    a = ds.make_demo_survey(tmp_path / "a", n_stars=24, seed=2, progress=False, workers=1)
    b = ds.make_demo_survey(tmp_path / "b", n_stars=24, seed=2, progress=False, workers=2)
    fa, fb = _files(a), _files(b)
    for k in (0, 5, 6, 23):
        np.testing.assert_array_equal(fitsio.read(fa[k], ext=1), fitsio.read(fb[k], ext=1))


def test_make_demo_survey_bad_input(tmp_path):
    with pytest.raises(ValueError, match="n_stars"):
        ds.make_demo_survey(tmp_path / "x", n_stars=0)
    with pytest.raises(ValueError, match="binary_fraction"):
        ds.make_demo_survey(tmp_path / "x", n_stars=3, binary_fraction=1.5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        ds.make_demo_survey(tmp_path / "full", n_stars=3)
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- cache
def test_cache_reused_and_incomplete_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("CANNON_FAST_CACHE", str(tmp_path / "cache"))
    p1 = ds.demo_survey(n_stars=5, seed=1, progress=False)
    assert p1.root == str(tmp_path / "cache" / "demo-survey-v1-seed1-n5")
    files = _files(p1) + [p1.allstar, p1.truth]
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    p2 = ds.demo_survey(n_stars=5, seed=1, progress=False)
    assert p2 == p1
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes
    # an interrupted generation (no completion marker) is thrown away and redone
    os.unlink(os.path.join(p1.root, "COMPLETE"))
    os.unlink(files[0])
    p3 = ds.demo_survey(n_stars=5, seed=1, progress=False)
    assert os.path.isfile(files[0]) and os.path.isfile(os.path.join(p3.root, "COMPLETE"))
    assert os.stat(p3.truth).st_mtime_ns != mtimes[p1.truth]
    # explicit cache_dir wins over the environment
    p4 = ds.demo_survey(cache_dir=tmp_path / "other", n_stars=5, seed=1, progress=False)
    assert p4.root.startswith(str(tmp_path / "other"))


def test_single_visit_float64_layout(tmp_path):
    paths = ds.make_demo_survey(tmp_path / "s", n_stars=4, seed=9, visits=False,
                                dtype="float64", progress=False)
    for f in _files(paths):
        with fitsio.FITS(f) as h:
            assert h[0].read_header()["NVISITS"] == 1
            assert h[1].read_header()["BITPIX"] == -64 and h[3].read_header()["BITPIX"] == 64
            flux = h[1].read()
            assert flux.shape == (2, 8575) and np.all(flux[1] == 0)   # as the real 1-visit file


def test_binaries_are_composite(tmp_path):
    paths = ds.make_demo_survey(tmp_path / "b", n_stars=12, seed=4, binary_fraction=1.0,
                                progress=False)
    truth = fitsio.read(paths.truth)
    assert truth["IS_BINARY"].all()
    assert np.all((truth["LIGHT_RATIO"] > 0) & (truth["LIGHT_RATIO"] < 1.5))
    assert np.all(truth["TEFF2"] > 3800) and np.all(truth["LOGG2"] > truth["LOGG"])
    nv = truth["NVISITS"]
    dv = truth["DV_VISITS"]
    assert np.all(np.isfinite(dv[np.arange(6)[None, :] < nv[:, None]]))
    assert np.all(np.isnan(dv[np.arange(6)[None, :] >= nv[:, None]]))
