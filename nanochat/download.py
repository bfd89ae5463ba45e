"""
The one way this repo fetches a file over HTTP: pretraining shards (nanochat.dataset), the
CORE eval bundle (nanochat.core_eval), the identity conversations and the spelling word list
(tasks.common).

download_file streams the body into a temporary file beside dest, checks it (the full
Content-Length arrived; the caller's validate accepts it), fsyncs it and renames it into
place. So dest either is complete and checked or does not exist, whatever interrupts the
download, and a dest that exists is trusted without asking the server again.

Failures the server or the network may get over (5xx, 429, refused or dropped connections,
timeouts, a body cut short) are retried with exponential backoff; any other 4xx is final at
once, because asking again gets the same answer. Callers that run on several ranks hold their
own file lock around the call (the lock's scope, e.g. download plus unzip, is theirs to choose).
"""

import http.client
import os
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from nanochat.common import print0, progress_bar

CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """The server refused the file, or every attempt failed."""


class OfflineError(DownloadError, ConnectionError):
    """Not even a connection could be made on the last attempt: no network, DNS, or a firewall."""


def could_not_connect(err: Exception) -> bool:
    """urlopen's wrapper around a socket failure (refused, DNS, timeout), as opposed to an HTTP answer
    or a URL it cannot use (an unknown scheme, whose reason is a string)."""
    return (isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError)
            and isinstance(err.reason, OSError))


def is_retryable(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429
    # failures to connect, and then those mid-transfer: a reset, a timeout, a body cut short. Other
    # OSErrors (a full disk, no write permission) are local and asking again will not help.
    return could_not_connect(err) or isinstance(err, (http.client.HTTPException, ConnectionError, TimeoutError))


def looks_offline(err: Exception) -> bool:
    """No connection at all; a TLS failure is not that (more likely a proxy rewriting certificates)."""
    return could_not_connect(err) and not isinstance(err.reason, ssl.SSLError)


def fetch_once(url: str, dest: Path, timeout: float, validate: Callable[[Path], None] | None):
    """One attempt: stream to a temporary file, check, fsync, rename. Nothing is left behind on failure."""
    # open(..., "xb") rather than mkstemp: the file gets the usual umask permissions, not 0600
    tmp_path = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp_path, "xb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            received = 0
            with progress_bar(total=int(expected) if expected else None, desc=dest.name, unit="B", unit_scale=True,
                              leave=False) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # without a length check, a connection closed early reads as a clean end of file
            if expected is not None and received != int(expected):
                raise ConnectionError(f"connection closed after {received} of {expected} bytes")
            out.flush()
            os.fsync(out.fileno())
        if validate is not None:
            validate(tmp_path)  # a truncated file or an HTML error page fails here, not in the caller
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def download_file(url: str, dest: str | Path, *, attempts: int = 5, base_delay: float = 2.0, timeout: float = 60.0,
                  validate: Callable[[Path], None] | None = None) -> Path:
    """
    Download url to dest unless dest exists, and return dest. Attempt k waits base_delay * 2**(k-1)
    seconds before the next. timeout bounds each connect and each read, in seconds.
    validate(tmp_path) sees the complete file before it is renamed into place and raises (say a
    ValueError naming what the file is instead) to refuse it; that error reaches the caller
    unchanged and is not retried, since the server delivered what it meant to.

    Raises DownloadError for a final HTTP answer or when attempts run out, OfflineError (a
    DownloadError) when the last attempt could not connect at all.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):  # every path through the loop returns or raises
        try:
            fetch_once(url, dest, timeout, validate)
            print0(f"downloaded {dest.name} ({dest.stat().st_size / 1e6:.1f} MB) from {url}")
            return dest
        except Exception as err:
            if not is_retryable(err):
                if isinstance(err, urllib.error.URLError):
                    answer = (f"answered HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError)
                              else f"cannot be fetched ({err.reason})")
                    raise DownloadError(f"{url} {answer} on attempt {attempt}/{attempts} "
                                        f"(not retried: asking again gets the same answer)") from err
                raise  # validate's refusal, or a local problem such as a full disk: the caller's to see
            last = attempt == attempts
            delay = base_delay * 2 ** (attempt - 1)
            print0(f"download of {url} failed (attempt {attempt}/{attempts}): {err}"
                   + ("" if last else f"; retrying in {delay:.1f}s"))
            if last and looks_offline(err):
                raise OfflineError(
                    f"cannot reach {url} after {attempts} attempts ({err.reason}): this machine looks offline. "
                    f"Check the network or proxy settings, or copy the file to {dest} by hand.") from err
            if last:
                raise DownloadError(f"{url}: gave up after {attempts} attempts; the last one failed with: {err}") from err
            time.sleep(delay)
