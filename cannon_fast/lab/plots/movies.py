"""Movies of the model spectrum (lab steps 13 and 14).

``movie_metallicity``: the model spectrum over 16,000-16,200 Å as [Fe/H]
goes from -1 to +0.5 at fixed Teff and log g ([Mg/Fe] = [Si/Fe] = 0, solar
scaled). ``movie_rgb``: the same window as the star climbs the red giant
branch, log g from 3.5 to 0.5 with Teff following an isochrone (a MIST or
PARSEC file, or an ``Isochrone``) or, by default, the survey's own giant
branch fitted to the model's training labels, at [Fe/H] = 0.

Frames are drawn with ``matplotlib.animation.FuncAnimation`` and written as a
GIF (``PillowWriter``, always) and an MP4 (``FFMpegWriter``) when an ffmpeg
is found (:func:`find_ffmpeg`: the PATH, else the binary that the
``imageio-ffmpeg`` package ships, installed by the ``movies`` extra); when
none is, that is said once per process (logged) and recorded in
``MovieResult.notes``. Frames whose labels lie outside the
training range are marked "extrapolated" in their title.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import numpy as np

from ..._util import atomic_path, progress
from ._labels import label_name

__all__ = ["MovieResult", "movie_metallicity", "movie_rgb", "lab_movies", "render_frame",
           "find_ffmpeg", "model_wavelength"]

_log = logging.getLogger("cannon_fast.movies")
_FFMPEG_NOTICE = {"shown": False}
_SOLAR_ALPHA = {"MG_FE": 0.0, "SI_FE": 0.0, "ALPHA_M": 0.0, "ALPHA_FE": 0.0, "O_FE": 0.0}


@dataclasses.dataclass
class MovieResult:
    """What a movie function wrote.

    Attributes
    ----------
    gif : str
        Path of the GIF.
    mp4 : str or None
        Path of the MP4 (None without ffmpeg).
    labels : ndarray, (F, L)
        Labels of each frame.
    label_names : list of str
    n_frames : int
    notes : list of str
        E.g. "ffmpeg not found", the track used, extrapolated frames.
    """

    gif: str
    mp4: str | None
    labels: np.ndarray
    label_names: list
    n_frames: int
    notes: list


def model_wavelength(model, wavelength=None):
    """Vacuum wavelengths (Å) of the model's pixels.

    Parameters
    ----------
    model : CannonModel
    wavelength : array_like (P,), optional
        Given explicitly (for a model on a custom grid).

    Returns
    -------
    ndarray, (P,)
    """
    if wavelength is not None:
        wave = np.asarray(wavelength, dtype=np.float64)
        if wave.shape != (model.n_pixels,):
            raise ValueError(f"wavelength has shape {wave.shape}, the model "
                             f"{model.n_pixels} pixels")
        return wave
    from ...apogee.files import GRID_SEGMENTS
    if model.n_pixels not in GRID_SEGMENTS:
        raise ValueError(f"the model has {model.n_pixels} pixels, not an APOGEE grid "
                         f"({', '.join(map(str, GRID_SEGMENTS))}): pass wavelength=")
    from ..binaries import pixel_grid
    return pixel_grid(model.n_pixels)[1]


def _label_text(names, lab):
    parts = []
    for n, v in zip(names, lab):
        if n == "TEFF":
            parts.append(f"{label_name(n)} = {v:.0f} K")
        elif n == "LOGG":
            parts.append(f"{label_name(n)} = {v:.2f}")
        else:
            parts.append(f"{label_name(n)} = {v:+.2f}")
    return ", ".join(parts)


def render_frame(model, labels, path=None, wave_range=(16000.0, 16200.0), wavelength=None,
                 reference=None, title=None, dpi=100):
    """One frame as a static figure (the same drawing as the movies), optionally saved.

    Parameters
    ----------
    model : CannonModel
    labels : array_like, (L,)
    path : str or os.PathLike, optional
    wave_range : (float, float), optional
    wavelength : array_like (P,), optional
    reference : array_like (L,), optional
        Labels of a grey reference spectrum.
    title : str, optional
    dpi : int, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    wave = model_wavelength(model, wavelength)
    sel = (wave >= wave_range[0]) & (wave <= wave_range[1])
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    if reference is not None:
        ax.plot(wave[sel], model.predict(np.asarray(reference, float))[sel], color="0.7", lw=1)
    ax.plot(wave[sel], model.predict(np.asarray(labels, float))[sel], color="k", lw=1.1)
    ax.set_xlim(*wave_range)
    ax.set_xlabel("vacuum wavelength [Å]")
    ax.set_ylabel("normalized flux")
    ax.set_title(title or _label_text(model.label_names, labels), fontsize=10)
    if path is not None:
        with atomic_path(os.fspath(path)) as tmp:
            fig.savefig(tmp, dpi=dpi, format=os.path.splitext(os.fspath(path))[1].lstrip(".")
                        or "png")
    return fig


