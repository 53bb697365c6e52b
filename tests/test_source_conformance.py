"""One conformance suite over every BlobSource kind: each must behave the same to the fetcher.

A kind is one entry of SOURCE_KINDS: `(name, setup)`, where `setup(request)` starts or finds
what the kind needs (through pytest fixtures) and returns `make(data) -> (source, cleanup)`:
a source over a blob holding `data`, or, for `data=None`, over a location where no blob is.
Adding a source kind (a registry's blobs, say) is one more entry here.

Every kind runs against a real store on 127.0.0.1 or a real file: nginx for http, moto's
S3 server for s3, Debian's docker-registry for registry (lazyfs' own push puts the blob there).
"""

from __future__ import annotations

import itertools
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lazyfs.errors import FetchError, NotFound, RangeNotSupported
from lazyfs.source import iter_ranges, open_source
from tests.s3server import SECRET_ACCESS_KEY

BLOB = random.Random(11).randbytes(700 * 1024 + 321)  # not a multiple of any block size
# Wherever a kind can carry a credential, it carries this one; no message may show it.
SECRET = "s3cr3t-pa55"

_names = (f"blob-{n}" for n in itertools.count())


def file_kind(request):
    root = request.getfixturevalue("tmp_path")

    def make(data):
        path = root / next(_names)
        if data is not None:
            path.write_bytes(data)
        source = open_source(str(path))
        return source, source.close

    return make


def http_kind(request):
    nginx = request.getfixturevalue("nginx")
    # nginx ignores both the user:password (sent as basic auth) and the query: they are here
    # to prove that no message repeats them.
    base = nginx.url.replace("http://", f"http://user:{SECRET}@")

    def make(data):
        name = next(_names)
        if data is not None:
            (nginx.root / name).write_bytes(data)
        source = open_source(f"{base}/{name}?token={SECRET}",
                             headers={"Authorization": f"Bearer {SECRET}"})
        return source, source.close

    return make


def lazyfs_serve_kind(request):
    """Our own `lazyfs serve` as the web server."""
    from lazyfs.serve import Server

    root = request.getfixturevalue("tmp_path") / "served"
    root.mkdir()
    server = Server(str(root))
    server.__enter__()
    request.addfinalizer(lambda: server.__exit__(None, None, None))

    def make(data):
        name = next(_names)
        if data is not None:
            (root / name).write_bytes(data)
        source = open_source(f"{server.url}/{name}")
        return source, source.close

    return make


def s3_kind(request):
    server, bucket = request.getfixturevalue("s3")  # also sets the AWS_* credentials
    client = server.client()

    def make(data):
        key = f"dir/{next(_names)}"
        if data is not None:
            client.put_object(Bucket=bucket, Key=key, Body=data)
        source = open_source(f"s3://{bucket}/{key}", s3_endpoint=server.url)
        return source, source.close

    return make


def registry_kind(request):
    from tests.registryserver import make_registry_source

    def make(data):
        if data is not None:
            return make_registry_source(data)
        # A blob the registry never got: its digest names nothing there.
        from lazyfs.format.oci import Descriptor
        from lazyfs.imageref import SourceOptions
        from lazyfs.registry import RegistryStore, parse_registry_reference
        from tests.registryserver import _shared_registry

        store = RegistryStore(parse_registry_reference(
            f"oci://{_shared_registry().host}/conformance:blob"), SourceOptions())
        source = store.open_blob(Descriptor("application/octet-stream", "sha256:" + "0" * 64, 1))

        def cleanup():
            source.close()
            store.close()

        return source, cleanup

    return make


SOURCE_KINDS = [
    ("file", file_kind),
    ("http", http_kind),
    ("lazyfs-serve", lazyfs_serve_kind),
    ("s3", s3_kind),
    ("registry", registry_kind),
]


@pytest.fixture(params=SOURCE_KINDS, ids=[name for name, _ in SOURCE_KINDS])
def make_source(request):
    """make_source(data=BLOB) -> an open source over those bytes; cleaned up at teardown."""
    _, setup = request.param
    make = setup(request)
    cleanups = []

    def make_and_track(data: bytes | None = BLOB):
        source, cleanup = make(data)
        cleanups.append(cleanup)
        return source

    yield make_and_track
    for cleanup in cleanups:
        cleanup()


