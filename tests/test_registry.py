"""Images in an OCI registry: Debian's docker-registry on 127.0.0.1, the test image pushed into
it by Debian's skopeo, read by lazyfs through the distribution API. The same mount test as over
plain HTTP, inspect/verify/convert of oci:// references, Basic and token auth (expired tokens,
bad credentials, anonymous access denied), blob redirects to expiring storage URLs, and
lazyfs' own RegistryDestination pushing an image that is then mounted."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.errors import AuthError, FormatError, NotFound, VerificationError
from lazyfs.format import oci
from lazyfs.imageref import SourceOptions, open_reference, pinned_reference
from lazyfs.oci_layout import host_platform, open_image, write_gzip_layout
from lazyfs.registry import RegistryDestination, parse_registry_reference
from lazyfs.registry.auth import find_credentials, origin_of, parse_challenge
from tests.faultproxy import FaultProxy
from tests.mounting import assert_mount_read_only_tocs, mounted
from tests.registryserver import (RedirectingProxy, RegistryServer, TokenService,
                                  htpasswd_auth, make_registry_source, push_layout,
                                  registry_missing_reason, write_auth_file)
from tests.tarbuild import tree_of
from tests.test_mount_http import chunk_range, drop_kernel_caches
from tests.testimage import BIG, TAG

USER, PASSWORD = "alice", "correct-horse-battery"
# What differs between the two seekable formats (the TOC reads) is tested for both; what only
# concerns the registry as a source runs for one format, to keep the suite's time down.
one_format = pytest.mark.parametrize("image", ["estargz"], indirect=True)
WRONG_PASSWORD = "wrong-staple-9f3e"


def lazyfs(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lazyfs", *map(str, args)],
                          capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"lazyfs {args}: exit {done.returncode}: {done.stderr}")
    return done


@pytest.fixture(autouse=True)
def no_login_files(tmp_path, monkeypatch):
    """Only the credentials a test writes: the machine's own login files stay out (also for
    the lazyfs subprocesses, which inherit the environment)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(scope="session")
def registry():
    """An anonymous docker-registry for the whole session."""
    reason = registry_missing_reason()
    if reason:
        pytest.skip(reason)
    with RegistryServer() as server:
        server.pushed = set()
        yield server


def push_once(registry, layout, repository: str, creds: str | None = None) -> str:
    """skopeo-push layout:TAG as REPOSITORY:TAG (once per session); the oci:// reference."""
    destination = f"{registry.host}/{repository}:{TAG}"
    if destination not in registry.pushed:
        push_layout(layout, TAG, destination, creds)
        registry.pushed.add(destination)
    return f"oci://{destination}"


@pytest.fixture
def pushed(image, registry):
    """(converted layout, oracle rootfs, oci:// reference of the converted image)"""
    _, converted, rootfs = image
    return converted, rootfs, push_once(registry, converted, f"lazyfs/{converted.name}")


def layer_blobs(converted, repository: str) -> dict:
    """{registry blob path: (TOC entries by path, blob size, TOC region)} of each layer."""
    layers = {}
    with open_image(f"{converted}:{TAG}") as image:
        for desc in image.layers:
            with LocalBlob(image.blobs.unverified_path(desc)) as blob:
                layer = SeekableLayer.open(blob)
                layers[f"/v2/{repository}/blobs/{desc.digest}"] = (
                    {item.path: item for item in layer.entries}, blob.size, layer.region)
    return layers


# --- Pulling ---------------------------------------------------------------------------------

def test_skopeo_keeps_the_manifest_and_its_toc_annotations(pushed):
    converted, _, ref = pushed
    with open_image(f"{converted}:{TAG}") as local, open_reference(ref) as remote:
        # Byte-identical manifest (same digest): every layer annotation (TOC digest,
        # uncompressed size, zstd:chunked's TOC position) reached the registry untouched.
        assert remote.manifest_descriptor.digest == local.manifest_descriptor.digest
        assert [d.annotations for d in remote.layers] == [d.annotations for d in local.layers]
        assert all(oci.ANNOTATION_TOC_DIGEST in d.annotations for d in remote.layers)
        assert remote.config == local.config
        assert remote.tag == TAG and remote.name == ref.rsplit(":", 1)[0]


