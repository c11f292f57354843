"""The lab pipeline's contracts that need no full run: refusals, errors, the report page."""
import json

import numpy as np
import pytest

from cannon_fast.lab import pipeline, report
from cannon_fast.apogee.catalog import TooFewStarsError
from cannon_fast.cli import main


def test_refuses_an_existing_report_folder(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        pipeline.run_lab(out_dir=out, cache_dir=tmp_path / "cache")
    assert (out / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_cli_demo_refuses_an_existing_report_folder(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["demo", "--out", str(out), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_force_replaces_only_report_files(tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    (out / "old.png").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    pipeline._prepare_out_dir(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_missing_isochrone_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="isochrone file not found"):
        pipeline.run_lab(out_dir=tmp_path / "rep", isochrones=[tmp_path / "nope.iso"])
    assert not (tmp_path / "rep").exists()


def test_too_few_stars_lists_the_per_cut_counts(tmp_path):
    from cannon_fast.demo.datasets import make_demo_survey

    make_demo_survey(tmp_path / "survey", n_stars=12, seed=3, progress=False)
    with pytest.raises(TooFewStarsError) as info:
        pipeline.run_lab(data_dir=tmp_path / "survey", out_dir=tmp_path / "rep",
                         continuum=_continuum(), min_stars=60, extras=False,
                         show_progress=False, log=None)
    msg = str(info.value)
    for cut in ("missing_labels", "low_snr", "dwarf", "metal_poor", "remaining", "need >= 60"):
        assert cut in msg
    assert not (tmp_path / "rep" / ".work").exists()


def _continuum():
    from cannon_fast.demo.datasets import continuum_mask
    return continuum_mask(n_stars=40)


def test_label_statistics_and_targets():
    ref = np.zeros((4, 2))
    fit = np.array([[10.0, 0.01], [-10.0, -0.01], [10.0, 0.01], [-10.0, -0.01]])
    st = pipeline.label_statistics(fit, ref, ["TEFF", "FE_H"])
    assert st["TEFF"]["bias"] == 0.0 and st["TEFF"]["n"] == 4
    assert np.isclose(st["TEFF"]["scatter"], np.std([10, -10, 10, -10], ddof=1))
    t = pipeline._targets(st)
    assert t["TEFF"]["met"] and t["FE_H"]["met"] and t["all_met"]
    st["FE_H"]["scatter"] = 0.05
    assert not pipeline._targets(st)["all_met"]


def test_population_breakdown_finds_where_the_error_is(tmp_path):
    # 8 well-fitted stars and 2 of a rare population with 10x their error
    true = np.zeros((10, 5))
    fit = true.copy()
    fit[:, 0] = [10, -10] * 4 + [100, -100]
    fit[:, 2] = 0.01
    pop = np.array(["disk"] * 8 + ["halo"] * 2)
    d = pipeline._population_breakdown(fit, true, np.ones(10, bool), pop)
    halo = [r for r in d["rows"] if r["population"] == "halo"][0]
    assert halo["n"] == 2 and np.isclose(halo["TEFF"]["share_of_squared_error"],
                                         2e4 / (8e2 + 2e4))
    assert np.isclose(halo["FE_H"]["share_of_squared_error"], 0.2)  # same error: share = n
    assert np.isclose(halo["TEFF"]["scatter"], np.std([100, -100], ddof=1))
    summary = dict(created="now", labels=["TEFF"], diagnostics=dict(populations=d))
    report.write_summary(summary, tmp_path)
    with open(report.rebuild_report(tmp_path), encoding="utf-8") as fh:
        page = fh.read()
    assert "<td>halo</td><td>2</td>" in page and "96%" in page


def test_report_html_references_every_png(tmp_path):
    summary = dict(created="now", labels=["TEFF"], figures=[dict(file="a.png", caption="A")],
                   timings=dict(total=1.0), notes=["a note"])
    report.write_summary(summary, tmp_path)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    path = report.rebuild_report(tmp_path)
    with open(path, encoding="utf-8") as fh:
        page = fh.read()
    for name in ("a.png", "b.png", "c.png"):
        assert f"src='{name}'" in page
    assert "a note" in page and page.index("a.png") < page.index("b.png")
    with open(tmp_path / "summary.json") as fh:
        assert json.load(fh)["figures"][0]["file"] == "a.png"


def test_report_cli_needs_a_summary(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "summary.json" in capsys.readouterr().err


def test_to_jsonable_handles_numpy_and_nan():
    out = report.to_jsonable({"a": np.float32(1.5), "b": np.array([1, 2]), "c": float("nan"),
                              "d": (np.str_("x"),)})
    assert out == {"a": 1.5, "b": [1, 2], "c": None, "d": ["x"]}
    json.dumps(out)


def test_optional_steps_never_sink_the_lab():
    def missing(ctx):
        raise ImportError("No module named 'cannon_fast.nothing'")

    def broken(ctx):
        raise RuntimeError("boom")

    status, value = pipeline._guarded("x", missing, {})
    assert status["status"] == "skipped" and "nothing" in status["reason"] and value is None
    status, value = pipeline._guarded("x", broken, {})
    assert status["status"] == "failed" and "boom" in status["reason"]
    status, value = pipeline._guarded("x", lambda ctx: {"n": 1, "figure": None}, {})
    assert status["status"] == "ok" and status["n"] == 1 and "figure" not in status


def test_unknown_optional_step_is_rejected_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown optional steps"):
        pipeline.run_lab(out_dir=tmp_path / "rep", extras=("mcmc", "telepathy"))


def test_cross_validation_prefers_the_right_model_and_the_debiased_fit():
    """Exact quadratic data, few training stars and many pixels: the plain fit is pulled to
    the centre, and extra terms only add noise to the model."""
    from cannon_fast import CannonModel
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=150, n_pix=1500, n_labels=3, seed=12)
    models = {"quadratic": lambda f, v, lab, err: CannonModel(s.label_names, grid=s.grid).train(
                  f, v, lab),
              "cubic": lambda f, v, lab, err: CannonModel(s.label_names, order=3,
                                                          grid=s.grid).train(f, v, lab)}
    name, step, info = pipeline.cross_validate(models, s.flux, s.ivar, s.labels)
    assert (name, step) == ("quadratic", "debias"), info
    sc = info["scatter"]
    assert np.all(np.array(sc["quadratic / debias"]) < np.array(sc["quadratic / plain"])), info
    assert "3-fold cross-validation on 150 training stars" in info["note"]


def test_unknown_test_step_and_bad_extra_terms_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="test_step"):
        pipeline.run_lab(out_dir=tmp_path / "a", cache_dir=tmp_path / "cache", test_step="best")
    with pytest.raises(ValueError, match="unknown label 'MASS'"):
        pipeline.run_lab(out_dir=tmp_path / "b", cache_dir=tmp_path / "cache",
                         extra_terms=["MASS^3"])
    assert not (tmp_path / "cache").exists()


def test_cli_train_with_extra_terms(tmp_path, capsys):
    from cannon_fast import CannonModel
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=120, n_pix=40, n_labels=3, seed=13)
    path = tmp_path / "train.npz"
    np.savez(path, flux=s.flux, ivar=s.ivar, labels=s.labels, label_names=np.array(s.label_names))
    assert main(["train", str(path), "--out", str(tmp_path / "m.npz"), "--labels",
                 ",".join(s.label_names), "--extra-terms", "TEFF^3, TEFF^4"]) == 0
    m = CannonModel.read(tmp_path / "m.npz")
    assert m.term_names[-2:] == ["TEFF*TEFF*TEFF", "TEFF*TEFF*TEFF*TEFF"] and m.n_terms == 12
    assert "TEFF*TEFF*TEFF" in capsys.readouterr().out
    assert main(["train", str(path), "--out", str(tmp_path / "r.npz"), "--labels",
                 ",".join(s.label_names), "--reciprocal", "TEFF"]) == 0
    r = CannonModel.read(tmp_path / "r.npz")
    assert r.reciprocal_labels == ["TEFF"]
    np.testing.assert_allclose(r.unscale_labels(r.scale_labels(s.labels[:3])), s.labels[:3],
                               rtol=1e-12)
    assert main(["train", str(path), "--out", str(tmp_path / "q.npz"), "--labels",
                 ",".join(s.label_names), "--reciprocal", "THETA"]) == 1
    assert "reciprocal label(s) ['THETA'] are not among the labels" in capsys.readouterr().err


def test_cli_train_records_the_stores_continuum(tmp_path, capsys):
    from cannon_fast import CannonModel
    from cannon_fast.core.continuum import model_continuum
    from cannon_fast.apogee.files import NPIX, wavelength_grid
    from cannon_fast.store import SpectraStore
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=60, n_pix=NPIX, n_labels=2, seed=14)
    cont = np.sort(np.random.default_rng(1).choice(NPIX, 300, replace=False))
    SpectraStore.write(tmp_path / "store", s.flux, s.ivar, wavelength_grid(), labels=s.labels,
                       label_names=s.label_names,
                       meta=dict(continuum_pixels=cont.tolist(), continuum_degree=2))
    assert main(["train", str(tmp_path / "store"), "--out", str(tmp_path / "m.fits")]) == 0
    assert "the store's 300 continuum pixels recorded" in capsys.readouterr().out
    pixels, degree, _ = model_continuum(CannonModel.read(tmp_path / "m.fits"))
    np.testing.assert_array_equal(np.flatnonzero(pixels), cont)
    assert degree == 2


def test_catalogue_errors_are_filled_or_refused():
    err = np.array([[40.0, 0.05, 0.02, 0.02, 0.03], [np.nan, 0.07, 0.03, 0.02, 0.03],
                    [60.0, 0.09, 0.04, -9999.0, 0.03]])
    filled, note = pipeline._catalogue_errors(err, "auto")
    np.testing.assert_allclose(filled[1, 0], 50.0)
    np.testing.assert_allclose(filled[2, 3], 0.02)
    assert "2 star(s) without a catalogue error" in note
    assert pipeline._catalogue_errors(err, False) == (None, "")
    none = np.full((3, 5), np.nan)
    got, note = pipeline._catalogue_errors(none, "auto")
    assert got is None and "has none for ['TEFF'" in note
    with pytest.raises(ValueError, match="no errors for"):
        pipeline._catalogue_errors(none, True)
    with pytest.raises(ValueError, match="label_errors must be"):
        pipeline.run_lab(out_dir="never-made", label_errors="maybe")


def test_cli_train_with_label_errors(tmp_path, capsys):
    from cannon_fast import CannonModel
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=120, n_pix=40, n_labels=3, seed=15)
    err = np.abs(s.labels).mean(0) * 0.01 * np.ones_like(s.labels)
    path = tmp_path / "train.npz"
    np.savez(path, flux=s.flux, ivar=s.ivar, labels=s.labels, label_names=np.array(s.label_names))
    assert main(["train", str(path), "--out", str(tmp_path / "m.npz"), "--label-errors"]) == 1
    assert "has no label errors" in capsys.readouterr().err
    np.savez(path, flux=s.flux, ivar=s.ivar, labels=s.labels, label_names=np.array(s.label_names),
             label_errors=err)
    assert main(["train", str(path), "--out", str(tmp_path / "m.npz"), "--label-errors"]) == 0
    info = CannonModel.read(tmp_path / "m.npz").train_info["label_errors"]
    np.testing.assert_allclose(list(info["median_error"].values()), err[0], rtol=1e-12)


def test_cli_fit_with_broadening(tmp_path, capsys):
    from astropy.table import Table
    from cannon_fast import CannonModel
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=150, n_pix=60, n_labels=3, seed=15)
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, flux=s.flux[:120], ivar=s.ivar[:120], labels=s.labels[:120],
             label_names=np.array(s.label_names), wavelength=s.grid.wavelength,
             resolution=s.grid.resolution)
    np.savez(test, flux=s.flux[120:], ivar=s.ivar[120:])
    assert main(["train", str(train), "--out", str(tmp_path / "m.npz")]) == 0
    assert main(["fit", str(tmp_path / "m.npz"), str(test), "--out", str(tmp_path / "b.fits"),
                 "--broadening"]) == 0
    t = Table.read(tmp_path / "b.fits")
    assert CannonModel.read(tmp_path / "m.npz").grid == s.grid
    direct = CannonModel.read(tmp_path / "m.npz").fit(s.flux[120:], s.ivar[120:], debias=False,
                                                      broadening=True)
    np.testing.assert_allclose(t["BROADENING"], direct.broadening, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(t["TEFF"], direct.labels[:, 0], rtol=1e-8)
    assert main(["fit", str(tmp_path / "m.npz"), str(test), "--out", str(tmp_path / "c.fits"),
                 "--broadening", "--method", "trf"]) == 1
    assert "--broadening and --refine-continuum go with the fast method" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "m.npz"), str(test), "--out", str(tmp_path / "d.fits"),
                 "--refine-continuum", "--method", "trf"]) == 1
    assert "--broadening and --refine-continuum go with the fast method" in capsys.readouterr().err


