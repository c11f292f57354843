"""Concurrent, resumable downloads of apStar files and the allStar catalogue from the SDSS SAS.

Layouts (``<base>`` defaults to :data:`DEFAULT_BASE_URL`; a mirror or a local
copy of the tree works the same)::

    DR17  <base>/dr17/apogee/spectro/redux/dr17/stars/<telescope>/<field>/apStar-dr17-<ID>.fits
          <base>/dr17/apogee/spectro/aspcap/dr17/synspec_rev1/allStar-dr17-synspec_rev1.fits
    DR16  <base>/dr16/apogee/spectro/redux/r12/stars/<telescope>/<field>/apStar-r12-<ID>.fits
          <base>/dr16/apogee/spectro/aspcap/r12/l33/allStar-r12-l33.fits

Files are written below ``dest`` with the same relative paths.  Each worker
thread keeps one HTTP/1.1 connection per host alive (``http.client``), so a
field of small files is not dominated by connection set-up.  A file is
streamed into a hidden ``.<name>.part`` next to its destination, resumed with
an HTTP ``Range`` request after a dropped connection, checked against the
announced length and (for ``.fits``) its FITS structure, and only then renamed
into place: a file under its final name is always complete.
"""
from __future__ import annotations

import errno
import html
import http.client
import os
import stat
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

from .._util import progress as _progress
from .files import apstar_filename, fits_check

__all__ = [
    "DEFAULT_BASE_URL", "LAYOUTS", "validate_name", "field_path", "apstar_path", "allstar_path",
    "DownloadResult", "DownloadReport", "download_files", "list_field", "field_stars",
    "download_fields", "download_allstar",
]

