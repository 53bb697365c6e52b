"""OCI and Docker image JSON: media types, annotations, descriptors, index, manifest, config.

Pure and synchronous: every function here maps bytes or dicts to values (or the reverse) and
never touches a file. Reading a layout from disk is `lazyfs.oci_layout`'s job.

The JSON wire names (`mediaType`, `schemaVersion`, ...) appear only in the from_json / to_json
mappings and the builders below; the rest of lazyfs uses the snake_case dataclass fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from lazyfs.errors import FormatError

# --- Media types -------------------------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
# Layers a converter can read: plain, gzip or zstd tars. Encrypted (`+encrypted`) and foreign
# layers are left out on purpose: their bytes are not a tar we could rewrite.
LAYER_MEDIA_TYPES = frozenset({
    OCI_LAYER_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    DOCKER_LAYER_TAR, DOCKER_LAYER_GZIP,
})

# --- Annotations -------------------------------------------------------------------------------

# Digest of the eStargz TOC JSON; readers pin the TOC to it (stargz-snapshotter's name).
ANNOTATION_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
# Size in bytes of the decompressed layer, as a decimal string (containers/image's name).
ANNOTATION_UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
# lazyfs' own hint: the blob offset where a layer's prioritized files end (its
# `.prefetch.landmark` member), as a decimal string. A mount starts downloading [0, offset)
# while it fetches the TOC; the bytes are verified against the TOC like any others, so a wrong
# value costs a bounded useless download, never a wrong byte. Absent: nothing is prioritized.
ANNOTATION_PREFETCH_END = "dev.lazyfs.prefetch.end-offset"
# lazyfs' own hint, with the one above, when the prioritized files were recorded with what a
# start-up reads of them: the blob ranges of the chunks it read, "OFFSET:LENGTH" decimal pairs
# joined by commas, in blob order (format_ranges). A mount prefetches those chunks only, and
# downloads those ranges instead of [0, end-offset). Like the end offset, a wrong value costs
# at most a bounded download or later on-demand reads, never a wrong byte.
ANNOTATION_PREFETCH_RANGES = "dev.lazyfs.prefetch.ranges"
# At most this many ranges are read from that annotation (a start-up reads a few dozen).
MAX_PREFETCH_RANGES = 4096
# lazyfs' own hint for eStargz layers: the blob offset where the TOC's gzip member starts, as a
# decimal string. A mount then reads exactly [offset, end of blob) for the footer and the TOC,
# in one request whatever the TOC's size, instead of a fixed-size tail (zstd:chunked has its
# manifest-position annotation for this). The footer still decides where the TOC is; a wrong
# value costs at most a second read or a bounded bigger one, never a wrong byte.
ANNOTATION_TOC_OFFSET = "dev.lazyfs.toc.offset"
# zstd:chunked's TOC checksum and position ("OFFSET:LENGTH:UNCOMPRESSED:TYPE", see
# format/zstdchunked.py), as its writer names them; containers/storage writes the same two
# under the io.github names: read either.
ANNOTATION_ZSTD_MANIFEST_CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
ANNOTATION_ZSTD_MANIFEST_POSITION = "io.containers.zstd-chunked.manifest-position"
STORAGE_ANNOTATION_ZSTD_MANIFEST_CHECKSUM = "io.github.containers.zstd-chunked.manifest-checksum"
STORAGE_ANNOTATION_ZSTD_MANIFEST_POSITION = "io.github.containers.zstd-chunked.manifest-position"
# The tag of a manifest inside an OCI layout's index.json.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# The layers of a cosign signature manifest (lazyfs.signing): signed JSON payloads.
COSIGN_SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"

# The whole content of an OCI layout's `oci-layout` file.
OCI_LAYOUT_VERSION = "1.0.0"
OCI_LAYOUT_FILE_BYTES = b'{"imageLayoutVersion":"1.0.0"}'

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


# --- Digests -----------------------------------------------------------------------------------

def sha256_digest(data: bytes) -> str:
    """The "sha256:<hex>" digest of data."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object, where: str) -> str:
    """Return digest if it is "sha256:<64 lowercase hex>", else raise FormatError.

    Every digest goes through here before it names a file, so a digest can never carry "../".
    """
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise FormatError(f"{where}: bad digest {digest!r} (want sha256:<64 lowercase hex>)")
    return digest


