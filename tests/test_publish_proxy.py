"""The nginx configs docs/publishing.md gives, run for real: an origin serving a pushed layout
with caching headers, and a caching proxy with the slice module in front of it. A second host
(a fresh lazyfs cache) mounting through the proxy is served without a single request to the
origin, and the origin only ever sees aligned slice requests."""

from __future__ import annotations

import http.client
import re
from pathlib import Path

import pytest

from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.oci_layout import open_image
from lazyfs.push import push
from tests.mounting import mounted
from tests.servers import NginxServer, nginx_missing_reason
from tests.testimage import BIG, TAG

DOCS = Path(__file__).resolve().parent.parent / "docs" / "publishing.md"
SLICE_BYTES = 1 << 20

# The origin: any static server; nginx answers byte ranges for static files by default. Only
# the caching headers are added. (Inside a server block, beside its `root`.)
ORIGIN_LOCATIONS = r"""
location ~ "/blobs/sha256/[0-9a-f]{64}$" {
    # A blob's name is its digest: it never changes, caches may keep it for good.
    add_header Cache-Control "public, max-age=31536000, immutable";
}
location ~ /index\.json$ {
    # Tags move: caches check again after a minute.
    add_header Cache-Control "public, max-age=60";
}
"""

# The caching proxy, http block: where the cache lives and how big it may grow.
PROXY_CACHE_PATH = ("proxy_cache_path /var/cache/nginx/lazyfs levels=1:2 keys_zone=lazyfs:10m "
                    "max_size=50g inactive=30d use_temp_path=off;")

# The caching proxy, server block.
PROXY_LOCATIONS = r"""
location ~ "/blobs/sha256/[0-9a-f]{64}$" {
    # Blobs are fetched and cached in aligned 1 MiB slices: a lazy read of a few KiB costs
    # the origin one slice once, and every later read of that slice, by any host, is a hit.
    slice 1m;
    proxy_cache lazyfs;
    proxy_cache_key $uri$slice_range;
    proxy_set_header Range $slice_range;
    proxy_cache_valid 200 206 30d;
    # Several ranges in one request would make the slice module start at the blob's first
    # slice; refusing them makes lazyfs ask one range per request.
    if ($http_range ~ ",") {
        return 416;
    }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_pass http://lazyfs_origin;
}
location / {
    # index.json (and oci-layout): cached as long as the origin's Cache-Control says.
    proxy_cache lazyfs;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_pass http://lazyfs_origin;
}
"""


def proxy_http_directives(origin_port: int) -> str:
    upstream = f"upstream lazyfs_origin {{ server 127.0.0.1:{origin_port}; keepalive 16; }}"
    # In the test the cache lives in the server's private prefix.
    return PROXY_CACHE_PATH.replace("/var/cache/nginx/lazyfs", "cache") + "\n" + upstream


@pytest.fixture
def servers(image, tmp_path):
    """(origin, proxy, {blob URI: (entries by path)}) with the converted image pushed to the
    origin's /images/app:TAG."""
    reason = nginx_missing_reason()
    if reason:
        pytest.skip(reason)
    _, converted, _ = image
    www = tmp_path / "www"
    push(f"{converted}:{TAG}", str(www / "images" / "app"), progress=False)
    layers = {}
    with open_image(f"{converted}:{TAG}") as img:
        for desc in img.layers:
            with LocalBlob(img.blobs.unverified_path(desc)) as blob:
                entries = {item.path: item for item in SeekableLayer.open(blob).entries}
            layers[f"/images/app/blobs/sha256/{desc.digest.split(':')[1]}"] = entries
    (tmp_path / "empty").mkdir()
    with NginxServer(www, locations=ORIGIN_LOCATIONS + "location / { }") as origin:
        with NginxServer(tmp_path / "empty", locations=PROXY_LOCATIONS,
                         http_directives=proxy_http_directives(origin.port)) as proxy:
            yield origin, proxy, layers