def _gif_writer(fps):
    """Return a ``PillowWriter`` that names the GIF format (temp files lack .gif)."""
    # the atomic temporary file has no .gif suffix, so Pillow cannot infer the format
    from matplotlib.animation import PillowWriter

    class _GifWriter(PillowWriter):
        def finish(self):
            self._frames[0].save(self.outfile, format="GIF", save_all=True,
                                 append_images=self._frames[1:], duration=int(1000 / self.fps),
                                 loop=0)

    return _GifWriter(fps=fps)


def _training_support(model, frames, radius=0.5):
    """Training stars within ``radius`` (scaled label units) of each frame's labels."""
    x_t = model.scale_labels(model.training_labels)  # (N, L)
    x_f = model.scale_labels(frames)  # (F, L)
    d2 = np.sum((x_f[:, None, :] - x_t[None, :, :]) ** 2, axis=2)
    return np.sum(d2 < radius ** 2, axis=1)


def _write_movie(model, frames, out, wave_range, wavelength, fps, dpi, mp4, subtitle,
                 reference_index=0, progress_bar=None, min_neighbours=3):
    """Animate ``frames`` (F, L) and write ``out`` (.gif) and an .mp4 beside it."""
    from matplotlib import animation
    from matplotlib.figure import Figure

    out = os.fspath(out)
    root, ext = os.path.splitext(out)
    gif = out if ext.lower() == ".gif" else root + ".gif"
    wave = model_wavelength(model, wavelength)
    sel = (wave >= wave_range[0]) & (wave <= wave_range[1])
    if sel.sum() < 2:
        raise ValueError(f"the model has no pixels in {wave_range[0]}-{wave_range[1]} Å "
                         f"(it covers {wave.min():.0f}-{wave.max():.0f} Å)")
    spectra = model.predict(frames)[:, sel]  # (F, P_sel)
    w = wave[sel]
    train = np.asarray(model.training_labels, dtype=np.float64)
    lo, hi = train.min(axis=0), train.max(axis=0)
    outside = np.any((frames < lo) | (frames > hi), axis=1)
    sparse = _training_support(model, frames) < min_neighbours
    names = list(model.label_names)

    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(w, spectra[reference_index], color="0.75", lw=1.0,
            label="first frame: " + _label_text(names, frames[reference_index]))
    (line,) = ax.plot(w, spectra[0], color="k", lw=1.1, label="current")
    ax.set_xlim(*wave_range)
    pad = 0.03
    ax.set_ylim(min(spectra.min(), 1.0) - pad, max(spectra.max(), 1.0) + pad)
    ax.set_xlabel("vacuum wavelength [Å]")
    ax.set_ylabel("normalized flux")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
    title = ax.set_title("", fontsize=10)
    fig.suptitle(subtitle, fontsize=9, color="0.3")

    def update(k):
        line.set_ydata(spectra[k])
        tag = "  (extrapolated: outside the training range)" if outside[k] else (
            "  (extrapolated: few training stars nearby)" if sparse[k] else "")
        title.set_text(_label_text(names, frames[k]) + tag)
        return line, title

    anim = animation.FuncAnimation(fig, update, frames=len(frames), blit=False)
    notes = []
    if outside.any():
        notes.append(f"{int(outside.sum())} of {len(frames)} frames are outside the training "
                     "range (marked 'extrapolated')")
    if (sparse & ~outside).any():
        notes.append(f"{int((sparse & ~outside).sum())} of {len(frames)} frames are inside the "
                     f"training box but have fewer than {min_neighbours} training stars nearby "
                     "(marked 'extrapolated')")
    bar = progress(total=len(frames), desc="movie frames", unit="frame",
                   disable=None if progress_bar is None else not progress_bar)

    def _tick(i, n):
        bar.update(1)

    with atomic_path(gif) as tmp:
        anim.save(tmp, writer=_gif_writer(fps), dpi=dpi, progress_callback=_tick)
    bar.close()
    mp4_path = None
    ffmpeg = find_ffmpeg() if mp4 in ("auto", True) else None
    if mp4 is True and ffmpeg is None:
        raise ValueError("mp4=True but ffmpeg is not on the PATH (and imageio-ffmpeg is not "
                         "installed: pip install 'cannon_fast[movies]')")
    if ffmpeg is not None:
        import matplotlib

        mp4_path = root + ".mp4"
        with atomic_path(mp4_path) as tmp, \
                matplotlib.rc_context({"animation.ffmpeg_path": ffmpeg}):
            # the temporary name has no .mp4 suffix: name the container explicitly
            anim.save(tmp, writer=animation.FFMpegWriter(fps=fps, extra_args=["-f", "mp4"]),
                      dpi=dpi)
    elif mp4 == "auto":
        msg = ("ffmpeg not found: wrote the GIF only (install ffmpeg, or pip install "
               "'cannon_fast[movies]', for MP4 movies)")
        notes.append(msg)
        if not _FFMPEG_NOTICE["shown"]:
            _FFMPEG_NOTICE["shown"] = True
            _log.warning(msg)
    return gif, mp4_path, notes


