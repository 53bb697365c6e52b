"""Images in an S3 bucket: moto's S3 server on 127.0.0.1 (tests/s3server.py) as the store.

The test image is pushed by hand into a bucket through S3Layout (the store `lazyfs push` writes
with), then mounted, inspected, verified and converted by s3:// reference. The server's access
log records every request with its Range header, so the tests prove what was fetched.
Misbehaving stores are the Python servers of tests/servers.py and the fault proxy, reached as S3
endpoints (a path-style S3 URL is a plain path to them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.errors import FetchError, FormatError, NotFound, RangeNotSupported
from lazyfs.format import oci
from lazyfs.imageref import (LoneBlob, SourceOptions, open_reference, pinned_reference,
                             scheme_of)
from lazyfs.oci_layout import open_image
from lazyfs.s3 import S3Layout, S3PushStore
from lazyfs.source.s3 import S3Source
from tests.faultproxy import FaultProxy
from tests.mounting import assert_mount_read_only_tocs, mounted
from tests.s3server import SECRET_ACCESS_KEY
from tests.servers import (NoHeadServer, NoRangeServer, ShortBodyServer, SilentServer,
                           WrongContentRangeServer)
from tests.tarbuild import tree_of
from tests.test_mount_http import drop_kernel_caches
from tests.testimage import BIG, TAG

# The image fixture runs every test over both formats; tests of what a command does with an
# s3:// reference (not of the format) take one, to keep the suite fast.
ONE_FORMAT = pytest.mark.parametrize("image", ["estargz"], indirect=True)


def lazyfs(*args, check=True, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lazyfs", *map(str, args)], capture_output=True,
                          text=True, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"lazyfs {args}: exit {done.returncode}: {done.stderr}")
    return done


def push_by_hand(layout_dir: Path, store: S3Layout) -> int:
    """Copy a local OCI layout into the store through the LayoutStore methods, blobs first and
    index.json last, as `lazyfs push` does; returns the bytes reported as progress."""
    sent = []
    for path in sorted((layout_dir / "blobs" / "sha256").iterdir()):
        store.put_file(f"blobs/sha256/{path.name}", str(path), sent.append)
    store.put_bytes("oci-layout", (layout_dir / "oci-layout").read_bytes())
    store.put_bytes("index.json", (layout_dir / "index.json").read_bytes())
    return sum(sent)


class Published:
    """The converted test image pushed by hand to s3://BUCKET/images/layout."""

    def __init__(self, server, bucket: str, converted: Path):
        self.server = server
        self.bucket = bucket
        self.endpoint = server.url
        self.ref = f"s3://{bucket}/images/layout:{TAG}"
        with S3Layout(f"s3://{bucket}/images/layout",
                      SourceOptions(s3_endpoint=server.url)) as store:
            self.bytes_pushed = push_by_hand(converted, store)
        # object key -> (entries by path, blob size, TOC region, TOC digest)
        self.layers = {}
        with open_image(f"{converted}:{TAG}") as img:
            self.manifest_digest = img.manifest_descriptor.digest
            for desc in img.layers:
                with LocalBlob(img.blobs.unverified_path(desc)) as blob:
                    layer = SeekableLayer.open(blob)
                    self.layers[f"images/layout/{oci.blob_relpath(desc.digest)}"] = (
                        {item.path: item for item in layer.entries}, blob.size, layer.region,
                        desc.annotations[oci.ANNOTATION_TOC_DIGEST])
        server.clear_log()

    def key_holding(self, path: str) -> str:
        return next(key for key, (entries, *_) in self.layers.items() if path in entries)

    def blob_gets(self) -> list[tuple[str, str]]:
        return [(r.key, r.range) for r in self.server.requests()
                if r.key in self.layers and r.method == "GET"]


@pytest.fixture
def published(image, s3):
    server, bucket = s3
    _, converted, _ = image
    return Published(server, bucket, Path(converted))


def chunk_range(chunk) -> str:
    return f"bytes={chunk.blob_offset}-{chunk.blob_end - 1}"


# --- mounting from a bucket ----------------------------------------------------------------------

@ONE_FORMAT  # both formats mount over file and HTTP; here the store is under test
def test_mount_over_s3_equals_the_extracted_layers(image, published, tmp_path):
    _, converted, rootfs = image
    assert published.bytes_pushed == sum(
        p.stat().st_size for p in (Path(converted) / "blobs" / "sha256").iterdir())
    mount_dir = tmp_path / "mnt"
    with mounted(published.ref, mount_dir, "--s3-endpoint", published.endpoint,
                 cache_dir=tmp_path / "cache"):
        assert tree_of(mount_dir) == tree_of(rootfs)