def test_cli_fit_refuses_an_empty_selection(tmp_path, capsys):
    """An empty batch, --rows 10:5 or a garbled --rows is one line, not an IndexError."""
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=60, n_pix=30, n_labels=3, seed=15)
    train, test, empty = tmp_path / "train.npz", tmp_path / "test.npz", tmp_path / "empty.npz"
    np.savez(train, flux=s.flux, ivar=s.ivar, labels=s.labels,
             label_names=np.array(s.label_names))
    np.savez(test, flux=s.flux[:20], ivar=s.ivar[:20])
    np.savez(empty, flux=s.flux[:0], ivar=s.ivar[:0])
    model = str(tmp_path / "m.npz")
    assert main(["train", str(train), "--out", model, "-q"]) == 0
    capsys.readouterr()
    for spectra, rows, why in ((empty, [], f"{empty} holds no spectra"),
                               (test, ["--rows", "10:5"], f"--rows 10:5 selects no spectra ({test} "
                                                          "holds 20, rows 0:20)"),
                               (test, ["--rows", "30:"], "--rows 30: selects no spectra"),
                               (test, ["--rows", "a:b"], "--rows a:b: expected START:STOP"),
                               (test, ["--rows", "7"], "--rows 7: expected START:STOP")):
        out = tmp_path / "labels.fits"
        assert main(["fit", model, str(spectra), "--out", str(out)] + rows) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cannon-fast fit: error: {why}") and err.count("\n") == 1
        assert not out.exists()
    assert main(["train", str(train), "--out", model, "--force", "--rows", "5:5"]) == 1
    assert "--rows 5:5 selects no spectra" in capsys.readouterr().err
    assert main(["fit", model, str(test), "--out", str(out), "--rows", "5:"]) == 0


