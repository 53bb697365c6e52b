"""What kind of input a path is, and each image input opened as one `ImageSource`.

Kinds, in the order they are tried:
- a directory with an `oci-layout` file: an OCI image layout;
- a tar (plain or gzip) with `oci-layout` and `index.json`: an oci-archive (docker >= 25's
  `docker save` output also has a manifest.json, and is read as the OCI layout it is);
- a tar with `manifest.json`: a docker-archive (`docker save`, `podman save`, skopeo's
  `docker-archive:`): a JSON list of {Config, RepoTags, Layers} naming members of the tar;
- anything else a tar, gzip or zstd stream: a single layer.

A docker-archive has no manifest, so one is synthesized (OCI media types) from the member
files; its only integrity pins are the config's `rootfs.diff_ids`, and every layer is checked
against them when the archive is opened.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

# inflate is tarinput's gzip/zstd decoder with its FormatError mapping; reused, not copied.
from converter.tarinput import inflate, compression_of
from lazyfs.errors import FormatError, NotFound, VerificationError
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor, Platform
from lazyfs.oci_layout import (ImageSource, LocalBlobs, Reference, TarIndex, load_image,
                               normalize_member_name, open_oci_archive, open_oci_layout,
                               parse_reference)

_LAYER_MEDIA_TYPE = {"none": oci.OCI_LAYER_TAR, "gzip": oci.OCI_LAYER_GZIP,
                     "zstd": oci.OCI_LAYER_ZSTD}


# Every member name an image archive may hold: OCI layout files, and docker-archive's
# manifest.json with configs and layers named "<hex>.json", "<hex>.tar", "<id>/layer.tar"
# (docker < 25) or "blobs/sha256/<hex>" (docker >= 25).
_IMAGE_ARCHIVE_MEMBER = re.compile(r"""
      \. | oci-layout | index\.json | manifest\.json | repositories
    | blobs (/sha256 (/[0-9a-f]{64})? )?
    | [0-9a-f]{64} (\.tar | \.json)?
    | [0-9a-f]{64} / (layer\.tar | json | VERSION)
