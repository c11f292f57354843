"""MIST isochrones from the web interpolator: form, zip, cache, offline; a loopback server only."""
import os
from pathlib import Path

import numpy as np
import pytest

from cannon_fast.cli import main
from cannon_fast.lab.isochrones import read_mist
from cannon_fast.lab.mist_web import fetch_mist, mist_cache_path, mist_form, mist_isochrones


@pytest.fixture(autouse=True)
def _server_mode(mist_server):
    """Each test starts with a server that answers correctly."""
    mist_server.mode = "ok"
    yield


def test_fetch_posts_the_form_and_caches_the_isochrone(mist_server, tmp_path):
    """The form as the interpolator takes it; the zip's table cached and read back."""
    n0 = len(mist_server.requests)
    path = fetch_mist(6.0, -1.0, cache_dir=tmp_path, url=mist_server.url)
    assert path == mist_cache_path(6.0, -1.0, cache_dir=tmp_path)
    assert path.startswith(str(tmp_path / "isochrones"))
    form = mist_server.requests[-1]
    assert form == mist_form(6.0, -1.0)
    assert (form["age_value"], form["FeH_value"], form["age_scale"], form["v_div_vcrit"],
            form["output_option"]) == ("6000000000", "-1.0000", "linear", "vvcrit0.4", "theory")
    (iso,) = read_mist(path)
    assert iso.age_gyr == pytest.approx(6.0) and iso.feh == pytest.approx(-1.0)
    # RGB Teff at log g 2.5 from the server's relation: 4600 + 280 K for [Fe/H] = -1
    assert iso.teff_at(2.5) == pytest.approx(4880.0, abs=2.0)
    # cached: the next call sends nothing and needs no server
    assert fetch_mist(6.0, -1.0, cache_dir=tmp_path, url="http://127.0.0.1:9/none/") == path
    assert len(mist_server.requests) == n0 + 1
    assert [f for f in os.listdir(tmp_path / "isochrones") if f.endswith(".part")] == []


def test_isochrones_at_one_age_and_two_metallicities(mist_server, tmp_path):
    """Lab step 11's pair (6 Gyr, [Fe/H] 0 and -1), then from the cache."""
    got = mist_isochrones(6.0, [0.0, -1.0], cache_dir=tmp_path, url=mist_server.url)
    assert [o for _, o in got] == ["MIST web interpolator"] * 2
    solar, poor = (iso for iso, _ in got)
    assert (solar.feh, poor.feh) == (0.0, -1.0)
    # the [Fe/H] trend a student compares with the fits: metal-poor giants are warmer
    g = np.linspace(1.5, 3.2, 5)
    assert np.all(poor.teff_at(g) - solar.teff_at(g) > 250)
    again = mist_isochrones(6.0, [0.0], cache_dir=tmp_path, url=mist_server.url)
    assert again[0][1] == "MIST cache"


def test_offline_is_a_clear_error_and_nothing_is_cached(closed_port_url, tmp_path):
    """Nobody listening: one line saying what to do instead; no cache file."""
    with pytest.raises(ConnectionError) as err:
        fetch_mist(6.0, 0.0, cache_dir=tmp_path, url=closed_port_url, timeout=5)
    msg = str(err.value)
    assert "cannot reach the MIST web interpolator" in msg and closed_port_url in msg
    assert "--isochrone FILE" in msg and "\n" not in msg
    assert not os.path.exists(mist_cache_path(6.0, 0.0, cache_dir=tmp_path))


@pytest.mark.parametrize("mode, match", [("no_link", "without a link to a zip file"),
                                         ("not_zip", "not a zip file"),
                                         ("wrong_feh", "not the MIST isochrone asked for")])
def test_a_wrong_answer_is_refused_and_the_cache_kept(mist_server, tmp_path, mode, match):
    """A page without a link, a broken zip or another [Fe/H]: refused, old file kept."""
    good = fetch_mist(6.0, 0.0, cache_dir=tmp_path, url=mist_server.url)
    before = Path(good).read_bytes()
    mist_server.mode = mode
    with pytest.raises(ValueError, match=match):
        fetch_mist(6.0, 0.0, cache_dir=tmp_path, url=mist_server.url, refresh=True)
    assert Path(good).read_bytes() == before  # the old isochrone stays until a good one comes
    assert sorted(os.listdir(tmp_path / "isochrones")) == [os.path.basename(good)]


def test_requests_outside_the_mist_grid_are_refused():
    """Ages, [Fe/H] and rotation MIST does not have are refused before any request."""
    with pytest.raises(ValueError, match="outside MIST's"):
        mist_form(30.0, 0.0)
    with pytest.raises(ValueError, match="outside MIST's"):
        mist_form(6.0, 1.0)
    with pytest.raises(ValueError, match="v/vcrit"):
        mist_form(6.0, 0.0, v_vcrit=0.2)


def test_cli_demo_offline_fails_before_any_work(closed_port_url, tmp_path, monkeypatch, capsys):
    """`demo --isochrone-source mist` offline: one line, before the survey is made."""
    monkeypatch.setenv("CANNON_FAST_MIST_URL", closed_port_url)
    monkeypatch.setenv("CANNON_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    rc = main(["demo", "--isochrone-source", "mist", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "cannot reach the MIST web interpolator" in err and "--isochrone FILE" in err
    assert not out.exists() and not (tmp_path / "cache").exists()  # no survey was generated
    rc = main(["demo", "--isochrone-feh", "0,solar", "--out", str(out), "-q"])
    assert rc == 1 and "--isochrone-feh '0,solar'" in capsys.readouterr().err


def test_cli_isochrones_fetches_once_and_copies(mist_server, tmp_path, monkeypatch, capsys):
    """`cannon-fast isochrones`: fetched, cached, copied to --out for `--isochrone FILE`."""
    monkeypatch.setenv("CANNON_FAST_MIST_URL", mist_server.url)
    monkeypatch.setenv("CANNON_FAST_CACHE", str(tmp_path / "cache"))
    n0 = len(mist_server.requests)
    rc = main(["isochrones", "--age", "6", "--feh", "0,-1", "--out", str(tmp_path / "iso")])
    text = capsys.readouterr().out
    assert rc == 0 and len(mist_server.requests) == n0 + 2
    assert "MIST 6 Gyr [Fe/H] = -1.00" in text and "RGB Teff at log g 3, 2, 1" in text
    copies = sorted(p.name for p in (tmp_path / "iso").iterdir())
    assert copies == ["MIST_6Gyr_feh+0.00.iso", "MIST_6Gyr_feh-1.00.iso"]
    (iso,) = read_mist(tmp_path / "iso" / copies[1])
    assert iso.feh == -1.0 and iso.teff_at(2.0) == pytest.approx(4715.0, abs=2.0)
    rc = main(["isochrones", "--out", str(tmp_path / "iso")])  # defaults 6 Gyr, 0 and -1
    assert rc == 1 and "exists; pass --force" in capsys.readouterr().err
    rc = main(["isochrones", "--out", str(tmp_path / "iso"), "--force"])
    assert rc == 0 and len(mist_server.requests) == n0 + 2  # from the cache