def test_cli_fit_warns_when_the_store_was_normalized_unlike_the_training_set(tmp_path, capsys):
    """A store made with one continuum list, fitted with a model trained on another."""
    from astropy.table import Table

    from cannon_fast import CannonModel
    from cannon_fast.core.continuum import record_continuum
    from cannon_fast.core.grid import PixelGrid
    from cannon_fast.store import SpectraStore
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=80, n_pix=8575, n_labels=3, seed=16)
    model = CannonModel(s.label_names).train(s.flux[:60], s.ivar[:60], s.labels[:60])
    mask = np.zeros(8575, bool)
    mask[300:800] = True
    record_continuum(model, mask, degree=3)
    model.write(tmp_path / "m.fits")
    for name, pixels in (("same", np.arange(300, 800)), ("other", np.arange(500, 1000))):
        store = SpectraStore.create(tmp_path / name, PixelGrid.apstar().wavelength,
                                    s.label_names, meta=dict(continuum_pixels=pixels.tolist(),
                                                             continuum_degree=3))
        store.append(s.flux[60:], s.ivar[60:], s.labels[60:])
        rc = main(["fit", str(tmp_path / "m.fits"), str(tmp_path / name), "--out",
                   str(tmp_path / f"{name}.fits")])
        err = capsys.readouterr().err
        assert rc == 0
        meta = Table.read(tmp_path / f"{name}.fits").meta
        if name == "same":
            assert "WARNING" not in err and "CONTMISM" not in meta
        else:
            assert "500 continuum pixels (degree 3) but the model was trained on spectra " \
                   "normalized with 500 (degree 3), 300 in common" in err
            assert "CONTMISM" in meta


