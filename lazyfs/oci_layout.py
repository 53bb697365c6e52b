"""Read one image from an OCI image layout directory or an oci-archive (a tar of a layout).

A reference names the layout and, optionally, which image in it:

    PATH                  the only image (or the host platform's one) in PATH
    PATH:TAG              the index.json entry whose org.opencontainers.image.ref.name is TAG
    PATH@sha256:<hex>     the manifest (or index) with that digest

Nested image indexes are followed down to one manifest, choosing the wanted platform
(linux/<host arch> unless told otherwise) where an index offers several.

Every blob is checked against the descriptor that names it (size, then sha256) before its
bytes or its path are handed out. A digest is validated as sha256:<64 hex> before it names a
file, so index.json cannot point us outside the layout.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import platform as host
import posixpath
import re
import shutil
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from lazyfs.errors import FormatError, NotFound, VerificationError
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor, Manifest, Platform

# Index, manifest and config documents are read whole into memory; registries cap manifests at
# 4 MiB, configs with long histories can be larger. 16 MiB bounds memory against a hostile layout.
MAX_JSON_BYTES = 16 << 20
# Nested indexes deeper than this are a loop or an attack, not an image.
MAX_INDEX_DEPTH = 4
_COPY_BLOCK_BYTES = 1 << 20


# --- References --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    path: str
    tag: str | None = None
    digest: str | None = None


def parse_reference(ref: str) -> Reference:
    """Split "PATH", "PATH:TAG" or "PATH@sha256:..." into its parts.

    A path may itself contain ':', so the split is at the first ':' whose left side exists on
    disk (and no split at all when the whole string exists). That also lets a tag contain ':',
    as in "layout:docker.io/library/busybox:1.36" when tools store a full name as the tag.
    """
    path, at, digest = ref.rpartition("@")
    if at and digest.startswith("sha256:"):
        oci.check_digest(digest, ref)
        if not os.path.lexists(path):
            raise NotFound(f"{path}: no such file or directory")
        return Reference(path, digest=digest)
    if os.path.lexists(ref):
        return Reference(ref)
    for i, char in enumerate(ref):
        if char == ":" and i > 0 and os.path.lexists(ref[:i]):
            if i == len(ref) - 1:
                raise FormatError(f"{ref}: empty tag after ':'")
            return Reference(ref[:i], tag=ref[i + 1:])
    raise NotFound(f"{ref}: no such file or directory")


def host_platform() -> Platform:
    """linux/<arch of this machine>, in OCI's architecture names."""
    return oci.linux_platform_of_machine(host.machine())


# --- Blobs -------------------------------------------------------------------------------------

