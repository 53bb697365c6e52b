"""A blob behind an http:// or https:// URL, read with strict Range requests.

Strictness is the point: a Range reply that is not exactly the bytes asked for must never be
taken as a success (google/crfs once treated a non-206 reply as an empty read). So a read checks
the status (206), the Content-Range (exactly `bytes a-b/total`), the encoding (identity) and the
body length, and says precisely which one was wrong.

Connections: one requests.Session with a pooled adapter, shared by all threads. Per-thread
sessions were rejected because trio's worker threads come and go (idle ones exit), so sessions
would pile up with their sockets; urllib3's pool is thread-safe and the Session state we touch
(headers, cookie jar with its own lock) is read-mostly.

Bodies are streamed and never read past `length + 1` bytes (the extra byte detects an overlong
body), so a server that ignores Range cannot make us buffer a multi-GiB blob.
"""

from __future__ import annotations

import os
import re
import threading
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from lazyfs.errors import FetchError, NotFound, RangeNotSupported
from lazyfs.source import check_range

# Manifests, indexes and configs are small; anything larger is a wrong URL or a hostile server.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
# About as many connections as fetch worker threads: more concurrent requests still work, but
# urllib3 then closes the extra connections after use instead of keeping them alive.
POOL_CONNECTIONS = 8
# One raw read at most this big, so memory per request stays near the asked length.
_READ_BLOCK_BYTES = 1024 * 1024

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