DEFAULT_BASE_URL = "https://data.sdss.org/sas"
LAYOUTS = {
    "dr17": dict(stars="dr17/apogee/spectro/redux/dr17/stars",
                 allstar="dr17/apogee/spectro/aspcap/dr17/synspec_rev1/"
                         "allStar-dr17-synspec_rev1.fits"),
    "dr16": dict(stars="dr16/apogee/spectro/redux/r12/stars",
                 allstar="dr16/apogee/spectro/aspcap/r12/l33/allStar-r12-l33.fits"),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
_USER_AGENT = "cannon_fast-download/0.1"


def _layout(release):
    rel = str(release).lower()
    if rel not in LAYOUTS:
        raise ValueError(f"unsupported release {release!r}: use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[rel]


def validate_name(kind, name):
    """Check that a field, telescope or star name is one path component.

    Parameters
    ----------
    kind : str
        What the name is ("field", "telescope", "APOGEE_ID"), for the message.
    name : str

    Returns
    -------
    str
        The name, unchanged.

    Raises
    ------
    ValueError
        For empty names, ``.``/``..``, slashes, backslashes or other characters
        outside ``A-Z a-z 0-9 _ . + -`` (such names could write outside ``dest``).
    """
    s = str(name)
    if not _NAME_RE.match(s) or ".." in s:
        raise ValueError(f"invalid {kind} name {name!r}: only letters, digits and _ . + - are "
                         "allowed (no slashes or '..')")
    return s


def field_path(release, telescope, fld):
    """Relative SAS directory of a field's apStar files (ends with ``/``)."""
    lay = _layout(release)
    return (f"{lay['stars']}/{validate_name('telescope', telescope)}/"
            f"{validate_name('field', fld)}/")


def apstar_path(release, telescope, fld, apogee_id):
    """Relative SAS path of one apStar file."""
    return field_path(release, telescope, fld) + apstar_filename(
        validate_name("APOGEE_ID", apogee_id), release)


def allstar_path(release):
    """Relative SAS path of the release's allStar catalogue."""
    return _layout(release)["allstar"]


def _join(base_url, rel):
    return base_url.rstrip("/") + "/" + rel.lstrip("/")


@dataclass
class DownloadResult:
    """Outcome for one file.

    Attributes
    ----------
    url, path : str
    status : {"downloaded", "skipped", "failed"}
    nbytes : int
        Bytes transferred in this run.
    attempts : int
    error : str or None
    """

    url: str
    path: str
    status: str
    nbytes: int = 0
    attempts: int = 0
    error: str | None = None


@dataclass
class DownloadReport:
    """All results of a batch, with totals and a readable failure summary.

    Attributes
    ----------
    results : list of DownloadResult
    seconds : float
        Wall time.
    """

    results: list = field(default_factory=list)
    seconds: float = 0.0

    def _with(self, status):
        return [r for r in self.results if r.status == status]

    @property
    def downloaded(self):
        """Results of the files fetched in this run."""
        return self._with("downloaded")

    @property
    def skipped(self):
        """Results of the files already complete on disk."""
        return self._with("skipped")

    @property
    def failed(self):
        """Results of the files that could not be fetched."""
        return self._with("failed")

    @property
    def nbytes(self):
        """Bytes transferred in this run."""
        return sum(r.nbytes for r in self.results)

    @property
    def ok(self):
        """True if nothing failed."""
        return not self.failed

    def __str__(self):
        mb = self.nbytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else float("nan")
        lines = [f"{len(self.downloaded)} downloaded, {len(self.skipped)} already complete, "
                 f"{len(self.failed)} failed; {mb:.1f} MB in {self.seconds:.1f} s "
                 f"({rate:.1f} MB/s)"]
        if self.failed:
            lines.append("failures:")
            for r in self.failed:
                lines.append(f"  {r.url} -> {r.path}: {r.error} (after {r.attempts} attempt"
                             f"{'s' if r.attempts != 1 else ''})")
        return "\n".join(lines)


class _Permanent(Exception):
    """An error retrying will not fix (404, invalid destination)."""


class _Retry(Exception):
    """A transient error: back off and try again (resuming if possible)."""


class _Connections:
    """Keep-alive connections: one per (scheme, host) and thread, all closed by :meth:`close`."""

    def __init__(self):
        self._local = threading.local()
        self._all = []
        self._lock = threading.Lock()

    def get(self, scheme, netloc, timeout):
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        c = pool.get((scheme, netloc))
        if c is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            c = cls(netloc, timeout=timeout)
            pool[(scheme, netloc)] = c
            with self._lock:
                self._all.append(c)
        return c

    def drop(self, scheme, netloc):
        pool = getattr(self._local, "pool", {})
        c = pool.pop((scheme, netloc), None)
        if c is not None:
            c.close()

    def close(self):
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()


def _request(conns, url, timeout, headers=None, max_redirects=5):
    """GET ``url`` on this thread's keep-alive connection; returns (response, url, key)."""
    for _ in range(max_redirects + 1):
        u = urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise _Permanent(f"unsupported URL scheme in {url!r}")
        target = u.path or "/"
        if u.query:
            target += "?" + u.query
        conn = conns.get(u.scheme, u.netloc, timeout)
        h = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        h.update(headers or {})
        try:
            conn.request("GET", target, headers=h)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as err:
            conns.drop(u.scheme, u.netloc)
            raise _Retry(f"cannot reach {u.netloc} ({type(err).__name__}: {err})") from None
        if resp.status in (301, 302, 303, 307, 308):
            loc = resp.getheader("Location")
            resp.read()
            if not loc:
                raise _Permanent(f"HTTP {resp.status} redirect without Location")
            url = urljoin(url, loc)
            continue
        return resp, url, (u.scheme, u.netloc)
    raise _Permanent(f"too many redirects for {url}")


def _discard(conns, resp, key):
    """Finish or abandon a response we do not want, keeping the connection usable."""
    try:
        if int(resp.getheader("Content-Length") or 0) <= 1 << 16:
            resp.read()
            return
    except (OSError, http.client.HTTPException, ValueError):
        pass
    conns.drop(*key)


def _check_part(part):
    """Return the size of ``part`` (0 if absent); refuse it unless it is a plain file.

    A planted symlink would send the bytes (and the truncation of a restart)
    wherever it points, outside ``--dest``.
    """
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise _Permanent(f"refusing to write {part}: it is {kind} (remove it and rerun)")
    return st.st_size


def _open_part(part, append):
    """Open ``part`` for writing without following a symlink (O_NOFOLLOW closes the race)."""
    flags = (os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
             | getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(part, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _Permanent(f"refusing to write {part}: it is a symbolic link (remove it and "
                             "rerun)") from None
        raise
    return os.fdopen(fd, "ab" if append else "wb")


def _fetch_once(conns, url, part, timeout, chunk, on_bytes):
    """One attempt: stream ``url`` into ``part`` (resuming); returns bytes received."""
    have = _check_part(part)
    headers = {"Range": f"bytes={have}-"} if have else {}
    resp, _, key = _request(conns, url, timeout, headers)
    status = resp.status
    if status == 416:  # nothing left to send: the part may already be whole
        cr = resp.getheader("Content-Range", "")
        _discard(conns, resp, key)
        m = re.match(r"bytes \*/(\d+)", cr)
        if m and int(m.group(1)) == have:
            return 0
        os.remove(part)
        raise _Retry("server refused the resume range; restarting")
    if status == 404 or (400 <= status < 500 and status not in (408, 429)):
        _discard(conns, resp, key)
        raise _Permanent(f"HTTP {status} {resp.reason}")
    if status != 200 and status != 206:
        _discard(conns, resp, key)
        raise _Retry(f"HTTP {status} {resp.reason}")
    if status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.getheader("Content-Range", ""))
        if not m or int(m.group(1)) != have:
            _discard(conns, resp, key)
            os.remove(part)
            raise _Retry("server resumed at the wrong offset; restarting")
        total = int(m.group(3)) if m.group(3) != "*" else None
        append = True
    else:
        cl = resp.getheader("Content-Length")
        total = int(cl) if cl is not None else None
        have = 0
        append = False
    got = 0
    try:
        fh = _open_part(part, append)
    except BaseException:
        _discard(conns, resp, key)
        raise
    try:
        with fh:
            while True:
                buf = resp.read1(chunk)  # what has arrived: a stall still leaves it on disk
                if not buf:
                    break
                fh.write(buf)
                got += len(buf)
                on_bytes(len(buf))
    except (OSError, http.client.HTTPException) as err:
        conns.drop(*key)
        raise _Retry(f"connection lost after {have + got} bytes ({type(err).__name__}: "
                     f"{err})") from None
    resp.close()  # read1 leaves a fully read response open; the connection needs it closed
    if resp.will_close:
        conns.drop(*key)
    size = os.lstat(part).st_size
    if total is not None and size != total:
        conns.drop(*key)
        raise _Retry(f"received {size} of {total} bytes")
    return got


def _safe_dest(dest, rel):
    """Absolute destination of ``rel`` below ``dest``; refuses anything that escapes it."""
    rel = str(rel).replace("\\", "/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or rel.startswith("/") or any(p == ".." for p in parts) or "\0" in rel:
        raise _Permanent(f"refusing to write {rel!r}: not a relative path inside {dest}")
    root = os.path.realpath(dest)
    final = os.path.realpath(os.path.join(root, *parts))
    if os.path.commonpath([root, final]) != root:
        raise _Permanent(f"refusing to write {rel!r}: resolves outside {dest}")
    return final


def _one(conns, url, rel, dest, retries, backoff, timeout, chunk, verify, on_bytes):
    try:
        final = _safe_dest(dest, rel)
    except _Permanent as err:
        return DownloadResult(url, os.path.join(dest, str(rel)), "failed", error=str(err))
    check = verify and final.lower().endswith(".fits")
    if os.path.exists(final):
        try:
            if check:
                fits_check(final)
            return DownloadResult(url, final, "skipped")
        except (ValueError, OSError):
            pass  # a damaged file under the final name: fetch it again
    os.makedirs(os.path.dirname(final), exist_ok=True)
    part = os.path.join(os.path.dirname(final), "." + os.path.basename(final) + ".part")
    count = [0]

    def counted(n):
        count[0] += n
        on_bytes(n)

    err = None
    for attempt in range(1, retries + 2):
        try:
            _fetch_once(conns, url, part, timeout, chunk, counted)
            if check:
                try:
                    fits_check(part)
                except ValueError as e:
                    os.remove(part)  # complete by length but not a FITS file: start over
                    raise _Retry(f"not a complete FITS file ({str(e).split(': ', 1)[-1]})")
            fd = os.open(part, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(part, final)
            return DownloadResult(url, final, "downloaded", count[0], attempt)
        except _Permanent as e:
            return DownloadResult(url, final, "failed", count[0], attempt, str(e))
        except _Retry as e:
            err = str(e)
        except OSError as e:  # local disk trouble
            err = f"{type(e).__name__}: {e}"
        if attempt <= retries:
            time.sleep(min(30.0, backoff * 2 ** (attempt - 1)) * (0.5 + random.random()))
    return DownloadResult(url, final, "failed", count[0], retries + 1, err)


def _rel_of(url, base_url):
    if base_url and url.startswith(base_url.rstrip("/") + "/"):
        return url[len(base_url.rstrip("/")) + 1:]
    return os.path.basename(unquote(urlsplit(url).path))


def download_files(items, dest, workers=8, retries=4, backoff=0.5, timeout=60.0, verify=True,
                   base_url=None, chunk_size=1 << 18, show_progress=None):
    """Download files concurrently; resume, retry, verify, rename into place.

    Parameters
    ----------
    items : iterable of str or (str, str)
        URLs, or (URL, path relative to ``dest``) pairs.  A bare URL below
        ``base_url`` keeps its path relative to it; any other URL its basename.
    dest : str or os.PathLike
        Target directory; nothing is ever written outside it.
    workers : int
        Concurrent connections.
    retries : int
        Extra attempts per file after a transient failure (dropped connection,
        timeout, 5xx, short body, corrupt FITS), with exponential back-off
        ``backoff * 2**k`` seconds (jittered, capped at 30 s).
    backoff, timeout : float
        Seconds; ``timeout`` applies to connecting and to each read.
    verify : bool
        Check that ``.fits`` files are complete FITS files before accepting
        them (and before skipping existing ones).
    base_url : str, optional
    chunk_size : int
        Bytes per read.
    show_progress : bool, optional
        Force the progress bar on/off (default: on for a terminal).

    Returns
    -------
    DownloadReport
        Never raises for a failed file: failures are listed in the report.
    """
    dest = os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    jobs, seen = [], set()
    for it in items:
        job = (it, _rel_of(it, base_url)) if isinstance(it, str) else (str(it[0]), str(it[1]))
        if job[1] in seen:  # two writers of one file would race
            continue
        seen.add(job[1])
        jobs.append(job)
    t0 = time.perf_counter()
    lock = threading.Lock()
    state = {"bytes": 0}
    conns = _Connections()
    bar = _progress(total=len(jobs), desc="download", unit="file",
                    disable=None if show_progress is None else not show_progress)

    def on_bytes(n):
        with lock:
            state["bytes"] += n

    def run(job):
        res = _one(conns, job[0], job[1], dest, int(retries), float(backoff), float(timeout),
                   int(chunk_size), verify, on_bytes)
        with lock:
            bar.update(1)
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{state['bytes'] / 1e6:.1f} MB, {state['bytes'] / 1e6 / dt:.1f} "
                                "MB/s", refresh=False)
        return res

    try:
        if workers <= 1:
            results = [run(j) for j in jobs]
        else:
            with ThreadPoolExecutor(max_workers=int(workers)) as ex:
                results = list(ex.map(run, jobs))
    finally:
        bar.close()
        conns.close()
    return DownloadReport(results, time.perf_counter() - t0)


_HREF_RE = re.compile(r"""href\s*=\s*["']([^"']+)["']""", re.I)


def list_field(release, telescope, fld, base_url=DEFAULT_BASE_URL, timeout=60.0, retries=2):
    """APOGEE IDs of a field, from the archive's directory listing (HTML index page).

    Parameters
    ----------
    release : {"dr17", "dr16"}
    telescope, fld : str
    base_url : str
    timeout : float
    retries : int

    Returns
    -------
    list of str
        Sorted IDs of the ``apStar-<tag>-<ID>.fits`` links on the page.

    Raises
    ------
    ValueError
        For an invalid name, or when the listing cannot be fetched (naming the URL).
    """
    url = _join(base_url, field_path(release, telescope, fld))
    tag = "dr17" if str(release).lower() == "dr17" else "r12"
    pat = re.compile(rf"^apStar-{tag}-(.+)\.fits$")
    last = None
    conns = _Connections()
    for attempt in range(retries + 1):
        try:
            resp, _, key = _request(conns, url, timeout)
            body = resp.read()
            if resp.will_close:
                conns.drop(*key)
            if resp.status != 200:
                raise _Permanent(f"HTTP {resp.status} {resp.reason}")
            break
        except _Permanent as err:
            conns.close()
            raise ValueError(f"cannot list field {fld!r} at {url}: {err}") from None
        except (_Retry, OSError, http.client.HTTPException) as err:
            last = err
            time.sleep(0.2 * 2 ** attempt)
    else:
        conns.close()
        raise ValueError(f"cannot list field {fld!r} at {url}: {last}")
    conns.close()
    ids = set()
    for href in _HREF_RE.findall(body.decode("utf-8", "replace")):
        name = os.path.basename(unquote(html.unescape(href)).split("?")[0])
        m = pat.match(name)
        if m:
            ids.add(m.group(1))
    return sorted(ids)


def field_stars(fields, release="dr17", telescope="apo25m", allstar=None,
                base_url=DEFAULT_BASE_URL, timeout=60.0):
    """Find the stars of each field: from an allStar catalogue or the archive listing.

    Parameters
    ----------
    fields : sequence of str
    release : {"dr17", "dr16"}
    telescope : str
        Used with the directory listing (the catalogue gives each star's own).
    allstar : str or astropy.table.Table, optional
        Catalogue with APOGEE_ID and FIELD (and TELESCOPE) columns.
    base_url : str
    timeout : float

    Returns
    -------
    stars : list of (telescope, field, apogee_id)
    errors : list of (field, message)
        Fields that were invalid or could not be listed; the others go on.
    """
    stars, errors, valid = [], [], []
    for f in fields:
        try:
            valid.append(validate_name("field", f))
        except ValueError as err:
            errors.append((f, str(err)))
    if allstar is not None:
        from .files import read_allstar

        cat = allstar
        if isinstance(allstar, (str, os.PathLike)):
            cat = read_allstar(allstar, columns=["APOGEE_ID", "TELESCOPE", "FIELD"], labels=())
        if "FIELD" not in cat.colnames:
            raise ValueError(f"{cat.meta.get('path', 'allStar')}: no FIELD column to find "
                             "the stars of a field")
        import numpy as np

        fcol = np.asarray(cat["FIELD"]).astype(str)
        tcol = (np.asarray(cat["TELESCOPE"]).astype(str) if "TELESCOPE" in cat.colnames
                else np.full(len(cat), telescope))
        ids = np.asarray(cat["APOGEE_ID"]).astype(str)
        for f in valid:
            rows = np.flatnonzero(fcol == f)
            if len(rows) == 0:
                errors.append((f, "no stars of this field in the allStar catalogue"))
            seen = set()
            for r in rows:
                key = (tcol[r], ids[r])
                if key in seen:
                    continue
                seen.add(key)
                stars.append((tcol[r], f, ids[r]))
        return stars, errors
    for f in valid:
        try:
            ids = list_field(release, telescope, f, base_url, timeout)
        except ValueError as err:
            errors.append((f, str(err)))
            continue
        if not ids:
            errors.append((f, "the field's directory listing has no apStar files"))
        stars.extend((telescope, f, i) for i in ids)
    return stars, errors


def download_fields(fields, dest, release="dr17", telescope="apo25m", allstar=None,
                    base_url=DEFAULT_BASE_URL, **kwargs):
    """Download every apStar file of the given fields into a SAS-like tree below ``dest``.

    Parameters
    ----------
    fields : sequence of str
        Field names, e.g. ``["M15", "N6791", "K2_C4_168-21", "060+00"]``.
    dest : str or os.PathLike
    release : {"dr17", "dr16"}
    telescope : str
    allstar : str or astropy.table.Table, optional
        Find the stars from this catalogue instead of the directory listings.
    base_url : str
        Archive root that precedes ``/dr17/apogee/...``.
    **kwargs
        Passed to :func:`download_files` (``workers``, ``retries``, ...).

    Returns
    -------
    DownloadReport
        Invalid or unlistable fields appear as failed results (URL = the field's
        directory); the other fields are downloaded regardless.
    """
    stars, errors = field_stars(fields, release, telescope, allstar, base_url,
                                kwargs.get("timeout", 60.0))
    items, bad = [], []
    for tel, f, sid in stars:
        try:
            rel = apstar_path(release, tel, f, sid)
        except ValueError as err:
            bad.append(DownloadResult(f"{tel}/{f}/{sid}", os.fspath(dest), "failed",
                                      error=str(err)))
            continue
        items.append((_join(base_url, rel), rel))
    report = download_files(items, dest, **kwargs)
    for f, msg in errors:
        report.results.append(DownloadResult(f"field {f!r}", os.fspath(dest), "failed",
                                             error=msg))
    report.results.extend(bad)
    return report


def download_allstar(dest, release="dr17", base_url=DEFAULT_BASE_URL, **kwargs):
    """Fetch the release's allStar catalogue (resumable; several GB for DR17).

    Returns
    -------
    path : str
        Local path of the complete catalogue.

    Raises
    ------
    ValueError
        If it could not be fetched (with the reason).
    """
    rel = allstar_path(release)
    report = download_files([(_join(base_url, rel), rel)], dest, **kwargs)
    r = report.results[0]
    if r.status == "failed":
        raise ValueError(f"could not download the allStar catalogue {r.url}: {r.error}")
    return r.path
