"""`lazyfs push`: the converted test image copied to a directory layout, read back by skopeo and
umoci (independent OCI implementations), served by nginx and mounted by URL."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lazyfs.format import oci
from lazyfs.push import (PushError, Target, copy_plan, open_push_source, parse_destination,
                         plan_push, signature_tag)
from tests.mounting import lazyfs_cmd, mounted
from tests.tarbuild import tree_of
from tests.testimage import TAG

# The push does not depend on the layer format: one format is enough here (test_mount_http
# mounts both formats over HTTP).
one_format = pytest.mark.parametrize("image", ["estargz"], indirect=True)


def run_push(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(lazyfs_cmd("push", "--no-progress", *args), capture_output=True,
                            text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def layout_files(layout: Path) -> dict[str, bytes]:
    """Every blob of a layout, by name."""
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def index_entries(layout: Path) -> dict[str, dict]:
    """index.json's entries by tag."""
    index = json.loads((layout / "index.json").read_text())
    return {m["annotations"][oci.ANNOTATION_REF_NAME]: m for m in index["manifests"]}


def skopeo_digest(layout: Path, tag: str) -> str:
    out = subprocess.run(["skopeo", "inspect", f"oci:{layout}:{tag}"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["Digest"]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".partial")]


@one_format
def test_push_to_a_directory_is_a_layout_with_equal_blobs(image, tmp_path):
    _, converted, _ = image
    dest = tmp_path / "published"
    first = run_push(f"{converted}:{TAG}", dest)
    assert first.stdout == f"{dest}:{TAG}\n"
    source_blobs = layout_files(converted)
    assert layout_files(dest) == source_blobs
    assert f"{len(source_blobs) - 1} blobs copied" in first.stderr   # the manifest is counted apart
    assert "0 skipped" in first.stderr
    [entry] = json.loads((converted / "index.json").read_text())["manifests"]
    assert index_entries(dest) == {TAG: entry}
    # skopeo and umoci read the result (each checks the digests it follows).
    assert skopeo_digest(dest, TAG) == entry["digest"]
    listed = subprocess.run(["umoci", "ls", "--layout", str(dest)], check=True,
                            capture_output=True, text=True).stdout.split()
    assert listed == [TAG]
    assert leftovers(dest) == []

    # Pushed again: nothing sent, nothing rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (dest / "blobs" / "sha256").iterdir()}
    again = run_push(f"{converted}:{TAG}", dest)
    assert f"0 blobs copied (0 B), {len(source_blobs) - 1} skipped (already there)" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in (dest / "blobs" / "sha256").iterdir()} == mtimes
    assert index_entries(dest) == {TAG: entry}


@one_format
def test_a_second_image_keeps_the_first_tag_and_a_tag_push_replaces_it(image, tmp_path):
    source, converted, _ = image
    dest = tmp_path / "published"
    run_push(f"{converted}:{TAG}", dest)
    converted_digest = skopeo_digest(dest, TAG)
    # The unconverted (gzip) image under another tag, given in DEST.
    assert run_push(f"{source}:{TAG}", f"{dest}:plain").stdout == f"{dest}:plain\n"
    source_digest = skopeo_digest(source, TAG)
    assert {tag: e["digest"] for tag, e in index_entries(dest).items()} == {
        TAG: converted_digest, "plain": source_digest}
    assert skopeo_digest(dest, "plain") == source_digest

    # The same tag pushed again with another image: replaced, the other tag untouched.
    run_push(f"{converted}:{TAG}", f"{dest}:plain")
    assert {tag: e["digest"] for tag, e in index_entries(dest).items()} == {
        TAG: converted_digest, "plain": converted_digest}


@one_format
def test_a_pushed_image_mounts_by_url_from_nginx(image, nginx, tmp_path):
    _, converted, rootfs = image
    dest = Path(nginx.root) / "images" / "app"
    run_push(f"{converted}:{TAG}", f"{dest}:v1")
    mount_dir = tmp_path / "mnt"
    with mounted(f"{nginx.url}/images/app:v1", mount_dir, cache_dir=tmp_path / "cache"):
        assert tree_of(mount_dir) == tree_of(rootfs)