def test_only_touched_chunks_are_fetched_and_rereads_are_free(published, tmp_path):
    base_key = published.key_holding("data/big.bin")
    big = published.layers[base_key][0]["data/big.bin"]
    mount_dir = tmp_path / "mnt"
    with mounted(published.ref, mount_dir, "--s3-endpoint", published.endpoint,
                 "--no-background-fetch", cache_dir=tmp_path / "cache"):
        assert_mount_read_only_tocs(published.blob_gets(),
                                    {key: (size, region) for key, (_, size, region, _)
                                     in published.layers.items()})
        published.server.clear_log()

        # 4 KiB in the middle of the big file's second chunk: one GET of exactly that chunk.
        with open(mount_dir / "data/big.bin", "rb") as f:
            f.seek(big.chunks[1].file_offset + 1000)
            assert f.read(4096) == BIG[big.chunks[1].file_offset + 1000:][:4096]
        assert published.blob_gets() == [(base_key, chunk_range(big.chunks[1]))]
        published.server.clear_log()

        # Again past the kernel's page cache: lazyfs answers from its cache, no request at all.
        drop_kernel_caches()
        with open(mount_dir / "data/big.bin", "rb") as f:
            f.seek(big.chunks[1].file_offset)
            assert f.read(65536) == BIG[big.chunks[1].file_offset:][:65536]
        assert published.server.requests() == []


@ONE_FORMAT
def test_a_lone_blob_in_a_bucket_mounts_and_verifies_with_its_toc_digest(published, tmp_path):
    key = published.key_holding("etc/passwd")
    toc_digest = published.layers[key][3]
    url = f"s3://{published.bucket}/{key}"
    assert isinstance(open_reference(url), LoneBlob)
    mount_dir = tmp_path / "mnt"
    with mounted(url, mount_dir, "--s3-endpoint", published.endpoint, "--toc-digest",
                 toc_digest, "--no-background-fetch", cache_dir=tmp_path / "cache"):
        assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")
    out = lazyfs("verify", "--s3-endpoint", published.endpoint, "--toc-digest", toc_digest,
                 url).stdout
    assert f"TOC {toc_digest} pinned" in out


# --- the other commands read s3:// references -------------------------------------------------

@ONE_FORMAT
def test_an_s3_image_resolves_like_the_local_one_and_pins_by_digest(image, published):
    _, converted, _ = image
    sources = SourceOptions(s3_endpoint=published.endpoint)
    with open_image(f"{converted}:{TAG}") as local, \
            open_reference(published.ref, sources=sources) as remote:
        assert remote.manifest_descriptor == local.manifest_descriptor
        assert remote.config == local.config
        pinned = pinned_reference(remote)
    assert pinned == f"s3://{published.bucket}/images/layout@{published.manifest_digest}"
    with open_reference(pinned, sources=sources) as again:
        assert again.manifest_descriptor == local.manifest_descriptor
    only_image = f"s3://{published.bucket}/images/layout/"
    with open_reference(only_image, sources=sources) as again:
        assert again.manifest_descriptor == local.manifest_descriptor


@ONE_FORMAT
def test_inspect_and_verify_of_an_s3_image(image, published):
    _, converted, _ = image
    remote = json.loads(lazyfs("inspect", "--json", "--s3-endpoint", published.endpoint,
                               published.ref).stdout)
    local = json.loads(lazyfs("inspect", "--json", f"{converted}:{TAG}").stdout)
    assert remote["layers"] == local["layers"]
    assert remote["manifest_digest"] == local["manifest_digest"]
    # inspect read footers and TOCs: ranged GETs, far less than the blobs.
    gets = published.blob_gets()
    assert gets and all(header.startswith("bytes=") for _, header in gets)
    fetched = sum(int(last) - int(first) + 1 for first, last in
                  (header.removeprefix("bytes=").split("-") for _, header in gets))
    assert fetched < sum(size for _, size, *_ in published.layers.values()) / 2
    published.server.clear_log()

    out = lazyfs("verify", "--s3-endpoint", published.endpoint, published.ref).stdout
    for key in published.layers:  # every layer blob, by digest
        assert f"sha256:{key.rsplit('/', 1)[1]}:" in out
    assert f"manifest {published.manifest_digest}" in out


