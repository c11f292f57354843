"""Pseudo-continuum normalization: numba vs numpy reference, exact recovery, flags, inputs."""
import numpy as np
import pytest

from cannon_fast.core import continuum as cn
from cannon_fast.core._reference.continuum import continuum_normalize as ref_kernel
from cannon_fast.apogee.files import CHIP_RANGES, NPIX, chip_of_pixel, read_apstar


def _synthetic(n=40, seed=1, degree=3, noise=0.0):
    """Line spectra equal to 1 at 'continuum' pixels times a random per-chip polynomial."""
    rng = np.random.default_rng(seed)
    chip = chip_of_pixel()
    basis, _ = cn.chebyshev_basis(degree)
    cont_pix = np.zeros(NPIX, bool)
    cont_pix[rng.choice(np.flatnonzero(chip >= 0), 600, replace=False)] = True
    labels = rng.uniform(-1, 1, (n, 2))
    depth = rng.uniform(0.03, 0.3, NPIX)
    depth[cont_pix] = 0.0
    a, b = rng.normal(0, 0.3, NPIX), rng.normal(0, 0.3, NPIX)
    norm = 1 - depth * (1 + a * labels[:, :1] + b * labels[:, 1:])      # (N, P)
    coef = rng.normal(0, 0.05, (n, 3, degree + 1))
    coef[:, :, 0] = rng.uniform(300, 2000, (n, 3))
    coef[:, :, 1:] *= coef[:, :, :1]
    cont = np.zeros((n, NPIX))
    for c in range(3):
        on = chip == c
        cont[:, on] = coef[:, c] @ basis[on].T
    flux = norm * cont
    with np.errstate(divide="ignore"):
        ivar = np.where(chip >= 0, 1.0 / (0.01 * cont) ** 2, 0.0)
    if noise:
        flux = flux + rng.normal(0, 1, flux.shape) * noise * cont
    return flux, ivar, cont_pix, norm, cont, labels


def test_chebyshev_basis():
    basis, chip = cn.chebyshev_basis(2)
    a, b = CHIP_RANGES[1]
    np.testing.assert_allclose(basis[a], [1, -1, 1])
    np.testing.assert_allclose(basis[b - 1], [1, 1, 1])
    mid = (a + b - 1) // 2  # the chip's centre pixel (its width b - 1 - a is even): x = 0
    np.testing.assert_allclose(basis[mid], [1, 0, -1], atol=1e-15)
    x = 2 * (np.arange(a, b) - a) / (b - 1 - a) - 1
    np.testing.assert_allclose(basis[a:b, 2], 2 * x ** 2 - 1)
    assert (basis[chip < 0] == 0).all()
    with pytest.raises(ValueError, match="degree must be 0-7"):
        cn.chebyshev_basis(9)


def test_exact_recovery_noiseless():
    flux, ivar, cp, norm, cont, _ = _synthetic()
    ns = cn.normalize(flux, ivar, cp, degree=3, dtype=np.float64, keep_continuum=True)
    on = chip_of_pixel() >= 0
    np.testing.assert_allclose(ns.continuum[:, on], cont[:, on], rtol=1e-9)
    np.testing.assert_allclose(ns.flux[:, on], norm[:, on], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ns.ivar[:, on], ivar[:, on] * cont[:, on] ** 2, rtol=1e-9)
    assert (ns.flux[:, ~on] == 1).all() and (ns.ivar[:, ~on] == 0).all()
    assert (ns.flags == 0).all()


def _with_trouble():
    flux, ivar, cp, *_ = _synthetic(n=12, noise=0.01)
    chip = chip_of_pixel()
    ivar[0, chip == 1] = 0                                   # missing green chip
    ivar[1, np.flatnonzero(cp & (chip == 2))[5:]] = 0         # too few red continuum pixels
    ivar[2, ::2] = 0                                          # half the pixels bad
    flux[3, 1000:1100] = np.nan                               # NaNs with ivar > 0
    ivar[4, 2000:2050] = np.inf
    flux[5, chip == 0] = -flux[5, chip == 0]                  # negative continuum
    ivar[6] = 0                                               # nothing at all
    return flux, ivar, cp