def find_ffmpeg():
    """The ffmpeg executable for MP4 movies: on the PATH, else imageio-ffmpeg's; or None."""
    path = shutil.which("ffmpeg")
    if path:
        return path
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # the package without its binary
        return None


def _base_labels(model, overrides):
    names = list(model.label_names)
    train = np.asarray(model.training_labels, dtype=np.float64)
    base = np.median(train, axis=0)
    for n, v in _SOLAR_ALPHA.items():
        if n in names:
            base[names.index(n)] = v
    for n, v in overrides.items():
        if v is None:
            continue
        if n not in names:
            raise ValueError(f"the model has no label {n!r}; labels are {names}")
        base[names.index(n)] = float(v)
    return base


def movie_metallicity(model, out, teff=4750.0, logg=2.5, feh_range=(-1.0, 0.5), n_frames=31,
                      wave_range=(16000.0, 16200.0), wavelength=None, fps=8, dpi=90, mp4="auto",
                      fixed=None, alpha="solar", progress_bar=None):
    """Movie of the model spectrum as [Fe/H] changes at fixed Teff and log g.

    Parameters
    ----------
    model : CannonModel
        Labels must include FE_H (TEFF and LOGG are fixed when present).
    out : str or os.PathLike
        Output GIF path (``.gif``; an ``.mp4`` is written beside it with ffmpeg).
    teff, logg : float, optional
        The fixed atmospheric parameters (a typical red giant by default).
    feh_range : (float, float), optional
    n_frames : int, optional
    wave_range : (float, float), optional
        Å; 16,000-16,200 as in the lab.
    wavelength : array_like (P,), optional
        The model's wavelengths if it is not on an APOGEE grid.
    fps, dpi : int, optional
    mp4 : {"auto", True, False}, optional
        ``"auto"``: MP4 when ffmpeg is present.
    fixed : dict, optional
        Other labels to fix (default: the training median, with [Mg/Fe] and
        [Si/Fe] at 0, solar-scaled).
    alpha : {"solar", "trend"}, optional
        ``"solar"`` keeps [Mg/Fe] = [Si/Fe] = 0 (the lab's choice); ``"trend"``
        lets the other labels follow the training set's median at each [Fe/H]
        (metal-poor giants are alpha-enhanced, so solar-scaled metal-poor
        frames lie where the model has few training stars).
    progress_bar : bool, optional

    Returns
    -------
    MovieResult
    """
    names = list(model.label_names)
    if alpha not in ("solar", "trend"):
        raise ValueError(f"alpha must be 'solar' or 'trend', got {alpha!r}")
    if "FE_H" not in names:
        raise ValueError(f"the metallicity movie needs an FE_H label; the model has {names}")
    if int(n_frames) < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    base = _base_labels(model, dict(fixed or {}, TEFF=teff if "TEFF" in names else None,
                                    LOGG=logg if "LOGG" in names else None))
    frames = np.repeat(base[None], int(n_frames), axis=0)
    jf = names.index("FE_H")
    frames[:, jf] = np.linspace(feh_range[0], feh_range[1], int(n_frames))
    others = [n for n in names if n not in ("TEFF", "LOGG", "FE_H")]
    if alpha == "trend":
        train = np.asarray(model.training_labels, dtype=np.float64)
        for k, feh in enumerate(frames[:, jf]):
            near = np.argsort(np.abs(train[:, jf] - feh))[:max(10, len(train) // 20)]
            for n in others:
                if n not in (fixed or {}):
                    frames[k, names.index(n)] = np.median(train[near, names.index(n)])
        sub = ("model spectrum vs [Fe/H] at fixed Teff/log g; "
               + ", ".join(others) + " follow the training set's trend with [Fe/H]")
    else:
        sub = ("model spectrum vs [Fe/H] at fixed Teff/log g; other labels: "
               + _label_text(others, [base[names.index(n)] for n in others]))
    gif, mp4_path, notes = _write_movie(model, frames, out, wave_range, wavelength, fps, dpi, mp4,
                                        sub, progress_bar=progress_bar)
    return MovieResult(gif=gif, mp4=mp4_path, labels=frames, label_names=names,
                       n_frames=len(frames), notes=notes)


def movie_rgb(model, out, isochrone=None, logg_range=(3.5, 0.5), feh=0.0, n_frames=31,
              wave_range=(16000.0, 16200.0), wavelength=None, fps=8, dpi=90, mp4="auto",
              fixed=None, age_gyr=None, progress_bar=None):
    """Movie of the model spectrum as a star climbs the red giant branch at fixed [Fe/H].

    Parameters
    ----------
    model : CannonModel
        Labels must include TEFF and LOGG.
    out : str or os.PathLike
        Output GIF path.
    isochrone : str, os.PathLike, Isochrone or None, optional
        Teff(log g) from this isochrone's RGB (a file is read and the
        isochrone nearest [Fe/H] = ``feh`` (and ``age_gyr``) used); ``None``
        fits the survey's giant branch to ``model.training_labels``
        (``cannon_fast.lab.isochrones.giant_branch``).
    logg_range : (float, float), optional
        Start and end log g (3.5 -> 0.5 as in the lab).
    feh : float, optional
    n_frames : int, optional
    wave_range, wavelength, fps, dpi, mp4, fixed, progress_bar
        As in ``movie_metallicity``.
    age_gyr : float, optional
        Age to select in a multi-age isochrone file.

    Returns
    -------
    MovieResult
        ``notes`` names the track used.
    """
    from ..isochrones import Isochrone, giant_branch, load_isochrone

    names = list(model.label_names)
    for need in ("TEFF", "LOGG"):
        if need not in names:
            raise ValueError(f"the RGB movie needs a {need} label; the model has {names}")
    if int(n_frames) < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    logg = np.linspace(logg_range[0], logg_range[1], int(n_frames))
    notes = []
    if isochrone is None:
        train = np.asarray(model.training_labels, dtype=np.float64)
        cols = {n: train[:, names.index(n)] for n in ("TEFF", "LOGG")}
        cols["FE_H"] = train[:, names.index("FE_H")] if "FE_H" in names else np.zeros(len(train))
        gb = giant_branch(cols, feh=feh, feh_window=0.3 if "FE_H" in names else 10.0)
        teff = gb.teff(logg)
        track = gb.description
        short = f"the survey's giant branch ({gb.n_stars} training stars)"
        lo, hi = gb.logg_range
        if logg.min() < lo - 1e-9 or logg.max() > hi + 1e-9:
            notes.append(f"the survey giant branch is fitted over log g {lo:.2f}-{hi:.2f} and "
                         "extrapolated (quadratic) beyond it")
    else:
        iso = isochrone if isinstance(isochrone, Isochrone) else \
            load_isochrone(isochrone, age_gyr=age_gyr, feh=feh, giants=False)
        teff = iso.teff_at(logg)
        track = f"isochrone {iso.label} ({os.path.basename(iso.path)}), RGB"
        short = f"{iso.label} RGB"
        if abs(iso.feh - feh) > 0.1:
            notes.append(f"the isochrone's metallicity ({iso.feh:+.2f}) differs from the movie's "
                         f"[Fe/H] = {feh:+.2f}")
        miss = ~np.isfinite(teff)
        if miss.all():
            raise ValueError(f"{iso.path}: the isochrone's RGB does not cover log g "
                             f"{logg_range[0]}-{logg_range[1]}")
        if miss.any():
            ok = np.flatnonzero(~miss)
            notes.append(f"the isochrone's RGB covers log g {logg[ok].min():.2f}-"
                         f"{logg[ok].max():.2f}: {int(miss.sum())} frames outside it dropped")
            logg, teff = logg[ok], teff[ok]
    notes.insert(0, "Teff(log g) from the " + track)
    base = _base_labels(model, dict(fixed or {}, FE_H=feh if "FE_H" in names else None))
    frames = np.repeat(base[None], len(logg), axis=0)
    frames[:, names.index("LOGG")] = logg
    frames[:, names.index("TEFF")] = teff
    sub = f"climbing the red giant branch at [Fe/H] = {feh:+.2f}; Teff(log g) from {short}"
    gif, mp4_path, more = _write_movie(model, frames, out, wave_range, wavelength, fps, dpi, mp4,
                                       sub, progress_bar=progress_bar)
    return MovieResult(gif=gif, mp4=mp4_path, labels=frames, label_names=names,
                       n_frames=len(frames), notes=notes + more)


def lab_movies(model, out_dir, isochrone=None, n_frames=31, fps=8, mp4="auto", progress_bar=None):
    """Both movies of the lab (steps 13 and 14) into ``out_dir``.

    Parameters
    ----------
    model : CannonModel
    out_dir : str or os.PathLike
    isochrone : str, os.PathLike or Isochrone, optional
        For the RGB movie (default: the survey's giant branch).
    n_frames, fps : int, optional
    mp4 : {"auto", True, False}, optional
    progress_bar : bool, optional

    Returns
    -------
    dict
        ``files`` (paths written), ``notes`` (list of str), ``results``
        (the two ``MovieResult``).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    a = movie_metallicity(model, os.path.join(out_dir, "movie_feh.gif"), n_frames=n_frames,
                          fps=fps, mp4=mp4, progress_bar=progress_bar)
    b = movie_rgb(model, os.path.join(out_dir, "movie_rgb.gif"), isochrone=isochrone,
                  n_frames=n_frames, fps=fps, mp4=mp4, progress_bar=progress_bar)
    files = [p for r in (a, b) for p in (r.gif, r.mp4) if p]
    notes = list(dict.fromkeys(a.notes + b.notes))
    return dict(files=files, notes=notes, results=[a, b])
