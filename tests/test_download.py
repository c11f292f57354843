"""Downloads against a real HTTP server on 127.0.0.1 serving a mock SAS tree, with faults."""
import http.server
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cannon_fast.apogee import download as dl
from cannon_fast.apogee.files import fits_check, read_apstar

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def mock_tree(shared_dir, tmp_path_factory):
    """Make a 20-star mock DR17 SAS tree made by mock_survey.py (about a second)."""
    out = tmp_path_factory.mktemp("sas")
    subprocess.run([sys.executable, str(shared_dir / "tools" / "mock_survey.py"), "--format", "sas",
                    "--n-stars", "20", "--out", str(out), "--workers", "1"],
                   check=True, capture_output=True)
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP/1.1 keep-alive, byte ranges and injectable faults."""

    protocol_version = "HTTP/1.1"
    faults = {}          # basename -> list of faults, consumed one per request
    requests = []
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        name = os.path.basename(path)
        with self.lock:
            self.requests.append((name, self.headers.get("Range"), self.client_address[1]))
            todo = self.faults.get(name)
            fault = todo.pop(0) if todo else None
        if os.path.isdir(path) or not os.path.exists(path):
            return super().do_GET()
        if fault == "500":
            self.send_error(500, "injected")
            return
        with open(path, "rb") as fh:
            data = fh.read()
        if fault == "corrupt":           # the server's copy itself is truncated
            data = data[: len(data) // 3]
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/fits")
        self.end_headers()
        if fault in ("drop", "short"):   # announce everything, send part, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "stall":             # half, then silence longer than the client waits
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(1.0)
            self.close_connection = True
            return
        if fault == "slow":
            for i in range(0, len(body), 65536):
                self.wfile.write(body[i:i + 65536])
                self.wfile.flush()
                time.sleep(0.01)
            return
        self.wfile.write(body)


@pytest.fixture()
def server(mock_tree):
    """(base_url, handler class) for a threaded server rooted at the mock tree."""
    handler = type("H", (_Handler,), {"faults": {}, "requests": []})

    def factory(*a, **k):
        return handler(*a, directory=str(mock_tree), **k)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def _tree_files(root):
    return sorted(p for p in root.rglob("apStar-*.fits"))


def _fields(mock_tree):
    d = mock_tree / "dr17/apogee/spectro/redux/dr17/stars/apo25m"
    return sorted(p.name for p in d.iterdir())


def test_layouts():
    assert dl.apstar_path("dr17", "apo25m", "M15", "2M21295618+1210011") == (
        "dr17/apogee/spectro/redux/dr17/stars/apo25m/M15/apStar-dr17-2M21295618+1210011.fits")
    assert dl.apstar_path("dr16", "lco25m", "060+00", "2M1") == (
        "dr16/apogee/spectro/redux/r12/stars/lco25m/060+00/apStar-r12-2M1.fits")
    assert dl.allstar_path("dr16").endswith("allStar-r12-l33.fits")
    for bad in ("../x", "a/b", "..", ".hidden", "", "a\\b", "x\0"):
        with pytest.raises(ValueError, match="invalid field"):
            dl.validate_name("field", bad)
    with pytest.raises(ValueError, match="unsupported release"):
        dl.field_path("dr15", "apo25m", "M15")


def test_list_field_and_download_fields(server, mock_tree, tmp_path):
    base, handler = server
    fields = _fields(mock_tree)
    ids = dl.list_field("dr17", "apo25m", fields[0], base_url=base)
    want = sorted(p.name[len("apStar-dr17-"):-5] for p in
                  (mock_tree / f"dr17/apogee/spectro/redux/dr17/stars/apo25m/{fields[0]}")
                  .glob("apStar-*.fits"))
    assert ids == want and len(ids) > 0
    rep = dl.download_fields(fields + ["../etc"], tmp_path / "dl", base_url=base, workers=4,
                             retries=1, backoff=0.01)
    src = _tree_files(mock_tree)
    got = _tree_files(tmp_path / "dl")
    assert [p.relative_to(tmp_path / "dl") for p in got] == [p.relative_to(mock_tree) for p in src]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(src, got))
    assert len(rep.downloaded) == len(src)
    # the bad field is a listed failure; nothing was written outside dest
    assert [r.url for r in rep.failed] == ["field '../etc'"]
    assert "invalid field" in str(rep) and not (tmp_path / "etc").exists()
    # keep-alive: 4 worker connections (+ one per listing) serve all the requests
    conns = {c for _, _, c in handler.requests}
    assert len(conns) <= 4 + len(fields) + 2 < len(handler.requests)
    # rerun: everything already complete, nothing fetched
    n_req = len(handler.requests)
    rep2 = dl.download_fields(fields, tmp_path / "dl", base_url=base, workers=4)
    assert len(rep2.skipped) == len(src) and rep2.nbytes == 0
    assert len(handler.requests) - n_req == len(fields)  # only the listings


def test_download_fields_from_allstar(server, mock_tree, tmp_path):
    base, _ = server
    allstar = next(mock_tree.rglob("allStar-*.fits"))
    fields = _fields(mock_tree)
    rep = dl.download_fields(fields[:1] + ["NOSUCHFIELD"], tmp_path, base_url=base,
                             allstar=str(allstar), workers=2, retries=0)
    n = len(list((mock_tree / f"dr17/apogee/spectro/redux/dr17/stars/apo25m/{fields[0]}")
                 .glob("*.fits")))
    assert len(rep.downloaded) == n
    assert len(rep.failed) == 1 and "NOSUCHFIELD" in rep.failed[0].url


def test_faults_resume_and_retry(server, mock_tree, tmp_path):
    base, handler = server
    src = _tree_files(mock_tree)[:8]
    rels = [str(p.relative_to(mock_tree)) for p in src]
    handler.faults.update({src[0].name: ["drop", "drop"], src[1].name: ["500", "500"],
                           src[2].name: ["short"], src[3].name: ["slow"],
                           src[4].name: ["drop", "500", "short"]})
    rep = dl.download_files([f"{base}/{r}" for r in rels], tmp_path, workers=3, retries=4,
                            backoff=0.01, timeout=10, base_url=base)
    assert rep.ok, str(rep)
    for p, r in zip(src, rels):
        assert (tmp_path / r).read_bytes() == p.read_bytes()
    # resumed with a Range request after the dropped connection, not restarted
    ranges = [rg for n, rg, _ in handler.requests if n == src[0].name]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert not list(tmp_path.rglob("*.part"))
    assert {r.attempts for r in rep.results if r.path.endswith(src[4].name)} == {4}


def test_stalled_server_times_out_and_resumes(server, mock_tree, tmp_path):
    base, handler = server
    p = _tree_files(mock_tree)[3]
    rel = str(p.relative_to(mock_tree))
    handler.faults[p.name] = ["stall"]
    t0 = time.perf_counter()
    rep = dl.download_files([f"{base}/{rel}", f"{base}/{rel}"], tmp_path, retries=2,
                            backoff=0.01, timeout=0.3, base_url=base)
    assert time.perf_counter() - t0 < 5
    assert rep.ok and len(rep.results) == 1 and rep.results[0].attempts == 2
    assert (tmp_path / rel).read_bytes() == p.read_bytes()
    assert [rg is not None for n, rg, _ in handler.requests if n == p.name] == [False, True]


def test_interrupted_then_rerun(server, mock_tree, tmp_path):
    """Out of retries mid-file: nothing looks complete; a rerun resumes and finishes."""
    base, handler = server
    p = _tree_files(mock_tree)[0]
    rel = str(p.relative_to(mock_tree))
    handler.faults[p.name] = ["drop", "drop"]
    rep = dl.download_files([f"{base}/{rel}"], tmp_path, retries=1, backoff=0.01, base_url=base)
    assert len(rep.failed) == 1 and "bytes" in rep.failed[0].error
    assert not (tmp_path / rel).exists()
    part = tmp_path / os.path.dirname(rel) / f".{p.name}.part"
    assert part.exists() and 0 < part.stat().st_size < p.stat().st_size
    with pytest.raises(ValueError, match="truncated"):
        fits_check(part)
    have = part.stat().st_size
    rep = dl.download_files([f"{base}/{rel}"], tmp_path, retries=1, backoff=0.01, base_url=base)
    assert rep.ok and (tmp_path / rel).read_bytes() == p.read_bytes()
    assert rep.results[0].nbytes == p.stat().st_size - have   # resumed, not restarted
    last = [rg for n, rg, _ in handler.requests if n == p.name][-1]
    assert last == f"bytes={have}-" and not part.exists()


def test_corrupt_on_server_never_complete(server, mock_tree, tmp_path):
    base, handler = server
    p = _tree_files(mock_tree)[1]
    rel = str(p.relative_to(mock_tree))
    handler.faults[p.name] = ["corrupt"] * 5
    rep = dl.download_files([f"{base}/{rel}"], tmp_path, retries=2, backoff=0.01, base_url=base)
    assert len(rep.failed) == 1 and "not a complete FITS file" in rep.failed[0].error
    assert not (tmp_path / rel).exists()
    assert not list(tmp_path.rglob("*.part"))


def test_damaged_existing_file_is_refetched(server, mock_tree, tmp_path):
    base, _ = server
    p = _tree_files(mock_tree)[2]
    rel = str(p.relative_to(mock_tree))
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(p.read_bytes()[:5000])
    rep = dl.download_files([f"{base}/{rel}"], tmp_path, base_url=base)
    assert len(rep.downloaded) == 1
    assert read_apstar(tmp_path / rel).flux.shape == (8575,)


def test_404_unreachable_and_escape(server, tmp_path):
    base, _ = server
    with socket_closed_port() as port:
        dead = f"http://127.0.0.1:{port}/x/apStar-dr17-2M0.fits"
        t0 = time.perf_counter()
        rep = dl.download_files([f"{base}/nope/apStar-dr17-2M1.fits", dead,
                                 (f"{base}/x.fits", "../outside.fits")],
                                tmp_path / "d", retries=2, backoff=0.01, workers=3)
        assert time.perf_counter() - t0 < 10
    errs = {os.path.basename(r.url): r.error for r in rep.failed}
    assert len(rep.failed) == 3
    assert errs["apStar-dr17-2M1.fits"].startswith("HTTP 404")
    assert "cannot reach 127.0.0.1" in errs["apStar-dr17-2M0.fits"]
    assert "refusing to write" in errs["x.fits"]
    assert not (tmp_path / "outside.fits").exists()
    assert "3 failed" in str(rep)


class socket_closed_port:
    """A loopback port with nothing listening."""

    def __enter__(self):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *a):
        return False


def test_download_allstar(server, tmp_path):
    base, _ = server
    path = dl.download_allstar(tmp_path, base_url=base)
    assert path.endswith("allStar-dr17-synspec_rev1.fits") and fits_check(path) == 2
    with pytest.raises(ValueError, match="could not download"):
        dl.download_allstar(tmp_path, release="dr16", base_url=base, retries=0)
    assert np.isfinite(os.path.getsize(path))


def test_cli_download(server, mock_tree, tmp_path, capsys):
    from cannon_fast.cli import main

    base, _ = server
    fields = _fields(mock_tree)
    rc = main(["download", "--fields", fields[0], "--dest", str(tmp_path), "--base-url", base,
               "--workers", "2", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 failed" in out
    n = len(list((mock_tree / f"dr17/apogee/spectro/redux/dr17/stars/apo25m/{fields[0]}")
                 .glob("*.fits")))
    assert len(list(tmp_path.rglob("apStar-*.fits"))) == n
    rc = main(["download", "--fields", "a/../b", fields[0], "--dest", str(tmp_path),
               "--base-url", base, "--retries", "0", "-q"])
    out = capsys.readouterr().out
    assert rc == 1 and "invalid field name 'a/../b'" in out and f"{n} already complete" in out


def test_planted_part_symlink_is_not_followed(server, mock_tree, tmp_path):
    """A symlink planted as the hidden .part never sends bytes outside --dest."""
    base, _ = server
    p = _tree_files(mock_tree)[0]
    rel = str(p.relative_to(mock_tree))
    dest = tmp_path / "d"
    part = dest / os.path.dirname(rel) / f".{p.name}.part"
    part.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    for target in (victim, tmp_path / "new.txt"):   # an existing file, a file to be created
        part.symlink_to(target)
        rep = dl.download_files([f"{base}/{rel}"], dest, retries=1, backoff=0.01, base_url=base)
        assert len(rep.failed) == 1
        assert f"refusing to write {part}: it is a symbolic link" in rep.failed[0].error
        assert part.is_symlink() and not (dest / rel).exists()
        part.unlink()
    assert victim.read_bytes() == b"precious" and not (tmp_path / "new.txt").exists()
    part.symlink_to(victim)          # planted after the check: O_NOFOLLOW still refuses
    with pytest.raises(dl._Permanent, match="symbolic link"):
        dl._open_part(str(part), append=True)
    part.unlink()
    rep = dl.download_files([f"{base}/{rel}"], dest, base_url=base)
    assert rep.ok and (dest / rel).read_bytes() == p.read_bytes()
