"""APOGEE_PIXMASK decoding and bad-pixel masks."""
import numpy as np
import pytest

from cannon_fast.apogee import bitmask as bm
from cannon_fast.apogee.files import CHIP_RANGES, NPIX


def test_bit_names_match_data_model():
    assert bm.PIXMASK_BITS["BADPIX"] == 0 and bm.PIXMASK_BITS["NOT_ENOUGH_PSF"] == 14
    assert sorted(bm.PIXMASK_BITS.values()) == list(range(15))
    # default: bits 0-7 and 12
    assert bm.bit_value() == sum(1 << b for b in (0, 1, 2, 3, 4, 5, 6, 7, 12)) == 0x10FF


def test_bit_value_forms_and_errors():
    assert bm.bit_value(["CRPIX", 12]) == 2 | 4096
    assert bm.bit_value("badpix, SIG_SKYLINE") == 1 | 4096
    assert bm.bit_value("0,1") == 3
    assert bm.bit_value(5) == 5
    with pytest.raises(ValueError, match="unknown APOGEE_PIXMASK bit name 'NOPE'"):
        bm.bit_value(["NOPE"])
    with pytest.raises(ValueError, match="bit 15"):
        bm.bit_value([15])


def test_decode_round_trip():
    assert bm.decode(4097) == ["BADPIX", "SIG_SKYLINE"]
    assert bm.decode(0) == []
    assert bm.decode(1 << 16) == ["BIT16"]
    for v in (1, 6, 0x10FF, 0x7FFF):
        assert bm.bit_value(bm.decode(v)) == v


def test_bad_pixel_mask_hand_case():
    pm = np.array([0, 1, 1 << 8, 1 << 12, (1 << 9) | (1 << 3), 1 << 13])
    np.testing.assert_array_equal(bm.bad_pixel_mask(pm), [0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(bm.bad_pixel_mask(pm, ["LITTROW_GHOST"]), [0, 0, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="integers"):
        bm.bad_pixel_mask(np.array([0.5]))


def test_quality_mask_nonfinite_zero_error_and_gaps():
    rng = np.random.default_rng(0)
    flux = rng.uniform(100, 200, (2, NPIX))
    err = np.full((2, NPIX), 2.0)
    pm = np.zeros((2, NPIX), np.int64)
    flux[0, 1000] = np.nan
    err[0, 1001] = 0.0
    err[0, 1002] = np.inf
    err[1, 1003] = -1.0
    pm[1, 1004] = 1 << 1        # CRPIX: bad
    pm[1, 1005] = 1 << 9        # PERSIST_HIGH: not bad by default
    bad = bm.quality_mask(flux, err, pm)
    assert bad[0, 1000] and bad[0, 1001] and bad[0, 1002] and bad[1, 1003] and bad[1, 1004]
    assert not bad[1, 1005]
    gaps = np.ones(NPIX, bool)
    for a, b in CHIP_RANGES:
        gaps[a:b] = False
    assert bad[:, gaps].all()
    assert bad[:, ~gaps].sum() == 5
    assert not bm.quality_mask(flux, err, pm, chips=False)[:, gaps].any()


def test_mask_spectra_makes_bad_pixels_weightless():
    flux = np.array([[1.0, np.nan, 3.0, 4.0]])
    err = np.array([[0.5, 1.0, 0.0, 2.0]])
    pm = np.array([[0, 0, 0, 1]])
    f, ivar, bad = bm.mask_spectra(flux, err, pm)
    np.testing.assert_array_equal(bad, [[False, True, True, True]])
    np.testing.assert_array_equal(ivar, [[4.0, 0, 0, 0]])
    assert np.all(np.isfinite(f)) and f[0, 0] == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        bm.quality_mask(np.zeros(3), np.zeros(4))