def read_some_files(mount_dir: Path, big_offset: int) -> None:
    """What a starting program does: a few small files and a piece of a big one."""
    assert (mount_dir / "etc/passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    assert (mount_dir / "etc/added").read_bytes() == b"added by layer 2\n"
    assert (mount_dir / "opaque/upper").read_bytes() == b"stays"
    with open(mount_dir / "data/big.bin", "rb") as f:
        f.seek(big_offset)
        assert f.read(8192) == BIG[big_offset:big_offset + 8192]


def slice_of(record) -> tuple[str, int]:
    """(blob URI, slice number) of an origin request, which must be one whole aligned slice."""
    start, end = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", record.range).groups())
    assert start % SLICE_BYTES == 0 and end == start + SLICE_BYTES - 1, record
    return record.uri, start // SLICE_BYTES


def covering_slices(records, sizes: dict[str, int]) -> set[tuple[str, int]]:
    """The slices that the ranges clients asked the proxy for touch."""
    covered = set()
    for record in records:
        if record.uri not in sizes:
            continue
        if record.range:
            first, last = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", record.range).groups())
        else:
            first, last = 0, sizes[record.uri] - 1
        covered.update((record.uri, n) for n in range(first // SLICE_BYTES,
                                                      last // SLICE_BYTES + 1))
    return covered


@pytest.mark.parametrize("image", ["estargz"], indirect=True)
def test_a_second_host_is_served_from_the_proxy_cache(servers, tmp_path):
    origin, proxy, layers = servers
    url = f"{proxy.url}/images/app:{TAG}"
    big = next(entries["data/big.bin"] for entries in layers.values() if "data/big.bin" in entries)
    big_offset = big.chunks[1].file_offset + 5000

    with mounted(url, tmp_path / "host1", "--no-background-fetch", cache_dir=tmp_path / "cache1"):
        read_some_files(tmp_path / "host1", big_offset)
    # The origin sent each slice the first host needed, once, and nothing else: whole aligned
    # slices, the proxy's cache keys.
    sizes = {r.uri: (Path(origin.root) / r.uri.lstrip("/")).stat().st_size
             for r in proxy.requests() if "/blobs/" in r.uri}
    from_origin = [slice_of(r) for r in origin.requests() if r.uri in sizes]
    assert len(from_origin) == len(set(from_origin))
    assert set(from_origin) == covering_slices(proxy.requests(), sizes)
    # Still lazy behind the proxy: the layers were not fetched whole.
    assert len(from_origin) < sum(-(-size // SLICE_BYTES) for size in sizes.values())

    origin.clear_log()
    proxy.clear_log()
    with mounted(url, tmp_path / "host2", "--no-background-fetch", cache_dir=tmp_path / "cache2"):
        read_some_files(tmp_path / "host2", big_offset)
    assert any(r.uri in layers for r in proxy.requests()), "host2 fetched through the proxy"
    assert origin.requests() == []


@pytest.mark.parametrize("image", ["estargz"], indirect=True)
def test_lazyfs_asks_the_proxy_one_range_per_request(servers):
    """Without the guard, nginx would answer a multi-range request with the whole blob, every
    slice pulled from the origin. With it, lazyfs falls back to single ranges at once."""
    from lazyfs.source.http import HttpSource

    origin, proxy, layers = servers
    uri = max(layers, key=lambda u: (Path(origin.root) / u.lstrip("/")).stat().st_size)
    data = (Path(origin.root) / uri.lstrip("/")).read_bytes()
    wanted = [(100, 50), (5_000_000, 4096), (9_000_000, 10)]
    with HttpSource(proxy.url + uri) as source:
        pieces = {}
        for index, piece in source.read_ranges(wanted):
            pieces[index] = pieces.get(index, b"") + piece
        assert source.multi_range is False
    assert pieces == {i: data[offset:offset + length] for i, (offset, length) in enumerate(wanted)}
    assert [r.status for r in proxy.requests()] == [416, 206, 206, 206]
    assert sorted(slice_of(r)[1] for r in origin.requests()) == [0, 4, 8]


@pytest.mark.parametrize("image", ["estargz"], indirect=True)
def test_the_origin_sends_the_documented_caching_headers(servers):
    origin, _, layers = servers
    blob_uri = next(iter(layers))

    def headers(uri: str, range_header: str | None = None) -> tuple[int, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=5)
        try:
            conn.request("GET", uri, headers={"Range": range_header} if range_header else {})
            resp = conn.getresponse()
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    status, blob = headers(blob_uri, "bytes=0-99")
    assert status == 206 and blob["content-range"].startswith("bytes 0-99/")
    assert blob["cache-control"] == "public, max-age=31536000, immutable"
    status, index = headers("/images/app/index.json")
    assert status == 200 and index["cache-control"] == "public, max-age=60"


def test_the_documented_configs_are_the_tested_ones():
    docs = re.sub(r"\s+", " ", DOCS.read_text())
    for snippet in (ORIGIN_LOCATIONS, PROXY_CACHE_PATH, PROXY_LOCATIONS):
        assert re.sub(r"\s+", " ", snippet).strip() in docs