def ref_normalize(flux, ivar, basis, chip, is_cont, n_chips, min_pixels):
    """The reference kernel with its outputs allocated: flux, ivar, continuum, status."""
    n, p = flux.shape
    out = (np.empty((n, p)), np.empty((n, p)), np.empty((n, p)), np.empty((n, n_chips), np.int64))
    ref_kernel(flux, ivar, basis, chip, is_cont, n_chips, min_pixels, *out)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_matches_reference(dtype):
    flux, ivar, cp = _with_trouble()
    basis, chip = cn.chebyshev_basis(3)
    ref = ref_normalize(flux, ivar, basis, chip, cp.astype(np.uint8), 3, 16)
    ns = cn.normalize(flux.astype(dtype), ivar.astype(dtype), cp, degree=3, min_pixels=16,
                      backend="numba", dtype=dtype, keep_continuum=True)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(ns.chip_status, ref[3])
    np.testing.assert_allclose(ns.flux, ref[0], **tol)
    np.testing.assert_allclose(ns.continuum, ref[2], **tol)
    np.testing.assert_allclose(ns.ivar / ref[1].max(), ref[1] / ref[1].max(), **tol)
    npy = cn.normalize(flux, ivar, cp, degree=3, min_pixels=16, backend="numpy",
                       dtype=np.float64)
    np.testing.assert_array_equal(npy.flags, ns.flags)


def test_flags_for_trouble():
    flux, ivar, cp = _with_trouble()
    ns = cn.normalize(flux, ivar, cp, degree=3, min_pixels=16, dtype=np.float64)
    F = cn.CONTINUUM_FLAGS
    assert ns.flags[0] == F["MISSING_CHIP_GREEN"] and ns.flag_names(0) == ["MISSING_CHIP_GREEN"]
    assert ns.flags[1] == F["FEW_CONTINUUM_PIXELS"]
    assert ns.flags[2] == 0 and ns.flags[3] == 0 and ns.flags[4] == 0
    assert ns.flags[5] == F["BAD_CONTINUUM_FIT"]
    assert ns.flags[6] == 7
    chip = chip_of_pixel()
    assert (ns.ivar[0, chip == 1] == 0).all() and (ns.ivar[0, chip == 0] > 0).any()
    assert (ns.ivar[3, 1000:1100] == 0).all() and np.isfinite(ns.flux).all()
    assert (ns.ivar[4, 2000:2050] == 0).all() and np.isfinite(ns.ivar).all()
    # the star with half its pixels bad still normalizes like its clean self
    clean = cn.normalize(*_synthetic(n=12, noise=0.01)[:3], degree=3, dtype=np.float64)
    good = ns.ivar[2] > 0
    assert np.median(np.abs(ns.flux[2, good] - clean.flux[2, good])) < 2e-3
    with pytest.raises(ValueError, match="only 3 continuum pixels on segment 0"):
        cn.normalize(flux, ivar, [300, 301, 302, 8000])