def test_cli_fit_and_train_on_an_apstar_file_say_what_is_wrong(tmp_path, capsys):
    """Fit reads apStar files (here: not on the model's grid); train says what it reads."""
    from cannon_fast import CannonModel
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=40, n_pix=30, n_labels=2, seed=1)
    CannonModel(s.label_names).train(s.flux, s.ivar, s.labels).write(tmp_path / "m.fits")
    path = tmp_path / "apStar-dr17-2M00000000+0000000.fits"
    path.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    assert main(["fit", str(path), "--model", str(tmp_path / "m.fits"), "--out",
                 str(tmp_path / "o.fits")]) == 1
    err = capsys.readouterr().err
    assert "trained on 30 pixels but the input spectra have 8575" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["train", str(path), "--out", str(tmp_path / "o.fits")]) == 1
    err = capsys.readouterr().err
    assert "is a FITS file (an apStar spectrum?)" in err and "fit and label read" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.fits").exists()


def test_cli_train_names_a_wavelength_array_that_makes_no_grid(tmp_path, capsys):
    from cannon_fast.testing import make_synthetic
    s = make_synthetic(n_stars=40, n_pix=30, n_labels=2, seed=2)
    wave = s.grid.wavelength.copy()
    wave[10] = wave[9]  # not increasing
    path = tmp_path / "train.npz"
    np.savez(path, flux=s.flux, ivar=s.ivar, labels=s.labels,
             label_names=np.array(s.label_names), wavelength=wave)
    assert main(["train", str(path), "--out", str(tmp_path / "m.npz")]) == 1
    err = capsys.readouterr().err
    assert f"{path}: its wavelengths make no pixel grid: pixel grid wavelengths must increase: " \
           "pixel 10" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.npz").exists()