@one_format
def test_a_digest_reference_and_the_pinned_reference_resolve(pushed, registry):
    _, _, ref = pushed
    with open_reference(ref) as by_tag:
        pinned = pinned_reference(by_tag)
        digest = by_tag.manifest_descriptor.digest
    assert pinned == f"{ref.rsplit(':', 1)[0]}@{digest}"
    with open_reference(pinned) as by_digest:
        assert by_digest.manifest_descriptor.digest == digest
        assert by_digest.manifest_json == by_tag.manifest_json
    absent = f"{ref.rsplit(':', 1)[0]}@sha256:{'0' * 64}"
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        open_reference(absent)
    with pytest.raises(NotFound, match="no-such-tag"):
        open_reference(ref.rsplit(":", 1)[0] + ":no-such-tag")


@one_format
def test_mount_from_the_registry_equals_the_extracted_layers(pushed, tmp_path):
    _, rootfs, ref = pushed
    mount_dir = tmp_path / "mnt"
    with mounted(ref, mount_dir, cache_dir=tmp_path / "cache"):
        assert tree_of(mount_dir) == tree_of(rootfs)


def test_only_touched_chunks_are_fetched_from_the_registry(pushed, registry, tmp_path):
    converted, _, ref = pushed
    repository = parse_registry_reference(ref).repository
    layers = layer_blobs(converted, repository)
    base_path = next(p for p, (entries, *_) in layers.items() if "data/big.bin" in entries)
    big = layers[base_path][0]["data/big.bin"]
    with FaultProxy(registry.url) as proxy:
        def blob_gets():
            return [(path, range_) for method, path, range_ in proxy.seen
                    if method == "GET" and path in layers]

        proxied = ref.replace(registry.host, proxy.url.removeprefix("http://"))
        mount_dir = tmp_path / "mnt"
        with mounted(proxied, mount_dir, "--no-background-fetch", cache_dir=tmp_path / "cache"):
            assert_mount_read_only_tocs(blob_gets(),
                                        {path: (size, region) for path, (_, size, region)
                                         in layers.items()}, whole_tail=False)
            proxy.seen.clear()

            with open(mount_dir / "data/big.bin", "rb") as f:
                f.seek(big.chunks[1].file_offset + 1000)
                assert f.read(4096) == BIG[big.chunks[1].file_offset + 1000:][:4096]
            assert blob_gets() == [(base_path, chunk_range(big.chunks[1]))]
            proxy.seen.clear()

            drop_kernel_caches()
            with open(mount_dir / "data/big.bin", "rb") as f:
                f.seek(big.chunks[1].file_offset)
                assert f.read(65536) == BIG[big.chunks[1].file_offset:][:65536]
            assert proxy.seen == []


@one_format
def test_inspect_and_verify_of_a_registry_image(pushed):
    converted, _, ref = pushed
    remote = json.loads(lazyfs("inspect", "--json", ref).stdout)
    local = json.loads(lazyfs("inspect", "--json", f"{converted}:{TAG}").stdout)
    assert remote["layers"] == local["layers"]
    assert remote["manifest_digest"] == local["manifest_digest"]
    out = lazyfs("verify", ref).stdout
    with open_image(f"{converted}:{TAG}") as image:
        for desc in image.layers:
            assert f"{desc.digest}:" in out


@one_format
def test_convert_reads_its_input_from_a_registry(image, registry, tmp_path):
    source, converted, _ = image
    ref = push_once(registry, source, "lazyfs/source")
    layer_format = converted.name.replace("-", ":")
    digest = lazyfs("convert", "--format", layer_format, ref, tmp_path / "out").stdout.strip()
    with open_image(f"{converted}:{TAG}") as local:
        # Conversion is deterministic: the registry's copy converts to the same image.
        assert digest == local.manifest_descriptor.digest


