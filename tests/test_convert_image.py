"""Whole-image conversion: every input kind in, a valid eStargz OCI image out, nothing on error.

Inputs are real: a hand-written two-layer OCI layout (whiteout and opaque dir in layer 2), the
docker-archive and oci-archive skopeo makes from it, and docker-archives in the older (<id>/
layer.tar, with a symlinked layer) and newer (blobs/sha256, gzip layers) `docker save` shapes.
Outputs are checked by reading them back and by skopeo and umoci accepting them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from converter.image import ImageResult, convert_image
from converter.inputs import InputKind, detect_kind, open_image_input
from converter.layer import LayerOptions
from lazyfs.errors import FormatError, LazyfsError, NotFound, VerificationError
from lazyfs.format import estargz, oci
from lazyfs.oci_layout import open_image
from tests.tarbuild import dir_, file_, symlink, tar_bytes
from tests.test_oci_layout import (CONFIG_EXTRAS, LAYER1, LAYER2, Layout, gzip_of, image_config,
                                   read_json, sha256, tagged, two_layer_layout)

OPTIONS = LayerOptions(chunk_size=64 * 1024, workers=2)
REPO_TAG = "example.com/lazyfs/test:v1"

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None,
                                  reason="skopeo is not installed (apt-get install skopeo)")
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None,
                                 reason="umoci is not installed (apt-get install umoci)")


def skopeo(*args: str) -> subprocess.CompletedProcess:
    # Local files only: no signature policy to consult.
    return subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True)


# --- docker-archive builders -------------------------------------------------------------------

def tar_file(path: Path, *members) -> Path:
    path.write_bytes(tar_bytes(*members))
    return path


def docker_manifest(config: str, layers: list[str], repo_tags=(REPO_TAG,)) -> tuple:
    return file_("manifest.json", json.dumps(
        [{"Config": config, "RepoTags": list(repo_tags), "Layers": layers}]).encode())


def legacy_docker_archive(path: Path, layer2: bytes = LAYER2) -> Path:
    """docker < 25: <id>/layer.tar, a duplicate layer as a symlink to another <id>/layer.tar."""
    config = json.dumps(image_config()).encode()
    ids = ["1" * 64, "2" * 64, "3" * 64]
    return tar_file(
        path,
        file_(f"{sha256(config)[7:]}.json", config),
        dir_(f"{ids[0]}/"), file_(f"{ids[0]}/VERSION", b"1.0"), file_(f"{ids[0]}/layer.tar", LAYER1),
        dir_(f"{ids[2]}/"), file_(f"{ids[2]}/layer.tar", layer2),
        dir_(f"{ids[1]}/"), symlink(f"{ids[1]}/layer.tar", f"../{ids[2]}/layer.tar"),
        docker_manifest(f"{sha256(config)[7:]}.json", [f"{ids[0]}/layer.tar", f"{ids[1]}/layer.tar"]),
        file_("repositories", b"{}"),
    )


def blobs_docker_archive(path: Path) -> Path:
    """docker >= 25 shape (blobs/sha256/<hex>), minus its OCI files, with gzip layers."""
    config = json.dumps(image_config()).encode()
    layers = [gzip_of(LAYER1), gzip_of(LAYER2)]
    blob = lambda data: file_(f"blobs/sha256/{sha256(data)[7:]}", data)   # noqa: E731
    return tar_file(
        path, dir_("blobs/"), dir_("blobs/sha256/"), blob(config), *map(blob, layers),
        docker_manifest(f"blobs/sha256/{sha256(config)[7:]}",
                        [f"blobs/sha256/{sha256(layer)[7:]}" for layer in layers]),
    )


# --- inputs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Input kind → reference, all images of the same two layers tagged v1."""
    root = tmp_path_factory.mktemp("sources")
    layout = two_layer_layout(root / "oci")
    refs = {
        "oci-layout": f"{layout.root}:v1",
        "oci-archive (python)": str(layout.tar(root / "python-oci.tar")),
        "docker-archive (legacy)": str(legacy_docker_archive(root / "legacy-docker.tar")),
        "docker-archive (blobs, gzip)": str(blobs_docker_archive(root / "blobs-docker.tar")),
    }
    if shutil.which("skopeo"):
        skopeo("copy", f"oci:{layout.root}:v1", f"docker-archive:{root}/skopeo-docker.tar:{REPO_TAG}")
        skopeo("copy", f"oci:{layout.root}:v1", f"oci-archive:{root}/skopeo-oci.tar:v1")
        refs["docker-archive (skopeo)"] = f"{root}/skopeo-docker.tar"
        refs["oci-archive (skopeo)"] = f"{root}/skopeo-oci.tar:v1"
    return refs


