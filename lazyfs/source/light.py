"""One kept-alive HTTP connection on the standard library, for a cold start's first requests.

A cold `lazyfs run` of an image on a web server spends its first tenth of a second or more
importing `requests` (with urllib3, charset_normalizer, cookiejar...) before it can ask for
index.json; `http.client` is a fraction of that. So the documents of an image (index,
manifest, config) and the first range request for a layer (its TOC, with the prefetch
window: lazyfs/source/speculative.py) go over this one connection, and `requests` is loaded
in the background, by the mount daemon, for what comes later (lazyfs/mount.py).

It does the plain case only, and says when it cannot: no proxies and no credentials (with a
proxy variable in the environment, a user:password in the URL or a netrc file, `usable()` is
False, and requests, which honours them, does everything), no redirects (`try_send` steps
aside for good, and requests follows them), one origin, one request at a time. Everything that judges an answer (status, Content-Range,
lengths, multipart framing) is the caller's code in lazyfs/source/http.py, the same for both
clients: `LightResponse` offers the part of `requests.Response` that code reads.
"""

from __future__ import annotations

import http.client
import os
import select
import ssl
import threading
from urllib.parse import urlsplit

from lazyfs.errors import FetchError, NotFound
from lazyfs.source import preconnect, waiting

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def usable(url: str) -> bool:
    """Whether this client may fetch `url` (preconnect.direct_http: the same test decides
    whether a connection is started in advance)."""
    return preconnect.direct_http(url)


def _is_redirect(status: int) -> bool:
    return status in _REDIRECT_STATUSES


def timeout_text(timeout: float | tuple[float, float]) -> str:
    """A timeout option as both clients' messages say it."""
    if isinstance(timeout, (tuple, list)):
        return f"{timeout[0]} s to connect or {timeout[1]} s to read"
    return f"{timeout} s"


def check_ca_cert(ca_cert: str | None) -> None:
    """A --ca-cert that is not there is the user's mistake: said at once, by both clients."""
    if ca_cert is not None and not os.path.isfile(ca_cert):
        raise NotFound(f"no such CA certificate file: {ca_cert}")


class LightConnection:
    """One HTTP/1.1 connection to the origin (scheme, host, port) of `url`, reopened when the
    server closes it. One request at a time: `try_acquire` before `send`, and the answer
    releases it when closed."""

    def __init__(self, url: str, *, headers: dict[str, str] | None, ca_cert: str | None,
                 timeout: float | tuple[float, float]):
        check_ca_cert(ca_cert)
        parts = urlsplit(url)
        self.origin = (parts.scheme, parts.hostname, parts.port)
        self.timeout = timeout
        connect_s, self._read_s = (timeout if isinstance(timeout, (tuple, list))
                                   else (timeout, timeout))
        # identity: as lazyfs.source.http.HttpClient asks, for the same reasons.
        self._headers = {"Accept-Encoding": "identity", "User-Agent": "lazyfs",
                         **(headers or {})}
        context = None
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=ca_cert or _default_ca_bundle())
            self._conn = http.client.HTTPSConnection(parts.hostname, parts.port,
                                                     timeout=connect_s, context=context)
        else:
            self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=connect_s)
        self._busy = threading.Lock()
        self.stepped_aside = False  # a redirect came: requests does everything from then on
        self._adopt(preconnect.take(url, connect_s), context, parts.hostname)

    def _adopt(self, sock, context, hostname: str) -> None:
        """Use a connection whose TCP handshake was made in advance (lazyfs.source.preconnect);
        with https, its TLS handshake is made here. Any trouble: it is dropped, and the first
        request connects as usual (and reports what fails)."""
        if sock is None:
            return
        try:
            sock.settimeout(self._conn.timeout)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=hostname)
        except (OSError, ValueError):
            sock.close()
            return
        self._conn.sock = sock

    def serves(self, url: str) -> bool:
        parts = urlsplit(url)
        return (parts.scheme, parts.hostname, parts.port) == self.origin

    def try_acquire(self) -> bool:
        return self._busy.acquire(blocking=False)

    def try_send(self, method: str, url: str, where: str,
                 headers: dict[str, str] | None = None) -> "LightResponse | None":
        """send(), if this connection can: None when it is busy or for another server, and
        when the answer is a redirect, which requests is to follow (it drops credentials
        that must not travel): the connection is then closed and `stepped_aside` for good."""
        if self.stepped_aside or not self.serves(url) or not self.try_acquire():
            return None
        resp = self.send(method, url, where, headers)
        if not _is_redirect(resp.status_code):
            return resp
        resp.close()
        self.stepped_aside = True
        self.close()
        return None

    def send(self, method: str, url: str, where: str,
             headers: dict[str, str] | None = None) -> "LightResponse":
        """The answer's status and headers (the body is read from it); FetchError like
        HttpClient.send's when there is none. Call with the connection acquired: the answer
        releases it when closed, or this when it raises."""
        try:
            response = self._send(method, url, where, headers)
        except BaseException:
            self._busy.release()
            raise
        return LightResponse(response, self, url)

    def _send(self, method: str, url: str, where: str,
              headers: dict[str, str] | None) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        all_headers = {**self._headers, **(headers or {})}
        if _dropped(self._conn.sock):
            # The server closed the kept-alive connection while it was idle (as urllib3 does,
            # checked before sending, so that a failure is never a stale connection's).
            self._conn.close()
        try:
            response = self._exchange(method, target, all_headers)
        except ssl.SSLError as exc:
            self._conn.close()
            raise FetchError(f"{where}: TLS error: {_tls_reason(exc)}") from exc
        except TimeoutError as exc:
            self._conn.close()
            raise FetchError(f"{where}: {method} timed out after {timeout_text(self.timeout)}",
                             retriable=True) from exc
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise FetchError(f"{where}: {method} failed: {_reason(exc)}",
                             retriable=True) from exc
        return response

    def close(self) -> None:
        self._conn.close()

    def _exchange(self, method: str, target: str,
                  headers: dict[str, str]) -> http.client.HTTPResponse:
        self._conn.request(method, target, headers=headers)
        waiting.use_wait()  # the answer is at least a round trip away
        if self._conn.sock is not None:  # from now on, waits are for the server's bytes
            self._conn.sock.settimeout(self._read_s)
        return self._conn.getresponse()