@one_format
def test_an_oci_archive_is_pushed_like_its_layout(image, tmp_path):
    _, converted, _ = image
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(converted / name, arcname=name)
    dest = tmp_path / "published"
    assert run_push(archive, dest).stdout == f"{dest}:{TAG}\n"
    assert layout_files(dest) == layout_files(converted)
    assert skopeo_digest(dest, TAG) == skopeo_digest(converted, TAG)


# --- indexes and signatures ----------------------------------------------------------------------

def add_blob(layout: Path, data: bytes, media_type: str, **fields) -> oci.Descriptor:
    desc = oci.descriptor_of(media_type, data, **fields)
    (layout / oci.blob_relpath(desc.digest)).write_bytes(data)
    return desc


def add_signature(layout: Path, signed_digest: str) -> str:
    """A signature of signed_digest as cosign writes it (a manifest whose config has an empty
    os and architecture), tagged sha256-<hex>.sig in layout's index.json; returns its digest."""
    payload = json.dumps({"critical": {"image": {"docker-manifest-digest": signed_digest},
                                       "type": "cosign container image signature"}}).encode()
    layer = add_blob(layout, payload, "application/vnd.dev.cosign.simplesigning.v1+json",
                     annotations={"dev.cosignproject.cosign/signature": "MEUCIQD0test"})
    config = add_blob(layout, oci.encode_json({
        "architecture": "", "os": "", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}), oci.OCI_CONFIG)
    manifest = add_blob(layout, oci.encode_json(oci.build_manifest(config, [layer])),
                        oci.OCI_MANIFEST)
    tag_entry(layout, manifest, signature_tag(signed_digest))
    return manifest.digest


def tag_entry(layout: Path, desc: oci.Descriptor, tag: str) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    tagged = dataclasses.replace(desc, annotations={oci.ANNOTATION_REF_NAME: tag})
    index["manifests"].append(tagged.to_json())
    index_path.write_text(json.dumps(index))


@pytest.fixture
def multi_platform(image, tmp_path):
    """A layout whose tag "multi" names an image index over the converted image (amd64) and
    the unconverted one (as arm64), with signatures of the index and of one platform
    manifest; (layout, index desc, [child descs], {signed digest: signature digest})."""
    source, converted, _ = image
    layout = tmp_path / "multi"
    shutil.copytree(converted, layout)
    for blob in (source / "blobs" / "sha256").iterdir():
        shutil.copy(blob, layout / "blobs" / "sha256" / blob.name)
    [amd64] = json.loads((converted / "index.json").read_text())["manifests"]
    [arm64] = json.loads((source / "index.json").read_text())["manifests"]
    children = [dataclasses.replace(oci.Descriptor.from_json(entry, "test"), annotations={},
                                    platform=oci.Platform("linux", arch))
                for entry, arch in ((amd64, "amd64"), (arm64, "arm64"))]
    index = add_blob(layout, oci.encode_json(oci.build_index(children)), oci.OCI_INDEX)
    tag_entry(layout, index, "multi")
    signatures = {digest: add_signature(layout, digest)
                  for digest in (index.digest, children[1].digest)}
    return layout, index, children, signatures


@one_format
def test_an_index_is_pushed_with_every_platform_and_the_signatures(multi_platform, tmp_path):
    layout, index, children, signatures = multi_platform
    dest = tmp_path / "published"
    result = run_push(f"{layout}:multi", dest)
    assert "2 signatures" in result.stderr
    # Every blob of the layout was reachable from "multi" or a signature, so all are copied.
    assert layout_files(dest) == layout_files(layout)
    entries = index_entries(dest)
    assert {tag: e["digest"] for tag, e in entries.items()} == {
        "multi": index.digest,
        **{signature_tag(signed): sig for signed, sig in signatures.items()}}
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{dest}:multi"], check=True,
                         capture_output=True).stdout
    assert oci.sha256_digest(raw) == index.digest
    for child in children:   # skopeo follows the index to each platform's manifest and config
        config = subprocess.run(["skopeo", "--override-arch", child.platform.architecture,
                                 "inspect", "--config", "--raw", f"oci:{dest}:multi"],
                                check=True, capture_output=True).stdout
        manifest = oci.parse_manifest(layout_files(dest)[child.digest.split(":")[1]])
        assert oci.sha256_digest(config) == manifest.config.digest