SOURCE_KINDS = ["oci-layout", "oci-archive (python)", "oci-archive (skopeo)",
                "docker-archive (skopeo)", "docker-archive (legacy)", "docker-archive (blobs, gzip)"]


def source(sources: dict[str, str], kind: str) -> str:
    if kind not in sources:
        pytest.skip(f"skopeo is not installed (apt-get install skopeo): no real {kind} input")
    return sources[kind]


def tar_names(data: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {name.removeprefix("./").rstrip("/") for name in tar.getnames()}


@pytest.mark.parametrize("kind, expected", [
    ("oci-layout", InputKind.OCI_LAYOUT),
    ("oci-archive (python)", InputKind.OCI_ARCHIVE),
    ("oci-archive (skopeo)", InputKind.OCI_ARCHIVE),
    ("docker-archive (skopeo)", InputKind.DOCKER_ARCHIVE),
    ("docker-archive (legacy)", InputKind.DOCKER_ARCHIVE),
    ("docker-archive (blobs, gzip)", InputKind.DOCKER_ARCHIVE),
])
def test_image_inputs_are_told_apart(sources, kind, expected):
    path = source(sources, kind).removesuffix(":v1")
    assert detect_kind(path) is expected


@pytest.mark.parametrize("name, data", [
    ("layer.tar", LAYER1),
    ("layer.tar.gz", gzip_of(LAYER1)),
    ("layer.tar.zst", zstandard.ZstdCompressor().compress(LAYER1)),
    ("empty.tar", tar_bytes()),
    # A layer whose first entries happen to look like archive members is still a layer.
    ("tricky.tar", tar_bytes(file_("manifest.json", b"[]"), dir_("usr/"))),
])
def test_layers_are_told_apart_from_images(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    assert detect_kind(str(path)) is InputKind.LAYER


def test_garbage_and_plain_directories_are_format_errors(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"this is not a tar\n" * 100)
    with pytest.raises(FormatError, match="not an OCI layout, an image archive or a layer"):
        detect_kind(str(garbage))
    with pytest.raises(FormatError, match="without an oci-layout file"):
        detect_kind(str(tmp_path))
    with pytest.raises(NotFound):
        detect_kind(str(tmp_path / "missing"))


@pytest.mark.parametrize("kind", ["docker-archive (skopeo)", "docker-archive (legacy)",
                                  "docker-archive (blobs, gzip)"])
def test_a_docker_archive_opens_as_an_oci_image(sources, kind):
    with open_image_input(source(sources, kind)) as image:
        assert (image.tag, image.repo_tag) == ("v1", REPO_TAG)
        assert image.config == image_config()
        assert image.manifest_json["mediaType"] == oci.OCI_MANIFEST
        layers = [Path(image.blob_path(desc)).read_bytes() for desc in image.layers]
        decompressed = [gzip.decompress(d) if d[:2] == b"\x1f\x8b" else d for d in layers]
        assert decompressed == [LAYER1, LAYER2]
    for ref in (f"{source(sources, kind)}:v1", f"{source(sources, kind)}:{REPO_TAG}"):
        with open_image_input(ref) as image:
            assert image.tag == "v1"


def test_a_docker_archive_layer_must_match_its_diff_id(tmp_path):
    archive = legacy_docker_archive(tmp_path / "bad.tar", layer2=LAYER2.replace(b"hi\n", b"HI\n"))
    with pytest.raises(VerificationError, match=r"layer 2{64}/layer.tar: its tar hashes to "
                                                r"sha256:\w+, the config's diff_id is"):
        open_image_input(str(archive))


def test_a_docker_archive_with_several_images_needs_a_tag(tmp_path):
    config = json.dumps(image_config((LAYER1,))).encode()
    config_name, layer_name = f"{sha256(config)[7:]}.json", f"{sha256(LAYER1)[7:]}.tar"
    entry = {"Config": config_name, "Layers": [layer_name]}
    manifest = [{**entry, "RepoTags": ["a/b:one"]}, {**entry, "RepoTags": ["c/d:two", "c/d:2"]}]
    path = tar_file(tmp_path / "two.tar", file_(config_name, config), file_(layer_name, LAYER1),
                    file_("manifest.json", json.dumps(manifest).encode()))
    with pytest.raises(NotFound, match=r"holds 2 images; .* \(available tags: a/b:one, c/d:two, c/d:2\)"):
        open_image_input(str(path))
    with pytest.raises(NotFound, match=r"no tag 'three'; available tags: a/b:one"):
        open_image_input(f"{path}:three")
    with open_image_input(f"{path}:2") as image:
        assert (image.tag, image.repo_tag) == ("2", "c/d:2")


# --- conversion --------------------------------------------------------------------------------

def check_converted(dst: Path, result: ImageResult, *, archive: bool) -> None:
    """dst holds the eStargz image result describes, tagged v1, with the same files."""
    if archive:
        with tarfile.open(dst) as tar:
            names = set(tar.getnames())
        blobs = {f"blobs/sha256/{r.blob_digest[7:]}" for r in result.layers}
        assert {"oci-layout", "index.json", f"blobs/sha256/{result.manifest_digest[7:]}"} | blobs <= names
    else:
        assert read_json(dst / "oci-layout") == {"imageLayoutVersion": "1.0.0"}
        entry, = read_json(dst / "index.json")["manifests"]
        assert entry["annotations"] == {oci.ANNOTATION_REF_NAME: "v1"}
        assert entry["platform"] == {"os": "linux", "architecture": "amd64"}
    with open_image(f"{dst}:v1") as image:     # reads layouts and archives alike
        assert image.manifest_descriptor.digest == result.manifest_digest
        assert (image.manifest_json["schemaVersion"], image.manifest_json["mediaType"]) == (
            2, oci.OCI_MANIFEST)
        assert image.config_descriptor.digest == result.config_digest
        assert image.config_descriptor.media_type == oci.OCI_CONFIG
        assert {k: v for k, v in image.config.items() if k != "rootfs"} == {
            "architecture": "amd64", "os": "linux", **CONFIG_EXTRAS}
        assert image.config["rootfs"]["diff_ids"] == [r.diff_id for r in result.layers]
        for desc, layer, input_tar in zip(image.layers, result.layers, (LAYER1, LAYER2)):
            assert (desc.media_type, desc.digest, desc.size) == (
                oci.OCI_LAYER_GZIP, layer.blob_digest, layer.blob_size)
            blob = Path(image.blob_path(desc)).read_bytes()
            toc_offset = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:]).toc_blob_offset
            assert desc.annotations == {oci.ANNOTATION_TOC_DIGEST: layer.toc_digest,
                                        oci.ANNOTATION_UNCOMPRESSED_SIZE: str(layer.uncompressed_size),
                                        oci.ANNOTATION_TOC_OFFSET: str(toc_offset)}
            tar = gzip.decompress(blob)
            assert (sha256(tar), len(tar)) == (layer.diff_id, layer.uncompressed_size)
            assert tar_names(tar) == tar_names(input_tar) | {".no.prefetch.landmark", "stargz.index.json"}


