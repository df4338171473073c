"""Downloads with checksums: resumable, atomic.

``download(url, dest, md5)`` writes ``dest`` only once its MD5 checksum matches: the bytes go to
``dest.part`` first (a later call resumes from there with an HTTP ``Range`` request), and the
finished file is renamed into place in one step, so a crash or a lost connection never leaves a
truncated ``dest``. Only the standard library is used (``urllib``); a proxy set in the usual
environment variables is honoured.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Union

__all__ = ["download", "md5sum", "DownloadError"]

CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download that failed or whose checksum did not match."""


def md5sum(path: Union[str, os.PathLike], chunk: int = CHUNK) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Union[str, os.PathLike], md5: Optional[str], timeout: float = 60.0,
             retries: int = 3, quiet: bool = False, verify: Optional[Callable[[Path], None]] = None) -> Path:
    """Fetch ``url`` to ``dest`` (see the module docstring); return ``dest``.

    An existing ``dest`` with the right checksum is kept as is. ``md5=None`` skips the check (only
    for files without a published checksum). A wrong checksum removes the partial file and raises
    :class:`DownloadError` naming the URL, the expected and the actual checksum. ``verify``, when given, is
    called on the finished download before it is renamed into place (e.g. to check the checksum of its
    decompressed bytes); if it raises, the partial file is removed and its error propagates.
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Optional[BaseException] = None
    for _ in range(max(1, retries)):
        try:
            _fetch(url, part, timeout, quiet)
            last_error = None
            break
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # resumable: try again from part
            last_error = e
    if last_error is not None:
        raise DownloadError(f"could not download {url} to {dest} ({last_error}); run again to resume from "
                            f"{part.name}, or download it by hand into {dest.parent}") from last_error
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise DownloadError(f"checksum mismatch for {url}: expected md5 {md5}, got {got}; the partial file "
                                f"was removed, run again to download it afresh")
    if verify is not None:
        try:
            verify(part)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout: float, quiet: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "tasklight"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already complete
            return
        raise
    with resp:
        resumed = have and resp.status == 206
        mode = "ab" if resumed else "wb"
        total = resp.headers.get("Content-Length")
        if not quiet:
            what = f"resuming at {have} bytes" if resumed else "downloading"
            size = f" ({int(total) + (have if resumed else 0)} bytes)" if total else ""
            print(f"tasklight: {what} {url}{size}", flush=True)
        with open(part, mode) as f:
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                f.write(block)
        if total is not None:
            expected = int(total) + (have if resumed else 0)
            if part.stat().st_size != expected:
                raise ConnectionError(f"connection closed after {part.stat().st_size} of {expected} bytes")