class RecordingDestination:
    """Records the calls push makes: the order every Destination (directory, S3, registry)
    relies on. `present` blobs are already there."""

    name = "recording"

    def __init__(self, present: set[str]):
        self.present = present
        self.calls: list[tuple[str, str | None, str | None]] = []

    def has_blob(self, desc):
        return desc.digest in self.present

    def put_blob(self, desc, path, progress):
        data = Path(path).read_bytes()
        assert oci.sha256_digest(data) == desc.digest
        progress(len(data))
        self.calls.append(("blob", desc.digest, None))

    def put_manifest(self, desc, data, tag):
        assert oci.sha256_digest(data) == desc.digest
        self.calls.append(("manifest", desc.digest, tag))

    def finish(self):
        self.calls.append(("finish", None, None))

    def close(self):
        pass


@one_format
def test_every_destination_gets_blobs_then_children_then_parents_then_finish(multi_platform):
    layout, index, children, signatures = multi_platform
    with open_push_source(f"{layout}:multi") as source:
        plan = plan_push(source, None)
        present = {next(iter(plan.blobs))}
        destination = RecordingDestination(present)
        copied, skipped, sent = copy_plan(source, plan, destination)
    kinds = [kind for kind, _, _ in destination.calls]
    assert kinds == ["blob"] * copied + ["manifest"] * len(plan.manifests) + ["finish"]
    assert skipped == 1 and copied == len(plan.blobs) - 1
    assert sent == sum(d.size for d in plan.blobs.values() if d.digest not in present)
    assert not any(digest in present for _, digest, _ in destination.calls)
    manifests = [(digest, tag) for kind, digest, tag in destination.calls if kind == "manifest"]
    order = [digest for digest, _ in manifests]
    assert all(order.index(child.digest) < order.index(index.digest) for child in children)
    assert dict(manifests) == {
        index.digest: "multi", children[0].digest: None, children[1].digest: None,
        **{sig: signature_tag(signed) for signed, sig in signatures.items()}}


@one_format
def test_a_platform_manifest_by_digest_needs_a_destination_tag(multi_platform, tmp_path):
    layout, _, children, signatures = multi_platform
    dest = tmp_path / "published"
    arm64 = children[1]
    refused = run_push(f"{layout}@{arm64.digest}", dest, check=False)
    assert refused.returncode == PushError.exit_code
    assert "has no tag; name one in the destination (DEST:TAG)" in refused.stderr
    assert not dest.exists()

    run_push(f"{layout}@{arm64.digest}", f"{dest}:arm")
    assert {tag: e["digest"] for tag, e in index_entries(dest).items()} == {
        "arm": arm64.digest, signature_tag(arm64.digest): signatures[arm64.digest]}
    assert skopeo_digest(dest, "arm") == arm64.digest


# --- errors ---------------------------------------------------------------------------------------

@one_format
def test_a_missing_tag_is_a_clear_error_and_writes_nothing(image, tmp_path):
    _, converted, _ = image
    dest = tmp_path / "published"
    result = run_push(f"{converted}:nope", dest, check=False)
    assert result.returncode == 4
    assert result.stderr == (f"lazyfs push: error: {converted}: no tag 'nope'; available tags: "
                             f"{TAG}\n")
    assert not dest.exists()


@one_format
def test_a_populated_directory_that_is_no_layout_is_refused(tmp_path, image):
    _, converted, _ = image
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    result = run_push(f"{converted}:{TAG}", tmp_path / "home", check=False)
    assert result.returncode == 1
    assert "not empty and not an OCI layout" in result.stderr
    assert os.listdir(tmp_path / "home") == ["notes.txt"]


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir()
    mounted_ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                capture_output=True)
    if mounted_ok.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted_ok.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@one_format
def test_a_read_only_destination_is_a_clear_error(image, tmp_path):
    _, converted, _ = image
    with tmpfs(tmp_path / "ro", "ro,size=1m") as root:
        result = run_push(f"{converted}:{TAG}", root / "published", check=False)
    assert result.returncode == PushError.exit_code
    assert result.stderr.startswith(f"lazyfs push: error: {root / 'published'}: cannot write ")
    assert result.stderr.rstrip().endswith("Read-only file system")


