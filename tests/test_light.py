"""The light HTTP client of a cold start (lazyfs/source/light.py): an image's documents and a
layer's first requests without `requests`, over one kept-alive connection, and requests for
whatever it does not do (redirects, proxies)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazyfs.errors import FetchError
from lazyfs.image import resolve_mount_image
from lazyfs.imageref import open_reference
from lazyfs.oci_layout import open_image
from lazyfs.source import light, preconnect, waiting
from lazyfs.source.http import HttpSource
from tests.mounting import mounted
from tests.servers import NginxServer, PyHttpServer, make_tls_files
from tests.testimage import TAG


@pytest.fixture
def layout(image, nginx):
    """A converted layout served by nginx: (its URL with tag, the local layout)."""
    _, converted, _ = image
    shutil.copytree(converted, Path(nginx.root) / "layout")
    return f"{nginx.url}/layout:{TAG}", converted


RESOLVE = """
import json, sys
from lazyfs.image import resolve_mount_image
image = resolve_mount_image(sys.argv[1])
spec = image.layers[0]
source = spec.source
toc = source.read(spec.blob_size - 100, 100)
source.read(0, 100)  # a second read: the connection carries it too
print(json.dumps({"requests": "requests" in sys.modules, "bootstrap": source._bootstrap is not None,
                  "read": len(toc)}))
image.close()
"""


def test_a_cold_resolve_and_first_read_need_no_requests_and_one_connection(layout, nginx):
    url, _ = layout
    nginx.clear_log()
    # The light client's case: no proxy, no netrc file (whatever the machine running this has).
    env = {name: value for name, value in os.environ.items()
           if not name.lower().endswith("_proxy")}
    env["NETRC"] = str(Path(nginx.root) / "no-netrc")
    done = subprocess.run([sys.executable, "-c", RESOLVE, url], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    # requests was never imported (its import is what the light client saves), and the blob's
    # source took over the documents' connection.
    assert json.loads(done.stdout) == {"requests": False, "bootstrap": True, "read": 100}
    records = nginx.requests()
    assert [r.uri.rsplit("/", 1)[-1] for r in records][0] == "index.json"
    assert len(records) == 5  # index, manifest, config, the blob's two ranges
    assert len({r.connection for r in records}) == 1  # one kept-alive connection


def test_a_proxy_in_the_environment_leaves_everything_to_requests(layout, monkeypatch):
    url, converted = layout
    # requests honours the variables (and no_proxy, so that it reaches the test server).
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert not light.usable(url)
    image = resolve_mount_image(url)
    try:
        source = image.layers[0].source
        assert isinstance(source, HttpSource) and source._bootstrap is None
        assert len(source.read(0, 10)) == 10
    finally:
        image.close()


class RedirectingServer(PyHttpServer):
    """Serves /moved/... ; anything under /old/ answers 302 to the same path under /moved/."""

    def _handle(self, handler, head: bool) -> None:
        if handler.path.startswith("/old/"):
            self.received.append(None)
            self.send(handler, 302, {"Location": "/moved/" + handler.path[len("/old/"):]},
                      b"", head)
            return
        super()._handle(handler, head)


def test_redirects_go_to_requests_and_the_light_connection_steps_aside(image, tmp_path):
    _, converted, _ = image
    shutil.copytree(converted, tmp_path / "www" / "moved" / "layout")
    with RedirectingServer(tmp_path / "www") as server:
        with open_reference(f"{server.url}/moved/layout:{TAG}") as direct:
            manifest = direct.manifest_descriptor
        image = resolve_mount_image(f"{server.url}/old/layout:{TAG}")
        try:
            assert image.description["manifest"] == manifest.digest
            source = image.layers[0].source
            size = source.size()
            assert len(source.read(size - 1000, 1000)) == 1000
            assert source._bootstrap is None  # handed back for good after the redirect
        finally:
            image.close()


class ClosingServer(PyHttpServer):
    """Keeps no connection alive, without saying so (no Connection: close): as a server whose
    idle timeout is shorter than the client's pause between requests."""

    def send(self, handler, status, headers, body, head=False, content_length=None):
        super().send(handler, status, headers, body, head, content_length)
        handler.close_connection = True


def test_a_connection_the_server_dropped_while_idle_is_reopened(tmp_path):
    (tmp_path / "doc.json").write_bytes(b'{"a": 1}')
    with ClosingServer(tmp_path) as server:
        url = f"{server.url}/doc.json"
        connection = light.LightConnection(url, headers=None, ca_cert=None, timeout=(5, 5))
        try:
            for _ in range(3):
                time.sleep(0.2)  # idle: the server's close arrives meanwhile
                assert connection.try_acquire()
                with connection.send("GET", url, "doc") as resp:
                    assert resp.status_code == 200 and resp.read(100) == b'{"a": 1}'
                    assert resp.read(100) == b""
        finally:
            connection.close()
        assert len(server.received) == 3


