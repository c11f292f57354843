"""MIST isochrones from the MIST web interpolator, cached on disk (lab step 11).

Lab step 11 overlays a 6 Gyr MIST isochrone of solar metallicity and one of
[Fe/H] = -1 on the Kiel diagram. The MIST web interpolator (Choi et al. 2016,
``https://waps.cfa.harvard.edu/MIST/interp_isos.html``) makes them: its HTML form
is POSTed to ``iso_form.php``; the page it answers links a zip file that holds
one ``.iso`` table (the "theory" output), read by
:func:`cannon_fast.lab.isochrones.read_mist`. Tools such as ``ezmist`` fill in
the same form.

Each isochrone is fetched once and kept under ``<cache>/isochrones/`` (the cache
root of :func:`cannon_fast._util.cache_root`), written atomically after it has
been read back and checked to be the age and [Fe/H] asked for; later runs read
the cached file and need no network. ``$CANNON_FAST_MIST_URL`` points the
fetch at another server (a mirror, or a test's loopback server).

References
----------
Choi et al. 2016, ApJ 823, 102; Dotter 2016, ApJS 222, 8 (MIST).
"""
from __future__ import annotations

import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from .._util import atomic_path, cache_root
from .isochrones import read_mist, select_isochrone

__all__ = ["MIST_URL", "MIST_FORM_PAGE", "mist_form", "mist_cache_path", "fetch_mist",
           "mist_isochrones"]

#: The MIST pages' folder: the form posts to ``iso_form.php`` in it.
MIST_URL = "https://waps.cfa.harvard.edu/MIST/"
#: The interpolator's page, named in the messages for a user who downloads by hand.
MIST_FORM_PAGE = MIST_URL + "interp_isos.html"
#: Environment variable that replaces :data:`MIST_URL`.
URL_ENV = "CANNON_FAST_MIST_URL"
#: A fetched isochrone must be this close to what was asked (the interpolator's own
#: rounding is far smaller): [Fe/H] in dex, age in dex of log10(age).
_TOLERANCE = {"feh": 0.02, "log_age": 0.005}


def mist_form(age_gyr, feh, v_vcrit=0.4):
    """The interpolator's form fields for one isochrone (theory output, no photometry).

    Parameters
    ----------
    age_gyr : float
        Age in Gyr (sent as a linear age in years).
    feh : float
        Initial [Fe/H].
    v_vcrit : {0.4, 0.0}
        Initial rotation (MIST's default grid is 0.4).

    Returns
    -------
    dict
    """
    age_gyr, feh = _check_request(age_gyr, feh)
    if v_vcrit not in (0.0, 0.4):
        raise ValueError(f"MIST has v/vcrit = 0.4 or 0.0, not {v_vcrit}")
    return {"version": "1.2", "v_div_vcrit": f"vvcrit{v_vcrit:.1f}", "age_scale": "linear",
            "age_type": "single", "age_value": f"{age_gyr * 1e9:.0f}", "age_range_low": "",
            "age_range_high": "", "age_range_delta": "", "age_list": "",
            "FeH_value": f"{feh:.4f}", "theory_output": "basic", "output_option": "theory",
            "output": "UBVRIJHKsKp", "Av_value": "0"}


def _check_request(age_gyr, feh):
    try:
        age_gyr, feh = float(age_gyr), float(feh)
    except (TypeError, ValueError):
        raise ValueError(f"isochrone age and [Fe/H] must be numbers, got {age_gyr!r}, "
                         f"{feh!r}") from None
    # the MIST grid: log10(age/yr) 5.0-10.3, [Fe/H] -4.0 to +0.5
    if not 1e-4 <= age_gyr <= 19.95:
        raise ValueError(f"isochrone age {age_gyr} Gyr is outside MIST's 0.0001-19.95 Gyr")
    if not -4.0 <= feh <= 0.5:
        raise ValueError(f"isochrone [Fe/H] = {feh} is outside MIST's -4.0 to +0.5")
    return age_gyr, feh


def mist_cache_path(age_gyr, feh, v_vcrit=0.4, cache_dir=None):
    """Where the isochrone of this age and [Fe/H] is cached."""
    age_gyr, feh = _check_request(age_gyr, feh)
    root = os.fspath(cache_dir) if cache_dir is not None else cache_root()
    return os.path.join(root, "isochrones",
                        f"MIST_v1.2_vvcrit{v_vcrit:.1f}_age{age_gyr:.4f}Gyr_feh{feh:+.2f}.iso")


