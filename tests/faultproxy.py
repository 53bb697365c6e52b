"""An HTTP proxy for tests that forwards to a real server (nginx) and injects faults.

    with NginxServer(root) as nginx, FaultProxy(nginx.url) as proxy:
        proxy.inject("status", status=503, times=2)   # the next 2 requests get a 503
        ...                                          # read through proxy.url
        proxy.inject("reset")                        # every request from now on: a reset
        proxy.clear()                                # the fault clears

Faults (one active at a time, for `times` requests or until cleared, optionally only for
requests that `match(method, path, headers)` accepts, and with `every=N` only for every Nth
such request, to sprinkle a fault over a long run; with `spare_retries=True`, never again for
a request for the same path and Range as one it hit, so that a client's retry goes through:
counting retries, `every=N` hits all of a request's attempts now and then, about (1/N)**retries
per fault, which a test of faults being retried must not mistake for a bug):

    reset         close the client connection with a TCP reset, no answer
    delay         wait `seconds`, then forward normally
    status        answer `status` (default 503) without asking the server
    ignore_range  forward without the Range header: 200 with the whole body
    truncate      forward, send the right headers and half the body, then cut the connection
    pause         forward, send the right headers and the body up to its second part's data (a
                  multipart answer; else its first `fraction`), wait `seconds`, then the rest:
                  an answer that completes late, its first part on time
    stall         forward, send the right headers and the first `fraction` (default half) of
                  the body, then go silent with the connection open for `seconds` (default 30,
                  or until the proxy stops): only the client's read timeout ends the wait
    corrupt       forward, with one byte of the body (the middle one) flipped
    flip          forward, with `count` bytes (default 3) flipped at evenly spaced positions of
                  the data: of the body, or of each part's data in a multipart answer (the
                  framing stays intact, so the client believes the parts and must check them)
    wrong_range   forward with every range of the Range header moved `shift` bytes (default 1)
                  later: a 206 whose Content-Range names other bytes than those asked for;
                  with `lie=True` (single ranges) the Content-Range is rewritten to the asked-for
                  range, so only the bytes are wrong
    no_multirange a request for several ranges gets 200 with the whole body (as S3 does);
                  single ranges are forwarded
    bad_multipart a request for several ranges gets the server's multipart answer with its
                  boundary mangled after the first part
    truncate_multipart  a request for several ranges gets the server's multipart answer cut
                  (clean FIN, full Content-Length announced) in the middle of its second part

Bodies are read whole from the server before anything is sent on (test blobs are small), so a
fault is applied to exactly the bytes the server sent. Every request the proxy saw is in
`seen` as (method, path, Range header or ""), and `faults_applied` counts the faults.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from tests.servers import ThreadedHttpServer

_RELAYED_HEADERS = ("Content-Type", "Content-Range", "Content-Encoding", "Location",
                    "Retry-After", "Accept-Ranges", "Last-Modified", "ETag")
KINDS = ("reset", "delay", "status", "ignore_range", "truncate", "pause", "stall", "corrupt", "flip",
         "wrong_range", "no_multirange", "bad_multipart", "truncate_multipart")
# Faults that only apply to requests for several ranges.
_MULTI_RANGE_KINDS = ("no_multirange", "bad_multipart", "truncate_multipart")
_RANGE_SPEC = re.compile(r"(\d+)-(\d+)")


@dataclass
class Fault:
    kind: str
    times: int | None = None  # None: until cleared
    status: int = 503
    seconds: float | None = None  # delay, pause: the wait; stall: the silence (None: 30 s)
    match: Callable[[str, str, dict], bool] | None = None
    every: int = 1  # apply to every Nth matching request only
    fraction: float = 0.5  # stall, pause: the part of the body sent before the silence
    count: int = 3  # flip: bytes flipped (per part in a multipart answer)
    shift: int = 1  # wrong_range: how far each range moves
    lie: bool = False  # wrong_range: claim the asked-for Content-Range anyway
    spare_retries: bool = False  # see the module doc
    matched: int = 0  # matching requests seen, for `every`
    hit: set[tuple[str, str]] = field(default_factory=set)  # (path, Range) it applied to


class FaultProxy(ThreadedHttpServer):
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port or 80)
        self.seen: list[tuple[str, str, str]] = []
        self.faults_applied = 0
        self._fault: Fault | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # ends the silence of stalled answers
        self._listen_routing({"GET": self._handle, "HEAD": self._handle})

    def inject(self, kind: str, *, times: int | None = None, **params) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._fault = Fault(kind, times, **params)

    def clear(self) -> None:
        with self._lock:
            self._fault = None

    @property
    def active(self) -> str | None:
        """The kind of the fault in force, None once cleared or used up."""
        with self._lock:
            return self._fault.kind if self._fault else None

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        super().__exit__(*exc)

    def _take_fault(self, method: str, path: str, headers: dict) -> Fault | None:
        with self._lock:
            fault = self._fault
            if fault is None:
                return None
            if fault.match is not None and not fault.match(method, path, headers):
                return None
            multi_range = "," in headers.get("Range", "")
            if fault.kind in _MULTI_RANGE_KINDS and not multi_range:
                return None
            request = (path, headers.get("Range", ""))
            if fault.spare_retries and request in fault.hit:
                return None
            fault.matched += 1
            if (fault.matched - 1) % fault.every:
                return None
            if fault.spare_retries:
                fault.hit.add(request)
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
            time.sleep(fault.seconds or 0.0)
        if kind in ("ignore_range", "no_multirange"):
            headers.pop("Range", None)
        asked_range = headers.get("Range", "")
        if kind == "wrong_range" and asked_range:
            headers["Range"] = _RANGE_SPEC.sub(
                lambda m: f"{int(m[1]) + fault.shift}-{int(m[2]) + fault.shift}", asked_range)
        status, reply_headers, body = self._forward(method, path, headers)
        if kind == "wrong_range" and fault.lie and status == 206 and "," not in asked_range:
            total = reply_headers.get("Content-Range", "").rpartition("/")[2]
            reply_headers["Content-Range"] = f"bytes {asked_range.removeprefix('bytes=')}/{total}"
        if kind == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
        if kind == "flip" and body:
            body = _flip(body, _data_spans(body, reply_headers), fault.count)
        if kind == "truncate_multipart":
            spans = _data_spans(body, reply_headers)
            if len(spans) >= 2:
                start, end = spans[1]
                _send_cut(handler, status, reply_headers, body, (start + end) // 2, method)
                return
        if kind == "bad_multipart":
            boundary = reply_headers.get("Content-Type", "").partition("boundary=")[2].encode()
            if boundary:
                first = body.find(boundary)
                second = body.find(boundary, first + len(boundary))
                if second >= 0:
                    body = body[:second] + b"X" * len(boundary) + body[second + len(boundary):]
        if kind == "truncate":
            _send_cut(handler, status, reply_headers, body, len(body) // 2, method)
            return
        if kind == "pause" and method != "HEAD":
            spans = _data_spans(body, reply_headers)
            cut = spans[1][0] if len(spans) >= 2 else int(len(body) * fault.fraction)
            _send(handler, status, reply_headers, body[:cut], False, content_length=len(body))
            time.sleep(fault.seconds or 0.0)
            handler.wfile.write(body[cut:])
            handler.wfile.flush()
            return
        if kind == "stall" and method != "HEAD":
            cut = int(len(body) * fault.fraction)
            _send(handler, status, reply_headers, body[:cut], False, content_length=len(body))
            # Silent, with the connection open: no FIN, no RST, until the time is up.
            self._stopping.wait(30 if fault.seconds is None else fault.seconds)
            handler.close_connection = True
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


def _send_cut(handler, status: int, headers: dict, body: bytes, cut: int, method: str) -> None:
    """The right headers (and Content-Length), the body's first `cut` bytes, then a clean end
    (FIN): the client sees a short body."""
    _send(handler, status, headers, body[:cut], method == "HEAD", content_length=len(body))
    handler.close_connection = True
    try:
        handler.connection.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _data_spans(body: bytes, headers: dict) -> list[tuple[int, int]]:
    """[start, end) of the data in a body: the whole body, or each part's data (between its
    header block and the next delimiter) in a multipart/byteranges answer."""
    content_type = headers.get("Content-Type", "")
    boundary = content_type.partition("boundary=")[2].strip('"').encode()
    if not content_type.startswith("multipart/") or not boundary:
        return [(0, len(body))]
    delimiter = b"\r\n--" + boundary
    spans = []
    at = body.find(b"--" + boundary)
    while at >= 0:
        headers_end = body.find(b"\r\n\r\n", at)
        if headers_end < 0:
            break
        start = headers_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            break
        spans.append((start, end))
        at = end + 2
        if body.startswith(b"--", at + 2 + len(boundary)):
            break  # the final delimiter
    return spans


def _flip(body: bytes, spans: list[tuple[int, int]], count: int) -> bytes:
    """`body` with `count` bytes of each span inverted, evenly spaced (never a span's first or
    last byte)."""
    out = bytearray(body)
    for start, end in spans:
        for i in range(1, count + 1):
            out[start + (end - start) * i // (count + 1)] ^= 0xFF
    return bytes(out)


def _reset(handler) -> None:
    """Close the client connection with RST (SO_LINGER 0) rather than a clean FIN."""
    sock = handler.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
    handler.close_connection = True