@ONE_FORMAT
def test_convert_reads_an_s3_image(image, s3, tmp_path):
    server, bucket = s3
    source, converted, _ = image
    with S3Layout(f"s3://{bucket}/source", SourceOptions(s3_endpoint=server.url)) as store:
        push_by_hand(Path(source), store)
    digest = lazyfs("convert", "--format", "estargz", "--s3-endpoint", server.url,
                    f"s3://{bucket}/source:{TAG}", tmp_path / "out").stdout.strip()
    with open_image(f"{converted}:{TAG}") as local:
        # Conversion is deterministic: the same input gives the same image, local or remote.
        assert digest == local.manifest_descriptor.digest


def test_s3_is_a_scheme():
    assert scheme_of(f"s3://bucket/layout:{TAG}") == "s3"


def test_the_endpoint_can_come_from_the_environment(s3, monkeypatch):
    server, bucket = s3
    server.client().put_object(Bucket=bucket, Key="blob", Body=b"0123456789")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
    with S3Source(f"s3://{bucket}/blob") as source:
        assert source.read(3, 4) == b"3456"


# --- errors: missing keys, denied access, bad credentials --------------------------------------

@ONE_FORMAT
def test_missing_keys_are_not_found(published):
    endpoint = published.endpoint
    missing_layout = lazyfs("inspect", "--s3-endpoint", endpoint,
                            f"s3://{published.bucket}/images/nothing:{TAG}", check=False)
    assert missing_layout.returncode == NotFound.exit_code
    assert "index.json" in missing_layout.stderr
    missing_blob = lazyfs("verify", "--s3-endpoint", endpoint, "--toc-digest", "sha256:" + "0" * 64,
                          f"s3://{published.bucket}/no/such/blob", check=False)
    assert missing_blob.returncode == NotFound.exit_code
    assert f"s3://{published.bucket}/no/such/blob" in missing_blob.stderr
    no_bucket = lazyfs("inspect", "--s3-endpoint", endpoint, f"s3://no-such-bucket/layout:{TAG}",
                       check=False)
    assert no_bucket.returncode == NotFound.exit_code and "no such bucket" in no_bucket.stderr


def _iam_user(server, name: str, resources: list[str]) -> tuple[str, str]:
    """An IAM user allowed s3:GetObject on `resources` only; its (key id, secret)."""
    iam = server.client("iam")
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": resources}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _env_with(key_id: str | None, secret: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AWS_ACCESS_KEY_ID", None)
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    if key_id is not None:
        env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    return env


@ONE_FORMAT
def test_a_bucket_that_denies_access_is_a_clear_error_without_secrets(published, tmp_path):
    server, bucket = published.server, published.bucket
    suffix = bucket.rsplit("-", 1)[1]
    reader = _iam_user(server, f"reader-{suffix}", [f"arn:aws:s3:::{bucket}/*"])
    outsider = _iam_user(server, f"outsider-{suffix}", ["arn:aws:s3:::elsewhere/*"])
    inspect = ("inspect", "--s3-endpoint", published.endpoint, published.ref)
    # The reader's keys also as a named profile of a credentials file: the standard chain.
    credentials_file = tmp_path / "credentials"
    credentials_file.write_text(f"[reader]\naws_access_key_id = {reader[0]}\n"
                                f"aws_secret_access_key = {reader[1]}\n")
    by_profile = _env_with(None, None) | {"AWS_SHARED_CREDENTIALS_FILE": str(credentials_file),
                                          "AWS_PROFILE": "reader"}
    with server.enforce_auth():
        # The control: s3:GetObject alone is enough to read an image (no listing needed).
        allowed = lazyfs(*inspect, env=_env_with(*reader))
        allowed_by_profile = lazyfs(*inspect, env=by_profile)
        denied = lazyfs(*inspect, env=_env_with(*outsider), check=False)
        unknown = lazyfs(*inspect, env=_env_with("AKIAUNKNOWNKEY000000", "not-the-secret"),
                         check=False)
    assert published.manifest_digest in allowed.stdout
    assert published.manifest_digest in allowed_by_profile.stdout
    assert denied.returncode == FetchError.exit_code
    assert f"s3://{bucket}/images/layout/index.json" in denied.stderr
    assert "access denied" in denied.stderr and "s3:GetObject" in denied.stderr
    assert unknown.returncode == FetchError.exit_code
    assert "refused the AWS credentials" in unknown.stderr and bucket in unknown.stderr
    for done, secret in ((denied, outsider[1]), (unknown, "not-the-secret")):
        assert secret not in done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1  # one clear line, no traceback


