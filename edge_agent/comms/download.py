"""Resumable, verified bundle downloads over ``http://`` and ``https://``
with the standard library only (``urllib``): the agent must stay lean on a
Pi, and a deploy needs nothing more than GET and Range. (A deploy by
``file://`` URL needs no download: ``lifecycle.resolve_source`` opens the
file where it is.)

What a deploy can rely on:

* the bytes are written to ``<dest>.part`` and renamed to ``dest`` only after
  the size and the sha256 match, so ``dest`` is either absent or right;
* a dropped connection, and an agent restarted in the middle, continue where
  the ``.part`` file ends with ``Range: bytes=N-``; a server that ignores
  Range (``200`` instead of ``206``) gets a clean full download instead;
* the size cap is enforced before the first byte (the declared size and the
  ``Content-Length``) and while reading (never more than ``size`` bytes are
  written), so a wrong URL cannot fill the SD card;
* transient failures (connection errors, time-outs, HTTP 408/425/429/5xx)
  are retried with exponential back-off and jitter
  (:class:`~edge_agent.backoff.Backoff`: ``backoff_s`` doubling up to
  ``max_backoff_s``, each delay scaled by a random factor in [0.5, 1]);
  other HTTP errors fail at once.

Errors are :class:`~edge_agent.errors.DownloadError` with the codes
``unsupported_url``, ``download_failed``, ``too_large``, ``size_mismatch``,
``checksum_mismatch``, ``disk_full`` and ``cancelled``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit


from edge_agent import __version__
from edge_agent.backoff import Backoff
from edge_agent.comms.commands import SHA256_RE
from edge_agent.errors import DownloadError, is_disk_full

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``; an exception it raises aborts the
download (the ``.part`` file is kept for a later resume)."""

CHUNK = 64 * 1024
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRY_STATUS = {408, 425, 429}



class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to ``ftp://``; a bundle URL may only
    lead to another http(s) URL."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DownloadError(f"{req.full_url} redirects to {newurl!r}, which is not http(s)", code="download_failed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _HttpOnlyRedirects())