def redact_url(url: str) -> str:
    """The URL without user:password and with the query hidden (presigned URLs carry their
    signature there), fit for messages and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "<redacted>" if parts.query else "", ""))


class HttpSource:
    def __init__(self, url: str, *, headers: dict[str, str] | None = None,
                 ca_cert: str | None = None, timeout: float = 30):
        self.url = url
        self.requests = 0
        self._where = redact_url(url)
        self._client = _Client(headers, ca_cert, timeout)
        self._count_lock = threading.Lock()
        # Held while probing the size, so that threads asking at once cost one HEAD, not many.
        self._size_lock = threading.Lock()
        self._blob_size: int | None = None

    def describe(self) -> str:
        return self._where

    def size(self) -> int:
        with self._size_lock:
            if self._blob_size is None:
                self._blob_size = self._probe_size()
            return self._blob_size

    def read(self, blob_offset: int, length: int) -> bytes:
        check_range(blob_offset, length)
        if length == 0:
            # "bytes=a-(a-1)" is not a valid range; nothing to ask for.
            return b""
        blob_end = blob_offset + length - 1  # inclusive, as HTTP counts
        wanted = f"bytes={blob_offset}-{blob_end}"
        with self._send("GET", {"Range": wanted}) as resp:
            if resp.status_code == 200:
                raise RangeNotSupported(
                    f"{self._where}: server ignored the Range header (HTTP 200 with the whole "
                    f"body for {wanted}); lazy reads need byte ranges")
            if resp.status_code == 416:
                raise FetchError(f"{self._where}: {length} bytes at {blob_offset} are past the "
                                 f"end of the blob{_total_from_416(resp)}")
            if resp.status_code != 206:
                raise _status_error(resp, self._where, f"GET {wanted}")
            _check_identity(resp, self._where)
            total = self._check_content_range(resp, blob_offset, blob_end, wanted)
            body = _read_body(resp, length + 1, self._where)
        if len(body) < length:
            # The headers were right but the transfer ended early: a cut connection, likely
            # transient.
            raise FetchError(f"{self._where}: body ended after {len(body)} of {length} bytes "
                             f"for {wanted}", retriable=True)
        if len(body) > length:
            raise RangeNotSupported(f"{self._where}: body longer than the {length} bytes of "
                                    f"{wanted}")
        if total is not None and self._blob_size is None:
            self._blob_size = total  # a free size: saves the HEAD if size() is asked later
        return body

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "HttpSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, headers: dict[str, str] | None = None) -> requests.Response:
        with self._count_lock:
            self.requests += 1
        return self._client.send(method, self.url, self._where, headers)

    def _check_content_range(self, resp: requests.Response, blob_offset: int, blob_end: int,
                             wanted: str) -> int | None:
        """The blob's total size from a Content-Range that must be exactly the range asked for."""
        header = resp.headers.get("Content-Range")
        if header is None:
            raise RangeNotSupported(f"{self._where}: HTTP 206 without a Content-Range for {wanted}")
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None:
            raise RangeNotSupported(f"{self._where}: malformed Content-Range {header!r} for "
                                    f"{wanted}")
        first, last = int(match[1]), int(match[2])
        total = None if match[3] == "*" else int(match[3])
        if total is not None:
            if self._blob_size is not None and total != self._blob_size:
                raise FetchError(f"{self._where}: blob changed size under us: {self._blob_size} "
                                 f"bytes before, {total} now")
            if first == blob_offset and last == total - 1 < blob_end:
                # A correct server clipping our range at the end: the caller read past the end.
                raise FetchError(f"{self._where}: {blob_end + 1 - blob_offset} bytes at "
                                 f"{blob_offset} are past the end of the blob ({total} bytes)")
        if (first, last) != (blob_offset, blob_end):
            raise RangeNotSupported(f"{self._where}: asked for {wanted}, server answered "
                                    f"Content-Range {header!r}")
        return total

    def _probe_size(self) -> int:
        with self._send("HEAD") as resp:
            # A HEAD reply has no body; "reading" it hands the connection back to the pool,
            # where closing the reply unread would close the connection.
            _read_body(resp, 1, self._where)
            if resp.status_code in (404, 410):
                raise NotFound(f"{self._where}: not found (HTTP {resp.status_code})")
            declared = resp.headers.get("Content-Length", "")
            if resp.status_code == 200 and declared.isdigit() and _is_identity(resp):
                return int(declared)
        # Some servers refuse HEAD (presigned URLs are signed for GET only) or omit the length;
        # a one-byte range tells the total in its Content-Range.
        with self._send("GET", {"Range": "bytes=0-0"}) as resp:
            if resp.status_code == 416:
                # An empty blob has no byte 0; a correct server still says "bytes */0".
                match = _UNSATISFIED_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
                if match:
                    return int(match[1])
            if resp.status_code == 200:
                raise RangeNotSupported(f"{self._where}: server ignored the Range header (HTTP "
                                        "200 for bytes=0-0); lazy reads need byte ranges")
            if resp.status_code != 206:
                raise _status_error(resp, self._where, "size probe (HEAD, then GET bytes=0-0)")
            header = resp.headers.get("Content-Range", "")
            match = _CONTENT_RANGE.fullmatch(header.strip())
            if match is None or match[1] != "0" or match[2] != "0" or match[3] == "*":
                raise RangeNotSupported(f"{self._where}: cannot learn the blob size: "
                                        f"Content-Range {header!r} for bytes=0-0")
            return int(match[3])


