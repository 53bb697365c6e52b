"""Real web servers on loopback for tests: nginx for correct behaviour, tiny Python servers for
the misbehaviour nginx cannot be made to show.

    with NginxServer(root_dir) as server:
        source = open_source(server.url + "/blob")
        ...
        [record] = server.requests()   # parsed access log: method, uri, status, range, ...

nginx runs as a foreground child (`daemon off`) with everything it writes (pid, logs, temp
files) under its own temp prefix, so tests never touch /etc/nginx or /var/log and several
servers can run at once.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

NGINX = "/usr/sbin/nginx"
_START_TIMEOUT_S = 10.0
_SYNC_URI = "/.lazyfs-log-sync"


def nginx_missing_reason() -> str | None:
    """Why nginx tests must skip, or None when they can run."""
    if not os.access(NGINX, os.X_OK):
        return f"{NGINX} not found (apt-get install -y nginx-light)"
    return None


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick; a tiny race remains, handled by
    NginxServer retrying on "Address already in use")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LogRecord:
    method: str
    uri: str                # as requested, with the query
    status: int
    range: str              # the request's Range header, "" when absent
    body_bytes: int         # $body_bytes_sent
    connection: int         # connection serial number: equal numbers mean keep-alive reuse
    connection_requests: int
    headers: dict[str, str]  # the extra request headers named in log_headers ("" when absent)


class NginxServer:
    """nginx serving `root_dir` on 127.0.0.1:<free port>; use as a context manager.

    `tls=(cert_path, key_path)` serves https instead. `log_headers` are request headers recorded
    in each log record (lower-case names). `locations` replaces the plain static `location / { }`
    and `http_directives` go in the http block (relative paths there resolve in the server's
    private prefix): a caching proxy, headers, the configs the docs publish.
    """

    def __init__(self, root_dir: str | os.PathLike, *, tls: tuple[str, str] | None = None,
                 log_headers: tuple[str, ...] = ("x-lazyfs-test", "user-agent"),
                 locations: str = "location / { }", http_directives: str = ""):
        self.locations = locations
        self.http_directives = http_directives
        self.root = Path(root_dir).resolve()
        self.tls = tls
        self.log_headers = tuple(name.lower() for name in log_headers)
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._prefix: Path | None = None
        self._syncs = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> "NginxServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        reason = nginx_missing_reason()
        if reason:
            raise RuntimeError(reason)
        self._prefix = Path(tempfile.mkdtemp(prefix="lazyfs-nginx-"))
        for _ in range(3):
            self.port = free_port()
            if self._try_start():
                return
        raise RuntimeError(f"nginx could not bind a free port:\n{self.error_log()}")

    def stop(self) -> None:
        if self._proc is not None:
            # SIGTERM is nginx's fast shutdown: the master stops its worker and exits.
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._prefix is not None:
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None

    def error_log(self) -> str:
        path = self._prefix / "error.log" if self._prefix else None
        return path.read_text(errors="replace") if path and path.exists() else "(no error log)"

    def requests(self) -> list[LogRecord]:
        """Every request logged so far, in order.

        nginx writes a request's log line just after sending its last byte, so a client that
        has its response may still race the log write. To be exact, this first sends its own
        marker request and waits for the marker's line: the single worker handles one event at
        a time, so every earlier request's line is on disk by then.
        """
        return [record for record in self._sync() if not record.uri.startswith(_SYNC_URI)]

    def clear_log(self) -> None:
        self._sync()  # so that no late line of an earlier request lands after the truncation
        os.truncate(self._prefix / "access.log", 0)  # nginx appends (O_APPEND): safe to truncate

    # --- internals --------------------------------------------------------------------------

    def _config(self) -> str:
        # escape=json makes every variable a valid JSON string body, whatever the client sent.
        fields = {
            "method": "$request_method", "uri": "$request_uri", "status": "$status",
            "range": "$http_range", "body_bytes": "$body_bytes_sent",
            "connection": "$connection", "connection_requests": "$connection_requests",
        }
        json_fields = [f'"{key}":"{value}"' for key, value in fields.items()]
        json_headers = [f'"{name}":"$http_{name.replace("-", "_")}"' for name in self.log_headers]
        log_format = "{" + ",".join(json_fields) + ',"headers":{' + ",".join(json_headers) + "}}"
        prefix = self._prefix
        listen = f"127.0.0.1:{self.port}" + (" ssl" if self.tls else "")
        tls = (f'ssl_certificate "{self.tls[0]}";\n        ssl_certificate_key "{self.tls[1]}";'
               if self.tls else "")
        # `user root` only when we are root: otherwise nginx ignores it with a warning.
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid "{prefix}/nginx.pid";
error_log "{prefix}/error.log" notice;
events {{ worker_connections 256; }}
http {{
    types {{ }}
    default_type application/octet-stream;
    log_format lazyfs escape=json '{log_format}';
    # No buffer= and no gzip=: every line is written when its request ends.
    access_log "{prefix}/access.log" lazyfs;
    client_body_temp_path "{prefix}/client_body";
    proxy_temp_path "{prefix}/proxy";
    fastcgi_temp_path "{prefix}/fastcgi";
    uwsgi_temp_path "{prefix}/uwsgi";
    scgi_temp_path "{prefix}/scgi";
    keepalive_requests 100000;
    {self.http_directives}
    server {{
        listen {listen};
        server_name localhost;
        {tls}
        root "{self.root}";
        location = {_SYNC_URI} {{ return 204; }}
        {self.locations}
    }}
}}
"""

    def _try_start(self) -> bool:
        """Start nginx on self.port; False when the port was taken meanwhile."""
        conf = self._prefix / "nginx.conf"
        conf.write_text(self._config())
        error_log = self._prefix / "error.log"
        error_log.write_text("")
        # -e: the error log from the very start (before the config is read nginx would write
        # to its compiled-in default). -p: relative paths in the config resolve here.
        self._proc = subprocess.Popen(
            [NGINX, "-p", f"{self._prefix}/", "-c", str(conf), "-e", str(error_log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in self.error_log():
                    return False
                raise RuntimeError(f"nginx exited at start:\n{self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"nginx did not listen within {_START_TIMEOUT_S} s:\n{self.error_log()}")

    def _sync(self) -> list[LogRecord]:
        self._syncs += 1
        marker = f"{_SYNC_URI}?n={self._syncs}"
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", marker, headers={"Connection": "close"})
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + 5
        while True:
            records = self._read_log()
            if any(record.uri == marker for record in records):
                return records
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not log {marker}:\n{self.error_log()}")
            time.sleep(0.002)

    def _read_log(self) -> list[LogRecord]:
        records = []
        for line in (self._prefix / "access.log").read_text().splitlines():
            if not line.endswith("}"):
                continue  # a line still being written
            raw = json.loads(line)
            records.append(LogRecord(
                raw["method"], raw["uri"], int(raw["status"]), raw["range"],
                int(raw["body_bytes"]), int(raw["connection"]), int(raw["connection_requests"]),
                raw["headers"]))
        return records


# --- misbehaving servers in Python -----------------------------------------------------------

@dataclass(frozen=True)
class PyRequest:
    method: str
    path: str
    headers: dict[str, str]


class ThreadedHttpServer:
    """An http.server on 127.0.0.1 in a background thread; subclasses give it a handler."""

    def _listen(self, handler_class) -> None:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self._server.daemon_threads = True
        # Clients that give up on a bad reply (as they should) and injected resets close
        # connections mid-body: not an error here.
        self._server.handle_error = lambda request, address: None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _listen_routing(self, routes: dict[str, Callable]) -> None:
        """Listen with a keep-alive handler that calls routes[METHOD](request) for each
        request, quietly (no access log on stderr)."""
        attrs = {"protocol_version": "HTTP/1.1", "log_message": lambda request, *args: None}
        for method, route in routes.items():
            attrs[f"do_{method}"] = lambda request, route=route: route(request)
        self._listen(type("Handler", (http.server.BaseHTTPRequestHandler,), attrs))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class PyHttpServer(ThreadedHttpServer):
    """http.server in a thread serving files from `root_dir`, correctly by default.

    Subclasses override `send_range` or `send_head` to misbehave. Received requests are kept in
    `.received` for assertions.
    """

    def __init__(self, root_dir: str | os.PathLike):
        self.root = Path(root_dir).resolve()
        self.received: list[PyRequest] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server

            def do_GET(self) -> None:
                owner._handle(self, head=False)

            def do_HEAD(self) -> None:
                owner._handle(self, head=True)

            def log_message(self, *args) -> None:
                pass  # quiet: tests assert on .received

        self._listen(Handler)

    def _handle(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        self.received.append(PyRequest(handler.command, handler.path, dict(handler.headers)))
        path = self.root / unquote(urlsplit(handler.path).path).lstrip("/")
        if self.root not in path.resolve().parents or not path.is_file():
            self.send(handler, 404, {}, b"not found\n", head)
            return
        data = path.read_bytes()
        if head:
            self.send_head(handler, data)
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", handler.headers.get("Range", ""))
        if match is None:
            self.send_whole(handler, data)
            return
        first, last = int(match[1]), min(int(match[2]), len(data) - 1)
        if first >= len(data):
            self.send(handler, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
            return
        self.send_range(handler, data, first, last)

    def send_head(self, handler, data: bytes) -> None:
        self.send(handler, 200, {}, data, head=True)

    def send_whole(self, handler, data: bytes) -> None:
        self.send(handler, 200, {}, data)

    def send_range(self, handler, data: bytes, first: int, last: int) -> None:
        self.send(handler, 206, {"Content-Range": f"bytes {first}-{last}/{len(data)}"},
                  data[first:last + 1])

    @staticmethod
    def send(handler, status: int, headers: dict[str, str], body: bytes, head: bool = False,
             content_length: int | None = None) -> None:
        """One reply; `content_length` overrides the true length, -1 leaves it out."""
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        if content_length != -1:  # -1: no length, the body ends when the connection closes
            handler.send_header("Content-Length", str(len(body) if content_length is None
                                                      else content_length))
        else:
            handler.close_connection = True
        handler.end_headers()
        if not head:
            handler.wfile.write(body)


class NoRangeServer(PyHttpServer):
    """Ignores Range: always 200 with the whole file."""

    def send_range(self, handler, data: bytes, first: int, last: int) -> None:
        self.send(handler, 200, {}, data)


class WrongContentRangeServer(PyHttpServer):
    """Sends the bytes asked for, with a Content-Range shifted by one byte."""

    def send_range(self, handler, data: bytes, first: int, last: int) -> None:
        self.send(handler, 206, {"Content-Range": f"bytes {first + 1}-{last + 1}/{len(data)}"},
                  data[first:last + 1])


class ShortBodyServer(PyHttpServer):
    """Right headers, then closes the connection halfway through the body."""

    def send_range(self, handler, data: bytes, first: int, last: int) -> None:
        body = data[first:last + 1]
        handler.close_connection = True
        self.send(handler, 206, {"Content-Range": f"bytes {first}-{last}/{len(data)}"},
                  body[:len(body) // 2], content_length=len(body))


class NoHeadServer(PyHttpServer):
    """Refuses HEAD with 405, as servers behind GET-only presigned URLs do."""

    def send_head(self, handler, data: bytes) -> None:
        self.send(handler, 405, {}, b"", head=True)


class SilentServer:
    """Accepts connections (the kernel does, from the backlog) and never answers: timeouts."""

    def __enter__(self) -> "SilentServer":
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self._sock.close()


# --- TLS material ----------------------------------------------------------------------------

def make_tls_files(directory: str | os.PathLike) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it, as PEM files:
    (ca_cert_path, server_cert_path, server_key_path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("lazyfs test CA", ca_key, "lazyfs test CA", ca_key, ca=True)
    server_cert = cert("127.0.0.1", server_key, "lazyfs test CA", ca_key, ca=False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return tuple(str(path) for path in paths)