@one_format
def test_blob_redirects_that_expire_are_resolved_again(pushed, registry, tmp_path):
    _, _, ref = pushed
    with RedirectingProxy(registry.url, uses_per_url=2) as proxy:
        proxied = ref.replace(registry.host, proxy.url.removeprefix("http://"))
        mount_dir = tmp_path / "mnt"
        with mounted(proxied, mount_dir, "--no-background-fetch", "--no-prefetch",
                     cache_dir=tmp_path / "cache"):
            assert (mount_dir / "data/big.bin").read_bytes() == BIG
            assert (mount_dir / "etc/passwd").read_bytes().startswith(b"root:")
        # Storage refused used-up URLs, and each time the registry gave a fresh one.
        assert proxy.expired >= 1
        assert proxy.redirects > proxy.expired
        # A mount takes blob sizes from the manifest; inspect and verify ask the source, whose
        # HEAD storage refuses: the size comes from a one-byte ranged GET instead.
        with open_reference(proxied) as image:
            source = image.blobs.open_source(image.layers[0])
            try:
                assert source.size() == image.layers[0].size
            finally:
                source.close()
        assert proxy.heads_refused == 1


@one_format
def test_a_wrong_manifest_for_a_digest_is_refused(pushed, registry):
    _, _, ref = pushed
    # A tag's manifest asked for under another digest: what the registry sends must hash to
    # the digest asked for. docker-registry itself refuses such a request, so this goes
    # through a proxy that answers a digest request with the tag's manifest.
    with open_reference(ref) as image:
        real = image.manifest_descriptor.digest
    wrong = "sha256:" + "1" * 64
    tag_path = f"/v2/{parse_registry_reference(ref).repository}/manifests/{TAG}"
    with _RewritingProxy(registry.url, {wrong: TAG}) as proxy:
        proxied = ref.replace(registry.host, proxy.url.removeprefix("http://"))
        with pytest.raises(VerificationError, match=real):
            open_reference(proxied.rsplit(":", 1)[0] + "@" + wrong)
        assert any(path == tag_path for _, path, _ in proxy.seen)


class _RewritingProxy(FaultProxy):
    """FaultProxy forwarding /manifests/A as /manifests/B for each A: B given; `seen` also
    lists each rewritten request as it was forwarded."""

    def __init__(self, upstream_url: str, rewrites: dict[str, str]):
        super().__init__(upstream_url)
        self.rewrites = rewrites

    def _forward(self, method, path, headers):
        for old, new in self.rewrites.items():
            path = path.replace(f"/manifests/{old}", f"/manifests/{new}")
        self.seen.append((method, path, ""))
        return super()._forward(method, path, headers)


# --- Pushing with RegistryDestination -------------------------------------------------------

def push_with_destination(layout, ref: str, sources: SourceOptions, chunk_bytes: int) -> list:
    """Every blob and the manifest of layout:TAG through RegistryDestination; the blobs it
    found already present."""
    skipped = []
    with open_image(f"{layout}:{TAG}") as image:
        destination = RegistryDestination(ref, sources, chunk_bytes=chunk_bytes)
        try:
            for desc in (image.config_descriptor, *image.layers):
                if destination.has_blob(desc):
                    skipped.append(desc.digest)
                    continue
                sent = []
                destination.put_blob(desc, image.blobs.path(desc), sent.append)
                assert sum(sent) == desc.size
            manifest = image.read_blob(image.manifest_descriptor)
            destination.put_manifest(image.manifest_descriptor, manifest, TAG)
            assert destination.has_blob(image.manifest_descriptor)
            destination.finish()
        finally:
            destination.close()
    return skipped


