"""Byte-range sources (lazyfs.source): choosing one by location, the file source's own cases,
then the HTTP source against misbehaving servers (the behaviour every source shares is in
tests/test_source_conformance.py).

The HTTP side runs against a real nginx on loopback (tests/servers.py), and its access log
proves what went over the wire: one request per read, with the exact Range asked for.
"""

from __future__ import annotations

import os
import random

import pytest

from lazyfs.errors import FetchError, NotFound, RangeNotSupported
from lazyfs.source import open_source
from lazyfs.source.file import FileSource
from lazyfs.source.http import HttpSource, fetch_all, redact_url
from tests.servers import (NginxServer, NoHeadServer, NoRangeServer, PyHttpServer,
                           ShortBodyServer, SilentServer, WrongContentRangeServer, free_port,
                           make_tls_files, nginx_missing_reason)

BLOB = random.Random(0).randbytes(1024 * 1024 + 123)  # not a multiple of any block size


def test_open_source_picks_the_source_by_location(tmp_path):
    (tmp_path / "a:b").write_bytes(b"xyz")  # a colon does not make a path a URL
    with open_source(str(tmp_path / "a:b")) as source:
        assert isinstance(source, FileSource) and source.read(1, 2) == b"yz"
    with open_source(f"file://{tmp_path}/a%3Ab") as source:
        assert isinstance(source, FileSource) and source.read(0, 3) == b"xyz"
    with open_source("http://127.0.0.1:1/blob") as source:
        assert isinstance(source, HttpSource)
    with pytest.raises(FetchError, match="unsupported source scheme 'ftp'"):
        open_source("ftp://host/blob")
    with pytest.raises(FetchError, match="remote host"):
        open_source("file://elsewhere/blob")


def test_file_source_refuses_a_directory(tmp_path):
    with pytest.raises(FetchError, match="directory"):
        FileSource(str(tmp_path))