def _report_summary():
    """A small summary in the shape run_lab writes (two labels, one fit, a CV choice)."""
    st = lambda b, s: dict(bias=b, scatter=s, mad_scatter=s, n=40)  # noqa: E731
    return dict(
        created="now", package_version="x", labels=["TEFF", "FE_H"], n_train=40,
        n_validation=40, primary_fit="debias", data=dict(kind="a test survey"),
        validation=dict(debias=dict(
            n_fitted=40, n_ok=39, median_reduced_chi2=1.04,
            flags=dict(HIT_BOUND=2, FAILED=1, POOR_FIT=0),
            median_errors=dict(TEFF=5.5, FE_H=0.004),
            vs_true=dict(TEFF=st(1.25, 17.75), FE_H=st(0.0003, 0.0117)),
            vs_catalog=dict(TEFF=st(3.5, 32.25), FE_H=st(0.0008, 0.0184)))),
        targets=dict(against="true labels", primary=dict(
            TEFF=dict(bias=1.25, scatter=17.75, bias_max=5.0, scatter_max=30.0, met=True),
            all_met=True)),
        choice=dict(model="quadratic", test_step="debias",
                    note="3-fold cross-validation, relative to the best: quadratic / debias "
                         "1.000, cubic / plain 1.100",
                    scatter={"quadratic / debias": [30.0, 0.02], "cubic / plain": [33.0, 0.022]}),
        notes=["Model (quadratic) and label fit (debias) chosen by 3-fold cross-validation, "
               "relative to the best: quadratic / debias 1.000, cubic / plain 1.100. More."],
        extras=dict(nn=dict(status="ok", seconds=1.0, vs_true=dict(TEFF=st(0, 150.5),
                                                                  FE_H=st(0, 0.35))),
                    pulls=dict(status="ok", seconds=0.5, median_pull=1.375)),
        timings=dict(total=12.0))


