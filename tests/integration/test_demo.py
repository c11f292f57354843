"""`cannon-fast demo` end to end on a tiny embedded survey: files, summary fields, report page."""
import json
import os
import re

import pytest

from cannon_fast.cli import main
from cannon_fast.lab.pipeline import LAB_LABELS, run_lab

SUMMARY_FIELDS = ("data", "cuts", "n_train", "n_validation", "model", "validation", "targets",
                  "timings", "figures", "extras", "outliers", "mystery_star", "continuum")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One small run shared by the tests (150 stars: ~100 survive the cuts)."""
    root = tmp_path_factory.mktemp("lab")
    out = root / "report"
    summary = run_lab(out_dir=out, n_stars=150, cache_dir=root / "cache", seed=1,
                      extras=False, min_stars=40, show_progress=False, log=None)
    return out, summary


def test_report_folder_has_every_file(lab):
    out, summary = lab
    names = set(os.listdir(out))
    assert {"report.html", "summary.json", "model.fits", "validation_labels.fits"} <= names
    expected = {"example_spectrum", "continuum", "corner", "data_vs_model", "gradients", "s2",
                "cv_true", "cv_catalog", "outliers", "kiel", "broadening"}
    assert {f"{n}.png" for n in expected} <= names
    assert ".work" not in names  # the store is removed unless keep_store


def test_summary_json_fields(lab):
    out, summary = lab
    with open(out / "summary.json") as fh:
        s = json.load(fh)
    for key in SUMMARY_FIELDS:
        assert key in s, key
    assert s["n_train"] + s["n_validation"] + 1 == s["cuts"]["n_kept"]
    assert [r["name"] for r in s["cuts"]["rows"]][:5] == [
        "no_catalog_match", "missing_labels", "low_snr", "dwarf", "metal_poor"]
    assert set(s["validation"]) == {"debias", "plain", "broadened"}
    b = s["validation"]["broadened"]["broadening"]
    assert b["unit"] == "(km/s)^2" and b["median_error"] > 0
    for fit in ("debias", "plain", "broadened"):
        v = s["validation"][fit]
        for ref in ("vs_true", "vs_catalog"):
            for name in LAB_LABELS:
                assert {"bias", "scatter", "mad_scatter", "n"} <= set(v[ref][name])
    t = s["targets"]["primary"]
    assert set(t) == {"TEFF", "FE_H", "all_met"}
    assert os.path.exists(s["model"]["path"])
    assert s["timings"]["total"] > 0
    assert all(v["status"] == "skipped" for v in s["extras"].values())
    # the labels are recovered (loosely: 50 training stars)
    assert s["validation"][s["primary_fit"]]["vs_true"]["TEFF"]["scatter"] < 150
    assert s["validation"][s["primary_fit"]]["vs_true"]["FE_H"]["scatter"] < 0.1
    sp = s["diagnostics"]["not_sparse_training"]
    v = s["validation"][s["primary_fit"]]
    assert sp["n"] + sp["n_flagged"] == v["n_ok"] and sp["n_flagged"] == v["flags"][
        "SPARSE_TRAINING"]
    assert sp["vs_true"]["TEFF"]["n"] == sp["n"]


def test_report_html_references_every_png(lab):
    out, _ = lab
    with open(out / "report.html", encoding="utf-8") as fh:
        page = fh.read()
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    referenced = set(re.findall(r"src='([^']+\.png)'", page))
    assert referenced == set(pngs)
    assert "Worst outliers" in page and "Cuts" in page


def test_cli_report_rebuilds_and_demo_refuses_then_forces(lab, tmp_path, capsys):
    out, _ = lab
    assert main(["report", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["demo", "--out", str(out), "-q"]) == 1
    assert "--force" in capsys.readouterr().err


def test_training_margin_trains_past_the_cuts_and_validates_inside(tmp_path):
    """``training_margin=True``: stars just past the hot and dwarf cuts train the model only."""
    from cannon_fast import CannonModel

    s = run_lab(out_dir=tmp_path / "report", n_stars=150, cache_dir=tmp_path / "cache",
                seed=1, extras=False, min_stars=40, show_progress=False, log=None,
                training_margin=True)
    m = s["training_margin"]
    assert (m["teff_max"], m["logg_max"]) == (6100.0, 4.3)
    assert 0 < m["n_training"] <= m["n_stars"], m
    # the split of the kept stars is the lab's own; the margin's stars come on top
    assert s["n_train"] + s["n_validation"] + 1 == s["cuts"]["n_kept"]
    model = CannonModel.read(tmp_path / "report" / "model.fits")
    assert len(model.training_labels) == s["n_train"] + m["n_training"]
    j = LAB_LABELS.index("TEFF"), LAB_LABELS.index("LOGG")
    past = (model.training_labels[:, j[0]] > 5700) | (model.training_labels[:, j[1]] > 4.0)
    assert past.sum() >= m["n_training"] - 1   # (catalogue labels: one may sit on the edge)