def test_real_spectra_normalize_smoothly(shared_dir):
    real = shared_dir / "data" / "real"
    cp = cn.load_continuum_pixels(real / "lab2" / "cannon_continuum_apogee.npz")
    files = [real / "apogee_dr17" / "apStar-dr17-2M17335483-2753043.fits",
             real / "apogee_dr17" / "apStar-dr17-2M19485057+5005279.fits",
             real / "lab2" / "mystery_spec_wiped.fits"]
    masked = [read_apstar(f).masked() for f in files]
    ns = cn.normalize(np.array([m[0] for m in masked]), np.array([m[1] for m in masked]), cp)
    assert (ns.flags == 0).all()
    for s in range(3):
        for a, b in CHIP_RANGES:
            sel = cp.copy()
            sel[:a] = sel[b:] = False
            sel &= ns.ivar[s] > 0
            idx = np.flatnonzero(sel)
            # continuum pixels sit at 1, also at both chip ends (no edge wiggles)
            assert abs(np.median(ns.flux[s, idx]) - 1) < 0.01
            for end in (idx[:25], idx[-25:]):
                assert abs(np.median(ns.flux[s, end]) - 1) < 0.03
    # the lab's normalized mystery spectrum: lines below 1, nothing crazy
    g = ns.ivar[2] > 0
    assert 0.85 < np.median(ns.flux[2, g]) < 1.0 and np.percentile(ns.flux[2, g], 99.9) < 1.2


