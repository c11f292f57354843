"""Quality cuts with per-cut counts, and the cross-match."""
import numpy as np
import pytest
from astropy.table import Table

from cannon_fast.apogee import catalog


def _table():
    # 10 stars, chosen so each cut has a known count (independent and sequential)
    t = Table()
    t["APOGEE_ID"] = [f"2M{i}" for i in range(10)]
    t["SNR"] = [100, 40, 80, 200, 60, 55, np.nan, 70, 49.9, 300]
    t["TEFF"] = [4800, 4700, 5800, 4500, np.nan, 4600, 4700, 4900, 4800, 6000]
    t["LOGG"] = [2.5, 2.4, 2.0, 4.2, 2.0, 2.6, 2.0, 1.5, 2.2, 4.5]
    t["FE_H"] = [0.0, -0.1, 0.1, -0.3, 0.0, -1.5, 0.0, -0.9, -1.2, -2.0]
    t["MG_FE"] = [0.1] * 10
    t["SI_FE"] = [0.05] * 9 + [np.nan]
    return t


def test_lab_cuts_counts():
    keep, rep = catalog.select(_table())
    # missing: 4 (TEFF nan), 9 (SI_FE nan)        -> fails 2, removed 2
    # low SNR: 1, 6 (nan), 8                        -> fails 3, removed 3
    # dwarf: 2 (TEFF), 3 (LOGG), 9                  -> fails 3, removed 2
    # metal poor: 5, 8, 9                           -> fails 3, removed 1 (5)
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 7])
    rows = {r["name"]: (r["fails"], r["removed"], r["remaining"]) for r in rep.rows}
    assert rows == {"missing_labels": (2, 2, 8), "low_snr": (3, 3, 5), "dwarf": (3, 2, 3),
                    "metal_poor": (3, 1, 2)}
    assert rep.n_input == 10 and rep.n_kept == 2
    assert rep.as_dict() == {"input": 10, "missing_labels": 2, "low_snr": 3, "dwarf": 2,
                             "metal_poor": 1, "kept": 2}
    text = str(rep)
    assert "SNR < 50" in text and "LOGG > 4 or TEFF > 5700" in text and "FE_H < -1" in text
    assert text.splitlines()[-1].split()[-1] == "2"


def test_configurable_thresholds_and_custom_cuts():
    keep, rep = catalog.select(_table(), snr_min=None, feh_min=-1.6, teff_max=None)
    assert [r["name"] for r in rep.rows] == ["missing_labels", "dwarf", "metal_poor"]
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 1, 2, 5, 6, 7, 8])
    cut = catalog.Cut("hot", "TEFF > 4750", lambda t: np.asarray(t["TEFF"]) > 4750, ("TEFF",))
    keep, rep = catalog.select(_table(), cuts=[cut])
    assert rep.rows[0]["removed"] == 5
    with pytest.raises(ValueError, match="either cuts= or threshold"):
        catalog.select(_table(), cuts=[cut], snr_min=3)


def test_too_few_and_missing_column():
    with pytest.raises(catalog.TooFewStarsError, match=r"only 2 of 10 stars(.|\n)*low_snr"):
        catalog.select(_table(), min_remaining=3)
    t = _table()
    del t["SNR"]
    t.meta["path"] = "allStar-test.fits"
    with pytest.raises(ValueError, match="allStar-test.fits lacks column.*SNR.*low_snr"):
        catalog.select(t)


def test_crossmatch():
    t = _table()
    rows, found, idx = catalog.crossmatch(t, ["2M3", "2Mx", "2M0"])
    np.testing.assert_array_equal(found, [True, False, True])
    assert list(rows["APOGEE_ID"]) == ["2M3", "2M0"] and idx[1] == -1


def test_flag_cuts_name_and_count_each_bit_and_missing_labels_can_be_kept():
    """AstroNN training filter: one counted cut per named bit; NaN labels kept on request."""
    from cannon_fast.apogee.bitmask import ASTRONN_TRAINING_FLAGS, flag_bit

    assert flag_bit("M_H_BAD") == ("ASPCAPFLAG", 19) and flag_bit("PROBLEM_TARGET")[1] == 40
    assert flag_bit("starflag:BRIGHT_NEIGHBOR") == ("STARFLAG", 2)
    assert flag_bit("ASPCAPFLAG:33") == ("ASPCAPFLAG", 33)
    with pytest.raises(ValueError, match="unknown flag name 'TELEPATHY'"):
        flag_bit("TELEPATHY")
    t = _table()
    bits = {0: 19, 1: 23, 2: 31, 3: 32, 5: 33, 6: 40}  # star -> the bit it carries
    t["ASPCAPFLAG"] = np.array([1 << bits.get(i, 0) if i in bits else 1 << 3 for i in range(10)],
                               np.int64)
    t["ASPCAPFLAG"][7] |= np.int64(1) << 19  # a second star with M_H_BAD
    t["STARFLAG"] = np.zeros(10, np.int64)
    t["STARFLAG"][9] = 1 << 2
    cuts = catalog.lab_cuts(snr_min=None, logg_max=None, teff_max=None, feh_min=None,
                            keep_missing=True,
                            flags=list(ASTRONN_TRAINING_FLAGS) + ["BRIGHT_NEIGHBOR"])
    t["TEFF"][4] = np.nan  # star 4 keeps its other labels
    for c in ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE"):
        t[c][8] = np.nan  # star 8 has none
    keep, rep = catalog.select(t, cuts=cuts)
    fails = {r["name"]: r["fails"] for r in rep.rows}
    assert fails == {"no_labels": 1, "M_H_BAD": 2, "STAR_BAD": 1, "NO_ASPCAP_RESULT": 1,
                     "MISSING_APSTAR": 1, "NO_GRID": 1, "PROBLEM_TARGET": 1,
                     "BRIGHT_NEIGHBOR": 1}
    np.testing.assert_array_equal(np.flatnonzero(keep), [4])  # its TEFF is missing
    t.remove_column("ASPCAPFLAG")
    with pytest.raises(ValueError, match="lacks column.* ASPCAPFLAG needed by cut 'M_H_BAD'"):
        catalog.select(t, cuts=cuts)


def test_companion_cuts_keep_the_dwarfs_and_hot_stars():
    """The stars a binary's secondary model is trained on: the lab's dwarfs, no giants."""
    keep, rep = catalog.select(_table(), cuts=catalog.companion_cuts(("TEFF", "LOGG", "FE_H")))
    # missing: 4; low SNR: 1, 6, 8; metal poor: 5, 9 (8 gone already); giants: 0, 7
    # kept: 2 (TEFF 5800), 3 (LOGG 4.2)
    np.testing.assert_array_equal(np.flatnonzero(keep), [2, 3])
    rows = {r["name"]: r["removed"] for r in rep.rows}
    assert rows == {"missing_labels": 1, "low_snr": 3, "metal_poor": 2, "giant": 2}
    assert "LOGG <= 3.5 and TEFF <= 5500" in str(rep)