def test_file_source_notices_truncation(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(BLOB)
    with FileSource(str(path)) as source:
        assert source.size() == len(BLOB)
        os.truncate(path, 1000)
        with pytest.raises(FetchError, match="truncated"):
            source.read(900, 200)


# --- HTTP against nginx: what goes over the wire --------------------------------------------

@pytest.fixture
def blob_url(nginx):
    (nginx.root / "blob").write_bytes(BLOB)
    return nginx.url + "/blob"


def test_read_sends_exactly_one_request_with_the_range(nginx, blob_url):
    with HttpSource(blob_url) as source:
        nginx.clear_log()
        assert source.read(1000, 4096) == BLOB[1000:5096]
    [record] = nginx.requests()
    assert (record.method, record.uri, record.status, record.range, record.body_bytes) == \
        ("GET", "/blob", 206, "bytes=1000-5095", 4096)


def test_ranges_in_any_order_are_one_request_answered_in_that_order(nginx, blob_url):
    with HttpSource(blob_url) as source:
        nginx.clear_log()
        pieces = list(source.read_ranges([(9000, 100), (0, 50), (5000, 10)]))
        assert [b"".join(p for i, p in pieces if i == n) for n in range(3)] == \
            [BLOB[9000:9100], BLOB[:50], BLOB[5000:5010]]
        with pytest.raises(ValueError, match="overlap at range 0"):
            list(source.read_ranges([(100, 50), (0, 101)]))
    assert [r.range for r in nginx.requests()] == ["bytes=9000-9099,0-49,5000-5009"]


def test_size_is_one_head_then_cached(nginx, blob_url):
    with HttpSource(blob_url) as source:
        assert source.size() == len(BLOB)
        assert source.size() == len(BLOB)
    assert [(r.method, r.range) for r in nginx.requests()] == [("HEAD", "")]


def test_size_is_learned_from_a_read(nginx, blob_url):
    with HttpSource(blob_url) as source:
        source.read(0, 10)
        assert source.size() == len(BLOB)
        assert source.requests == 1
    assert [r.method for r in nginx.requests()] == ["GET"]


def test_connections_are_kept_alive(nginx, blob_url):
    with HttpSource(blob_url) as source:
        source.size()
        for i in range(5):
            source.read(i * 1000, 1000)
    assert len({record.connection for record in nginx.requests()}) == 1


def test_custom_headers_reach_the_server(nginx, blob_url):
    with open_source(blob_url, headers={"X-Lazyfs-Test": "token-123"}) as source:
        source.size()
        source.read(0, 1)
    records = nginx.requests()
    assert [r.method for r in records] == ["HEAD", "GET"]
    assert all(r.headers["x-lazyfs-test"] == "token-123" for r in records)
    assert all(r.headers["user-agent"] == "lazyfs" for r in records)


def test_404_is_not_found(nginx):
    with HttpSource(nginx.url + "/missing") as source:
        with pytest.raises(NotFound):
            source.size()
        with pytest.raises(NotFound):
            source.read(0, 10)


def test_403_is_not_retriable(nginx):
    (nginx.root / "dir").mkdir()  # no index, autoindex off: nginx answers 403
    with HttpSource(nginx.url + "/dir/") as source:
        with pytest.raises(FetchError, match="HTTP 403") as info:
            source.read(0, 10)
    assert not info.value.retriable


def test_blob_changing_size_is_noticed(nginx, blob_url):
    with HttpSource(blob_url) as source:
        source.size()
        (nginx.root / "blob").write_bytes(BLOB + b"more")
        with pytest.raises(FetchError, match="changed size"):
            source.read(0, 10)


def test_fetch_all(nginx):
    (nginx.root / "index.json").write_bytes(b'{"schemaVersion": 2}')
    assert fetch_all(nginx.url + "/index.json") == b'{"schemaVersion": 2}'
    with pytest.raises(NotFound):
        fetch_all(nginx.url + "/missing.json")
    with pytest.raises(FetchError, match="more than the 10 bytes"):
        fetch_all(nginx.url + "/index.json", max_bytes=10)
    assert [r.range for r in nginx.requests()] == ["", "", ""]


# --- HTTP against misbehaving servers ---------------------------------------------------------

@pytest.fixture
def www(tmp_path):
    root = tmp_path / "py-www"
    root.mkdir()
    (root / "blob").write_bytes(BLOB)
    (root / "empty").write_bytes(b"")
    return root


def test_server_ignoring_range(www):
    with NoRangeServer(www) as server, HttpSource(server.url + "/blob") as source:
        assert source.size() == len(BLOB)  # HEAD is fine
        with pytest.raises(RangeNotSupported, match="server ignored the Range header"):
            source.read(10, 10)


def test_wrong_content_range(www):
    with WrongContentRangeServer(www) as server, HttpSource(server.url + "/blob") as source:
        with pytest.raises(RangeNotSupported,
                           match=r"asked for bytes=10-19, server answered Content-Range "
                                 r"'bytes 11-20/"):
            source.read(10, 10)


def test_short_body_is_retriable(www):
    with ShortBodyServer(www) as server, HttpSource(server.url + "/blob") as source:
        with pytest.raises(FetchError, match=r"connection lost after \d+ bytes") as info:
            source.read(0, 10_000)
    assert info.value.retriable


def test_size_falls_back_to_a_one_byte_range(www):
    with NoHeadServer(www) as server:
        with HttpSource(server.url + "/blob") as source:
            assert source.size() == len(BLOB)
        with HttpSource(server.url + "/empty") as source:
            assert source.size() == 0
        assert [(r.method, r.headers.get("Range")) for r in server.received] == \
            [("HEAD", None), ("GET", "bytes=0-0")] * 2


class _StatusServer(PyHttpServer):
    status = 503

    def send_range(self, handler, data, first, last):
        self.send(handler, self.status, {}, b"try later\n")


@pytest.mark.parametrize("status, retriable", [(500, True), (503, True), (429, True),
                                               (408, True), (401, False), (400, False)])
def test_status_codes_map_to_retriable(www, status, retriable):
    server_class = type("S", (_StatusServer,), {"status": status})
    with server_class(www) as server, HttpSource(server.url + "/blob") as source:
        with pytest.raises(FetchError, match=f"HTTP {status}") as info:
            source.read(0, 10)
    assert info.value.retriable is retriable
    assert not isinstance(info.value, NotFound)


class _GzipServer(PyHttpServer):
    def send_range(self, handler, data, first, last):
        self.send(handler, 206, {"Content-Range": f"bytes {first}-{last}/{len(data)}",
                                 "Content-Encoding": "gzip"}, data[first:last + 1])


def test_compressed_range_is_refused(www):
    with _GzipServer(www) as server, HttpSource(server.url + "/blob") as source:
        with pytest.raises(FetchError, match="Content-Encoding 'gzip'"):
            source.read(0, 10)


class _NoLengthServer(PyHttpServer):
    def send_whole(self, handler, data):
        self.send(handler, 200, {}, data, content_length=-1)


def test_fetch_all_caps_a_body_without_length(www):
    with _NoLengthServer(www) as server:
        assert fetch_all(server.url + "/blob") == BLOB
        with pytest.raises(FetchError, match="more than the 1000 bytes allowed"):
            fetch_all(server.url + "/blob", max_bytes=1000)


def test_connection_refused_is_retriable():
    with HttpSource(f"http://127.0.0.1:{free_port()}/blob") as source:
        with pytest.raises(FetchError, match="Connection refused") as info:
            source.read(0, 10)
    assert info.value.retriable


def test_timeout_is_retriable():
    with SilentServer() as server, HttpSource(server.url + "/blob", timeout=0.3) as source:
        with pytest.raises(FetchError, match="timed out after 0.3 s") as info:
            source.read(0, 10)
    assert info.value.retriable


def test_credentials_never_reach_messages():
    url = f"http://user:hunter2@127.0.0.1:{free_port()}/blob?X-Amz-Signature=s3cr3t"
    assert redact_url(url) == f"http://127.0.0.1:{url.split(':')[3].split('/')[0]}" \
                              "/blob?<redacted>"
    with HttpSource(url) as source:
        assert "hunter2" not in source.describe() and "s3cr3t" not in source.describe()
        with pytest.raises(FetchError) as info:
            source.read(0, 10)
    assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)