def test_one_request_at_a_time_and_an_unread_body_closes_the_connection(tmp_path):
    (tmp_path / "blob").write_bytes(b"x" * 100_000)
    with PyHttpServer(tmp_path) as server:
        url = f"{server.url}/blob"
        connection = light.LightConnection(url, headers={"X-Test": "1"}, ca_cert=None,
                                           timeout=5)
        try:
            assert connection.try_acquire()
            assert not connection.try_acquire()  # busy until the answer is closed
            resp = connection.send("GET", url, "blob", {"Range": "bytes=0-99999"})
            assert resp.status_code == 206 and len(resp.read1(10)) > 0
            resp.close()  # most of the body unread: that connection cannot be reused
            assert connection.try_acquire()
            with connection.send("GET", url, "blob", {"Range": "bytes=5-9"}) as resp:
                assert resp.read(10) == b"xxxxx"
        finally:
            connection.close()
    assert [r.headers.get("X-Test") for r in server.received] == ["1", "1"]
    assert server.received[0].headers["Accept-Encoding"] == "identity"


def test_a_connection_started_in_advance_carries_the_first_request(nginx, monkeypatch):
    (Path(nginx.root) / "doc.json").write_bytes(b"{}")
    url = f"{nginx.url}/doc.json"
    monkeypatch.setenv("NETRC", str(Path(nginx.root) / "no-netrc"))
    preconnect.start(url)
    connection = light.LightConnection(url, headers=None, ca_cert=None, timeout=5)
    try:
        assert connection._conn.sock is not None  # connected before any request
        assert connection.try_acquire()
        with connection.send("GET", url, "doc") as resp:
            assert resp.status_code == 200 and resp.read(10) == b"{}"
    finally:
        connection.close()
    assert preconnect.take(url, 0) is None  # taken once
    # Nothing is connected for a proxied URL, and what nobody takes is closed.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    preconnect.start(url.replace("http://", "https://"))
    assert preconnect._pending == {}
    monkeypatch.delenv("https_proxy")
    preconnect.start(url)
    preconnect.discard()
    assert preconnect._pending == {}


def test_a_numeric_address_is_connected_by_the_kernel_and_a_name_by_a_thread(nginx,
                                                                             monkeypatch):
    """127.0.0.1: a non-blocking connect, no thread (one would wait for the interpreter lock
    behind the imports that follow); a name must be resolved, in a thread. Either way the
    socket handed over is connected, without Nagle's delay, as http.client's own are."""
    monkeypatch.setenv("NETRC", str(Path(nginx.root) / "no-netrc"))
    port = nginx.url.rsplit(":", 1)[1]
    for host, threaded in (("127.0.0.1", False), ("localhost", True)):
        url = f"http://{host}:{port}/doc.json"
        preconnect.start(url)
        assert (preconnect._pending[(host, int(port))]._thread is not None) == threaded
        sock = preconnect.take(url, 5)
        try:
            assert sock is not None and sock.getpeername()[1] == int(port)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            sock.close()
    assert preconnect._numeric_family("::1") == socket.AF_INET6
    assert preconnect._numeric_family("cdn.example") is None