@one_format
def test_registry_destination_pushes_an_image_that_mounts(pushed, registry, tmp_path):
    converted, rootfs, _ = pushed
    ref = f"oci://{registry.host}/pushed/by-lazyfs/{converted.name}:{TAG}"
    # Blobs above 1 MiB go up in 1 MiB PATCHes, smaller ones in one PUT: both paths.
    assert push_with_destination(converted, ref, SourceOptions(), chunk_bytes=1 << 20) == []
    with open_image(f"{converted}:{TAG}") as local:
        # A second push finds every blob there and uploads nothing.
        all_blobs = [d.digest for d in (local.config_descriptor, *local.layers)]
        assert push_with_destination(converted, ref, SourceOptions(), 1 << 20) == all_blobs
        # An image index (pushed after its child, as push does) is descended as a layout's
        # is, its manifest fetched by digest from /manifests/.
        other = oci.Platform("linux", "s390x" if host_platform().architecture != "s390x"
                             else "riscv64")
        entries = [replace(local.manifest_descriptor, annotations={}, platform=platform)
                   for platform in (other, host_platform())]
        index = oci.encode_json(oci.build_index(entries))
        index_ref = ref.rsplit(":", 1)[0] + ":multi"
        destination = RegistryDestination(index_ref, SourceOptions())
        try:
            destination.put_manifest(oci.descriptor_of(oci.OCI_INDEX, index), index, "multi")
        finally:
            destination.close()
        for pushed_ref in (ref, index_ref):
            with open_reference(pushed_ref) as remote:
                assert remote.manifest_descriptor.digest == local.manifest_descriptor.digest
    mount_dir = tmp_path / "mnt"
    with mounted(ref, mount_dir, cache_dir=tmp_path / "cache"):
        assert tree_of(mount_dir / "etc") == tree_of(rootfs / "etc")
        assert (mount_dir / "data/big.bin").read_bytes() == BIG


# --- Authentication --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_layout(tmp_path_factory):
    layout = tmp_path_factory.mktemp("small") / "layout"
    write_gzip_layout(str(layout), [_tar_of_one_file(b"hello from a private registry\n")], TAG)
    return layout


def _tar_of_one_file(data: bytes) -> bytes:
    from tests.tarbuild import file_, tar_bytes
    return tar_bytes(file_("hello.txt", data))


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory, small_layout):
    """(registry demanding tokens, its token service, oci:// reference of a pushed image)."""
    reason = registry_missing_reason()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("token-registry")
    with TokenService({USER: PASSWORD}) as tokens, \
            RegistryServer(auth=tokens.registry_auth(directory)) as server:
        server.pushed = set()
        ref = push_once(server, small_layout, "private/small", f"{USER}:{PASSWORD}")
        yield server, tokens, ref


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory, small_layout):
    """(registry with htpasswd Basic auth, oci:// reference of a pushed image)."""
    reason = registry_missing_reason()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("basic-registry")
    with RegistryServer(auth=htpasswd_auth(directory, {USER: PASSWORD})) as server:
        server.pushed = set()
        yield server, push_once(server, small_layout, "private/small", f"{USER}:{PASSWORD}")


def secrets_in(text: str) -> list[str]:
    pair = base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode()
    return [s for s in (PASSWORD, WRONG_PASSWORD, pair, "Bearer ", "eyJ") if s in text]


def test_a_token_registry_with_credentials_from_the_docker_config(token_registry, small_layout,
                                                                 no_login_files):
    server, tokens, ref = token_registry
    (no_login_files / ".docker").mkdir()
    write_auth_file(no_login_files / ".docker" / "config.json", server.host, USER, PASSWORD)
    issued = tokens.issued
    with open_reference(ref) as remote, open_image(f"{small_layout}:{TAG}") as local:
        assert remote.manifest_descriptor == local.manifest_descriptor
        layer = remote.layers[0]
        with open(remote.blobs.path(layer), "rb") as f:
            assert f.read() == Path(local.blobs.path(layer)).read_bytes()
        # One token for the repository's pull scope served the manifest, config and blob.
        assert tokens.issued == issued + 1


def test_registry_auth_file_is_read_before_the_docker_config(token_registry, tmp_path,
                                                              no_login_files, monkeypatch):
    server, _, ref = token_registry
    (no_login_files / ".docker").mkdir()
    write_auth_file(no_login_files / ".docker" / "config.json", server.host, USER, "stale")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", write_auth_file(tmp_path / "auth.json",
                                                             server.host, USER, PASSWORD))
    with open_reference(ref) as image:
        assert image.tag == TAG