def test_no_credentials_at_all_is_a_clear_error(s3):
    server, bucket = s3
    done = lazyfs("inspect", "--s3-endpoint", server.url, f"s3://{bucket}/layout:{TAG}",
                  env=_env_with(None, None), check=False)
    assert done.returncode == FetchError.exit_code
    assert "no usable AWS credentials" in done.stderr and bucket in done.stderr
    no_profile = lazyfs("inspect", "--s3-endpoint", server.url, f"s3://{bucket}/layout:{TAG}",
                        env=_env_with(None, None) | {"AWS_PROFILE": "nonesuch"}, check=False)
    assert no_profile.returncode == FetchError.exit_code
    assert "nonesuch" in no_profile.stderr and len(no_profile.stderr.splitlines()) == 1


def test_debug_output_holds_no_secret(s3, monkeypatch):
    server, bucket = s3
    server.client().put_object(Bucket=bucket, Key="not-a-blob", Body=b"x" * 100)
    # botocore logs each request's headers at DEBUG, the session token among them.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-s3cr3t")
    done = lazyfs("--debug", "verify", "--s3-endpoint", server.url, f"s3://{bucket}/not-a-blob",
                  check=False)
    assert done.returncode == 2 and "footer" in done.stderr
    assert "GET /" in done.stderr  # debugging output there is, but no secret in it
    for secret in (SECRET_ACCESS_KEY, "session-token-s3cr3t"):
        assert secret not in done.stdout + done.stderr


# --- the source against misbehaving stores ------------------------------------------------------

@pytest.fixture
def bucket_dir(tmp_path):
    """A directory the Python servers serve; path-style S3 URLs name files in it."""
    (tmp_path / "bkt").mkdir()
    (tmp_path / "bkt" / "blob").write_bytes(bytes(range(256)) * 40)
    return tmp_path


def test_head_refused_falls_back_to_a_one_byte_range(s3, bucket_dir):
    with NoHeadServer(bucket_dir) as server, \
            S3Source("s3://bkt/blob", endpoint_url=server.url) as source:
        assert source.size() == 10240
        assert [(r.method, r.headers.get("Range")) for r in server.received] == [
            ("HEAD", None), ("GET", "bytes=0-0")]


@pytest.mark.parametrize("server_class, error, retriable", [
    (NoRangeServer, RangeNotSupported, False),
    (WrongContentRangeServer, RangeNotSupported, False),
    (ShortBodyServer, FetchError, True),
])
def test_a_store_that_breaks_ranges_is_refused(s3, bucket_dir, server_class, error, retriable):
    with server_class(bucket_dir) as server, \
            S3Source("s3://bkt/blob", endpoint_url=server.url) as source:
        with pytest.raises(error) as info:
            source.read(100, 1000)
    assert info.value.retriable == retriable
    assert "s3://bkt/blob" in str(info.value)


@pytest.mark.parametrize("status, retriable", [(503, True), (500, True), (403, False)])
def test_errors_are_mapped_and_botocore_does_not_retry(s3, status, retriable):
    server, bucket = s3
    server.client().put_object(Bucket=bucket, Key="blob", Body=b"x" * 1000)
    with FaultProxy(server.url) as proxy, \
            S3Source(f"s3://{bucket}/blob", endpoint_url=proxy.url) as source:
        proxy.inject("status", status=status)
        with pytest.raises(FetchError) as info:
            source.read(0, 10)
        assert info.value.retriable == retriable
        assert len(proxy.seen) == 1  # one attempt: the fetcher owns retries
        proxy.clear()
        assert source.read(0, 10) == b"x" * 10


def test_a_cut_connection_and_a_timeout_are_retriable(s3):
    server, bucket = s3
    server.client().put_object(Bucket=bucket, Key="blob", Body=b"x" * 1000)
    with FaultProxy(server.url) as proxy, \
            S3Source(f"s3://{bucket}/blob", endpoint_url=proxy.url) as source:
        proxy.inject("reset", times=1)
        with pytest.raises(FetchError) as info:
            source.read(0, 10)
        assert info.value.retriable
    with SilentServer() as silent, \
            S3Source(f"s3://{bucket}/blob", endpoint_url=silent.url, timeout=0.3) as source:
        with pytest.raises(FetchError, match="timed out") as info:
            source.read(0, 10)
        assert info.value.retriable


def test_path_style_urls_for_an_s3_compatible_endpoint(s3):
    server, bucket = s3
    server.client().put_object(Bucket=bucket, Key="dir/blob", Body=b"0123456789")
    # A host name, not an IP: path-style (http://localhost:PORT/BUCKET/KEY), as docs/s3.md
    # says, since virtual-hosted URLs (http://BUCKET.localhost/...) would need wildcard DNS.
    endpoint = server.url.replace("127.0.0.1", "localhost")
    with S3Source(f"s3://{bucket}/dir/blob", endpoint_url=endpoint) as source:
        assert source.read(2, 3) == b"234"
    assert [(r.bucket, r.key, r.range) for r in server.requests() if r.method == "GET"] == [
        (bucket, "dir/blob", "bytes=2-4")]