@one_format
def test_a_push_failing_midway_leaves_the_layout_as_it_was(image, tmp_path):
    """A disk that fills up during the second image: the first image's tag still resolves, the
    second tag does not exist, no partial file is left behind, and the error says why."""
    source, converted, _ = image
    converted_bytes = sum(p.stat().st_size for p in converted.rglob("*") if p.is_file())
    source_bytes = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    # Room for the unconverted image and part of the converted one (tmpfs rounds to pages).
    size_kib = (source_bytes + converted_bytes // 2) // 1024
    with tmpfs(tmp_path / "small", f"size={size_kib}k") as root:
        dest = root / "published"
        run_push(f"{source}:{TAG}", f"{dest}:plain")
        before = (dest / "index.json").read_bytes()
        result = run_push(f"{converted}:{TAG}", dest, check=False)
        assert result.returncode == PushError.exit_code
        assert "No space left on device" in result.stderr
        assert f"{dest}: cannot write blobs/sha256/" in result.stderr
        assert (dest / "index.json").read_bytes() == before
        assert skopeo_digest(dest, "plain") == skopeo_digest(source, TAG)
        assert leftovers(root) == []


# --- destination syntax ---------------------------------------------------------------------------

@pytest.mark.parametrize("dest, expected", [
    ("out", Target(None, "out", None)),
    ("out:v2", Target(None, "out", "v2")),
    ("some/dir/", Target(None, "some/dir", None)),
    ("/abs/out:latest", Target(None, "/abs/out", "latest")),
    ("file:///abs/out:v1", Target(None, "/abs/out", "v1")),
    ("s3://bucket/images/app:v1", Target("s3", "s3://bucket/images/app", "v1")),
    ("s3://bucket/images/app/", Target("s3", "s3://bucket/images/app", None)),
    ("oci://localhost:5000/team/app", Target("oci", "oci://localhost:5000/team/app", None)),
    ("oci://localhost:5000/team/app:v1", Target("oci", "oci://localhost:5000/team/app", "v1")),
])
def test_destination_syntax(dest, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "out" does not exist: its ":v2" is a tag
    assert parse_destination(dest) == expected


def test_an_existing_path_with_a_colon_is_a_directory(tmp_path):
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_destination(str(odd)) == Target(None, str(odd), None)


@pytest.mark.parametrize("dest, message", [
    ("https://cdn.example/images/app", "cannot push to https://"),
    ("out@sha256:" + "0" * 64, "takes a tag (DEST:TAG), not a digest"),
    ("out:", "empty tag"),
    ("oci://localhost:5000", "oci://REGISTRY/REPOSITORY[:TAG]"),
])
def test_bad_destinations_are_refused(dest, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PushError, match=re.escape(message)):
        parse_destination(dest)


# --- other sources, layouts kept as found ---------------------------------------------------------

@one_format
def test_an_image_on_a_web_server_is_mirrored_to_a_directory(image, nginx, tmp_path):
    _, converted, _ = image
    shutil.copytree(converted, Path(nginx.root) / "layout")
    dest = tmp_path / "mirror"
    assert run_push(f"{nginx.url}/layout:{TAG}", f"{dest}:copy").stdout == f"{dest}:copy\n"
    assert layout_files(dest) == layout_files(converted)
    assert skopeo_digest(dest, "copy") == skopeo_digest(converted, TAG)


@one_format
def test_an_existing_index_keeps_its_other_entries_and_fields(image, tmp_path):
    source, converted, _ = image
    dest = tmp_path / "published"
    shutil.copytree(source, dest)
    index = json.loads((dest / "index.json").read_text())
    [entry] = index["manifests"]
    untagged = {k: v for k, v in entry.items() if k != "annotations"}
    index["annotations"] = {"org.example.owner": "team-a"}
    index["manifests"] = [entry, {**untagged, "urls": ["https://mirror.example/blob"]}]
    (dest / "index.json").write_text(json.dumps(index))

    run_push(f"{converted}:{TAG}", f"{dest}:converted")
    merged = json.loads((dest / "index.json").read_text())
    assert merged["annotations"] == index["annotations"]
    assert merged["manifests"][:2] == index["manifests"]
    assert [m["annotations"][oci.ANNOTATION_REF_NAME] for m in merged["manifests"][2:]] == [
        "converted"]