class LightResponse:
    """An answer on a LightConnection, read the way lazyfs.source.http reads requests'
    (status_code, reason, headers, raw.read1/read, history, url, close)."""

    def __init__(self, response: http.client.HTTPResponse, connection: LightConnection,
                 url: str):
        self._response = response
        self._connection = connection
        self.status_code = response.status
        self.reason = response.reason
        self.headers = response.headers  # case-insensitive, as requests' are
        self.history: list = []  # no redirects are followed here
        self.url = url
        self.raw = self  # the body is read as requests' raw stream is
        self._closed = False

    def read1(self, limit_bytes: int, decode_content: bool = False) -> bytes:
        missing_bytes = self._response.length  # None: the body ends when the connection does
        data = self._read(self._response.read1, limit_bytes)
        if not data and limit_bytes and missing_bytes:
            # read1, unlike read, returns b"" when the connection ends before the announced
            # length: a cut connection, as urllib3 reports it, not a short answer.
            raise ConnectionError("the connection ended in the body") from \
                http.client.IncompleteRead(b"", missing_bytes)
        return data

    def read(self, limit_bytes: int, decode_content: bool = False) -> bytes:
        return self._read(self._response.read, limit_bytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # http.client marks a body read to its end with read1 as done only by its length
        # (0), not by closing it as read does.
        body_done = self._response.isclosed() or self._response.length == 0
        self._response.close()  # the connection may carry the next request
        if not body_done:
            # Body left unread: the connection is mid-answer, and cannot carry another.
            self._connection.close()
        self._connection._busy.release()

    def __enter__(self) -> "LightResponse":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, read, limit_bytes: int) -> bytes:
        try:
            return read(limit_bytes)
        except http.client.HTTPException as exc:
            # IncompleteRead: the server closed the connection before the end of the body.
            # As an OSError, it is a lost connection to the callers, as urllib3's errors are.
            raise ConnectionError("the connection ended in the body") from exc


def _dropped(sock) -> bool:
    """Whether an idle connection's socket has something to read: the server's close (or
    bytes nobody asked for), so it cannot carry a request."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _default_ca_bundle() -> str | None:
    """The CA bundle requests would use, so that both clients trust the same servers: the one
    named by REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi's, else the system's."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _tls_reason(exc: ssl.SSLError) -> str:
    """As requests words it ("certificate verify failed: self-signed certificate")."""
    verify_message = getattr(exc, "verify_message", None)
    if verify_message:
        return f"certificate verify failed: {verify_message}"
    return exc.reason or str(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and isinstance(exc.strerror, str):
        return exc.strerror
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    return str(exc) or type(exc).__name__
