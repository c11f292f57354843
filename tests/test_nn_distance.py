"""AstroNNDist-like distances (cannon_fast.nn.distance) and their training cuts."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cannon_fast.apogee.catalog import distance_training_cuts, select  # noqa: E402
from cannon_fast.nn.distance import DIST_FLAGS, DistanceNetwork, fakemag  # noqa: E402
from cannon_fast.testing import make_synthetic  # noqa: E402

MLP = dict(arch="mlp", hidden=(64, 32), dropout=0.1)


def test_fakemag_is_the_absolute_magnitude_for_a_true_parallax():
    """Fakemag is 10^(0.2 M + 2) for the true parallax; negative parallaxes stay."""
    m, d, a = np.array([-1.5, 0.3, 4.0]), np.array([150.0, 2300.0, 9000.0]), 0.2
    k0 = m + 5 * np.log10(d) - 5
    f = fakemag(1000.0 / d, k0)
    np.testing.assert_allclose(f, 10 ** (0.2 * m + 2), rtol=1e-12)
    np.testing.assert_allclose(5 * np.log10(f) - 10, m, atol=1e-12)
    assert fakemag(-0.1, 12.0) < 0  # a negative parallax stays a (negative) measurement
    assert np.isfinite(a)


@pytest.fixture(scope="module")
def survey():
    """Spectra whose absolute Ks follows the labels; Gaia-like parallaxes, some negative."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    s = make_synthetic(n_stars=700, n_pix=100, n_labels=3, seed=11, snr=(150, 250))
    rng = np.random.default_rng(2)
    z = (s.labels - s.labels.mean(0)) / s.labels.std(0)
    absmag = -1.0 + 1.2 * z[:, 1] - 0.3 * z[:, 0]  # log g and Teff set the luminosity
    dist = 10 ** rng.uniform(2.5, 4.5, len(z))  # 300 pc to 30 kpc
    a_k = rng.uniform(0.0, 0.4, len(z))
    k = absmag + 5 * np.log10(dist) - 5 + a_k
    plx_err = np.full(len(z), 0.05)
    plx = 1000.0 / dist + plx_err * rng.standard_normal(len(z))
    tr = np.arange(500)
    net = DistanceNetwork(seed=0, device="cpu", **MLP).train(
        s.flux[tr], s.ivar[tr], plx[tr], plx_err[tr], k[tr], a_k[tr], split=(5, 1, 0),
        epochs=80, batch_size=32, learning_rate=2e-3, patience=15, progress=False)
    torch.set_num_threads(old)
    return dict(s=s, dist=dist, a_k=a_k, k=k, plx=plx, plx_err=plx_err, net=net,
                te=np.arange(500, 699))  # star 699 is fully masked


def test_distances_beat_inverted_parallaxes_and_errors_are_calibrated(survey):
    """Distances beat 1/parallax at low parallax S/N; ~68 % within 1 sigma."""
    s, te, net = survey["s"], survey["te"], survey["net"]
    assert (survey["plx"][:500] < 0).sum() > 5  # negative parallaxes were trained on
    res = net.predict(s.flux[te], s.ivar[te], survey["k"][te], survey["a_k"][te])
    dt = survey["dist"][te]
    rel = np.abs(res.distance - dt) / dt
    inv = np.where(survey["plx"][te] > 0, np.abs(1000 / survey["plx"][te] - dt) / dt, np.inf)
    far = survey["plx"][te] / survey["plx_err"][te] < 5
    assert far.sum() > 30
    assert np.median(rel[far]) < 0.5 * np.median(inv[far])
    assert np.median(rel) < 0.12
    inside = np.mean(np.abs(res.distance - dt) < res.distance_err)
    assert 0.5 < inside < 0.9
    np.testing.assert_allclose(res.parallax * res.distance, 1000.0, rtol=1e-9)
    np.testing.assert_allclose(res.absmag_k, 5 * np.log10(res.fakemag) - 10, rtol=1e-12)
    np.testing.assert_allclose(res.fakemag_err, np.hypot(res.fakemag_model_err,
                                                         res.fakemag_predictive_err))


def test_missing_photometry_extinction_and_masked_spectra_are_flagged(survey, tmp_path):
    """Missing Ks/A_K and masked spectra get Astra's flags; save/load round trip."""
    s, net = survey["s"], survey["net"]
    i = np.arange(500, 506)
    k, a_k = survey["k"][i].copy(), survey["a_k"][i].copy()
    flux, ivar = s.flux[i].copy(), s.ivar[i].copy()
    k[0] = np.nan
    a_k[1] = -9999.0
    ivar[2, :80] = 0.0
    res = net.predict(flux, ivar, k, a_k)
    full = net.predict(s.flux[i], s.ivar[i], survey["k"][i], survey["a_k"][i])
    assert res.flag_names(0) == ["MISSING_PHOTOMETRY"] or res.flag_names(0) == [
        "FAKEMAG_UNRELIABLE", "MISSING_PHOTOMETRY"]
    assert np.isnan(res.distance[0]) and np.isfinite(res.absmag_k[0])
    assert "MISSING_EXTINCTION" in res.flag_names(1)
    assert res.flag_warn[1] and not res.flag_warn[0]
    # A_K taken as 0: the star looks brighter by A_K, hence nearer
    assert res.distance[1] == pytest.approx(full.distance[1] * 10 ** (0.2 * survey["a_k"][i[1]]))
    assert "NO_RESULT" in res.flag_names(2) and np.isnan(res.fakemag[2])
    assert res.flag_bad[0] and res.flag_bad[2]
    assert res.result_flags[2] & DIST_FLAGS["NO_RESULT"] == 1 << 11
    t = res.to_table()
    assert {"fakemag", "fakemag_err", "distance", "parallax_err", "result_flags",
            "flag_warn", "flag_bad"} <= set(t.colnames)
    net.save(tmp_path / "d.pt")
    again = DistanceNetwork.load(tmp_path / "d.pt").predict(s.flux[i], s.ivar[i],
                                                            survey["k"][i], survey["a_k"][i])
    np.testing.assert_array_equal(again.distance, full.distance)