def fetch_mist(age_gyr, feh, cache_dir=None, url=None, v_vcrit=0.4, timeout=60.0,
               refresh=False):
    """Path of a MIST isochrone file: the cached one, or fetched from the interpolator.

    Parameters
    ----------
    age_gyr, feh : float
    cache_dir : str or os.PathLike, optional
        Cache root (default ``$CANNON_FAST_CACHE`` or ``~/.cache/cannon_fast``).
    url : str, optional
        The MIST pages' folder (default ``$CANNON_FAST_MIST_URL`` or :data:`MIST_URL`).
    v_vcrit : {0.4, 0.0}
    timeout : float
        Seconds per request.
    refresh : bool
        Fetch again even when cached (the cached file is replaced only once the
        new one has been read and checked).

    Returns
    -------
    str

    Raises
    ------
    ConnectionError
        The interpolator cannot be reached (offline); the message says how to
        give files instead.
    ValueError
        It answered something that is not the isochrone asked for.
    """
    path = mist_cache_path(age_gyr, feh, v_vcrit, cache_dir)
    if os.path.exists(path) and not refresh:
        return path
    base = url or os.environ.get(URL_ENV) or MIST_URL
    base = base if base.endswith("/") else base + "/"
    form = mist_form(age_gyr, feh, v_vcrit)
    page = _get(urllib.parse.urljoin(base, "iso_form.php"), base, timeout,
                data=urllib.parse.urlencode(form).encode("ascii")).decode("utf-8", "replace")
    link = re.search(r"""href\s*=\s*["']([^"']+\.zip)["']""", page, re.IGNORECASE)
    if link is None:
        text = " ".join(re.sub(r"<[^>]+>", " ", page).split())[:200]
        raise ValueError(f"{base}iso_form.php answered without a link to a zip file (page "
                         f"text: {text!r}); the form may have changed: download the isochrone "
                         f"from {MIST_FORM_PAGE} and pass the file with --isochrone")
    zip_url = urllib.parse.urljoin(base, link.group(1))
    text = _unzip_iso(_get(zip_url, base, timeout), zip_url)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(text)
        _check_fetched(tmp, zip_url, age_gyr, feh)
    return path


def _get(request_url, base, timeout, data=None):
    """The body of a GET (or POST with ``data``); an unreachable server is a ConnectionError."""
    req = urllib.request.Request(request_url, data=data,
                                 headers={"User-Agent": "cannon_fast (MIST isochrones)"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as err:
        raise ConnectionError(f"the MIST web interpolator at {base} answered HTTP {err.code} "
                              f"({err.reason}) for {request_url}; {_OFFLINE_HINT}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConnectionError(f"cannot reach the MIST web interpolator at {base} ({reason}); "
                              f"{_OFFLINE_HINT}") from None


_OFFLINE_HINT = (f"give MIST or PARSEC isochrone files with --isochrone FILE (MIST: "
                 f"{MIST_FORM_PAGE}), or fetch once when online: they are cached for later runs")


def _unzip_iso(blob, zip_url):
    """The ``.iso`` (or ``.iso.cmd``) table inside the interpolator's zip file."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            names = [n for n in zf.namelist() if n.endswith((".iso", ".iso.cmd"))]
            if not names:
                raise ValueError(f"{zip_url}: the zip file holds no .iso table "
                                 f"(it has {zf.namelist()[:5]})")
            return zf.read(names[0])
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_url}: not a zip file ({len(blob)} bytes starting "
                         f"{blob[:40]!r})") from None


def _check_fetched(path, source, age_gyr, feh):
    """The fetched file must read as MIST and hold the isochrone asked for."""
    try:
        isos = read_mist(path)
        select_isochrone(isos, age_gyr=age_gyr, feh=feh, tolerance=_TOLERANCE)
    except ValueError as err:
        raise ValueError(f"{source}: not the MIST isochrone asked for ({age_gyr:g} Gyr, "
                         f"[Fe/H] = {feh:+.2f}): {err}") from None


def mist_isochrones(age_gyr, fehs, cache_dir=None, url=None, v_vcrit=0.4, timeout=60.0):
    """MIST isochrones at one age and several [Fe/H], cached or fetched.

    Parameters
    ----------
    age_gyr : float
    fehs : sequence of float
    cache_dir, url, v_vcrit, timeout
        As for :func:`fetch_mist`.

    Returns
    -------
    list of (Isochrone, str)
        Each isochrone and where it came from (``"MIST web interpolator"`` or
        ``"MIST cache"``).
    """
    out = []
    for feh in fehs:
        cached = os.path.exists(mist_cache_path(age_gyr, feh, v_vcrit, cache_dir))
        path = fetch_mist(age_gyr, feh, cache_dir=cache_dir, url=url, v_vcrit=v_vcrit,
                          timeout=timeout)
        iso = select_isochrone(read_mist(path), age_gyr=age_gyr, feh=feh)
        out.append((iso, "MIST cache" if cached else "MIST web interpolator"))
    return out