def test_size_is_asked_once(make_source):
    source = make_source()
    assert source.size() == len(BLOB)
    asked = source.requests
    assert source.size() == len(BLOB)
    assert source.requests == asked


@pytest.mark.parametrize("blob_offset, length", [
    (0, 1), (0, 4096),                                 # the start
    (len(BLOB) // 2 - 777, 65_537),                    # the middle
    (len(BLOB) - 1, 1), (len(BLOB) - 10_000, 10_000),  # the very end
    (0, len(BLOB)),                                    # everything
])
def test_reads_return_exactly_the_bytes_asked_for(make_source, blob_offset, length):
    source = make_source()
    before = source.requests
    assert source.read(blob_offset, length) == BLOB[blob_offset:blob_offset + length]
    assert source.requests > before


def test_zero_length_read_costs_nothing(make_source):
    source = make_source()
    before = source.requests
    assert source.read(1000, 0) == b""
    assert source.read(len(BLOB) + 10, 0) == b""
    assert source.requests == before


@pytest.mark.parametrize("blob_offset, length", [
    (len(BLOB) - 5, 10),    # starts inside, ends outside
    (len(BLOB), 1),         # starts right at the end
    (len(BLOB) + 100, 1),   # starts well past the end
])
def test_read_past_the_end_is_a_clear_error(make_source, blob_offset, length):
    source = make_source()
    with pytest.raises(FetchError, match="past the end") as info:
        source.read(blob_offset, length)
    assert not info.value.retriable
    assert not isinstance(info.value, RangeNotSupported)  # the caller's range, not the store


def test_negative_range_is_a_caller_bug(make_source):
    source = make_source()
    with pytest.raises(ValueError):
        source.read(-1, 10)
    with pytest.raises(ValueError):
        source.read(0, -1)


def test_empty_blob(make_source):
    source = make_source(b"")
    assert source.size() == 0
    assert source.read(0, 0) == b""
    with pytest.raises(FetchError):
        source.read(0, 1)


def test_missing_blob_is_not_found(make_source):
    with pytest.raises(NotFound) as info:
        make_source(None).size()
    assert SECRET not in str(info.value) and SECRET_ACCESS_KEY not in str(info.value)
    with pytest.raises(NotFound):
        make_source(None).read(0, 10)


def test_concurrent_reads_from_8_threads(make_source):
    source = make_source()
    rng = random.Random(2)
    ranges = [(offset, rng.randrange(1, 20_000))
              for offset in (rng.randrange(0, len(BLOB) - 20_000) for _ in range(120))]
    before = source.requests
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda r: source.read(*r), ranges))
    for (blob_offset, length), data in zip(ranges, results):
        assert data == BLOB[blob_offset:blob_offset + length]
    assert source.requests - before == len(ranges)  # the counter lost no increments


def test_several_ranges_stream_in_order(make_source):
    source = make_source()
    ranges = [(0, 100), (5000, 0), (9000, 300_000), (len(BLOB) - 50, 50)]
    got = [b""] * len(ranges)
    order = []
    for index, piece in iter_ranges(source, ranges):
        assert not order or order[-1] <= index
        order.append(index)
        got[index] += piece
    assert got == [BLOB[offset:offset + length] for offset, length in ranges]


def test_describe_names_the_blob_without_credentials(make_source):
    source = make_source()
    where = source.describe()
    assert where and SECRET not in where and SECRET_ACCESS_KEY not in where
    with pytest.raises(FetchError) as info:
        source.read(len(BLOB), 1)
    assert SECRET not in str(info.value) and SECRET_ACCESS_KEY not in str(info.value)


def test_close_releases_descriptors_and_connections(make_source):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    make_source().read(0, 10)  # the kind's one-time setup (first client, first connection)
    before = open_fds()
    for _ in range(5):
        source = make_source()
        assert source.read(100, 10) == BLOB[100:110]
        source.close()
    # A server running in this process (lazyfs serve) closes its end of each connection in
    # its own thread, a moment after the client: give it that moment.
    deadline = time.monotonic() + 5
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() <= before
    source.close()  # a second close is harmless
