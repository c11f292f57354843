"""Shared fixtures: the backends, seeded synthetic data, and the one way to find ../shared."""
import os
from pathlib import Path

import pytest

from cannon_fast.core.backends import available_backends


def _shared_dir():
    """../shared next to the repository (override with CANNON_FAST_SHARED)."""
    env = os.environ.get("CANNON_FAST_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    """The project's shared data folder; skip outside CI when absent, fail in CI."""
    path = _shared_dir()
    if not (path / "data" / "real").is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data folder is missing: {path}")
        pytest.skip(f"shared data folder not found at {path} (set CANNON_FAST_SHARED)")
    return path


@pytest.fixture(params=available_backends())
def backend(request):
    """Every backend available on this machine (numpy reference, numba, c)."""
    return request.param


@pytest.fixture(params=[b for b in available_backends() if b != "numpy"])
def fast_backend(request):
    """Every available backend but the numpy reference: what a comparison with it can test."""
    return request.param


# ----------------------------------------------------------------------------- MIST server
def mist_iso_text(age_gyr, feh):
    """A MIST ``.iso`` table (the interpolator's format) of a made-up isochrone.

    Its giant branch is ``Teff = 4600 + 330 (log g - 2.5) - 280 [Fe/H] - 150 log10(age/6)``
    K, the red clump 150 K warmer at log g 2.4-2.6: metal-poor and young giants are warmer,
    as in MIST.
    """
    import numpy as np

    rows = []
    for k, g in enumerate(np.linspace(4.6, 3.9, 8)):  # main sequence
        rows.append((200 + k, 5900 - 300 * (4.6 - g) - 150 * feh, g, 0))
    for k, g in enumerate(np.linspace(3.8, 0.5, 34)):  # red giant branch
        rows.append((400 + k, 4600 + 330 * (g - 2.5) - 280 * feh - 150 * np.log10(age_gyr / 6),
                     g, 2))
    for k, g in enumerate((2.6, 2.5, 2.4)):  # red clump
        rows.append((640 + k, 4750 + 330 * (g - 2.5) - 280 * feh, g, 3))
    lines = ["# MIST version number  = 1.2", "# MESA revision number =     7503",
             "# " + "-" * 60, "#  Yinit        Zinit   [Fe/H]   [a/Fe]  v/vcrit",
             f"# 0.2703  1.42857E-02  {feh:7.2f}     0.00     0.40", "# " + "-" * 60,
             "# number of isochrones =     1", "# " + "-" * 60,
             f"# number of EEPs, cols =   {len(rows)}   10",
             "# " + " ".join(map(str, range(1, 11))),
             "# EEP log10_isochrone_age_yr initial_mass star_mass log_Teff log_g log_L "
             "[Fe/H]_init [Fe/H] phase"]
    for eep, teff, g, phase in rows:
        lines.append(f"  {eep} {np.log10(age_gyr * 1e9):.6f} 1.1 1.05 {np.log10(teff):.6f} "
                     f"{g:.4f} {4.44 - g:.4f} {feh:.2f} {feh:.2f} {phase}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def mist_server():
    """A loopback stand-in for the MIST web interpolator (no network in tests).

    POST ``/MIST/iso_form.php`` answers a page linking ``tmp/<name>.iso.zip``, a zip of
    :func:`mist_iso_text` at the form's age and [Fe/H]. ``server.mode`` makes it answer
    wrongly: ``"no_link"``, ``"not_zip"`` or ``"wrong_feh"``; ``server.requests`` records
    the forms received. ``server.url`` is the MIST folder's URL.
    """
    import http.server
    import io
    import threading
    import urllib.parse
    import zipfile

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def _send(self, body, ctype):
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            srv = self.server
            form = dict(urllib.parse.parse_qsl(
                self.rfile.read(int(self.headers["Content-Length"])).decode(),
                keep_blank_values=True))
            srv.requests.append(form)
            if self.path != "/MIST/iso_form.php" or srv.mode == "no_link":
                return self._send(b"<html><body>Server busy, try later</body></html>",
                                  "text/html")
            feh = float(form["FeH_value"]) + (0.5 if srv.mode == "wrong_feh" else 0.0)
            name = f"MIST_iso_{len(srv.requests):04d}.iso"
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr(name, mist_iso_text(float(form["age_value"]) / 1e9, feh))
            srv.files[name + ".zip"] = b"not a zip" if srv.mode == "not_zip" else buf.getvalue()
            self._send(f"<html><body>Your isochrone: <a href=\"tmp/{name}.zip\">{name}.zip"
                       "</a></body></html>".encode(), "text/html")

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            if not self.path.startswith("/MIST/tmp/") or name not in self.server.files:
                self.send_error(404)
                return
            self._send(self.server.files[name], "application/zip")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests, server.files, server.mode = [], {}, "ok"
    server.url = f"http://127.0.0.1:{server.server_address[1]}/MIST/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url():
    """A loopback URL where nothing listens: an offline interpolator."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/MIST/"


@pytest.fixture(scope="session")
def mist_table():
    """:func:`mist_iso_text`, for tests that write a MIST file of their own."""
    return mist_iso_text