def test_training_needs_photometry_and_parallaxes(survey):
    """A training star without Ks is an error naming it."""
    s = survey["s"]
    k = survey["k"][:50].copy()
    k[3] = np.nan
    with pytest.raises(ValueError, match="star 3.*apply the training cuts"):
        DistanceNetwork(**MLP).train(s.flux[:50], s.ivar[:50], survey["plx"][:50],
                                     survey["plx_err"][:50], k, survey["a_k"][:50])


def test_training_cuts_count_each_cut_and_name_missing_columns():
    """Each training cut is counted; RUWE only when present; no parallax column: error."""
    from astropy.table import Table

    t = Table(dict(SNR=[250.0, 150.0, 300.0, 400.0, 500.0, 260.0],
                   STARFLAG=[0, 0, 4, 0, 0, 0],
                   GAIAEDR3_PARALLAX=[0.5, 0.4, -0.1, 0.2, np.nan, 0.3],
                   GAIAEDR3_PARALLAX_ERROR=[0.02, 0.02, 0.03, 0.2, 0.02, 0.02],
                   K=[10.0, 11.0, 12.0, 9.0, 8.0, -9999.0], AK_TARG=[0.1] * 6))
    keep, rep = select(t, cuts=distance_training_cuts(t.colnames))
    assert keep.tolist() == [True, False, False, False, False, False]
    removed = {r["name"]: r["removed"] for r in rep.rows}
    assert removed == dict(low_snr=1, starflag=1, parallax=1, parallax_error=1,
                           missing_photometry=1, missing_extinction=0)
    assert "ruwe" not in removed  # DR17's allStar has no RUWE: no cut
    t["GAIAEDR3_RUWE"] = [1.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    keep, rep = select(t, cuts=distance_training_cuts(t.colnames), min_remaining=0)
    assert not keep.any() and {r["name"]: r["fails"] for r in rep.rows}["ruwe"] == 1
    t.remove_columns(["GAIAEDR3_PARALLAX", "GAIAEDR3_PARALLAX_ERROR"])
    with pytest.raises(ValueError, match="GAIAEDR3_PARALLAX, GAIAEDR3_PARALLAX_ERROR"):
        distance_training_cuts(t.colnames)


def test_cli_train_and_predict_distances(survey, tmp_path, capsys):
    """nn-dist-train / nn-dist-predict; missing parallax columns: a one-line error."""
    from astropy.table import Table

    from cannon_fast.cli import main

    s = survey["s"]
    n = 300
    ids = np.array([f"2M{i:08d}+0000000" for i in range(n)])
    np.savez(tmp_path / "spec.npz", flux=s.flux[:n], ivar=s.ivar[:n], ids=ids)
    cat = Table(dict(APOGEE_ID=ids, SNR=np.full(n, 300.0), STARFLAG=np.zeros(n, int),
                     K=survey["k"][:n], K_ERR=np.full(n, 0.02), AK_TARG=survey["a_k"][:n],
                     GAIAEDR3_PARALLAX=survey["plx"][:n],
                     GAIAEDR3_PARALLAX_ERROR=survey["plx_err"][:n]))
    cat["AK_TARG"][5] = np.nan
    cat.write(tmp_path / "allStar.fits")
    args = ["nn-dist-train", str(tmp_path / "spec.npz"), "--allstar",
            str(tmp_path / "allStar.fits"),
            "--out", str(tmp_path / "d.pt"), "--arch", "mlp", "--hidden", "16", "--epochs", "3",
            "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "missing_extinction (AK_TARG missing)" in out and "299 training stars" in out
    assert main(["nn-dist-predict", str(tmp_path / "d.pt"), str(tmp_path / "spec.npz"),
                 "--allstar", str(tmp_path / "allStar.fits"), "--out", str(tmp_path / "d.fits"),
                 "--quiet"]) == 0
    import fitsio

    t = fitsio.read(tmp_path / "d.fits")
    assert len(t) == n and t["flag_warn"].sum() == 1 and t["flag_warn"][5]
    assert Table.read(tmp_path / "d.fits")["apogee_id"][0] == ids[0]
    cat.remove_columns(["GAIAEDR3_PARALLAX", "GAIAEDR3_PARALLAX_ERROR"])
    cat.write(tmp_path / "noplx.fits")
    capsys.readouterr()
    args[3] = str(tmp_path / "noplx.fits")
    args[5] = str(tmp_path / "e.pt")
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "GAIAEDR3_PARALLAX, GAIAEDR3_PARALLAX_ERROR" in err and err.count("\n") == 1
