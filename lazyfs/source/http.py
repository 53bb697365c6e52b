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

Several ranges in one request (`read_ranges`): `Range: bytes=a-b,c-d,...` answered with a
`multipart/byteranges` body saves a round trip per range without fetching the gaps between them.
Many servers do not do it (S3 answers 200 with the whole object, some proxies 416 or 501, some
coalesce or reorder parts), so the first such answer that is not exactly the parts asked for, in
order, turns multi-range off for this source (`multi_range` False) and the ranges not yet
delivered are fetched one request each. Nothing already delivered is fetched again.

Redirects: a registry or CDN often redirects a blob to a signed, expiring location. The final
location is remembered so that later reads skip the redirect's round trip, and when that
location answers 401/403/404/410 (the signature expired, the object moved) the read goes back
to the original URL once, which redirects to a fresh location.
"""

from __future__ import annotations

import http.client  # (loaded anyway: lazyfs.source.light, imported below, is built on it)
import logging
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from lazyfs.errors import FetchError, NotFound, RangeNotSupported
from lazyfs.source import CONTENT_RANGE, check_content_range, check_range
from lazyfs.source.light import check_ca_cert, timeout_text

if TYPE_CHECKING:  # requests is imported when first used (see lazyfs/source/light.py)
    import requests
    import requests.auth

    from lazyfs.source.light import LightConnection

log = logging.getLogger(__name__)

# Manifests, indexes and configs are small; anything larger is a wrong URL or a hostile server.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
# About as many connections as the fetcher runs requests at once (it calls set_pool_size with
# its --max-connections): more concurrent requests still work, but urllib3 then closes the
# extra connections after use instead of keeping them alive.
POOL_CONNECTIONS = 8
# One raw read at most this big, so memory per request stays near the asked length.
_READ_BLOCK_BYTES = 1024 * 1024
# Multipart framing (preamble, part headers, delimiters) is a few hundred bytes; lines and
# header blocks beyond these bounds are a broken or hostile answer, not something to buffer.
_MAX_LINE_BYTES = 8192
_MAX_PART_HEADER_LINES = 32
_MAX_PREAMBLE_LINES = 16
# A cached redirect target answering one of these has most likely expired: resolve again.
_EXPIRED_LOCATION_STATUSES = frozenset({401, 403, 404, 410})
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^;,\s]{1,200}))', re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL without user:password and with the query hidden (presigned URLs carry their
    signature there), fit for messages and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "<redacted>" if parts.query else "", ""))


class _NoMultiRange(Exception):
    """The server did not answer a multi-range request with the parts asked for."""


class HttpSource:
    def __init__(self, url: str, *, headers: dict[str, str] | None = None,
                 ca_cert: str | None = None, timeout: float | tuple[float, float] = 30,
                 max_connections: int = POOL_CONNECTIONS,
                 auth: requests.auth.AuthBase | None = None, client: "HttpClient | None" = None,
                 bootstrap: "LightConnection | None" = None):
        # auth: how a registry's blob URLs authenticate (lazyfs.registry); None for plain URLs.
        # client: an HttpClient to take over (with its kept-alive connections) instead of a
        # new one; it carries the headers, CA, timeout and auth then. Closed with the source.
        # bootstrap: a kept-alive LightConnection to the blob's server (the documents' one)
        # to take over: requests go over it whenever it is free, so that the first ones need
        # neither a new connection nor requests, which is made and imported when first needed.
        self.url = url
        self.requests = 0
        # None: not tried yet; True: the server answered a multi-range request properly;
        # False: it did not, so every range is its own request from now on.
        self.multi_range: bool | None = None
        self._where = redact_url(url)
        check_ca_cert(ca_cert)
        self._client = client
        self._client_args = (headers, ca_cert, timeout, auth)
        self._max_connections = max_connections
        self._client_lock = threading.Lock()
        # Not for another server, nor with credentials to send (the light client has none).
        self._bootstrap = bootstrap
        if bootstrap is not None and (auth is not None or not bootstrap.serves(url)):
            bootstrap.close()
            self._bootstrap = None
        self._count_lock = threading.Lock()
        # Held while probing the size, so that threads asking at once cost one HEAD, not many.
        self._size_lock = threading.Lock()
        self._blob_size: int | None = None
        # Where the last redirect chain ended (None: no redirect seen, or forgotten).
        self._location: str | None = None

    def describe(self) -> str:
        return self._where

    def set_pool_size(self, max_connections: int) -> None:
        """Keep up to `max_connections` connections alive (the fetcher's per-source bound)."""
        self._max_connections = max_connections
        if self._client is not None:
            self._client.set_pool_size(max_connections)

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
        return b"".join(self._range_pieces(blob_offset, length))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """Yield `(index, piece)` for the `(blob_offset, length)` ranges, in the order given;
        the pieces of one index concatenate to exactly its bytes. Ranges must not overlap;
        they may come in any order (a speculative download asks for the TOC at the blob's end
        before the prefetch region at its start), which a multi-range request keeps: a server
        that reorders the parts is answered as one that cannot do several ranges at once.

        A generator: the caller consumes bytes as they arrive (a big prefetch range is inflated
        member by member while the rest is still on the wire). An error may come after some
        pieces were delivered; they were right, and a retry needs only the rest.
        """
        todo = []
        for index, (blob_offset, length) in enumerate(ranges):
            check_range(blob_offset, length)
            if length:
                todo.append((index, blob_offset, length))
        _check_no_overlap(todo)
        if len(todo) > 1 and self.multi_range is not False:
            delivered = dict.fromkeys((index for index, _, _ in todo), 0)
            try:
                for index, piece in self._multipart_pieces(todo):
                    delivered[index] += len(piece)
                    yield index, piece
                self.multi_range = True
                return
            except _NoMultiRange as exc:
                self.multi_range = False
                log.info("%s: no multi-range requests from now on: %s", self._where, exc)
            todo = [(index, blob_offset + delivered[index], length - delivered[index])
                    for index, blob_offset, length in todo if delivered[index] < length]
        for index, blob_offset, length in todo:
            for piece in self._range_pieces(blob_offset, length):
                yield index, piece

    def close(self) -> None:
        if self._bootstrap is not None:
            self._bootstrap.close()
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> "HttpSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, headers: dict[str, str] | None = None) -> requests.Response:
        location = self._location
        resp = self._counted_send(method, location or self.url, headers)
        if location is not None and resp.status_code in _EXPIRED_LOCATION_STATUSES:
            # The remembered redirect target refused us: a signed URL expired or the object
            # moved. Going back to the original URL once gets a fresh redirect.
            resp.close()
            self._location = None
            resp = self._counted_send(method, self.url, headers)
        if resp.history and resp.status_code < 400:
            self._location = resp.url
        return resp

    def _counted_send(self, method: str, url: str,
                      headers: dict[str, str] | None) -> requests.Response:
        with self._count_lock:
            self.requests += 1
        bootstrap = self._bootstrap
        if bootstrap is not None:
            resp = bootstrap.try_send(method, url, self._where, headers)
            if resp is not None:
                return resp
            if bootstrap.stepped_aside:
                self._bootstrap = None
        return self._requests_client().send(method, url, self._where, headers)

    def _requests_client(self) -> "HttpClient":
        with self._client_lock:
            if self._client is None:
                headers, ca_cert, timeout, auth = self._client_args
                self._client = HttpClient(headers, ca_cert, timeout, self._max_connections,
                                          auth=auth)
            return self._client

    def _range_pieces(self, blob_offset: int, length: int) -> Iterator[bytes]:
        """The bytes of one range, in pieces as they arrive, with every check of a strict
        single-range reply."""
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
            total = self._check_content_range(resp.headers.get("Content-Range"), blob_offset,
                                              blob_end, wanted, "HTTP 206 without a Content-Range")
            body = _BodyReader(resp, self._where)
            got = 0
            for piece in body.pieces(length):
                got += len(piece)
                yield piece
            if got < length:
                # The headers were right but the transfer ended early: a cut connection,
                # likely transient.
                raise FetchError(f"{self._where}: body ended after {got} of {length} bytes "
                                 f"for {wanted}", retriable=True)
            if body.read_some(1):
                raise RangeNotSupported(f"{self._where}: body longer than the {length} bytes "
                                        f"of {wanted}")
        if total is not None and self._blob_size is None:
            self._blob_size = total  # a free size: saves the HEAD if size() is asked later

    def _multipart_pieces(self, todo: list[tuple[int, int, int]]) -> Iterator[tuple[int, bytes]]:
        """One request for several ranges, answered as multipart/byteranges. _NoMultiRange
        when the answer is anything else (before or after some parts were delivered)."""
        wanted = "bytes=" + ",".join(f"{offset}-{offset + length - 1}"
                                     for _, offset, length in todo)
        with self._send("GET", {"Range": wanted}) as resp:
            status = resp.status_code
            boundary = _multipart_boundary(resp.headers.get("Content-Type", ""))
            if status in (200, 400, 416, 501) or (status == 206 and boundary is None):
                # 200: multi-range (or Range at all) ignored; 416/501/400: refused. The body,
                # perhaps the whole blob, is not read: closing drops the connection instead.
                raise _NoMultiRange(f"HTTP {status} "
                                    f"{resp.headers.get('Content-Type', '')!r} for {len(todo)} "
                                    "ranges")
            if status != 206:
                raise _status_error(resp, self._where, f"GET {len(todo)} ranges")
            _check_identity(resp, self._where)
            body = _BodyReader(resp, self._where)
            delimiter = b"--" + boundary
            # nginx starts with an empty line; RFC 2046 allows any preamble before the first
            # delimiter.
            line = body.readline()
            for _ in range(_MAX_PREAMBLE_LINES):
                if line is None or line == delimiter:
                    break
                line = body.readline()
            for number, (index, blob_offset, length) in enumerate(todo):
                if line != delimiter:
                    raise _NoMultiRange(f"part {number}: expected the boundary, got "
                                        f"{_quote(line)}")
                content_range = self._part_content_range(body, number)
                blob_end = blob_offset + length - 1
                try:
                    self._check_content_range(content_range, blob_offset, blob_end,
                                              f"bytes={blob_offset}-{blob_end}",
                                              f"part {number} without a Content-Range")
                except RangeNotSupported as exc:
                    raise _NoMultiRange(str(exc)) from None
                got = 0
                for piece in body.pieces(length):
                    got += len(piece)
                    yield index, piece
                if got < length:
                    raise _NoMultiRange(f"part {number} ended after {got} of {length} bytes")
                if body.readline() != b"":
                    raise _NoMultiRange(f"part {number} is longer than {length} bytes")
                line = body.readline()
            if line != delimiter + b"--":
                raise _NoMultiRange(f"more parts than the {len(todo)} asked for, or no final "
                                    f"boundary: {_quote(line)}")
            # The epilogue (normally nothing) is read so that the connection stays alive.
            body.read_some(_MAX_LINE_BYTES)

    def _part_content_range(self, body: "_BodyReader", number: int) -> str | None:
        content_range = None
        for _ in range(_MAX_PART_HEADER_LINES):
            line = body.readline()
            if line is None:
                raise _NoMultiRange(f"body ended in the headers of part {number}")
            if line == b"":
                return content_range
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() == b"content-range":
                content_range = value.strip().decode("latin-1")
        raise _NoMultiRange(f"part {number} has more than {_MAX_PART_HEADER_LINES} header lines")

    def _check_content_range(self, header: str | None, blob_offset: int, blob_end: int,
                             wanted: str, missing: str) -> int | None:
        """The blob's total size from a Content-Range that must be exactly the range asked for."""
        if header is None:
            raise RangeNotSupported(f"{self._where}: {missing} for {wanted}")
        return check_content_range(header, blob_offset, blob_end, where=self._where,
                                   wanted=wanted, known_size=self._blob_size)

    def _probe_size(self) -> int:
        with self._send("HEAD") as resp:
            # A HEAD reply has no body; "reading" it hands the connection back to the pool,
            # where closing the reply unread would close the connection.
            read_body(resp, 1, self._where)
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
            match = CONTENT_RANGE.fullmatch(header.strip())
            if match is None or match[1] != "0" or match[2] != "0" or match[3] == "*":
                raise RangeNotSupported(f"{self._where}: cannot learn the blob size: "
                                        f"Content-Range {header!r} for bytes=0-0")
            return int(match[3])


class _BodyReader:
    """Lines and exact-length pieces of a streamed body. Transport failures while reading are
    retriable FetchErrors (a cut connection); what the bytes mean is the caller's business."""

    def __init__(self, resp: requests.Response, where: str):
        self._resp = resp
        self._where = where
        self._buffer = bytearray()
        self._got = 0  # body bytes received so far, for messages

    def _raw_read(self, limit_bytes: int) -> bytes:
        # read1: what has arrived (one socket read), not `limit_bytes` in full. A plain read
        # waits until the whole block is in, so a member that arrived would wait for bytes
        # after it, and when the server stalls mid-block the bytes received so far are lost
        # with the timeout instead of being delivered (a retry then refetches them).
        # (urllib3 < 2 has no read1: read.)
        raw = self._resp.raw
        read = getattr(raw, "read1", None) or raw.read
        try:
            part = read(limit_bytes, decode_content=False)
        except _body_read_errors() as exc:
            # Read timeouts and connections cut mid-body (urllib3 raises IncompleteRead when
            # fewer bytes than Content-Length arrive) are worth retrying.
            raise FetchError(f"{self._where}: connection lost after {self._got} bytes of the "
                             f"body: {_reason(exc)}", retriable=True) from exc
        self._got += len(part)
        return part

    def readline(self) -> bytes | None:
        """The next line without its CRLF (or LF); None at the end of the body."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                return line.removesuffix(b"\r")
            if len(self._buffer) > _MAX_LINE_BYTES:
                raise _NoMultiRange(f"a line longer than {_MAX_LINE_BYTES} bytes")
            # Small reads: multipart framing lines are short and the data that follows is
            # better read by pieces().
            part = self._raw_read(256)
            if not part:
                if not self._buffer:
                    return None
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += part

    def pieces(self, length: int) -> Iterator[bytes]:
        """Up to `length` bytes in pieces of at most _READ_BLOCK_BYTES; fewer only at the end
        of the body."""
        if self._buffer:
            head = bytes(self._buffer[:length])
            del self._buffer[:len(head)]
            length -= len(head)
            yield head
        while length > 0:
            part = self._raw_read(min(length, _READ_BLOCK_BYTES))
            if not part:
                return
            length -= len(part)
            yield part

    def read_some(self, limit_bytes: int) -> bytes:
        """Up to `limit_bytes` more bytes (b"" at the end of the body)."""
        return b"".join(self.pieces(limit_bytes))


def _multipart_boundary(content_type: str) -> bytes | None:
    if not content_type.strip().lower().startswith("multipart/byteranges"):
        return None
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    return (match[1] or match[2]).encode("latin-1")


def _quote(line: bytes | None) -> str:
    return "the end of the body" if line is None else repr(line[:80])


def fetch_all(url: str, *, headers: dict[str, str] | None = None, ca_cert: str | None = None,
              timeout: float | tuple[float, float] = 30,
              max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The whole body of a small document (index.json, manifest, config), at most `max_bytes`,
    on a connection of its own (HttpClient.fetch_document keeps one for several)."""
    client = HttpClient(headers, ca_cert, timeout)
    try:
        return client.fetch_document(url, max_bytes)
    finally:
        client.close()


def _check_no_overlap(todo: list[tuple[int, int, int]]) -> None:
    """Overlapping ranges are the caller's bug: a server may merge them into one part."""
    previous_end = 0
    for index, blob_offset, length in sorted(todo, key=lambda item: item[1]):
        if blob_offset < previous_end:
            raise ValueError(f"ranges overlap at range {index}")
        previous_end = blob_offset + length


class HttpClient:
    """A Session with our headers, TLS settings and timeout; maps transport errors.

    `timeout` is in seconds: one number for both, or (connect, read) as requests takes it. The
    read timeout bounds each wait for bytes, not the whole transfer, so a big range on a slow
    but steady link never times out while a stalled one does.
    """

    def __init__(self, headers: dict[str, str] | None, ca_cert: str | None,
                 timeout: float | tuple[float, float], max_connections: int = POOL_CONNECTIONS,
                 auth: requests.auth.AuthBase | None = None):
        check_ca_cert(ca_cert)
        self.timeout = tuple(timeout) if isinstance(timeout, (tuple, list)) else timeout
        # Passed with every request, not set on the session: requests lets REQUESTS_CA_BUNDLE
        # override a session-level verify, which would silently drop the user's --ca-cert.
        self.verify: bool | str = ca_cert if ca_cert is not None else True
        import requests  # here, not at the top: see lazyfs/source/light.py

        self.session = requests.Session()
        self.set_pool_size(max_connections)
        # identity: byte ranges and digests are about the stored bytes, and a compressed reply
        # would make Content-Length and Content-Range count something else.
        self.session.headers.update({"Accept-Encoding": "identity", "User-Agent": "lazyfs"})
        self.session.headers.update(headers or {})
        # requests drops the Authorization header when a redirect leaves the host, so a
        # registry's credentials never reach the storage a blob is redirected to.
        self.session.auth = auth

    def set_pool_size(self, max_connections: int) -> None:
        if getattr(self, "_pool_size", None) == max_connections:
            return  # a new adapter would drop the connections kept alive so far
        self._pool_size = max_connections
        # max_retries=0: the fetcher owns retries, and must see every failure to count it.
        # pool_connections is the number of hosts pooled (the blob's, and a redirect target's).
        from requests.adapters import HTTPAdapter

        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, max_connections),
                              max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def fetch_document(self, url: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
        """The whole body of a small document, at most `max_bytes`; the connection is kept
        alive for the next one (an image's index, manifest and config come one after another:
        a new connection would cost each of them a round trip more)."""
        where = redact_url(url)
        return fetch_document(self.send("GET", url, where), where, max_bytes)

    def send(self, method: str, url: str, where: str,
             headers: dict[str, str] | None = None, data=None) -> requests.Response:
        import requests

        try:
            return self.session.request(method, url, headers=headers, data=data, stream=True,
                                        timeout=self.timeout, verify=self.verify,
                                        allow_redirects=True)
        except requests.exceptions.SSLError as exc:
            # Certificate problems do not heal by retrying.
            raise FetchError(f"{where}: TLS error: {_reason(exc)}") from exc
        except requests.exceptions.Timeout as exc:
            raise FetchError(f"{where}: {method} timed out after {timeout_text(self.timeout)}",
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


def fetch_document(resp: requests.Response, where: str,
                   max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The whole body of the answer to a document's GET (closed here), at most `max_bytes`;
    read to its end, so that its connection is kept alive for the next one."""
    with resp:
        if resp.status_code != 200:
            raise _status_error(resp, where, "GET")
        _check_identity(resp, where)
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(f"{where}: document is {declared} bytes, more than the "
                             f"{max_bytes} bytes allowed")
        body = read_body(resp, max_bytes + 1, where)
    if len(body) > max_bytes:
        raise FetchError(f"{where}: document is more than the {max_bytes} bytes allowed")
    return body


def read_body(resp: requests.Response, limit_bytes: int, where: str) -> bytes:
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
    except _body_read_errors() as exc:
        # Read timeouts and connections cut mid-body (urllib3 raises IncompleteRead when fewer
        # bytes than Content-Length arrive) are worth retrying.
        raise FetchError(f"{where}: connection lost after {got} bytes of the body: "
                         f"{_reason(exc)}", retriable=True) from exc
    return b"".join(parts)


def _body_read_errors() -> tuple[type[BaseException], ...]:
    """What reading a body may raise when the connection fails: OSError, and requests' and
    urllib3's errors once they are loaded (a LightResponse raises OSErrors only)."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    if "requests" in sys.modules:
        import requests
        import urllib3

        errors += (urllib3.exceptions.HTTPError, requests.exceptions.RequestException)
    return errors


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
    error = FetchError(message, retriable=status >= 500 or status in (408, 429))
    # A throttling server may say when to come back (seconds form only; the date form is rare
    # for 429/503 and would need the server's clock). The fetcher waits at least that long.
    retry_after = resp.headers.get("Retry-After", "").strip()
    if error.retriable and retry_after.isdigit():
        error.retry_after_s = float(retry_after)
    return error


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
        urllib3 = sys.modules.get("urllib3")
        if (urllib3 is not None and isinstance(current, urllib3.exceptions.ReadTimeoutError)) or (
                isinstance(current, TimeoutError) and current.strerror is None):
            # A stalled answer: the server sent part of it, then nothing for the read timeout.
            # (A socket timeout has no strerror and urllib3's message quotes the URL, so say it
            # here. Not urllib3's TimeoutError: NewConnectionError, a refused connection, is
            # one; nor ETIMEDOUT, whose strerror says what it is.)
            return "timed out waiting for more bytes"
        if isinstance(current, http.client.IncompleteRead):
            # A cut connection: its message (urllib3's ProtocolError) names no cause we can show.
            return "the server closed the connection before the end of the body"
        if isinstance(current, OSError) and isinstance(current.strerror, str):
            return current.strerror
        todo.extend(cause for cause in (getattr(current, "reason", None), current.__cause__,
                                        current.__context__, *current.args)
                    if isinstance(cause, BaseException))
    return type(exc).__name__
