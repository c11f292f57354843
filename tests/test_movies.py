"""Movies of the model spectrum: frame counts, labels, the ffmpeg fallback, the CLI."""
import imageio_ffmpeg
import numpy as np
import PIL.Image
import pytest

from cannon_fast import CannonModel
from cannon_fast.lab.plots import movies
from cannon_fast.testing import make_synthetic

# 300 apStar pixels starting at index 4150: 15,977-16,243 Å
WAVE = 10 ** (4.179 + 6e-6 * np.arange(4150, 4450))


@pytest.fixture(scope="module")
def model():
    tr = make_synthetic(n_stars=120, n_pix=300, n_labels=5, seed=41)
    return CannonModel(tr.label_names).train(tr.flux, tr.ivar, tr.labels)


def test_metallicity_movie(model, tmp_path, monkeypatch):
    monkeypatch.setattr(movies, "find_ffmpeg", lambda: None)
    res = movies.movie_metallicity(model, tmp_path / "feh.gif", n_frames=6, wavelength=WAVE,
                                   fps=4, dpi=50)
    with PIL.Image.open(res.gif) as im:
        assert im.n_frames == 6
    assert res.mp4 is None and any("ffmpeg not found" in n for n in res.notes)
    feh = res.labels[:, model.label_names.index("FE_H")]
    np.testing.assert_allclose(feh, np.linspace(-1.0, 0.5, 6))
    assert np.all(res.labels[:, 0] == 4750.0) and np.all(res.labels[:, 1] == 2.5)
    assert np.all(res.labels[:, 3:] == 0.0)  # [Mg/Fe] = [Si/Fe] = 0, solar-scaled
    trend = movies.movie_metallicity(model, tmp_path / "trend.gif", n_frames=3, wavelength=WAVE,
                                     dpi=30, alpha="trend", mp4=False)
    assert not np.all(trend.labels[:, 3] == 0.0)  # [Mg/Fe] follows the training set
    with pytest.raises(ValueError, match="alpha must be"):
        movies.movie_metallicity(model, tmp_path / "x.gif", wavelength=WAVE, alpha="high")
    with pytest.raises(ValueError, match="mp4=True but ffmpeg"):
        movies.movie_metallicity(model, tmp_path / "x.gif", n_frames=2, wavelength=WAVE,
                                 mp4=True, dpi=30)


def test_rgb_movie_giant_branch_and_isochrone(model, tmp_path):
    res = movies.movie_rgb(model, tmp_path / "rgb.gif", n_frames=5, wavelength=WAVE, dpi=50,
                           mp4=False)
    with PIL.Image.open(res.gif) as im:
        assert im.n_frames == 5
    np.testing.assert_allclose(res.labels[:, 1], np.linspace(3.5, 0.5, 5))
    assert np.all(np.isfinite(res.labels[:, 0]))
    assert "survey giant branch" in res.notes[0]
    iso = tmp_path / "tiny.iso"
    from test_isochrones import MIST_ISO
    iso.write_text(MIST_ISO)
    res = movies.movie_rgb(model, tmp_path / "rgb_iso.gif", isochrone=iso, n_frames=7,
                           wavelength=WAVE, dpi=50, mp4=False, age_gyr=6.0)
    # the tiny track's RGB spans log g 1.5-3.4: frames 3.5, 1.0, 0.5 are dropped (and said)
    assert res.n_frames == 4 and any("dropped" in n for n in res.notes)
    with PIL.Image.open(res.gif) as im:
        assert im.n_frames == 4
    with pytest.raises(FileNotFoundError, match="isochrone file not found"):
        movies.movie_rgb(model, tmp_path / "r.gif", isochrone=tmp_path / "none.iso",
                         wavelength=WAVE)


def test_frame_and_errors(model, tmp_path):
    fig = movies.render_frame(model, [4500, 2.0, 0.0, 0.0, 0.0], tmp_path / "f.png",
                              wavelength=WAVE, reference=[4500, 2.0, -1.0, 0.0, 0.0])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "vacuum wavelength [Å]" and ax.get_ylabel() == "normalized flux"
    assert "[Fe/H] = +0.00" in ax.get_title()
    with pytest.raises(ValueError, match="not an APOGEE grid"):
        movies.movie_metallicity(model, tmp_path / "a.gif")
    with pytest.raises(ValueError, match="no pixels in"):
        movies.movie_metallicity(model, tmp_path / "a.gif", wavelength=WAVE,
                                 wave_range=(15000, 15100))


def test_cli_movie(model, tmp_path, capsys, monkeypatch):
    from cannon_fast.cli import main
    # the CLI needs an APOGEE-grid model: embed the tiny model's pixels in an 8575 grid
    big = CannonModel(model.label_names)
    for k in ("label_offsets", "label_scales", "training_labels", "training_hash"):
        setattr(big, k, getattr(model, k))
    big.theta = np.zeros((8575, model.n_terms))
    big.theta[:, 0] = 1.0
    big.theta[4150:4450] = model.theta
    big.s2 = np.zeros(8575)
    big.theta_cov = np.zeros((8575, model.theta_cov.shape[1]))
    big.pixel_flags = np.zeros(8575, np.uint8)
    mpath = tmp_path / "m.npz"
    big.write(mpath)
    rc = main(["movie", "--model", str(mpath), "--out", str(tmp_path / "mv"), "--frames", "3",
               "--no-mp4"])
    out = capsys.readouterr().out
    assert rc == 0 and "metallicity:" in out and "rgb:" in out
    assert (tmp_path / "mv" / "spectrum_vs_feh.gif").exists()
    rc = main(["movie", "--model", str(mpath), "--out", str(tmp_path / "mv"), "--frames", "3"])
    assert rc == 1 and "pass --force" in capsys.readouterr().err


def test_mp4_has_every_frame(model, tmp_path, monkeypatch):
    """A real MP4, with the ffmpeg that imageio-ffmpeg ships when none is on the PATH."""
    monkeypatch.setattr(movies.shutil, "which", lambda name: None)
    assert movies.find_ffmpeg() == imageio_ffmpeg.get_ffmpeg_exe()
    res = movies.movie_metallicity(model, tmp_path / "feh.gif", n_frames=7, wavelength=WAVE,
                                   fps=5, dpi=41, mp4=True)  # an odd frame size on purpose
    assert res.mp4 == str(tmp_path / "feh.mp4")
    with open(res.mp4, "rb") as fh:
        assert fh.read(12)[4:8] == b"ftyp"  # an MP4 container
    n_frames, secs = imageio_ffmpeg.count_frames_and_secs(res.mp4)
    assert n_frames == 7 and secs == pytest.approx(7 / 5, abs=0.05)
    assert not any("ffmpeg not found" in n for n in res.notes)