# --- TLS ---------------------------------------------------------------------------------------

@pytest.fixture
def tls_nginx(tmp_path):
    reason = nginx_missing_reason()
    if reason:
        pytest.skip(reason)
    ca_cert, server_cert, server_key = make_tls_files(tmp_path)
    root = tmp_path / "tls-www"
    root.mkdir()
    (root / "blob").write_bytes(BLOB)
    with NginxServer(root, tls=(server_cert, server_key)) as server:
        yield server, ca_cert


def test_tls_is_verified_by_default(tls_nginx):
    server, _ = tls_nginx
    with HttpSource(server.url + "/blob") as source:
        with pytest.raises(FetchError, match="TLS error: .*certificate verify failed") as info:
            source.read(0, 10)
    assert not info.value.retriable


def test_tls_with_the_ca_cert(tls_nginx):
    server, ca_cert = tls_nginx
    with open_source(server.url + "/blob", ca_cert=ca_cert) as source:
        assert source.size() == len(BLOB)
        assert source.read(100, 1000) == BLOB[100:1100]
    assert [(r.method, r.range) for r in server.requests()] == \
        [("HEAD", ""), ("GET", "bytes=100-1099")]


def test_missing_ca_cert_file(tmp_path):
    with pytest.raises(NotFound, match="CA certificate"):
        HttpSource("https://127.0.0.1:1/blob", ca_cert=str(tmp_path / "nope.pem"))
