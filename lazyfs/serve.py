"""`lazyfs serve DIR`: publish a directory (an OCI layout, blobs) over HTTP with Range support.

A minimal static server for loopback demos and quick sharing: Python's own http.server
ignores Range, which lazy mounting needs. For production use any static web server or CDN
(nginx, caddy, S3 website hosting): lazyfs needs nothing but GET with single ranges and HEAD.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
import urllib.parse

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_COPY_BYTES = 1 << 20


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection carries many range requests
    root = "."

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        return None

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _path(self) -> str | None:
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        full = os.path.realpath(os.path.join(self.root, relative))
        if full != self.root and not full.startswith(self.root + os.sep):
            return None  # outside the served directory
        return full if os.path.isfile(full) else None

    def _serve(self, send_body: bool) -> None:
        path = self._path()
        if path is None:
            self._reply(404, {}, b"not found\n", send_body)
            return
        size = os.path.getsize(path)
        first, last = 0, size - 1
        status = 200
        header = self.headers.get("Range")
        if header:
            match = _RANGE_RE.match(header.strip())
            if not match or not (match.group(1) or match.group(2)):
                self._reply(416, {"Content-Range": f"bytes */{size}"}, b"", send_body)
                return
            if match.group(1):
                first = int(match.group(1))
                last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # a suffix: the last N bytes
                first = max(0, size - int(match.group(2)))
            if first >= size or first > last:
                self._reply(416, {"Content-Range": f"bytes */{size}"}, b"", send_body)
                return
            status = 206
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "Content-Length": str(last - first + 1)}
        if status == 206:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            with open(path, "rb") as f:
                f.seek(first)
                _copy(f, self.wfile, last - first + 1)

    def _reply(self, status: int, headers: dict, body: bytes, send_body: bool) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _copy(source, sink, length: int) -> None:
    while length > 0:
        block = source.read(min(_COPY_BYTES, length))
        if not block:
            break
        sink.write(block)
        length -= len(block)


class Server:
    """A running server in a background thread; `url` is where DIR is published."""

    def __init__(self, directory: str, host: str = "127.0.0.1", port: int = 0):
        handler = type("Handler", (_Handler,), {"root": os.path.realpath(directory)})
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Server":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_forever(directory: str, host: str, port: int) -> int:
    server = Server(directory, host, port)
    print(f"serving {directory} at {server.url}/ (Ctrl-C to stop)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0