@pytest.mark.parametrize("archive", [False, True], ids=["to-layout", "to-archive"])
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_input_kind_converts_to_the_same_estargz_image(sources, tmp_path, kind, archive):
    dst = tmp_path / ("image.tar" if archive else "image")
    result = convert_image(source(sources, kind), str(dst), archive=archive, options=OPTIONS)
    assert result.tag == "v1"
    assert len(result.layers) == 2
    check_converted(dst, result, archive=archive)
    assert sorted(os.listdir(tmp_path)) == [dst.name]        # no work dir left behind
    # Every input kind holds the same image, so every output is the same image.
    reference = convert_image(sources["oci-layout"], str(tmp_path / "ref"), archive=False,
                              options=OPTIONS)
    assert result.manifest_digest == reference.manifest_digest


def test_converting_twice_gives_identical_archives(sources, tmp_path):
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    for dst in (first, second):
        convert_image(sources["oci-layout"], str(dst), archive=True, options=OPTIONS)
    assert first.read_bytes() == second.read_bytes()


@needs_skopeo
@pytest.mark.parametrize("archive", [False, True], ids=["layout", "archive"])
def test_skopeo_accepts_the_output(sources, tmp_path, archive):
    dst = tmp_path / ("image.tar" if archive else "image")
    result = convert_image(sources["oci-layout"], str(dst), archive=archive, options=OPTIONS)
    transport = "oci-archive" if archive else "oci"
    raw_manifest = skopeo("inspect", "--raw", f"{transport}:{dst}:v1").stdout
    assert sha256(raw_manifest) == result.manifest_digest
    inspected = json.loads(skopeo("inspect", f"{transport}:{dst}:v1").stdout)
    assert (inspected["Architecture"], inspected["Os"]) == ("amd64", "linux")
    copy = tmp_path / "copy"
    skopeo("copy", f"{transport}:{dst}:v1", f"dir:{copy}")   # reads and checks every blob
    for layer in result.layers:
        assert (copy / layer.blob_digest[7:]).stat().st_size == layer.blob_size