def test_report_leads_with_the_headline_and_reaches_every_number(tmp_path):
    """The report leads with the headline and shows every number of summary.json.

    Headline numbers and key figures before any section; flags and the CV choice as tables.
    """
    summary = _report_summary()
    report.write_summary(summary, tmp_path)
    for name in ("cv_true.png", "kiel.png", "gradients.png", "s2.png", "zz_new.png"):
        (tmp_path / name).write_bytes(b"\x89PNG")
    page = (tmp_path / report.rebuild_report(tmp_path)).read_text(encoding="utf-8")
    first_section = page.index("<details class='section'")
    for text in ("17.8", "32.2", "0.0117", "met", "cv_true.png", "kiel.png", "gradients.png"):
        assert page.index(text) < first_section, text
    assert page.index("s2.png") > first_section        # details come after
    assert "<td>HIT_BOUND</td><td>2 (5%)</td>" in page and '{"HIT_BOUND"' not in page
    assert "39 of 40 validation fits usable" in page
    # the cross-validation candidates are table rows, not a paragraph in the notes
    assert "<td>cubic</td><td>plain chi2</td><td>1.100</td>" in page
    body = page.split("id='all_numbers'")[0]        # the page before the raw numbers
    assert "cubic / plain 1.100" not in body
    # no verdict from a status word: the network's numbers stand next to the Cannon's
    assert ">ok<" not in body and "neural network" in body and "150.5" in body
    # an optional step without a section of its own gets one; so does an unplaced figure
    assert "id='pulls'" in page and "1.375" in page and "src='zz_new.png'" in page
    nav = page[page.index("<nav>"):page.index("</nav>")]
    assert "href='#validation'" in nav and "href='#all_numbers'" in nav

    def scalars(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from scalars(v)
        elif isinstance(o, list):
            for v in o:
                yield from scalars(v)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            yield o
    for x in scalars(summary):
        assert f"{x:.6g}" in page, x


def test_a_section_is_one_call(tmp_path, monkeypatch):
    """add_section: a step's own section, with its figures, before the timings."""
    monkeypatch.setattr(report, "SECTIONS", list(report.SECTIONS))
    report.add_section(report.ReportSection(
        "pulls", "Error pulls", render=lambda s: f"<p>pull {s['extras']['pulls']['median_pull']}"
                                                 "</p>", figures=("pull*.png",)))
    summary = _report_summary()
    report.write_summary(summary, tmp_path)
    (tmp_path / "pulls_teff.png").write_bytes(b"\x89PNG")
    page = (tmp_path / report.rebuild_report(tmp_path)).read_text(encoding="utf-8")
    sec = page[page.index("id='pulls'"):]
    sec = sec[:sec.index("</details>")]
    assert "Error pulls" in sec and "pull 1.375" in sec and "src='pulls_teff.png'" in sec
    assert page.index("id='pulls'") < page.index("id='timings'")