def fetch_all(url: str, *, headers: dict[str, str] | None = None, ca_cert: str | None = None,
              timeout: float = 30, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The whole body of a small document (index.json, manifest, config), at most `max_bytes`."""
    where = redact_url(url)
    client = _Client(headers, ca_cert, timeout)
    try:
        with client.send("GET", url, where) as resp:
            if resp.status_code != 200:
                raise _status_error(resp, where, "GET")
            _check_identity(resp, where)
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"{where}: document is {declared} bytes, more than the "
                                 f"{max_bytes} bytes allowed")
            body = _read_body(resp, max_bytes + 1, where)
        if len(body) > max_bytes:
            raise FetchError(f"{where}: document is more than the {max_bytes} bytes allowed")
        return body
    finally:
        client.close()


class _Client:
    """A Session with our headers, TLS settings and timeout; maps transport errors."""

    def __init__(self, headers: dict[str, str] | None, ca_cert: str | None, timeout: float):
        if ca_cert is not None and not os.path.isfile(ca_cert):
            raise NotFound(f"no such CA certificate file: {ca_cert}")
        self.timeout = timeout
        # Passed with every request, not set on the session: requests lets REQUESTS_CA_BUNDLE
        # override a session-level verify, which would silently drop the user's --ca-cert.
        self.verify: bool | str = ca_cert if ca_cert is not None else True
        self.session = requests.Session()
        # max_retries=0: the fetcher owns retries, and must see every failure to count it.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_CONNECTIONS, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # identity: byte ranges and digests are about the stored bytes, and a compressed reply
        # would make Content-Length and Content-Range count something else.
        self.session.headers.update({"Accept-Encoding": "identity", "User-Agent": "lazyfs"})
        self.session.headers.update(headers or {})

    def send(self, method: str, url: str, where: str,
             headers: dict[str, str] | None = None) -> requests.Response:
        try:
            return self.session.request(method, url, headers=headers, stream=True,
                                        timeout=self.timeout, verify=self.verify,
                                        allow_redirects=True)
        except requests.exceptions.SSLError as exc:
            # Certificate problems do not heal by retrying.
            raise FetchError(f"{where}: TLS error: {_reason(exc)}") from exc
        except requests.exceptions.Timeout as exc:
            raise FetchError(f"{where}: {method} timed out after {self.timeout} s",
                             retriable=True) from exc
        except requests.exceptions.ConnectionError as exc:
            raise FetchError(f"{where}: {method} failed: {_reason(exc)}", retriable=True) from exc
        except requests.exceptions.TooManyRedirects as exc:
            raise FetchError(f"{where}: too many redirects") from exc
        except (requests.exceptions.RequestException, OSError) as exc:
            # Invalid URL or header, unreadable CA file: the request cannot be made as given.
            raise FetchError(f"{where}: {method} cannot be sent: {_reason(exc)}") from exc

    def close(self) -> None:
        self.session.close()


def _read_body(resp: requests.Response, limit_bytes: int, where: str) -> bytes:
    """At most `limit_bytes` of the raw (undecoded) body. Reading to the end of the body lets
    urllib3 put the connection back in the pool for the next request (keep-alive)."""
    parts: list[bytes] = []
    got = 0
    try:
        while got < limit_bytes:
            part = resp.raw.read(min(limit_bytes - got, _READ_BLOCK_BYTES), decode_content=False)
            if not part:
                break
            parts.append(part)
            got += len(part)
    except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
        # Read timeouts and connections cut mid-body (urllib3 raises IncompleteRead when fewer
        # bytes than Content-Length arrive) are worth retrying.
        raise FetchError(f"{where}: connection lost after {got} bytes of the body: "
                         f"{_reason(exc)}", retriable=True) from exc
    return b"".join(parts)


def _is_identity(resp: requests.Response) -> bool:
    return resp.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")


def _check_identity(resp: requests.Response, where: str) -> None:
    if not _is_identity(resp):
        raise FetchError(f"{where}: server sent Content-Encoding "
                         f"{resp.headers['Content-Encoding']!r} although identity was asked for")


def _status_error(resp: requests.Response, where: str, what: str) -> Exception:
    status = resp.status_code
    message = f"{where}: {what}: HTTP {status} {resp.reason or ''}".rstrip()
    if status in (404, 410):
        return NotFound(message)
    # Server trouble, throttling and request timeouts may pass; other 4xx (403, 401, 400) are
    # about the request itself and will fail again the same way.
    return FetchError(message, retriable=status >= 500 or status in (408, 429))


def _total_from_416(resp: requests.Response) -> str:
    match = _UNSATISFIED_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    return f" ({match[1]} bytes)" if match else ""


def _reason(exc: BaseException) -> str:
    """The innermost readable cause ("Connection refused"), found by walking the exception
    chain. requests' own messages quote the URL, which may carry a signed query string, so
    they are not used."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and isinstance(current.strerror, str):
            return current.strerror
        todo.extend(cause for cause in (getattr(current, "reason", None), current.__cause__,
                                        current.__context__, *current.args)
                    if isinstance(cause, BaseException))
    return type(exc).__name__