def test_an_expired_token_is_renewed_and_the_request_retried(token_registry, small_layout,
                                                            tmp_path, monkeypatch):
    server, tokens, ref = token_registry
    monkeypatch.setenv("REGISTRY_AUTH_FILE", write_auth_file(tmp_path / "auth.json",
                                                             server.host, USER, PASSWORD))
    tokens.next_token_lifetime_s = 2
    issued = tokens.issued
    started = time.monotonic()
    with open_reference(ref) as image, open_image(f"{small_layout}:{TAG}") as local:
        expected = Path(local.blobs.path(local.layers[0])).read_bytes()[:10]
        source = image.blobs.open_source(image.layers[0])
        try:
            assert source.read(0, 10) == expected
            # By now the first token's signing certificate has expired: the registry answers
            # 401 to it, and the client must get a new token and retry.
            time.sleep(max(0.0, started + 3.5 - time.monotonic()))
            assert source.read(0, 10) == expected
        finally:
            source.close()
    # Exactly one renewal, whether the expiry was met above or already while opening.
    assert tokens.issued == issued + 2


def test_registry_tokens_are_not_sent_to_the_storage_blobs_redirect_to(token_registry,
                                                                       small_layout, tmp_path,
                                                                       monkeypatch):
    server, _, ref = token_registry
    with RedirectingProxy(server.url, uses_per_url=1) as proxy:
        proxy_host = proxy.url.removeprefix("http://")
        monkeypatch.setenv("REGISTRY_AUTH_FILE", write_auth_file(tmp_path / "auth.json",
                                                                 proxy_host, USER, PASSWORD))
        proxied = ref.replace(server.host, proxy_host)
        with open_reference(proxied) as remote, open_image(f"{small_layout}:{TAG}") as local:
            layer = remote.layers[0]
            expected = Path(local.blobs.path(layer)).read_bytes()
            source = remote.blobs.open_source(layer)
            try:
                assert source.read(0, 10) == expected[:10]
                assert source.read(10, 10) == expected[10:20]   # a used-up URL: re-resolved
            finally:
                source.close()
        assert proxy.redirects >= 3 and proxy.expired >= 1
        assert proxy.storage_saw_authorization == 0


def test_bad_credentials_are_a_clear_error_without_the_secret(token_registry, tmp_path,
                                                             monkeypatch):
    server, tokens, ref = token_registry
    monkeypatch.setenv("REGISTRY_AUTH_FILE", write_auth_file(tmp_path / "auth.json",
                                                             server.host, USER, WRONG_PASSWORD))
    refused = tokens.refused
    done = lazyfs("--debug", "inspect", ref, check=False)
    assert done.returncode == AuthError.exit_code
    assert f"access denied for user '{USER}'" in done.stderr
    assert str(tmp_path / "auth.json") in done.stderr
    assert secrets_in(done.stderr + done.stdout) == []
    assert tokens.refused == refused + 1


def test_anonymous_pull_is_denied_with_a_hint(token_registry):
    _, _, ref = token_registry
    done = lazyfs("inspect", ref, check=False)
    assert done.returncode == AuthError.exit_code
    assert "anonymous access denied" in done.stderr and "login" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@one_format
def test_mount_from_a_token_registry(image, token_registry, tmp_path, monkeypatch):
    server, _, _ = token_registry
    _, converted, rootfs = image
    ref = push_once(server, converted, f"private/{converted.name}", f"{USER}:{PASSWORD}")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", write_auth_file(tmp_path / "auth.json",
                                                             server.host, USER, PASSWORD))
    mount_dir = tmp_path / "mnt"
    with mounted(ref, mount_dir, cache_dir=tmp_path / "cache"):
        assert (mount_dir / "etc/passwd").read_bytes() == (rootfs / "etc/passwd").read_bytes()
        assert tree_of(mount_dir / "usr") == tree_of(rootfs / "usr")