def test_a_refused_preconnection_is_not_handed_over_and_the_request_says_why(monkeypatch,
                                                                           tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with socket.socket() as unused:  # a port nobody listens on once this is closed
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"http://127.0.0.1:{port}/doc.json"
    preconnect.start(url)
    assert preconnect.take(url, 5) is None
    connection = light.LightConnection(url, headers=None, ca_cert=None, timeout=5)
    try:
        assert connection.try_acquire()
        with pytest.raises(FetchError, match="GET failed.*[Rr]efused") as info:
            connection.send("GET", url, "doc")
        assert info.value.retriable
    finally:
        connection.close()


def test_spare_time_work_runs_once_while_a_request_waits_for_its_answer(tmp_path):
    """The work runs after the request has gone out and before its answer is read: the
    server has the request when the work runs. Once; a failing work costs the request
    nothing; work no request ran is dropped when the block ends."""
    (tmp_path / "doc.json").write_bytes(b"{}")
    ran: list[int] = []
    with PyHttpServer(tmp_path) as server:
        url = f"{server.url}/doc.json"
        connection = light.LightConnection(url, headers=None, ca_cert=None, timeout=5)
        try:
            def work():
                deadline = time.monotonic() + 5
                while not server.received and time.monotonic() < deadline:
                    time.sleep(0.01)
                ran.append(len(server.received))

            def failing():
                raise ImportError("no such module")

            with waiting.spare_time(failing), waiting.spare_time(work):
                for _ in range(2):
                    assert connection.try_acquire()
                    with connection.send("GET", url, "doc") as resp:
                        assert resp.read(10) == b"{}"
            assert ran == [1]
            with waiting.spare_time(work):
                pass
            assert waiting._pending == []
        finally:
            connection.close()


PRELOAD = """
import sys
from lazyfs.mount import MountOptions, preload_session_modules, resolve_image
from lazyfs.source import waiting
before = "lazyfs.layer" in sys.modules
with waiting.spare_time(preload_session_modules):
    image = resolve_image(sys.argv[1], MountOptions())
print(before, "lazyfs.layer" in sys.modules, "lazyfs.cache" in sys.modules)
image.close()
"""


def test_a_run_loads_the_daemon_modules_while_it_waits_for_the_documents(layout, nginx):
    """What `lazyfs run` does before forking the daemon: resolving an image on a web server
    loads the modules the daemon needs first; resolving a local layout leaves them alone."""
    url, converted = layout
    env = {name: value for name, value in os.environ.items()
           if not name.lower().endswith("_proxy")}
    env["NETRC"] = str(Path(nginx.root) / "no-netrc")
    for ref, expected in ((url, "False True True"), (f"{converted}:{TAG}", "False False False")):
        done = subprocess.run([sys.executable, "-c", PRELOAD, ref], capture_output=True,
                              text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == expected.split(), ref


def test_credentials_in_the_url_or_a_netrc_file_leave_everything_to_requests(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert light.usable("https://cdn.example/layout:v1")
    assert not light.usable("https://user:secret@cdn.example/layout:v1")
    (tmp_path / "netrc").write_text("machine cdn.example login u password p\n")
    assert not light.usable("https://cdn.example/layout:v1")
    assert not light.usable("s3://bucket/layout:v1")


def test_tls_is_verified_with_the_same_trust_as_requests(tmp_path, monkeypatch):
    ca_cert, server_cert, server_key = make_tls_files(tmp_path)
    root = tmp_path / "tls-www"
    root.mkdir()
    (root / "doc.json").write_bytes(b'{"tls": 1}')
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with NginxServer(root, tls=(server_cert, server_key)) as server:
        url = f"{server.url}/doc.json"
        # Not trusted by default (certifi's bundle, as requests): a TLS error, not retried.
        untrusted = light.LightConnection(url, headers=None, ca_cert=None, timeout=5)
        try:
            assert untrusted.try_acquire()
            with pytest.raises(FetchError, match="TLS error: certificate verify failed") as info:
                untrusted.send("GET", url, "doc")
            assert not info.value.retriable
        finally:
            untrusted.close()
        # With --ca-cert, and over a connection whose TCP handshake was made in advance.
        preconnect.start(url)
        trusted = light.LightConnection(url, headers=None, ca_cert=ca_cert, timeout=5)
        try:
            assert trusted._conn.sock is not None
            assert trusted.try_acquire()
            with trusted.send("GET", url, "doc") as resp:
                assert resp.status_code == 200 and resp.read(100) == b'{"tls": 1}'
        finally:
            trusted.close()


def test_a_mount_reads_no_config(layout, nginx, tmp_path):
    """The filesystem needs the layers only: the daemon of `lazyfs mount` never asks for the
    image config (`lazyfs run` reads it itself, while the daemon fetches the TOCs)."""
    url, converted = layout
    with open_image(f"{converted}:{TAG}") as local:
        config_name = local.config_descriptor.digest.split(":")[1]
        manifest_name = local.manifest_descriptor.digest.split(":")[1]
    nginx.clear_log()
    with mounted(url, tmp_path / "mnt", "--no-background-fetch", cache_dir=tmp_path / "cache"):
        assert (tmp_path / "mnt" / "etc" / "passwd").read_bytes().startswith(b"root:")
    names = [r.uri.rsplit("/", 1)[-1] for r in nginx.requests()]
    assert manifest_name in names and config_name not in names


class CuttingServer(PyHttpServer):
    """Announces the whole range, sends half of it, then closes the connection."""

    def send_range(self, handler, data: bytes, first: int, last: int) -> None:
        body = data[first:last + 1]
        self.send(handler, 206, {"Content-Range": f"bytes {first}-{last}/{len(data)}"},
                  body[:len(body) // 2], content_length=len(body))
        handler.close_connection = True


def test_a_body_cut_short_is_a_lost_connection_to_retry(tmp_path):
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 400)
    with CuttingServer(tmp_path) as server:
        url = f"{server.url}/blob"
        bootstrap = light.LightConnection(url, headers=None, ca_cert=None, timeout=5)
        with HttpSource(url, bootstrap=bootstrap) as source:
            with pytest.raises(FetchError, match="connection lost after 500 bytes") as info:
                source.read(0, 1000)
            assert info.value.retriable