def test_the_pool_follows_the_fetchers_connections(s3):
    server, bucket = s3
    server.client().put_object(Bucket=bucket, Key="blob", Body=b"x" * 1000)
    with S3Source(f"s3://{bucket}/blob", endpoint_url=server.url) as source:
        assert source.read(0, 10) == b"x" * 10
        source.set_pool_size(24)
        assert source._client.meta.config.max_pool_connections == 24
        assert source.read(10, 10) == b"x" * 10


def test_bad_s3_urls_are_clear_errors():
    for url in ("s3://", "s3:///key", "s3://bucket", "s3://bucket/", "s3://bucket/dir/"):
        with pytest.raises(FetchError, match="s3://"):
            S3Source(url, endpoint_url="http://127.0.0.1:1")


# --- S3Layout as the LayoutStore of `lazyfs push` ---------------------------------------------

def test_layout_store_round_trip(s3, tmp_path):
    server, bucket = s3
    big = tmp_path / "big"
    big.write_bytes(os.urandom(9 * 1024 * 1024 + 7))  # above the 8 MiB multipart threshold
    with S3PushStore(f"s3://{bucket}/pushed/", SourceOptions(s3_endpoint=server.url)) as store:
        assert store.name == f"s3://{bucket}/pushed"
        assert store.exists("index.json") is None and store.get("index.json", 100) is None
        store.put_bytes("index.json", b'{"schemaVersion": 2}')
        assert store.exists("index.json") == 20
        assert store.get("index.json", 100) == b'{"schemaVersion": 2}'
        with pytest.raises(FormatError, match="more than the 10 bytes"):
            store.get("index.json", 10)

        sent = []
        store.put_file("blobs/sha256/big", str(big), sent.append)
        assert sum(sent) == big.stat().st_size and len(sent) > 1
        assert store.exists("blobs/sha256/big") == big.stat().st_size
        uploads = [r for r in server.requests() if r.key == "pushed/blobs/sha256/big"]
        assert any("uploadId" in r.query for r in uploads)  # multipart, done by boto3
    got = server.client().get_object(Bucket=bucket, Key="pushed/blobs/sha256/big")
    assert got["Body"].read() == big.read_bytes()


@ONE_FORMAT
def test_lazyfs_push_to_a_bucket_then_mount_by_url(image, s3, tmp_path):
    server, bucket = s3
    _, converted, _ = image
    dest = f"s3://{bucket}/pushed/app"
    pushed = lazyfs("push", "--s3-endpoint", server.url, f"{converted}:{TAG}", f"{dest}:v1")
    assert pushed.stdout.strip() == f"{dest}:v1"
    written = {r.key for r in server.requests() if r.method == "PUT"}  # multipart parts too
    assert written == {f"pushed/app/{path.relative_to(converted)}"
                       for path in Path(converted).rglob("*") if path.is_file()}
    with open_image(f"{converted}:{TAG}") as local:
        wanted = local.manifest_descriptor.digest
    with open_reference(f"{dest}:v1", sources=SourceOptions(s3_endpoint=server.url)) as remote:
        assert remote.manifest_descriptor.digest == wanted

    # A second push finds every blob there (HEAD) and writes only the tags.
    server.clear_log()
    lazyfs("push", "--s3-endpoint", server.url, f"{converted}:{TAG}", f"{dest}:v2")
    assert [r.key for r in server.requests() if r.method == "PUT"] == ["pushed/app/index.json"]

    mount_dir = tmp_path / "mnt"
    with mounted(f"{dest}:v2", mount_dir, "--s3-endpoint", server.url, "--no-background-fetch",
                 cache_dir=tmp_path / "cache"):
        assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")


def test_layout_store_errors_name_the_bucket(s3, tmp_path):
    server, _ = s3
    (tmp_path / "f").write_bytes(b"data")
    with S3PushStore("s3://no-such-bucket/x", SourceOptions(s3_endpoint=server.url)) as store:
        with pytest.raises(NotFound, match="no-such-bucket"):
            store.get("index.json", 100)
        with pytest.raises(NotFound, match="s3://no-such-bucket/x/blobs/sha256/f"):
            store.put_file("blobs/sha256/f", str(tmp_path / "f"), lambda n: None)
