"""Named stars in the lab (`--star`) and MCMC on any apStar file (issue 19, item 3).

One small embedded-survey run (150 stars, ~25 s) names a star that passes the cuts and one
that a cut removes; its model then samples the lab's real mystery apStar file.
"""
import json
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from cannon_fast.cli import main
from cannon_fast.lab.pipeline import run_lab
from cannon_fast.lab.stars import find_stars, near_matches

#: The lab's checkpoint stars: real DR17 stars, never in the embedded survey.
CHECKPOINT_STARS = ("2M19395986+2341280", "2M03533659+2512012")


def _pick(allstar):
    """A giant that passes the lab's cuts and a dwarf that the log g cut removes."""
    t = Table.read(allstar)
    ok = np.all([np.isfinite(np.asarray(t[c], float)) for c in
                 ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE")], axis=0)
    giant = ok & (t["LOGG"] > 1.5) & (t["LOGG"] < 3.3) & (t["TEFF"] < 5000) \
        & (t["FE_H"] > -0.7) & (t["SNR"] > 100)
    dwarf = ok & (t["LOGG"] > 4.3)
    ids = np.char.strip(np.asarray(t["APOGEE_ID"]).astype(str))
    return ids[giant][0], ids[dwarf][0], list(ids)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, mist_server, mist_table):
    """A 150-star lab run naming a star the cuts keep and one they remove.

    Its Kiel diagram has a MIST file of the user's (10 Gyr, [Fe/H] = -0.5) and the lab's
    MIST isochrones (6 Gyr, [Fe/H] = 0 and -1) from the loopback stand-in of the MIST web
    interpolator.
    """
    from cannon_fast.demo import datasets

    root = tmp_path_factory.mktemp("stars")
    paths = datasets.demo_survey(cache_dir=root / "cache", n_stars=150, seed=0, progress=False)
    kept, cut, ids = _pick(paths.allstar)
    out = root / "report"
    iso_file = root / "my_isochrone.iso"
    iso_file.write_text(mist_table(10.0, -0.5))
    n_forms = len(mist_server.requests)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CANNON_FAST_MIST_URL", mist_server.url)
        summary = run_lab(out_dir=out, n_stars=150, cache_dir=root / "cache", seed=1,
                          extras=False, min_stars=40, show_progress=False, log=None,
                          extra_terms=(), test_step="plain", label_errors=False,  # no CV: fast
                          stars=[kept.lower(), cut], isochrones=[iso_file],
                          isochrone_source="mist", isochrone_age=6.0, isochrone_feh=[0.0, -1.0])
    yield dict(out=out, summary=summary, kept=kept, cut=cut, ids=ids, root=root, paths=paths,
               forms=mist_server.requests[n_forms:], iso_file=iso_file)
    shutil.rmtree(root, ignore_errors=True)


def test_named_stars_get_the_example_figures(lab):
    """The named stars take the example figures; a cut star gets its continuum only."""
    s, out, kept, cut = lab["summary"], lab["out"], lab["kept"], lab["cut"]
    roles = {e["apogee_id"]: e["role"] for e in s["example_stars"]}
    assert list(roles) == [kept, cut]  # as the data spell them, in the order given
    assert roles[kept] in ("training", "validation", "held-back (MCMC)")
    assert roles[cut] == "not kept by the lab's cuts"
    captions = {f["file"]: f["caption"] for f in s["figures"]}
    # the first named star takes the default figures; the cut one has no labels to model
    assert kept in captions["data_vs_model.png"]
    for name in ("example_spectrum.png", "continuum.png", f"continuum_{cut}.png"):
        assert (out / name).stat().st_size > 10000
    assert not (out / f"data_vs_model_{cut}.png").exists()
    assert any(cut in n and "continuum figure is drawn" in n for n in s["notes"])


def test_kiel_diagram_says_which_isochrones_it_drew(lab):
    """The user's file and the lab's two MIST isochrones, fetched once, in summary and report."""
    s = lab["summary"]
    got = [(i["source"], i["origin"], i["age_gyr"], i["feh"]) for i in s["isochrones"]]
    assert got == [("MIST", "file", 10.0, -0.5),
                   ("MIST", "MIST web interpolator", 6.0, 0.0),
                   ("MIST", "MIST web interpolator", 6.0, -1.0)]
    assert s["isochrones"][0]["path"] == str(lab["iso_file"])
    assert all(p["path"].startswith(str(lab["root"] / "cache" / "isochrones"))
               for p in s["isochrones"][1:])
    assert [f["FeH_value"] for f in lab["forms"]] == ["0.0000", "-1.0000"]
    caption = next(f["caption"] for f in s["figures"] if f["file"] == "kiel.png")
    assert "MIST 6 Gyr [Fe/H] = -1.00 (MIST web interpolator)" in caption
    assert any("nearest 6 Gyr, [Fe/H] = +0.00 or -1.00" in n and "10 Gyr" in n
               for n in s["notes"])
    page = (lab["out"] / "report.html").read_text()
    assert "Kiel diagram isochrones" in page and "MIST web interpolator" in page


def test_unknown_star_is_a_one_line_error_with_near_ids(lab, tmp_path, capsys):
    """A checkpoint star is not in the embedded survey: one line, near IDs, no work done."""
    out = tmp_path / "report"
    with pytest.raises(ValueError) as err:
        run_lab(out_dir=out, n_stars=150, cache_dir=lab["root"] / "cache", extras=False,
                min_stars=40, show_progress=False, log=None, stars=[CHECKPOINT_STARS[0]])
    msg = str(err.value)
    assert "\n" not in msg and "not in the embedded synthetic survey" in msg
    assert "--data DIR" in msg
    near = msg.split("nearest IDs: ")[1].split(";")[0].split(", ")
    assert near and set(near) <= set(lab["ids"])
    assert not (out / "model.fits").exists()  # refused before the spectra were read
    rc = main(["demo", "--n-stars", "150", "--out", str(tmp_path / "r2"), "--no-extras",
               "--star", CHECKPOINT_STARS[1], "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and CHECKPOINT_STARS[1] in err


def test_find_stars_and_near_matches():
    """IDs match without regard to case; a typo lists the nearest IDs first."""
    ids = ["2M19395986+2341280", "2M19395986+2341281", "2M03533659+2512012", "2M00000000+0000000"]
    assert find_stars([" 2m03533659+2512012", "2M19395986+2341280"], ids, "x") == \
        ["2M03533659+2512012", "2M19395986+2341280"]
    assert set(near_matches("2M19395986+2341289", ids)[:2]) == set(ids[:2])
    with pytest.raises(ValueError, match=r"--star 2M03533659\+2512019: not in the data \(4 "
                                         r"stars\); nearest IDs: 2M03533659\+2512012"):
        find_stars(["2M03533659+2512019"], ids, "the data")
    with pytest.raises(ValueError, match="no similar ID; try --data"):
        find_stars(["Vega"], ids, "the data", hint="try --data")


def test_apstar_normalized_as_prepare_does(lab, tmp_path):
    """`mcmc`/`binaries` read an apStar file into the same flux and ivar as the lab's store."""
    from cannon_fast.apogee.prepare import prepare_dataset
    from cannon_fast.cli.science import load_one_spectrum
    from cannon_fast.core.continuum import model_continuum
    from cannon_fast.core.model import CannonModel
    from cannon_fast.lab.pipeline import LAB_LABELS

    model = CannonModel.read(lab["summary"]["model"]["path"])
    path = lab["summary"]["mystery_star"]["path"]
    cont, degree, _ = model_continuum(model)
    prep = prepare_dataset([path], lab["paths"].allstar, tmp_path / "store", cont,
                           labels=LAB_LABELS, degree=degree, show_progress=False)
    flux, ivar, ids, notes = load_one_spectrum(path, model)
    assert ids == [lab["summary"]["mystery_star"]["apogee_id"]]
    np.testing.assert_array_equal(ivar[0] > 0, np.asarray(prep.store.ivar[0]) > 0)
    np.testing.assert_allclose(flux[0], prep.store.flux[0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ivar[0], prep.store.ivar[0], rtol=2e-4)


def test_mcmc_on_the_labs_mystery_apstar(lab, shared_dir, tmp_path, capsys):
    """`cannon-fast mcmc` on the lab's real mystery apStar file with the demo's model."""
    from cannon_fast.apogee.files import read_apstar
    from cannon_fast.cli.science import load_one_spectrum
    from cannon_fast.core.continuum import model_continuum
    from cannon_fast.core.model import CannonModel

    mystery = shared_dir / "data" / "real" / "lab2" / "mystery_spec_wiped.fits"
    mpath = lab["summary"]["model"]["path"]
    out = tmp_path / "post.json"
    rc = main(["mcmc", str(mystery), "--model", mpath, "--out", str(out), "--corner",
               str(tmp_path / "corner.png"), "-q"])
    assert rc == 0, capsys.readouterr().err
    post = json.loads(out.read_text())
    assert post["star"] == "2M16333217+3942519" and post["converged"] is True
    # the pixels used are the file's good pixels (PIXMASK bits 0-7 and 12, chip gaps)
    n_good = int((read_apstar(mystery).masked()[1] > 0).sum())
    assert 0.98 * n_good <= post["n_pixels"] <= n_good
    for j, name in enumerate(post["label_names"]):
        lo, hi = post["prior"][name]["support"]
        assert lo < post["median"][j] < hi
        # the posterior sits on the chi2 fit it started from
        assert abs(post["median"][j] - post["fit_labels"][j]) < 5 * post["sigma"][j]
    # normalized: the continuum pixels sit at 1
    model = CannonModel.read(mpath)
    flux, ivar, _, _ = load_one_spectrum(str(mystery), model)
    cont = model_continuum(model)[0] & (ivar[0] > 0)
    assert abs(np.median(flux[0][cont]) - 1.0) < 0.01
    assert (tmp_path / "corner.png").stat().st_size > 10000


def test_mcmc_on_an_all_masked_apstar_is_a_flag(lab, tmp_path, capsys):
    """Every pixel masked: the TOO_FEW_PIXELS flag, exit code 4, one line; no crash."""
    path = tmp_path / "apStar-dr17-2M00000000+0000000.fits"
    with fits.open(lab["summary"]["mystery_star"]["path"]) as hdul:
        hdul[3].data = np.ones_like(hdul[3].data)  # PIXMASK bit 0 (BADPIX) everywhere
        hdul.writeto(path)
    out = tmp_path / "post.json"
    rc = main(["mcmc", str(path), "--model", lab["summary"]["model"]["path"], "--out",
               str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 4
    assert err.count("\n") == 1 and str(path) in err and "TOO_FEW_PIXELS" in err
    d = json.loads(out.read_text())
    assert d["flags"] == ["TOO_FEW_PIXELS"] and d["n_usable_pixels"] == 0
