"""One reference syntax for every command: inspect, verify and convert read the same remote
images that mount reads (here an OCI layout on nginx), and reject what they must."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.errors import FetchError, VerificationError
from lazyfs.format import oci
from lazyfs.image import resolve_mount_image
from lazyfs.imageref import LoneBlob, open_reference, pinned_reference, scheme_of
from lazyfs.oci_layout import open_image
from tests.testimage import TAG


def lazyfs(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lazyfs", *map(str, args)], capture_output=True,
                          text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"lazyfs {args}: exit {done.returncode}: {done.stderr}")
    return done


@pytest.fixture
def served(image, nginx):
    """(nginx, local converted layout, its URL with tag, source layout URL with tag)."""
    source, converted, _ = image
    shutil.copytree(converted, Path(nginx.root) / "converted")
    shutil.copytree(source, Path(nginx.root) / "source")
    return nginx, converted, f"{nginx.url}/converted:{TAG}", f"{nginx.url}/source:{TAG}"


@pytest.fixture
def layer_format_of():
    """The --format a converted test layout was written with (its directory is named so)."""
    return lambda converted: Path(converted).name.replace("-", ":")


def test_scheme_of():
    assert scheme_of("/a/b:c") is None
    assert scheme_of("layout:tag") is None
    assert scheme_of("HTTP://h/x") == "http"
    assert scheme_of("oci://registry/repo:tag") == "oci"
    assert scheme_of("s3://bucket/prefix/layout:tag") == "s3"
    assert scheme_of("a b://x") is None


def test_a_remote_image_resolves_like_the_local_one(served):
    _, converted, url, _ = served
    with open_image(f"{converted}:{TAG}") as local, open_reference(url) as remote:
        assert remote.manifest_descriptor == local.manifest_descriptor
        assert remote.config == local.config
        assert remote.tag == TAG
        pinned = pinned_reference(remote)
    assert pinned == f"{url.rsplit(':', 1)[0]}@{local.manifest_descriptor.digest}"
    mount_image = resolve_mount_image(pinned)
    try:
        assert mount_image.config == local.config
        assert mount_image.description["manifest"] == local.manifest_descriptor.digest
    finally:
        mount_image.close()


def test_inspect_of_a_remote_image_reads_only_footers_and_tocs(served):
    nginx, converted, url, _ = served
    remote = json.loads(lazyfs("inspect", "--json", url).stdout)
    local = json.loads(lazyfs("inspect", "--json", f"{converted}:{TAG}").stdout)
    assert remote["layers"] == local["layers"]
    assert remote["manifest_digest"] == local["manifest_digest"]
    blob_bytes = sum(layer["blob_size"] for layer in local["layers"])
    fetched = sum(r.body_bytes for r in nginx.requests() if "/blobs/" in r.uri
                  and r.status == 206)
    assert 0 < fetched < blob_bytes / 2


def test_verify_of_a_remote_image_checks_every_layer(served):
    _, converted, url, _ = served
    out = lazyfs("verify", url).stdout
    with open_image(f"{converted}:{TAG}") as image:
        for desc in image.layers:
            assert f"{desc.digest}:" in out
        assert f"manifest {image.manifest_descriptor.digest}" in out


def test_verify_of_a_remote_lone_blob(served):
    nginx, converted, _, _ = served
    with open_image(f"{converted}:{TAG}") as image:
        desc = image.layers[0]
        toc_digest = desc.annotations[oci.ANNOTATION_TOC_DIGEST]
    blob_url = f"{nginx.url}/converted/{oci.blob_relpath(desc.digest)}"
    assert isinstance(open_reference(blob_url), LoneBlob)
    out = lazyfs("verify", "--toc-digest", toc_digest, blob_url).stdout
    assert f"TOC {toc_digest} pinned" in out
    wrong = "sha256:" + "0" * 64
    failed = lazyfs("verify", "--toc-digest", wrong, blob_url, check=False)
    assert failed.returncode == VerificationError.exit_code and wrong in failed.stderr


def test_convert_reads_a_remote_image(served, layer_format_of, tmp_path):
    _, converted, _, source_url = served
    out = tmp_path / "out"
    digest = lazyfs("convert", "--format", layer_format_of(converted), source_url,
                    out).stdout.strip()
    with open_image(f"{converted}:{TAG}") as local:
        # Conversion is deterministic: the same input gives the same image, local or remote.
        assert digest == local.manifest_descriptor.digest


def test_a_remote_blob_that_does_not_match_its_digest_is_refused(served):
    nginx, converted, url, _ = served
    with open_image(f"{converted}:{TAG}") as image:
        config = image.config_descriptor
    path = Path(nginx.root) / "converted" / oci.blob_relpath(config.digest)
    path.write_bytes(path.read_bytes().replace(b"{", b" ", 1))
    with pytest.raises(VerificationError, match=config.digest):
        open_reference(url)


def test_an_unknown_scheme_is_a_clear_error():
    with pytest.raises(FetchError, match="unsupported scheme ftp://"):
        open_reference("ftp://host/layout:tag")