@needs_umoci
def test_umoci_unpacks_the_output_with_whiteouts_applied(sources, tmp_path):
    dst = tmp_path / "image"
    convert_image(sources["oci-layout"], str(dst), archive=False, options=OPTIONS)
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run(["umoci", "unpack", *rootless, "--image", f"{dst}:v1", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    rootfs = tmp_path / "bundle" / "rootfs"
    assert not (rootfs / "foo").exists()                        # .wh.foo
    assert sorted(os.listdir(rootfs / "dir")) == ["c"]          # dir/.wh..wh..opq
    assert (rootfs / "bin" / "hello").read_bytes() == b"#!/bin/sh\necho hello\n"
    assert os.path.samefile(rootfs / "bin" / "hello", rootfs / "bin" / "hello-again")
    assert os.readlink(rootfs / "link") == "bin/hello"
    assert (rootfs / "etc" / "motd").read_bytes() == b"hi\n"


# --- prioritized files -------------------------------------------------------------------------

def test_prioritized_files_may_live_in_different_layers(sources, tmp_path):
    options = LayerOptions(chunk_size=64 * 1024, prioritized_files=("bin/hello", "etc/motd"))
    result = convert_image(sources["oci-layout"], str(tmp_path / "image"), archive=False,
                           options=options)
    assert [r.missing_prioritized for r in result.layers] == [("etc/motd",), ("bin/hello",)]


@pytest.mark.parametrize("missing_ok", [False, True])
def test_a_prioritized_file_in_no_layer_is_not_found_and_nothing_is_written(sources, tmp_path,
                                                                            missing_ok):
    # missing_prioritized_ok is a per-layer switch: the image as a whole still needs each file.
    options = LayerOptions(prioritized_files=("bin/hello", "nope", "etc/nope"),
                           missing_prioritized_ok=missing_ok)
    with pytest.raises(NotFound, match=r"2 prioritized file\(s\) in no layer of the image: "
                                       r"'etc/nope', 'nope'$"):
        convert_image(sources["oci-layout"], str(tmp_path / "image"), archive=False, options=options)
    assert os.listdir(tmp_path) == []


# --- errors leave nothing behind ---------------------------------------------------------------

def corrupt_second_layer_layout(root: Path) -> Path:
    """Digests all match, but layer 2 is a gzip of garbage: conversion fails after layer 1."""
    layout = Layout(root)
    garbage = b"not a tar" * 1000
    manifest = layout.image((LAYER1, garbage))
    layout.index(tagged(manifest, "v1"))
    return layout.root


@pytest.mark.parametrize("archive", [False, True], ids=["to-layout", "to-archive"])
@pytest.mark.parametrize("make_input, ref_suffix, error, message", [
    (lambda p: two_layer_layout(p), ":v9", NotFound, r"no tag 'v9'; available tags: v1$"),
    (lambda p: corrupt_second_layer_layout(p), "", FormatError,
     r"input: layer 2 \(sha256:\w+\): not a valid tar"),
    (lambda p: p.write_bytes(b"garbage" * 99), "", FormatError,
     "not an OCI layout, an image archive or a layer"),
    (lambda p: p.write_bytes(LAYER1), "", FormatError, "a single layer tar, not an image"),
], ids=["missing-tag", "corrupt-layer", "garbage", "single-layer"])
def test_errors_leave_no_output(tmp_path, archive, make_input, ref_suffix, error, message):
    src = tmp_path / "input"
    make_input(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(error, match=message) as caught:
        convert_image(f"{src}{ref_suffix}", str(out_dir / "image"), archive=archive, options=OPTIONS)
    assert "\n" not in str(caught.value)
    assert os.listdir(out_dir) == []


def test_a_tampered_input_blob_is_a_verification_error_and_leaves_no_output(tmp_path):
    layout = two_layer_layout(tmp_path / "oci")
    with open_image(str(layout.root)) as image:
        path = layout.path_of(image.layers[1].digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(VerificationError, match="content hashes to"):
        convert_image(f"{layout.root}:v1", str(out_dir / "image"), archive=False, options=OPTIONS)
    assert os.listdir(out_dir) == []


def test_an_existing_destination_is_left_alone(sources, tmp_path):
    dst = tmp_path / "image"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    with pytest.raises(LazyfsError, match="already exists"):
        convert_image(sources["oci-layout"], str(dst), archive=False, options=OPTIONS)
    assert os.listdir(dst) == ["keep"]
    with pytest.raises(NotFound, match="no such directory"):
        convert_image(sources["oci-layout"], str(tmp_path / "no" / "image"), archive=False,
                      options=OPTIONS)


def test_an_unsupported_layer_media_type_is_refused(tmp_path):
    layout = Layout(tmp_path / "oci")
    layout.index(tagged(layout.image(layer_media_type=oci.OCI_LAYER_GZIP + "+encrypted"), "v1"))
    with pytest.raises(FormatError, match=r"unsupported media type '.*\+encrypted'"):
        convert_image(str(layout.root), str(tmp_path / "image"), archive=False, options=OPTIONS)


def test_zstd_layers_convert(tmp_path):
    layout = Layout(tmp_path / "oci")
    layout.index(tagged(layout.image(compress=zstandard.ZstdCompressor().compress,
                                     layer_media_type=oci.OCI_LAYER_ZSTD), "v1"))
    result = convert_image(str(layout.root), str(tmp_path / "image"), archive=False, options=OPTIONS)
    check_converted(tmp_path / "image", result, archive=False)


# --- progress ----------------------------------------------------------------------------------

@pytest.mark.parametrize("progress, shown", [(True, True), (False, False), (None, False)])
def test_progress_bar_on_stderr(sources, tmp_path, capsys, progress, shown):
    # None means "when stderr is a terminal": under pytest it is not.
    convert_image(sources["oci-layout"], str(tmp_path / "image"), archive=False, options=OPTIONS,
                  progress=progress)
    err = capsys.readouterr().err
    assert ("2/2" in err) is shown