def test_registry_destination_pushes_with_a_token(token_registry, small_layout, tmp_path,
                                                  monkeypatch):
    server, tokens, _ = token_registry
    monkeypatch.setenv("REGISTRY_AUTH_FILE", write_auth_file(tmp_path / "auth.json",
                                                             server.host, USER, PASSWORD))
    ref = f"oci://{server.host}/private/pushed:{TAG}"
    push_with_destination(small_layout, ref, SourceOptions(), chunk_bytes=64)
    with open_reference(ref) as remote, open_image(f"{small_layout}:{TAG}") as local:
        assert remote.manifest_descriptor == local.manifest_descriptor


def test_an_upload_outliving_its_token_is_resent_after_renewal(token_registry, tmp_path,
                                                              monkeypatch):
    server, tokens, _ = token_registry
    monkeypatch.setenv("REGISTRY_AUTH_FILE", write_auth_file(tmp_path / "auth.json",
                                                             server.host, USER, PASSWORD))
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 * 4096))
    desc = oci.descriptor_of("application/octet-stream", blob.read_bytes())
    destination = RegistryDestination(f"oci://{server.host}/private/uploads:{TAG}",
                                      SourceOptions(), chunk_bytes=4096)
    issued = tokens.issued
    tokens.next_token_lifetime_s = 2      # the push token: it expires during the upload
    started = time.monotonic()
    sent = []

    def progress(n: int) -> None:
        if not sent:   # the first PATCH is under way with a valid token: let it expire
            time.sleep(max(0.0, started + 3.5 - time.monotonic()))
        sent.append(n)

    try:
        destination.put_blob(desc, str(blob), progress)
        assert destination.has_blob(desc)
    finally:
        destination.close()
    # The next PATCH met a 401, got a new token and sent its body again from the start; the
    # progress callback heard of every byte exactly once.
    assert tokens.issued == issued + 2
    assert sum(sent) == desc.size


def test_basic_auth_with_good_and_bad_credentials(basic_registry, small_layout, tmp_path,
                                                   monkeypatch):
    server, ref = basic_registry
    with pytest.raises(AuthError, match="no credentials"):
        open_reference(ref)
    auth_file = write_auth_file(tmp_path / "auth.json", server.host, USER, PASSWORD)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", auth_file)
    with open_reference(ref) as remote, open_image(f"{small_layout}:{TAG}") as local:
        assert remote.manifest_descriptor == local.manifest_descriptor
        assert remote.blobs.open_source(remote.layers[0]).size() == local.layers[0].size
    write_auth_file(auth_file, server.host, USER, WRONG_PASSWORD)
    done = lazyfs("--debug", "inspect", ref, check=False)
    assert done.returncode == AuthError.exit_code
    assert f"access denied for user '{USER}'" in done.stderr
    assert secrets_in(done.stderr + done.stdout) == []


# --- Units: references, credentials files, challenges ----------------------------------------

@pytest.mark.parametrize("ref, expected", [
    ("oci://127.0.0.1:5000/a/b/c:v1", ("127.0.0.1:5000", "a/b/c", "v1", None)),
    ("oci://reg.example/app", ("reg.example", "app", "latest", None)),
    (f"oci://reg.example/app:v1@sha256:{'a' * 64}", ("reg.example", "app", None,
                                                     f"sha256:{'a' * 64}")),
    ("oci://docker.io/busybox:1.36", ("docker.io", "library/busybox", "1.36", None)),
    ("oci://[::1]:5000/x:sha256-abc.sig", ("[::1]:5000", "x", "sha256-abc.sig", None)),
])
def test_registry_references(ref, expected):
    name = parse_registry_reference(ref)
    assert (name.registry, name.repository, name.tag, name.digest) == expected


@pytest.mark.parametrize("ref", ["oci://reg/App:v1", "oci://reg/a/../b:v1", "oci://reg",
                                 "oci://reg/a:-bad", "oci://reg/a@sha256:12", "oci:///a:v1"])
def test_malformed_registry_references(ref):
    with pytest.raises(FormatError):
        parse_registry_reference(ref)