class LocalBlobs:
    """Blobs available as local files, each verified against its descriptor before first use.

    `locate(digest)` returns the local path of a blob (raising NotFound); `verified` lists
    digests already proven (e.g. computed by the caller from the very files). `cleanup` runs
    once on close() and releases temporary files and open archives.
    """

    def __init__(self, locate: Callable[[str], str], *, verified: Iterable[str] = (),
                 cleanup: Callable[[], None] | None = None):
        self._locate = locate
        self._verified = set(verified)
        self._cleanup = cleanup

    def path(self, desc: Descriptor) -> str:
        """The local path of a verified blob."""
        path = self._locate(oci.check_digest(desc.digest, "blob"))
        if desc.digest not in self._verified:
            _verify_file(path, desc)
            self._verified.add(desc.digest)
        return path

    def unverified_path(self, desc: Descriptor) -> str:
        """The local path of a blob whose content the caller verifies piece by piece.

        For seekable layers being mounted: hashing a whole layer up front would defeat lazy
        loading, and each chunk is checked against the TOC, which the manifest pins.
        """
        return self._locate(oci.check_digest(desc.digest, "blob"))

    def open_source(self, desc: Descriptor):
        """A BlobSource over the unverified blob, for a mount (which verifies every chunk)."""
        from lazyfs.source.file import FileSource

        return FileSource(self.unverified_path(desc))

    def read(self, desc: Descriptor, max_size: int = MAX_JSON_BYTES) -> bytes:
        """The verified bytes of a small blob (a JSON document)."""
        if desc.size > max_size:
            raise FormatError(f"blob {desc.digest}: {desc.size} bytes is over the {max_size}"
                              " byte limit for a JSON document")
        with open(self._locate(oci.check_digest(desc.digest, "blob")), "rb") as f:
            data = f.read(max_size + 1)
        _verify_bytes(data, desc)
        return data

    def close(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()


def _verify_file(path: str, desc: Descriptor) -> None:
    # The size check is a cheap early answer for truncated blobs; the hash is the real proof.
    size = os.path.getsize(path)
    if size != desc.size:
        raise VerificationError(f"blob {desc.digest}: {size} bytes on disk,"
                                f" its descriptor says {desc.size}")
    with open(path, "rb") as f:
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    if digest != desc.digest:
        raise VerificationError(f"blob {desc.digest}: content hashes to {digest}")


def _verify_bytes(data: bytes, desc: Descriptor) -> None:
    if len(data) != desc.size:
        raise VerificationError(f"blob {desc.digest}: {len(data)} bytes,"
                                f" its descriptor says {desc.size}")
    digest = oci.sha256_digest(data)
    if digest != desc.digest:
        raise VerificationError(f"blob {desc.digest}: content hashes to {digest}")


# --- Images ------------------------------------------------------------------------------------

@dataclass(eq=False)
class ImageSource:
    """One image: its manifest, its config and a way to reach each blob, verified.

    Close it (or use it as a context manager) to release temporary files.
    """

    name: str                        # where it was read from, for messages
    manifest_descriptor: Descriptor
    manifest_json: dict[str, Any]
    manifest: Manifest
    blobs: LocalBlobs = field(repr=False)
    tag: str | None = None
    repo_tag: str | None = None       # a docker-archive's full "repo:tag", when it had one
    # (config bytes, parsed config), read and checked by load_image, or at first use when it
    # was asked to defer them (a mount needs none of it: `lazyfs run` reads it meanwhile).
    _config: tuple[bytes, dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.manifest.layers

    @property
    def config_bytes(self) -> bytes:
        return self._loaded_config()[0]

    @property
    def config(self) -> dict[str, Any]:
        return self._loaded_config()[1]

    def _loaded_config(self) -> tuple[bytes, dict[str, Any]]:
        if self._config is None:
            self._config = _read_config(self.blobs, self.manifest, self.name,
                                        self.manifest_descriptor)
        return self._config

    @property
    def config_descriptor(self) -> Descriptor:
        return self.manifest.config

    def blob_path(self, desc: Descriptor) -> str:
        """A local path to the blob desc names, after checking its size and sha256."""
        return self.blobs.path(desc)

    def read_blob(self, desc: Descriptor, max_size: int = MAX_JSON_BYTES) -> bytes:
        """The verified bytes of a small blob (a JSON document: index, manifest, config)."""
        return self.blobs.read(desc, max_size)

    def close(self) -> None:
        self.blobs.close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_image(blobs: LocalBlobs, manifest_desc: Descriptor, *, name: str,
               tag: str | None = None, repo_tag: str | None = None,
               defer_config: bool = False) -> ImageSource:
    """Read and validate the manifest and config that manifest_desc pins (the config at its
    first use instead, with `defer_config`: its errors come then).

    Closes blobs if the image is unusable, so the caller only closes the ImageSource.
    """
    try:
        manifest_bytes = blobs.read(manifest_desc)
        where = f"{name}: manifest {manifest_desc.digest}"
        manifest_json = oci.parse_json_object(manifest_bytes, where)
        if manifest_json.get("mediaType", manifest_desc.media_type) != manifest_desc.media_type:
            raise FormatError(f"{where}: mediaType {manifest_json['mediaType']!r} disagrees with"
                              f" its descriptor's {manifest_desc.media_type!r}")
        manifest = oci.parse_manifest(manifest_bytes, where)
        if manifest.config.media_type not in oci.CONFIG_MEDIA_TYPES:
            raise FormatError(f"{where}: not a container image"
                              f" (config media type {manifest.config.media_type!r})")
        config = None if defer_config else _read_config(blobs, manifest, name, manifest_desc)
    except BaseException:
        blobs.close()
        raise
    return ImageSource(name, manifest_desc, manifest_json, manifest, blobs, tag=tag,
                       repo_tag=repo_tag, _config=config)


def _read_config(blobs: LocalBlobs, manifest: Manifest, name: str,
                 manifest_desc: Descriptor) -> tuple[bytes, dict[str, Any]]:
    """The manifest's config, verified and checked against the manifest."""
    config_bytes = blobs.read(manifest.config)
    signatures = bool(manifest.layers) and all(
        d.media_type == oci.COSIGN_SIMPLE_SIGNING for d in manifest.layers)
    config = oci.parse_config(config_bytes, f"{name}: config {manifest.config.digest}",
                              require_platform=not signatures)
    diff_id_count = len(oci.config_diff_ids(config))
    if diff_id_count != len(manifest.layers):
        raise FormatError(f"{name}: manifest {manifest_desc.digest}: {len(manifest.layers)} "
                          f"layers but the config lists {diff_id_count} diff_ids")
    return config_bytes, config


def open_image(ref: str, *, platform: Platform | None = None,
               tmp_dir: str | None = None) -> ImageSource:
    """Open "PATH[:TAG|@DIGEST]" where PATH is an OCI layout directory or an oci-archive."""
    reference = parse_reference(ref)
    if os.path.isdir(reference.path):
        return open_oci_layout(reference, platform=platform)
    return open_oci_archive(reference, platform=platform, tmp_dir=tmp_dir)


def open_oci_layout(reference: Reference, *, platform: Platform | None = None) -> ImageSource:
    """Open an image from an OCI layout directory."""
    root = reference.path

    def read(relpath: str) -> bytes:
        try:
            with open(os.path.join(root, relpath), "rb") as f:
                return _read_capped(f, f"{root}: {relpath}")
        except FileNotFoundError:
            raise FormatError(f"{root}: no {relpath} (not an OCI image layout)") from None

    def locate(digest: str) -> str:
        path = os.path.join(root, oci.blob_relpath(digest))
        if not os.path.isfile(path):
            raise NotFound(f"{root}: blob {digest} is missing")
        return path

    oci.parse_oci_layout(read("oci-layout"), f"{root}: oci-layout")
    index = oci.parse_index(read("index.json"), f"{root}: index.json")
    return resolve_in_index(LocalBlobs(locate), index, reference, platform)


def open_oci_archive(reference: Reference, *, platform: Platform | None = None,
                     tmp_dir: str | None = None) -> ImageSource:
    """Open an image from an oci-archive: a tar (possibly gzip-compressed) of an OCI layout.

    The archive is indexed, not unpacked: only the blobs asked for are copied out, into a
    temporary directory (under tmp_dir) that close() removes.
    """
    archive = TarIndex(reference.path, tmp_dir)
    try:
        for required in ("oci-layout", "index.json"):
            if required not in archive.members:
                raise FormatError(f"{reference.path}: no {required} member (not an oci-archive)")
        oci.parse_oci_layout(archive.read("oci-layout"), f"{reference.path}: oci-layout")
        index = oci.parse_index(archive.read("index.json"), f"{reference.path}: index.json")
    except BaseException:
        archive.close()
        raise
    blobs = LocalBlobs(lambda digest: archive.extract(oci.blob_relpath(digest)),
                       cleanup=archive.close)
    return resolve_in_index(blobs, index, reference, platform)


# --- Archives ----------------------------------------------------------------------------------

class TarIndex:
    """The members of a tar by normalized name, copied out on demand into a private temp dir."""

    def __init__(self, path: str, tmp_dir: str | None = None):
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, EOFError, OSError):
            # tarfile's own message lists every compression it tried, over several lines.
            raise FormatError(f"{path}: not a readable tar archive") from None
        try:
            self.members = {normalize_member_name(m.name): m for m in self._tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as exc:
            self._tar.close()
            raise FormatError(f"{path}: corrupt tar archive: {exc}") from None
        self._tmp_parent = tmp_dir
        self._tmp: str | None = None
        self._extracted: dict[str, str] = {}
        self._temp_count = 0

    def write(self, data: bytes) -> str:
        """Store data in the temp dir beside the copied members; return its path."""
        path = self._new_temp_path()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def read(self, name: str, max_size: int = MAX_JSON_BYTES) -> bytes:
        """The content of a small member."""
        with self._corrupt_as_format_error(name), self._open(name) as f:
            return _read_capped(f, f"{self.path}: {name}", max_size)

    def extract(self, name: str) -> str:
        """A local path holding the member's content (copied once, then reused)."""
        key = normalize_member_name(name)
        path = self._extracted.get(key)
        if path is None:
            path = self._new_temp_path()
            with (self._corrupt_as_format_error(name), self._open(key) as src,
                  open(path, "wb") as out):
                shutil.copyfileobj(src, out, _COPY_BLOCK_BYTES)
            self._extracted[key] = path
        return path

    def close(self) -> None:
        self._tar.close()
        if self._tmp is not None:
            self._remove_tmp()
            self._tmp = None
            self._extracted.clear()

    @contextlib.contextmanager
    def _corrupt_as_format_error(self, name: str) -> Iterator[None]:
        # A truncated or corrupt (compressed) archive shows up only while a member is read.
        try:
            yield
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise FormatError(f"{self.path}: corrupt archive reading {name}: {exc}") from None

    def _new_temp_path(self) -> str:
        # Files are numbered, never named after a member: a hostile member name
        # ("../../etc/passwd") cannot escape the temp dir.
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="lazyfs-archive-", dir=self._tmp_parent)
            # Like tempfile.TemporaryDirectory: removed by close(), or at the latest when this
            # object is collected or the interpreter exits, if a caller forgot to close.
            self._remove_tmp = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        self._temp_count += 1
        return os.path.join(self._tmp, str(self._temp_count))

    def _open(self, name: str):
        member = self.members.get(normalize_member_name(name))
        if member is None:
            raise NotFound(f"{self.path}: no member {name}")
        # extractfile follows hard and symbolic links inside the archive; None means a
        # directory or device, KeyError a dangling link.
        try:
            f = self._tar.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise FormatError(f"{self.path}: member {name} is not a regular file")
        return f


def normalize_member_name(name: str) -> str:
    """A tar member name as a key: "./blobs/x" and "blobs/x" are the same member."""
    return posixpath.normpath(name).lstrip("/")


def _read_capped(f: Any, where: str, max_size: int = MAX_JSON_BYTES) -> bytes:
    data = f.read(max_size + 1)
    if len(data) > max_size:
        raise FormatError(f"{where}: larger than the {max_size} byte limit for a JSON document")
    return data


# --- Choosing the manifest ---------------------------------------------------------------------

def resolve_in_index(blobs: LocalBlobs, index: oci.Index, reference: Reference,
                     platform: Platform | None, *, defer_config: bool = False) -> ImageSource:
    name = reference.path
    try:
        if reference.digest is not None:
            found = _find_digest(blobs, index.manifests, reference.digest, name, depth=0)
            if found is None:
                raise NotFound(f"{name}: no manifest {reference.digest}")
            top, desc = found
            entries, tag = [desc], top.ref_name
        else:
            entries, tag = _entries_for_tag(index.manifests, reference.tag, name)
        desc = _descend(blobs, entries, platform or host_platform(), name)
    except BaseException:
        blobs.close()
        raise
    return load_image(blobs, desc, name=name, tag=tag, defer_config=defer_config)


def _entries_for_tag(entries: tuple[Descriptor, ...], tag: str | None,
                     name: str) -> tuple[list[Descriptor], str | None]:
    """The top-level entries a tag (or no tag) designates, and the tag they carry."""
    if tag is None:
        # Signatures stored beside an image (cosign's sha256-<hex>.sig tags) are not images:
        # "the layout's only image" ignores them.
        entries = tuple(d for d in entries if not _is_signature_tag(d.ref_name))
    tags = sorted({d.ref_name for d in entries if d.ref_name})
    available = ", ".join(tags) or "(none)"
    if tag is not None:
        chosen = [d for d in entries if d.ref_name == tag]
        if not chosen:
            raise NotFound(f"{name}: no tag {tag!r}; available tags: {available}")
        return chosen, tag
    if len(tags) > 1:
        raise NotFound(f"{name}: holds several images; name one as {name}:TAG"
                       f" (available tags: {available})")
    if not entries:
        raise NotFound(f"{name}: index.json lists no manifests")
    # Several entries under one tag (or none) differ by platform: _descend chooses.
    return list(entries), tags[0] if tags else None


_SIGNATURE_TAG = re.compile(r"sha256-[0-9a-f]{64}\.sig")


def _is_signature_tag(tag: str | None) -> bool:
    return tag is not None and _SIGNATURE_TAG.fullmatch(tag) is not None


def _descend(blobs: LocalBlobs, candidates: list[Descriptor], wanted: Platform, name: str,
             depth: int = 0) -> Descriptor:
    """Pick one candidate by platform, and follow image indexes down to a manifest."""
    desc = _choose_platform(candidates, wanted, name)
    if desc.media_type in oci.MANIFEST_MEDIA_TYPES:
        return desc
    if desc.media_type not in oci.INDEX_MEDIA_TYPES:
        raise FormatError(f"{name}: {desc.digest} has media type {desc.media_type!r},"
                          " not an image manifest or index")
    if depth >= MAX_INDEX_DEPTH:
        raise FormatError(f"{name}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
    nested = oci.parse_index(blobs.read(desc), f"{name}: index {desc.digest}")
    return _descend(blobs, list(nested.manifests), wanted, name, depth + 1)


def _choose_platform(candidates: list[Descriptor], wanted: Platform, name: str) -> Descriptor:
    # A lone candidate is taken whatever its platform: converting an arm64 image on an amd64
    # machine is legitimate, nothing here runs it. The platform only breaks ties.
    if len(candidates) == 1:
        return candidates[0]
    for desc in candidates:     # the index's order is the publisher's preference
        if desc.platform is not None and desc.platform.matches(wanted):
            return desc
    offered = ", ".join(str(d.platform) if d.platform else "(unspecified)" for d in candidates)
    raise NotFound(f"{name}: no manifest for platform {wanted}; available: {offered or '(none)'}")


def _find_digest(blobs: LocalBlobs, entries: Iterable[Descriptor], digest: str, name: str,
                 depth: int) -> tuple[Descriptor, Descriptor] | None:
    """Find digest among entries or inside the indexes they name.

    Returns (the top-level entry it was found under, its own descriptor), or None.
    """
    nested_indexes = []
    for desc in entries:
        if desc.digest == digest:
            return desc, desc
        if desc.media_type in oci.INDEX_MEDIA_TYPES:
            nested_indexes.append(desc)
    if depth >= MAX_INDEX_DEPTH:
        return None
    for desc in nested_indexes:
        nested = oci.parse_index(blobs.read(desc), f"{name}: index {desc.digest}")
        found = _find_digest(blobs, nested.manifests, digest, name, depth + 1)
        if found is not None:
            return desc, found[1]
    return None


# --- Writing -------------------------------------------------------------------------------------

def write_gzip_layout(layout: str, layer_tars: list[bytes], tag: str, *,
                      runtime_config: dict | None = None, architecture: str | None = None) -> None:
    """A plain OCI image layout at `layout` (which must not exist) with gzip layers.

    The layers are the given uncompressed tars, lowest first; `runtime_config` is the config's
    "config" part (Env, Cmd, Entrypoint, WorkingDir, User). For demos and tests: real image
    conversion writes layouts through converter.image.
    """
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)

    def put(data: bytes, media_type: str, annotations=None) -> Descriptor:
        descriptor = oci.descriptor_of(media_type, data, annotations)
        with open(os.path.join(layout, oci.blob_relpath(descriptor.digest)), "wb") as f:
            f.write(data)
        return descriptor

    layers = [put(gzip.compress(t, mtime=0), oci.OCI_LAYER_GZIP) for t in layer_tars]
    config = {"architecture": architecture or host_platform().architecture, "os": "linux",
              "config": dict(runtime_config or {}),
              "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(t) for t in layer_tars]}}
    config_descriptor = put(oci.encode_json(config), oci.OCI_CONFIG)
    manifest = put(oci.encode_json(oci.build_manifest(config_descriptor, layers)),
                   oci.OCI_MANIFEST, {oci.ANNOTATION_REF_NAME: tag})
    with open(os.path.join(layout, "oci-layout"), "wb") as f:
        f.write(oci.OCI_LAYOUT_FILE_BYTES)
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(oci.encode_json(oci.build_index([manifest])))