def blob_relpath(digest: str) -> str:
    """Path of a blob inside an OCI layout: "blobs/sha256/<hex>"."""
    check_digest(digest, "blob")
    return "blobs/sha256/" + digest.removeprefix("sha256:")


# --- Descriptors -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def from_json(cls, obj: object, where: str) -> Platform:
        obj = _object(obj, where)
        return cls(
            os=_str(obj, "os", where),
            architecture=_str(obj, "architecture", where),
            variant=_str(obj, "variant", where, required=False) or "",
        )

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def matches(self, wanted: Platform) -> bool:
        """True if self can serve wanted; an unspecified variant on either side matches any."""
        variant_ok = not self.variant or not wanted.variant or self.variant == wanted.variant
        return self.os == wanted.os and self.architecture == wanted.architecture and variant_ok

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        obj = _object(obj, where)
        size = obj.get("size")
        # bool is an int subclass: reject it explicitly so `"size": true` is not size 1.
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{where}: size must be a non-negative integer, got {size!r}")
        platform = obj.get("platform")
        return cls(
            media_type=_str(obj, "mediaType", where),
            digest=check_digest(obj.get("digest"), where),
            size=size,
            annotations=_annotations(obj, where),
            platform=None if platform is None else Platform.from_json(platform, f"{where}.platform"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out

    @property
    def ref_name(self) -> str | None:
        """The tag this descriptor carries in an index.json, if any."""
        return self.annotations.get(ANNOTATION_REF_NAME)


def descriptor_of(media_type: str, data: bytes, annotations: Mapping[str, str] | None = None,
                  platform: Platform | None = None) -> Descriptor:
    """The descriptor that pins data."""
    return Descriptor(media_type, sha256_digest(data), len(data), dict(annotations or {}), platform)


# --- Index and manifest ------------------------------------------------------------------------

@dataclass(frozen=True)
class Index:
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


def parse_json_object(data: bytes, where: str) -> dict[str, Any]:
    """Decode a JSON object, with a FormatError naming `where` for anything else."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{where}: not valid JSON: {exc}") from None
    return _object(obj, where)


def parse_oci_layout(data: bytes, where: str = "oci-layout") -> None:
    """Check the `oci-layout` file names a layout version we read."""
    version = parse_json_object(data, where).get("imageLayoutVersion")
    if version != OCI_LAYOUT_VERSION:
        raise FormatError(f"{where}: unsupported imageLayoutVersion {version!r}"
                          f" (want {OCI_LAYOUT_VERSION!r})")


def parse_index(data: bytes, where: str = "index.json") -> Index:
    """Parse and validate an OCI image index (or Docker manifest list)."""
    obj = parse_json_object(data, where)
    _check_schema_version(obj, where)
    _check_media_type_field(obj, INDEX_MEDIA_TYPES, where)
    manifests = obj.get("manifests")
    if not isinstance(manifests, list):
        raise FormatError(f"{where}: manifests must be a list")
    return Index(
        manifests=tuple(Descriptor.from_json(m, f"{where}: manifests[{i}]")
                        for i, m in enumerate(manifests)),
        annotations=_annotations(obj, where),
    )


def parse_manifest(data: bytes, where: str = "manifest") -> Manifest:
    """Parse and validate an image manifest (OCI or Docker schema 2)."""
    obj = parse_json_object(data, where)
    _check_schema_version(obj, where)
    media_type = _check_media_type_field(obj, MANIFEST_MEDIA_TYPES, where) or OCI_MANIFEST
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"{where}: layers must be a list")
    return Manifest(
        media_type=media_type,
        config=Descriptor.from_json(obj.get("config"), f"{where}: config"),
        layers=tuple(Descriptor.from_json(d, f"{where}: layers[{i}]") for i, d in enumerate(layers)),
        annotations=_annotations(obj, where),
    )


def parse_config(data: bytes, where: str = "config", *,
                 require_platform: bool = True) -> dict[str, Any]:
    """Parse an image config, checking the fields a converter relies on; returns the whole dict.

    `require_platform` False lets os and architecture be empty, as in the configs cosign writes
    for its signature manifests (nothing runs those)."""
    obj = parse_json_object(data, where)
    rootfs = _object(obj.get("rootfs"), f"{where}: rootfs")
    if rootfs.get("type") != "layers":
        raise FormatError(f"{where}: rootfs.type must be 'layers', got {rootfs.get('type')!r}")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise FormatError(f"{where}: rootfs.diff_ids must be a list")
    for i, diff_id in enumerate(diff_ids):
        check_digest(diff_id, f"{where}: rootfs.diff_ids[{i}]")
    for key in ("architecture", "os"):
        _str(obj, key, where, required=require_platform)
    return obj


def config_diff_ids(config: Mapping[str, Any]) -> list[str]:
    """The layer diff_ids of a config that went through parse_config."""
    return list(config["rootfs"]["diff_ids"])


def config_with_diff_ids(config: Mapping[str, Any], diff_ids: Sequence[str]) -> dict[str, Any]:
    """A copy of config with rootfs.diff_ids replaced and every other field (and key order) kept."""
    rootfs = dict(config["rootfs"])
    rootfs["diff_ids"] = list(diff_ids)
    return {**config, "rootfs": rootfs}


def config_platform(config: Mapping[str, Any]) -> Platform:
    """The platform an image config was built for."""
    variant = config.get("variant")
    return Platform(config["os"], config["architecture"], variant if isinstance(variant, str) else "")


# --- Builders ----------------------------------------------------------------------------------

def build_manifest(config: Descriptor, layers: Sequence[Descriptor],
                   annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An OCI image manifest dict (encode it with encode_json)."""
    out: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        out["annotations"] = dict(annotations)
    return out


def build_index(manifests: Sequence[Descriptor]) -> dict[str, Any]:
    """An OCI image index dict, as written to a layout's index.json."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [m.to_json() for m in manifests],
    }


def encode_json(obj: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; the same dict always gives the same bytes (and so the same digest)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# --- Platforms ---------------------------------------------------------------------------------

# platform.machine() → OCI (GOARCH) architecture and variant.
_MACHINE_TO_OCI = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""), "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
}


def linux_platform_of_machine(machine: str) -> Platform:
    """The linux OCI platform for a platform.machine() string (unknown ones are passed through)."""
    arch, variant = _MACHINE_TO_OCI.get(machine.lower(), (machine.lower(), ""))
    return Platform("linux", arch, variant)


# --- Validation helpers ------------------------------------------------------------------------

def _object(obj: object, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _str(obj: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise FormatError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _annotations(obj: Mapping[str, Any], where: str) -> dict[str, str]:
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise FormatError(f"{where}: annotations must map strings to strings")
    return dict(annotations)


def _check_schema_version(obj: Mapping[str, Any], where: str) -> None:
    if obj.get("schemaVersion") != 2:
        raise FormatError(f"{where}: schemaVersion must be 2, got {obj.get('schemaVersion')!r}")


def _check_media_type_field(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> str | None:
    # The mediaType field is optional in OCI (required in Docker schema 2); when present it
    # must agree with what the document is being read as, or we would misread its fields.
    media_type = obj.get("mediaType")
    if media_type is not None and media_type not in allowed:
        raise FormatError(f"{where}: unexpected mediaType {media_type!r}")
    return media_type


def format_ranges(ranges: list[tuple[int, int]]) -> str:
    """(start, end) blob ranges as ANNOTATION_PREFETCH_RANGES writes them."""
    return ",".join(f"{start}:{end - start}" for start, end in ranges)


def parse_ranges(text: str, blob_size: int | None = None) -> list[tuple[int, int]]:
    """ANNOTATION_PREFETCH_RANGES as (start, end) blob ranges: sorted, apart, non-empty and
    (with blob_size) inside the blob. FormatError otherwise."""
    ranges: list[tuple[int, int]] = []
    for number, pair in enumerate(text.split(",") if text else []):
        offset, _, length = pair.partition(":")
        if not (offset.isdigit() and length.isdigit() and int(length) > 0):
            raise FormatError(f"{ANNOTATION_PREFETCH_RANGES}: range {number} is {pair[:50]!r}, "
                              "not OFFSET:LENGTH")
        start, end = int(offset), int(offset) + int(length)
        if ranges and start < ranges[-1][1]:
            raise FormatError(f"{ANNOTATION_PREFETCH_RANGES}: range {number} overlaps or "
                              "precedes the one before it")
        if blob_size is not None and end > blob_size:
            raise FormatError(f"{ANNOTATION_PREFETCH_RANGES}: range {number} ends at {end}, "
                              f"past the blob's {blob_size} bytes")
        ranges.append((start, end))
        if len(ranges) > MAX_PREFETCH_RANGES:
            raise FormatError(f"{ANNOTATION_PREFETCH_RANGES}: more than {MAX_PREFETCH_RANGES} "
                              "ranges")
    return ranges