class _Transient(Exception):
    """A failure worth retrying (the connection, not the content)."""


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` accumulate until they are verified."""
    return dest.with_name(dest.name + ".part")


def download(
    url: str,
    dest: Path | str,
    *,
    sha256: str,
    size: int,
    max_bytes: int,
    progress: Progress | None = None,
    retries: int = 5,
    timeout: float = 30.0,
    backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` and return ``dest``, verified.

    ``size`` and ``sha256`` are what the deploy command promised; a download
    of any other length or digest is refused. Blocks the calling thread (run
    it in a worker); not safe to run twice at once for the same ``dest``.
    Setting ``cancel`` (the agent is stopping) ends it with ``cancelled``
    within one chunk or one socket time-out, keeping the ``.part`` file for
    the next attempt.
    """
    dest = Path(dest)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"cannot download {url!r}: only http:// and https:// URLs are downloaded", code="unsupported_url"
        )
    if not SHA256_RE.fullmatch(sha256.lower()):
        raise ValueError("sha256 must be 64 hexadecimal digits")
    if size < 0 or max_bytes < 0 or retries < 0:
        raise ValueError("size, max_bytes and retries must not be negative")
    if size > max_bytes:
        raise DownloadError(
            f"the bundle is {size} bytes; the limit is {max_bytes} (download.max_bytes)", code="too_large"
        )
    sha256 = sha256.lower()
    part = part_path(dest)
    user_progress = progress

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise DownloadError(f"the download of {url} was cancelled", code="cancelled")

    def tick(done: int, total: int) -> None:
        check_cancel()
        if user_progress is not None:
            user_progress(done, total)

    progress = tick
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(exc, f"cannot create {dest.parent}") from None
    if _already_there(dest, size, sha256):
        log.info("download of %s: %s is already there and verified", url, dest)
        return dest
    fresh_restart_done = False
    attempt = 0
    backoff = Backoff(backoff_s, max_backoff_s, jitter=0.5)
    while True:
        resumed = _part_size(part) > 0
        check_cancel()
        try:
            _check_free_space(part, size)
            _fetch_http(
                url, part, size=size, max_bytes=max_bytes, progress=progress, timeout=timeout, context=ssl_context
            )
        except _Transient as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    f"downloading {url} failed after {attempt} attempt(s): {exc}", code="download_failed"
                ) from None
            delay = backoff.next()
            log.warning("download of %s: %s; retry %d/%d in %.1f s", url, exc, attempt, retries, delay)
            if cancel is not None:
                cancel.wait(delay)
            else:
                time.sleep(delay)
            continue
        except DownloadError as exc:
            if exc.code in ("size_mismatch", "too_large", "disk_full"):
                _unlink(part)
            raise

        digest = _sha256_of(part)
        if digest != sha256:
            _unlink(part)
            if resumed and not fresh_restart_done:
                # The part may be left over from another file at the same URL
                # (a re-published bundle): one clean download decides.
                log.warning("download of %s: sha256 mismatch after a resume; downloading again from the start", url)
                fresh_restart_done = True
                continue
            raise DownloadError(
                f"the download of {url} has sha256 {digest}, not the expected {sha256}", code="checksum_mismatch"
            )
        try:
            os.replace(part, dest)
        except OSError as exc:
            raise _disk_error(exc, f"cannot move the download into {dest}") from None
        _fsync_dir(dest.parent)
        log.info("downloaded %s (%d bytes) to %s", url, size, dest)
        return dest


# -- the transport ----------------------------------------------------------


def _fetch_http(
    url: str,
    part: Path,
    *,
    size: int,
    max_bytes: int,
    progress: Progress | None,
    timeout: float,
    context: ssl.SSLContext | None,
) -> None:
    offset = _part_size(part)
    if offset > size:
        _unlink(part)
        offset = 0
    if offset == size and size > 0:
        return  # complete from an earlier run: verify it
    request = urllib.request.Request(
        url, headers={"User-Agent": f"edge-agent/{__version__}", "Accept-Encoding": "identity"}
    )
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = _opener(context).open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _unlink(part)
            raise _Transient("the server refused to resume (HTTP 416); starting again") from None
        if exc.code in _RETRY_STATUS or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}", code="download_failed") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise DownloadError(f"TLS certificate of {url} not trusted: {exc.reason}", code="download_failed") from None
        raise _Transient(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from None

    with response:
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                _unlink(part)
                raise _Transient(f"the server answered an unexpected range ({response.headers.get('Content-Range')})")
            if match.group(3) != "*" and int(match.group(3)) != size:
                raise DownloadError(
                    f"{url} is {match.group(3)} bytes, not the expected {size}", code="size_mismatch"
                )
        elif status == 200:
            if offset:
                log.info("download of %s: the server ignored Range; downloading from the start", url)
                offset = 0
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit():
                if int(length) > max_bytes:
                    raise DownloadError(f"{url} is {length} bytes; the limit is {max_bytes}", code="too_large")
                if int(length) != size:
                    raise DownloadError(f"{url} is {length} bytes, not the expected {size}", code="size_mismatch")
        else:
            raise DownloadError(f"unexpected HTTP {status} for {url}", code="download_failed")
        _copy(response.read, part, offset=offset, size=size, progress=progress, append=offset > 0)


def _copy(
    read: Callable[[int], bytes], part: Path, *, offset: int, size: int, progress: Progress | None, append: bool
) -> None:
    """Stream from ``read`` into ``part`` until ``size`` bytes are there."""
    done = offset
    try:
        fh = open(part, "ab" if append else "wb")
    except OSError as exc:
        raise _disk_error(exc, f"cannot write {part}") from None
    with fh:
        while done < size:
            try:
                chunk = read(min(CHUNK, size - done + 1))  # +1: notice a longer body
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection lost after {done} of {size} bytes ({type(exc).__name__})") from None
            if not chunk:
                break
            if done + len(chunk) > size:
                raise DownloadError(f"the download is longer than the expected {size} bytes", code="size_mismatch")
            try:
                fh.write(chunk)
            except OSError as exc:
                raise _disk_error(exc, f"cannot write {part}") from None
            done += len(chunk)
            if progress is not None:
                progress(done, size)
        if done == size:
            try:
                if read(1):
                    raise DownloadError(f"the download is longer than the expected {size} bytes", code="size_mismatch")
            except (OSError, http.client.HTTPException):
                pass  # the body is complete; how the server closes does not matter
        try:
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            raise _disk_error(exc, f"cannot write {part}") from None
    if done < size:
        raise _Transient(f"the connection closed after {done} of {size} bytes")


# -- helpers ------------------------------------------------------------------------


def _already_there(dest: Path, size: int, sha256: str) -> bool:
    """A repeated deploy (after a restart) need not fetch a verified file again."""
    try:
        return dest.is_file() and dest.stat().st_size == size and _sha256_of(dest) == sha256
    except DownloadError:
        return False


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except OSError:
        return 0


def _check_free_space(part: Path, size: int) -> None:
    try:
        free = shutil.disk_usage(part.parent).free
    except OSError:
        return
    needed = size - _part_size(part)
    if needed > free:
        raise DownloadError(
            f"{needed} more bytes are needed in {part.parent}, only {free} are free", code="disk_full"
        )


def _disk_error(exc: OSError, what: str) -> DownloadError:
    if is_disk_full(exc):
        return DownloadError(f"{what}: the disk is full ({exc.strerror})", code="disk_full")
    return DownloadError(f"{what}: {exc.strerror or exc}", code="download_failed")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _sha256_of(path: Path) -> str:
    from edge_agent.bundles import sha256_file

    try:
        return sha256_file(path)
    except FileNotFoundError:
        return hashlib.sha256().hexdigest()  # an empty download (size 0) writes no file
    except OSError as exc:
        raise _disk_error(exc, f"cannot read {path}") from None


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the file system allows (best effort)."""
    from edge_agent.models.state import fsync_dir

    try:
        fsync_dir(folder)
    except OSError:
        pass