def test_credentials_files_order_and_key_forms(tmp_path, no_login_files, monkeypatch):
    docker = no_login_files / ".docker"
    docker.mkdir()
    pair = base64.b64encode(b"hub-user:hub-pw").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": pair},
        "reg.example": {"auth": base64.b64encode(b"docker:pw1").decode()}}}))
    assert find_credentials("docker.io", "library/busybox").username == "hub-user"
    assert find_credentials("reg.example", "app").username == "docker"
    assert find_credentials("other.example", "app") is None
    runtime = tmp_path / "run"
    (runtime / "containers").mkdir(parents=True)
    (runtime / "containers" / "auth.json").write_text(json.dumps({"auths": {
        "reg.example": {"auth": base64.b64encode(b"podman:pw2").decode()},
        "reg.example/team/app": {"auth": base64.b64encode(b"team:pw3").decode()}}}))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert find_credentials("reg.example", "app").username == "podman"
    found = find_credentials("reg.example", "team/app")
    assert (found.username, found.source) == ("team", str(runtime / "containers/auth.json"))
    assert "pw3" not in repr(found)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(NotFound, match="REGISTRY_AUTH_FILE"):
        find_credentials("reg.example", "app")
    (tmp_path / "bad.json").write_text(json.dumps({"auths": {"reg.example": {"auth": "%%"}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "bad.json"))
    with pytest.raises(FormatError, match="not base64"):
        find_credentials("reg.example", "app")


def test_challenges():
    challenge = parse_challenge('Bearer realm="https://auth.example/token",'
                                'service="registry.example",scope="repository:a/b:pull,push"')
    assert challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.example/token",
                                "service": "registry.example",
                                "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x \\"y\\""').params == {"realm": 'x "y"'}
    assert parse_challenge("").scheme == ""


def test_origins_decide_where_credentials_go():
    assert origin_of("https://Reg.Example/v2/a") == origin_of("https://reg.example:443/token")
    assert origin_of("http://reg.example/v2/") != origin_of("https://reg.example/v2/")
    assert origin_of("http://127.0.0.1:5000/") != origin_of("http://127.0.0.1:5001/")


def test_the_conformance_factory_reads_a_registry_blob():
    data = os.urandom(100_000)
    source, cleanup = make_registry_source(data)
    try:
        assert source.size() == len(data)
        assert source.read(1234, 5000) == data[1234:6234]
        assert source.read(len(data) - 1, 1) == data[-1:]
    finally:
        cleanup()


# --- `lazyfs push` to a registry, end to end -------------------------------------------------

@one_format
def test_push_of_a_signed_image_to_a_registry_mounts_with_its_signature(image, registry,
                                                                       tmp_path):
    """The command line path users take: push copies the image and its signature tag (cosign's
    `sha256-<hex>.sig`), and a mount from the registry checks that signature."""
    _, converted, rootfs = image
    layout = tmp_path / "layout"
    shutil.copytree(converted, layout)
    lazyfs("keygen", tmp_path / "k")
    digest = lazyfs("sign", f"{layout}:{TAG}", "--key", tmp_path / "k.key").stdout.strip()
    ref = f"oci://{registry.host}/pushed/signed:{TAG}"
    pushed = lazyfs("push", "--no-progress", f"{layout}:{TAG}", ref)
    assert pushed.stdout.strip() == ref
    assert lazyfs("push", "--no-progress", f"{layout}:{TAG}", ref).returncode == 0  # idempotent
    with open_reference(f"oci://{registry.host}/pushed/signed:sha256-{digest[7:]}.sig") as sig:
        assert sig.layers[0].media_type == oci.COSIGN_SIMPLE_SIGNING
    mount_dir = tmp_path / "mnt"
    with mounted(ref, mount_dir, "--verify-key", tmp_path / "k.pub",
                 cache_dir=tmp_path / "cache"):
        assert (mount_dir / "data/big.bin").read_bytes() == BIG
        assert tree_of(mount_dir / "etc") == tree_of(rootfs / "etc")
    lazyfs("keygen", tmp_path / "other")
    refused = lazyfs("verify", "--verify-key", tmp_path / "other.pub", ref, check=False)
    assert refused.returncode == VerificationError.exit_code
    assert "does not verify" in refused.stderr
