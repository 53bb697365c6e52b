"""An HTTP proxy for tests that forwards to a real server (nginx) and injects faults.

    with NginxServer(root) as nginx, FaultProxy(nginx.url) as proxy:
        proxy.inject("status", status=503, times=2)   # the next 2 requests get a 503
        ...                                          # read through proxy.url
        proxy.inject("reset")                        # every request from now on: a reset
        proxy.clear()                                # the fault clears

Faults (one active at a time, for `times` requests or until cleared, optionally only for
requests that `match(method, path, headers)` accepts):

    reset         close the client connection with a TCP reset, no answer
    delay         wait `seconds`, then forward normally
    status        answer `status` (default 503) without asking the server
    ignore_range  forward without the Range header: 200 with the whole body
    truncate      forward, send the right headers and half the body, then cut the connection
    corrupt       forward, with one byte of the body (the middle one) flipped
    no_multirange a request for several ranges gets 200 with the whole body (as S3 does);
                  single ranges are forwarded
    bad_multipart a request for several ranges gets the server's multipart answer with its
                  boundary mangled after the first part

Bodies are read whole from the server before anything is sent on (test blobs are small), so a
fault is applied to exactly the bytes the server sent. Every request the proxy saw is in
`seen` as (method, path, Range header or ""), and `faults_applied` counts the faults.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from tests.servers import ThreadedHttpServer

_RELAYED_HEADERS = ("Content-Type", "Content-Range", "Content-Encoding", "Location",
                    "Retry-After", "Accept-Ranges", "Last-Modified", "ETag")
KINDS = ("reset", "delay", "status", "ignore_range", "truncate", "corrupt", "no_multirange",
         "bad_multipart")


@dataclass
class Fault:
    kind: str
    times: int | None = None  # None: until cleared
    status: int = 503
    seconds: float = 0.0
    match: Callable[[str, str, dict], bool] | None = None


class FaultProxy(ThreadedHttpServer):
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port or 80)
        self.seen: list[tuple[str, str, str]] = []
        self.faults_applied = 0
        self._fault: Fault | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                proxy._handle(self)

            def do_HEAD(self):
                proxy._handle(self)

            def log_message(self, *args):
                pass

        self._listen(Handler)

    def inject(self, kind: str, *, times: int | None = None, **params) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._fault = Fault(kind, times, **params)

    def clear(self) -> None:
        with self._lock:
            self._fault = None

    def _take_fault(self, method: str, path: str, headers: dict) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None:
                return None
            if fault.match is not None and not fault.match(method, path, headers):
                return None
            multi_range = "," in headers.get("Range", "")
            if fault.kind in ("no_multirange", "bad_multipart") and not multi_range:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._fault = None
            self.faults_applied += 1
            return fault

    # --- one request ---------------------------------------------------------------------------

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        headers = {name: value for name, value in handler.headers.items()}
        method, path = handler.command, handler.path
        self.seen.append((method, path, headers.get("Range", "")))
        fault = self._take_fault(method, path, headers)
        kind = fault.kind if fault else None
        if kind == "reset":
            _reset(handler)
            return
        if kind == "status":
            _send(handler, fault.status, {"Content-Type": "text/plain"}, b"injected fault\n",
                  method == "HEAD")
            return
        if kind == "delay":
            time.sleep(fault.seconds)
        if kind in ("ignore_range", "no_multirange"):
            headers.pop("Range", None)
        status, reply_headers, body = self._forward(method, path, headers)
        if kind == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        if kind == "bad_multipart":
            boundary = reply_headers.get("Content-Type", "").partition("boundary=")[2].encode()
            if boundary:
                first = body.find(boundary)
                second = body.find(boundary, first + len(boundary))
                if second >= 0:
                    body = body[:second] + b"X" * len(boundary) + body[second + len(boundary):]
        if kind == "truncate":
            _send(handler, status, reply_headers, body[:len(body) // 2], method == "HEAD",
                  content_length=len(body))
            # A clean end (FIN) after half the promised body: the client sees a short body.
            handler.close_connection = True
            try:
                handler.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        _send(handler, status, reply_headers, body, method == "HEAD")

    def _forward(self, method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            forwarded = {k: v for k, v in headers.items()
                         if k.lower() not in ("host", "connection", "keep-alive")}
            conn.request(method, path, headers=forwarded)
            resp = conn.getresponse()
            body = resp.read()
            reply_headers = {name: resp.headers[name] for name in _RELAYED_HEADERS
                             if resp.headers.get(name) is not None}
            if method == "HEAD" and resp.headers.get("Content-Length"):
                reply_headers["Content-Length"] = resp.headers["Content-Length"]
            return resp.status, reply_headers, body
        finally:
            conn.close()


def _send(handler, status: int, headers: dict, body: bytes, head: bool,
          content_length: int | None = None) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        if name != "Content-Length":
            handler.send_header(name, value)
    if head and "Content-Length" in headers:
        handler.send_header("Content-Length", headers["Content-Length"])
    else:
        handler.send_header("Content-Length", str(len(body) if content_length is None
                                                  else content_length))
    handler.end_headers()
    if not head:
        handler.wfile.write(body)
    handler.wfile.flush()


def _reset(handler) -> None:
    """Close the client connection with RST (SO_LINGER 0) rather than a clean FIN."""
    sock = handler.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
    handler.close_connection = True
