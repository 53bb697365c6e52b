"""The TCP handshake with an image's web server, started before the code that talks to it is
loaded.

`lazyfs run URL` spends its first ~0.1 s starting the interpreter and importing; the
connection the documents will need (lazyfs/source/light.py) costs a round trip of waiting
that can overlap those imports: `start(url)` begins it at once, and the light client `take`s
it when it makes its connection. Only what this module imports (socket, threading) is loaded
before the handshake starts. A connection never taken is closed by `discard()`; a failed one
is simply not there, and the light client connects as usual (and reports any error itself).

Who makes the handshake: for a numeric address (127.0.0.1, [::1], a CDN's IP) the kernel,
after a non-blocking connect() that returns at once. A name must be resolved first, which can
block: a thread does that and the connect. A thread is the slower of the two, as the imports
that follow hold the interpreter lock: it gets to run in 5 ms slices (the switch interval), so
its connect() went out 20-40 ms after `start` in the cold-start benchmark, against at once.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from urllib.parse import urlsplit

# Environment variables that put a proxy between us and the server (any case, as requests and
# curl read them): with one set, the light client steps aside, and nothing is preconnected.
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")
_DEFAULT_PORTS = {"http": 80, "https": 443}

_lock = threading.Lock()
_pending: dict[tuple[str, int], "_Handshake"] = {}


def direct_http(url: str) -> bool:
    """Whether `url` is the light client's case: http(s) with no credentials in it, no proxy
    configured and no netrc file (requests does all three: it sends the URL's or netrc's
    credentials as Basic auth, and goes through the proxy)."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or "@" in parts.netloc:
        return False
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES):
        return False
    netrc = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    return not os.path.exists(netrc)


class _Handshake:
    """A connection in the making; `result` hands it over once (or never, if it failed)."""

    def __init__(self, address: tuple[str, int], timeout_s: float):
        self._sock: socket.socket | None = None
        self._claimed = False  # result() was called: an answer after it is closed unused
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._in_progress: socket.socket | None = None  # the kernel's handshake, not waited for
        family = _numeric_family(address[0])
        if family is not None:
            self._in_progress = _connect_nonblocking(family, address)
        else:
            self._thread = threading.Thread(target=self._connect, args=(address, timeout_s),
                                            name="lazyfs-preconnect", daemon=True)
            self._thread.start()

    def _connect(self, address: tuple[str, int], timeout_s: float) -> None:
        try:
            sock = socket.create_connection(address, timeout=timeout_s)
        except OSError:
            return  # the light client will connect, and say what fails
        with self._lock:
            if self._claimed:
                sock.close()
            else:
                self._sock = sock

    def result(self, timeout_s: float) -> socket.socket | None:
        """The socket, if the handshake is done within timeout_s; never again after."""
        if self._in_progress is not None:
            sock, self._in_progress = self._in_progress, None
            return _when_connected(sock, timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            self._claimed = True
            sock, self._sock = self._sock, None
        if sock is not None:
            _no_delay(sock)
        return sock


def _numeric_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an address written in numbers; None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return family
    return None


def _connect_nonblocking(family: int, address: tuple[str, int]) -> socket.socket | None:
    """A socket whose handshake the kernel is making (or has made); None if it failed."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        code = sock.connect_ex(address)
    except OSError:
        code = -1
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        return None
    return sock


def _when_connected(sock: socket.socket, timeout_s: float) -> socket.socket | None:
    """`sock` once its handshake has succeeded, waiting at most timeout_s; else None (closed)."""
    try:
        _, writable, _ = select.select([], [sock], [], max(0.0, timeout_s))
        if writable and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            sock.setblocking(True)
            _no_delay(sock)
            return sock
    except (OSError, ValueError):
        pass
    sock.close()
    return None


def _no_delay(sock: socket.socket) -> None:
    """As http.client does for the connections it makes: requests go out at once, not
    after the previous segment's acknowledgement (Nagle)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def start(url: str, timeout_s: float = 10.0) -> None:
    """Begin connecting to the server of `url` (http or https, no proxy), in the background."""
    if not direct_http(url):
        return
    address = _address(url)
    if address is None:
        return
    with _lock:
        if address not in _pending:
            _pending[address] = _Handshake(address, timeout_s)


def take(url: str, timeout_s: float) -> socket.socket | None:
    """The connected socket to the server of `url`, if one was started (waiting at most
    `timeout_s` for its handshake); the caller owns it. None otherwise."""
    address = _address(url)
    with _lock:
        handshake = _pending.pop(address, None) if address is not None else None
    if handshake is None:
        return None
    return handshake.result(timeout_s)


def discard() -> None:
    """Close the connections nobody took (after a failed resolve, or a non-layout URL)."""
    with _lock:
        handshakes = list(_pending.values())
        _pending.clear()
    for handshake in handshakes:
        sock = handshake.result(0)
        if sock is not None:
            sock.close()


def _address(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a malformed port: the real client says so
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port