def test_load_continuum_pixel_formats(shared_dir, tmp_path):
    m = shared_dir / "data" / "real" / "masks"
    lab = cn.load_continuum_pixels(shared_dir / "data" / "real" / "lab2" /
                                   "cannon_continuum_apogee.npz")
    assert lab.shape == (NPIX,) and lab.sum() == 529
    # the same 529 pixels on the 7214 grid (mask) and on the 7514 grid (.npy)
    np.testing.assert_array_equal(cn.load_continuum_pixels(m / "cannon_cont_pixels_apogee.npz"),
                                  lab)
    np.testing.assert_array_equal(cn.load_continuum_pixels(m / "dr14_contmask.npy"), lab)
    assert cn.load_continuum_pixels(m / "dr17_contmask.npy").sum() == 532
    idx = cn.load_continuum_pixels(m / "contpix.txt")
    assert idx.sum() == 460
    np.testing.assert_array_equal(cn.load_continuum_pixels(m / "contpix_lambda.txt"), idx)
    reg = cn.load_continuum_pixels(m / "continuum-regions.list")
    assert 300 < reg.sum() < 3000
    np.save(tmp_path / "i.npy", np.array([0, 10, 7213]))
    with pytest.raises(ValueError, match="i.npy: integer pixel indices are ambiguous"):
        cn.load_continuum_pixels(tmp_path / "i.npy")
    np.testing.assert_array_equal(np.flatnonzero(cn.load_continuum_pixels(tmp_path / "i.npy",
                                                                          grid=7214)),
                                  [322, 332, 8305])
    np.savez(tmp_path / "w.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="no continuum pixel array"):
        cn.load_continuum_pixels(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        cn.load_continuum_pixels(tmp_path / "none.npz")
    np.testing.assert_array_equal(
        np.flatnonzero(cn.load_continuum_pixels([[15100.0, 15101.0]])),
        np.flatnonzero((10 ** (4.179 + 6e-6 * np.arange(NPIX)) >= 15100)
                       & (10 ** (4.179 + 6e-6 * np.arange(NPIX)) <= 15101)))


class _LinearModel:
    """Stand-in with the CannonModel training API (linear in scaled labels)."""

    def __init__(self, n_labels=2):
        self.n_labels = n_labels

    def train(self, flux, ivar, labels):
        x = (labels - labels.mean(0)) / labels.std(0)
        X = np.column_stack([np.ones(len(x)), x])
        self.theta = np.linalg.lstsq(X, flux, rcond=None)[0].T
        return self


def test_continuum_pixels_from_model_and_iteration():
    flux, ivar, cp, norm, cont, labels = _synthetic(n=80, noise=0.002)
    m = _LinearModel().train(norm, ivar, labels)
    pick = cn.continuum_pixels_from_model(m, fraction=0.05)
    assert pick.sum() > 300 and (pick & cp).sum() / pick.sum() > 0.95
    m.pixel_flags = np.zeros(NPIX, np.uint8)
    m.pixel_flags[np.flatnonzero(pick)[:10]] = 1
    assert not (cn.continuum_pixels_from_model(m, fraction=0.05) & (m.pixel_flags > 0)).any()
    found, hist = cn.find_continuum_pixels(flux, ivar, labels, _LinearModel, n_iter=4,
                                           fraction=0.05)
    assert (found & cp).sum() / found.sum() > 0.9
    assert len(hist) >= 2 and hist[-1] <= hist[0]
    ns = cn.normalize(flux, ivar, found, dtype=np.float64)
    on = ns.ivar > 0
    assert np.median(np.abs(ns.flux[on] - norm[on])) < 0.01


def test_model_keeps_its_continuum_record(tmp_path):
    from cannon_fast import CannonModel
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=60, n_pix=NPIX, n_labels=2, seed=4)
    model = CannonModel(s.label_names, backend="numba")
    chosen = np.zeros(NPIX, bool)
    chosen[np.random.default_rng(0).choice(NPIX, 400, replace=False)] = True
    with pytest.raises(ValueError, match="after training"):
        cn.record_continuum(model, chosen)
    model.train(s.flux, s.ivar, s.labels)
    picked, degree, source = cn.model_continuum(model)  # no record: picked, the default degree
    np.testing.assert_array_equal(picked, cn.continuum_pixels_from_model(model))
    assert degree == cn.DEFAULT_DEGREE and "no record" in source
    cn.record_continuum(model, chosen, degree=2)
    model.write(tmp_path / "m.fits")
    got, degree, source = cn.model_continuum(CannonModel.read(tmp_path / "m.fits"))
    np.testing.assert_array_equal(got, chosen)
    assert degree == 2 and "record (400 pixels, degree 2)" in source
    # a user's pixels override the record; the degree stays the record's
    other = ~chosen
    got, degree, source = cn.model_continuum(model, other)
    np.testing.assert_array_equal(got, other)
    assert degree == 2 and source == f"given ({int(other.sum())} pixels, degree 2)"


def test_picking_continuum_pixels_needs_theta_or_a_jacobian():
    """A model with neither theta nor predict_with_jacobian gets a message saying what to give."""
    from types import SimpleNamespace

    from cannon_fast.core.continuum import continuum_pixels_from_model
    with pytest.raises(ValueError, match="give the continuum pixels instead"):
        continuum_pixels_from_model(SimpleNamespace(label_names=["A"], training_labels=None))


def test_bitmask_and_out_buffers():
    """``bitmask`` leaves out flagged pixels as ivar = 0 would; ``out`` is written in place."""
    flux, ivar, cp, _, _, _ = _synthetic(n=6, noise=0.01)
    flux, ivar = flux.astype(np.float32), ivar.astype(np.float32)
    rng = np.random.default_rng(3)
    bm = rng.choice(np.array([0, 0, 2, 8], np.int16), size=flux.shape)
    want = cn.normalize(flux, np.where((bm & 2) != 0, 0, ivar), cp)
    out = (np.full(flux.shape, np.nan, np.float32), np.full(flux.shape, np.nan, np.float32))
    got = cn.normalize(flux, ivar, cp, bitmask=bm, bad_bits=2, out=out)
    assert got.flux is out[0] and got.ivar is out[1]
    np.testing.assert_array_equal(got.flux, want.flux)
    np.testing.assert_array_equal(got.ivar, want.ivar)
    np.testing.assert_array_equal(got.flags, want.flags)
    # a big-endian bitmask (an npz from another machine) and a boolean one
    for other, bits in ((bm.astype(">i2"), 2), ((bm & 2) != 0, 1)):
        again = cn.normalize(flux, ivar, cp, bitmask=other, bad_bits=bits)
        np.testing.assert_array_equal(again.ivar, want.ivar)
    with pytest.raises(ValueError, match="out arrays must be C-contiguous"):
        cn.normalize(flux, ivar, cp, out=(out[0][:, :100], out[1]))
    with pytest.raises(ValueError, match="bitmask float64"):
        cn.normalize(flux, ivar, cp, bitmask=bm.astype(float), bad_bits=2)