""", re.VERBOSE)


class InputKind(enum.Enum):
    OCI_LAYOUT = "oci-layout"
    OCI_ARCHIVE = "oci-archive"
    DOCKER_ARCHIVE = "docker-archive"
    LAYER = "layer"


def detect_kind(path: str) -> InputKind:
    """Tell an OCI layout, oci-archive, docker-archive and a single layer apart."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "oci-layout")):
            return InputKind.OCI_LAYOUT
        raise FormatError(f"{path}: a directory without an oci-layout file is not an OCI layout")
    try:
        compression = compression_of(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file or directory") from None
    # Image archives are plain or gzip tars; a zstd stream can only be a layer (whose tar
    # the layer converter checks as it reads it).
    if compression == "zstd":
        return InputKind.LAYER
    return _classify_tar(path)


def _classify_tar(path: str) -> InputKind:
    with open(path, "rb") as raw:   # an unreadable file is an OSError, not a FormatError
        try:
            names = _image_archive_members(raw)
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            # tarfile's own message lists every compression it tried, over several lines.
            raise FormatError(f"{path}: not an OCI layout, an image archive or a layer"
                              " (plain, gzip or zstd tar)") from None
    if names is None:
        return InputKind.LAYER
    if {"oci-layout", "index.json"} <= names:
        return InputKind.OCI_ARCHIVE
    if "manifest.json" in names:
        return InputKind.DOCKER_ARCHIVE
    return InputKind.LAYER


def _image_archive_members(raw: BinaryIO) -> set[str] | None:
    """The member names of a (plain or compressed) tar, or None once a member proves that
    it is a layer: image archives hold only names _IMAGE_ARCHIVE_MEMBER allows, so a
    multi-GB layer is not read to its end to learn that it is not an image."""
    names = set()
    with tarfile.open(fileobj=raw, mode="r:*") as tar:
        for member in tar:
            name = normalize_member_name(member.name)
            if not _IMAGE_ARCHIVE_MEMBER.fullmatch(name):
                return None
            names.add(name)
    return names


def open_image_input(ref: str, *, platform: Platform | None = None,
                     tmp_dir: str | None = None, sources=None) -> ImageSource:
    """Open "PATH[:TAG|@DIGEST]" as an image, whatever kind of image input PATH is, or a
    remote image (http(s)://, s3://, oci://: see lazyfs.imageref), reached with `sources`.

    tmp_dir is where archives' members and remote blobs are copied (default: the system's
    temp dir).
    """
    from lazyfs.imageref import LoneBlob, open_reference, scheme_of

    if scheme_of(ref) not in (None, "file"):
        image = open_reference(ref, sources=sources, platform=platform, tmp_dir=tmp_dir)
        if isinstance(image, LoneBlob):
            raise FormatError(f"{ref}: a single blob, not an image: download it and convert "
                              "it as a layer")
        return image
    reference = parse_reference(ref)
    kind = detect_kind(reference.path)
    if kind is InputKind.OCI_LAYOUT:
        return open_oci_layout(reference, platform=platform)
    if kind is InputKind.OCI_ARCHIVE:
        return open_oci_archive(reference, platform=platform, tmp_dir=tmp_dir)
    if kind is InputKind.DOCKER_ARCHIVE:
        return open_docker_archive(reference, tmp_dir=tmp_dir)
    raise FormatError(f"{reference.path}: a single layer tar, not an image"
                      " (no oci-layout nor manifest.json): convert it as a layer")


# --- docker-archive ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DockerArchiveEntry:
    """One image of a docker-archive's manifest.json."""

    config: str                  # member names
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def open_docker_archive(reference: Reference, *, tmp_dir: str | None = None) -> ImageSource:
    """Open one image of a `docker save` tarball, selected by tag or config digest."""
    archive = TarIndex(reference.path, tmp_dir)
    try:
        entries = parse_docker_manifest(archive.read("manifest.json"),
                                        f"{reference.path}: manifest.json")
        entry, repo_tag = _select_entry(entries, reference)
        blobs, manifest_desc = _stage_image(archive, entry)
    except BaseException:
        archive.close()
        raise
    return load_image(blobs, manifest_desc, name=reference.path,
                      tag=_tag_of(repo_tag) if repo_tag else None, repo_tag=repo_tag)


def parse_docker_manifest(data: bytes, where: str) -> list[DockerArchiveEntry]:
    """Parse a docker-archive's manifest.json."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(obj, list) or not obj:
        raise FormatError(f"{where}: expected a non-empty list of images")
    return [_docker_entry(item, f"{where}[{i}]") for i, item in enumerate(obj)]


def _docker_entry(item: object, where: str) -> DockerArchiveEntry:
    if not isinstance(item, dict):
        raise FormatError(f"{where}: expected a JSON object")
    config = item.get("Config")
    repo_tags = item.get("RepoTags") or []   # docker writes null for an untagged image
    layers = item.get("Layers")
    if not isinstance(config, str) or not config:
        raise FormatError(f"{where}: Config must be a member name")
    if not isinstance(repo_tags, list) or not all(isinstance(t, str) for t in repo_tags):
        raise FormatError(f"{where}: RepoTags must be a list of strings")
    if not isinstance(layers, list) or not all(isinstance(n, str) and n for n in layers):
        raise FormatError(f"{where}: Layers must be a list of member names")
    return DockerArchiveEntry(config, tuple(repo_tags), tuple(layers))


def _select_entry(entries: list[DockerArchiveEntry],
                  reference: Reference) -> tuple[DockerArchiveEntry, str | None]:
    """The entry the reference names, and the repo tag it was found under."""
    name = reference.path
    all_tags = [t for e in entries for t in e.repo_tags]
    available = ", ".join(all_tags) or "(none)"
    if reference.digest is not None:
        for entry in entries:
            if _digest_in_name(entry.config) == reference.digest:
                return entry, entry.repo_tags[0] if entry.repo_tags else None
        raise NotFound(f"{name}: no image with config {reference.digest}")
    if reference.tag is not None:
        for entry in entries:
            for repo_tag in entry.repo_tags:
                if reference.tag in (repo_tag, _tag_of(repo_tag)):
                    return entry, repo_tag
        raise NotFound(f"{name}: no tag {reference.tag!r}; available tags: {available}")
    if len(entries) > 1:
        raise NotFound(f"{name}: holds {len(entries)} images; name one as {name}:TAG"
                       f" (available tags: {available})")
    # With several tags on the only image, docker lists the one it was saved by first.
    entry = entries[0]
    return entry, entry.repo_tags[0] if entry.repo_tags else None


def _tag_of(repo_tag: str) -> str | None:
    """"busybox:latest" → "latest"; "localhost:5000/busybox" (no tag) → None."""
    _, colon, tag = repo_tag.rpartition(":")
    return tag if colon and "/" not in tag else None


def _digest_in_name(member: str) -> str | None:
    """The digest a member's name states: "<hex>.json", "<hex>.tar" or "blobs/sha256/<hex>"."""
    match = re.fullmatch(r"(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json|\.tar)?",
                         normalize_member_name(member))
    return f"sha256:{match.group(1)}" if match else None


def _stage_image(archive: TarIndex, entry: DockerArchiveEntry) -> tuple[LocalBlobs, Descriptor]:
    """Copy the image's members out, check them, and synthesize its OCI manifest."""
    where = archive.path
    config_path = archive.extract(entry.config)
    config_desc = _file_descriptor(oci.OCI_CONFIG, config_path)
    named = _digest_in_name(entry.config)
    if named is not None and named != config_desc.digest:
        raise VerificationError(f"{where}: config {entry.config} hashes to {config_desc.digest}")
    with open(config_path, "rb") as f:
        diff_ids = oci.config_diff_ids(oci.parse_config(f.read(), f"{where}: {entry.config}"))
    if len(diff_ids) != len(entry.layers):
        raise FormatError(f"{where}: {len(entry.layers)} layers but the config lists"
                          f" {len(diff_ids)} diff_ids")
    paths = {config_desc.digest: config_path}
    layers = []
    for member, diff_id in zip(entry.layers, diff_ids):
        path = archive.extract(member)
        desc = _file_descriptor(_LAYER_MEDIA_TYPE[compression_of(path)], path)
        try:
            _check_diff_id(path, desc, diff_id)
        except FormatError as exc:
            raise type(exc)(f"{where}: layer {member}: {exc}") from None
        paths[desc.digest] = path
        layers.append(desc)
    manifest_bytes = oci.encode_json(oci.build_manifest(config_desc, layers))
    manifest_desc = oci.descriptor_of(oci.OCI_MANIFEST, manifest_bytes)
    paths[manifest_desc.digest] = archive.write(manifest_bytes)

    def locate(digest: str) -> str:
        if digest not in paths:
            raise NotFound(f"{where}: no blob {digest}")
        return paths[digest]

    # Every digest was computed from the very files, so they count as verified.
    return LocalBlobs(locate, verified=paths, cleanup=archive.close), manifest_desc


def _file_descriptor(media_type: str, path: str) -> Descriptor:
    with open(path, "rb") as f:
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return Descriptor(media_type, digest, os.path.getsize(path))


def _check_diff_id(path: str, desc: Descriptor, diff_id: str) -> None:
    """Check that the layer's uncompressed tar hashes to the diff_id the config pins."""
    digest = desc.digest if desc.media_type == oci.OCI_LAYER_TAR else _uncompressed_digest(path)
    if digest != diff_id:
        raise VerificationError(f"its tar hashes to {digest}, the config's diff_id is {diff_id}")


class _HashingSink:
    def __init__(self) -> None:
        self.hasher = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        return len(data)


def _uncompressed_digest(path: str) -> str:
    sink = _HashingSink()
    with open(path, "rb") as raw:
        inflate(compression_of(path), raw, sink)
    return "sha256:" + sink.hasher.hexdigest()
