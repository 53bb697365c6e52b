"""Resolve what the user asked to mount into layers: where each blob is and what pins its TOC.

    /path/layer.esgz                    a lone eStargz blob (needs --toc-digest or
    https://host/layer.esgz               --insecure-skip-verify)
    /path/layout[:TAG|@sha256:...]      an OCI image layout directory (or an oci-archive)
    https://host/path/layout:TAG        the same layout published on any static web server:
    https://host/path/layout/           index.json, manifests and blobs over plain HTTP(S)

For images, the manifest pins every layer's TOC digest (the stargz annotation), and the
manifest itself is pinned by index.json (or by the @digest the user gave); every document is
checked against its digest before it is used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

from lazyfs import oci_layout
from lazyfs.errors import FormatError, VerificationError
from lazyfs.format import oci, zstdchunked
from lazyfs.format.seekable import MAX_FOOTER_SIZE, has_footer
from lazyfs.layer import LayerSpec
from lazyfs.oci_layout import MAX_JSON_BYTES, Reference

_URL_RE = re.compile(r"^https?://", re.IGNORECASE)


@dataclass
class MountImage:
    layers: list[LayerSpec]
    description: dict  # what `lazyfs stats` shows about the image
    close: Callable[[], None] = field(default=lambda: None)
    # The OCI image config (Env, Cmd, User, ... under "config"); None for a lone blob.
    config: dict | None = None


@dataclass
class SourceOptions:
    headers: dict[str, str] | None = None
    ca_cert: str | None = None
    timeout: float = 30.0

    def open(self, location: str):
        from lazyfs.source import open_source

        return open_source(location, headers=self.headers, ca_cert=self.ca_cert,
                           timeout=self.timeout)


def resolve_mount_image(ref: str, *, toc_digest: str | None = None, insecure: bool = False,
                        sources: SourceOptions | None = None) -> MountImage:
    sources = sources or SourceOptions()
    if _URL_RE.match(ref):
        base, tag, digest = _split_url_reference(ref)
        if base is None:
            return _lone_blob(ref, sources.open(ref), toc_digest, insecure)
        return _remote_layout(base, tag, digest, sources, insecure)
    if os.path.isfile(ref) and _ends_with_footer(ref):
        return _lone_blob(ref, sources.open(ref), toc_digest, insecure)
    image = oci_layout.open_image(ref)
    return _from_image(image, ref, lambda desc: sources.open(image.blobs.unverified_path(desc)),
                       insecure, close=image.close)


def _ends_with_footer(path: str) -> bool:
    """A lone seekable blob (either format) rather than an image archive."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - MAX_FOOTER_SIZE))
        tail = f.read()
    return has_footer(tail)


def _lone_blob(location: str, source, toc_digest: str | None, insecure: bool) -> MountImage:
    if toc_digest is None and not insecure:
        raise VerificationError(
            f"{location} is a lone blob: nothing pins its TOC. Pass --toc-digest "
            "(printed by `lazyfs convert`) or, knowingly, --insecure-skip-verify")
    if toc_digest is not None:
        oci.check_digest(toc_digest, "--toc-digest")
    spec = LayerSpec(source=source, toc_digest=toc_digest, label=location)
    return MountImage([spec], {"image": location, "verified": toc_digest is not None})


def _from_image(image, name: str, open_blob, insecure: bool, close) -> MountImage:
    try:
        specs = []
        for number, desc in enumerate(image.layers, 1):
            toc_digest = (desc.annotations or {}).get(oci.ANNOTATION_TOC_DIGEST)
            if toc_digest is None and not insecure:
                raise FormatError(
                    f"{name}: layer {number} ({desc.digest}) has no {oci.ANNOTATION_TOC_DIGEST} "
                    "annotation: it is not a seekable layer (convert the image with "
                    "`lazyfs convert`) or its TOC is not pinned")
            if toc_digest is not None:
                oci.check_digest(toc_digest, f"{name}: layer {number} TOC digest annotation")
            annotations = desc.annotations or {}
            position = (annotations.get(zstdchunked.ANNOTATION_MANIFEST_POSITION)
                        or annotations.get(zstdchunked.STORAGE_ANNOTATION_MANIFEST_POSITION))
            specs.append(LayerSpec(source=open_blob(desc), toc_digest=toc_digest,
                                   label=desc.digest, blob_size=desc.size, toc_position=position))
    except BaseException:
        close()
        raise
    verified = all(spec.toc_digest for spec in specs)
    description = {"image": name, "tag": image.tag, "manifest": image.manifest_descriptor.digest,
                   "verified": verified}
    return MountImage(specs, description, close, config=image.config)


# --- images on a static web server ---------------------------------------------------------------

def _split_url_reference(url: str) -> tuple[str | None, str | None, str | None]:
    """(layout base URL, tag, digest) for a layout reference, or (None, None, None) for a blob.

    A layout is named with a tag or digest on its last path segment (`.../layout:TAG`,
    `.../layout@sha256:...`) or by a trailing slash (`.../layout/`, its only image).
    """
    scheme_end = url.index("://") + 3
    path_start = url.find("/", scheme_end)
    if path_start < 0:
        return None, None, None
    head, last = url.rsplit("/", 1)
    if "@sha256:" in last:
        name, digest = last.split("@", 1)
        oci.check_digest(digest, url)
        return f"{head}/{name}", None, digest
    if ":" in last:
        name, tag = last.split(":", 1)
        return f"{head}/{name}", tag, None
    if last == "" and len(head) > path_start:
        return head, None, None
    return None, None, None


class _RemoteBlobs:
    """LocalBlobs' interface over HTTP: documents fetched whole and checked against digests."""

    def __init__(self, base_url: str, sources: SourceOptions):
        self.base_url = base_url
        self.sources = sources

    def url(self, digest: str) -> str:
        return f"{self.base_url}/{oci.blob_relpath(oci.check_digest(digest, 'blob'))}"

    def read(self, desc: oci.Descriptor, max_size: int = MAX_JSON_BYTES) -> bytes:
        if desc.size > max_size:
            raise FormatError(f"blob {desc.digest}: {desc.size} bytes is over the {max_size} "
                              "byte limit for a JSON document")
        data = _fetch_document(self.url(desc.digest), self.sources)
        if len(data) != desc.size or oci.sha256_digest(data) != desc.digest:
            raise VerificationError(f"{self.url(desc.digest)}: content does not match "
                                    f"{desc.digest} ({len(data)} bytes, {desc.size} expected)")
        return data

    def close(self) -> None:
        return None


def _fetch_document(url: str, sources: SourceOptions) -> bytes:
    from lazyfs.source.http import fetch_all

    return fetch_all(url, headers=sources.headers, ca_cert=sources.ca_cert,
                     timeout=sources.timeout, max_bytes=MAX_JSON_BYTES)


def _remote_image(base: str, tag: str | None, digest: str | None,
                  sources: SourceOptions) -> tuple[oci_layout.ImageSource, _RemoteBlobs]:
    index = oci.parse_index(_fetch_document(f"{base}/index.json", sources), f"{base}/index.json")
    blobs = _RemoteBlobs(base, sources)
    return oci_layout.resolve_in_index(blobs, index, Reference(base, tag, digest), None), blobs


def _remote_layout(base: str, tag: str | None, digest: str | None, sources: SourceOptions,
                   insecure: bool) -> MountImage:
    image, blobs = _remote_image(base, tag, digest, sources)
    name = base + (f":{tag}" if tag else f"@{digest}" if digest else "/")
    return _from_image(image, name, lambda desc: sources.open(blobs.url(desc.digest)), insecure,
                       close=image.close)


# --- the config alone, for `lazyfs run` ----------------------------------------------------------

def resolve_image_config(ref: str, *,
                         sources: SourceOptions | None = None) -> tuple[dict | None, str]:
    """The image config `ref` names, and `ref` pinned to the manifest that config came from.

    `lazyfs run` needs the config in the foreground while the mount daemon resolves the image
    on its own: mounting the pinned reference (LAYOUT@sha256:...) guarantees that the config
    and the layers belong to one manifest even if the tag moves in between. Only index,
    manifest and config are read: no layer is opened, fetched or copied out of an archive.
    A lone blob has no config: (None, ref), unchanged.
    """
    sources = sources or SourceOptions()
    if _URL_RE.match(ref):
        base, tag, digest = _split_url_reference(ref)
        if base is None:
            return None, ref
        image, _ = _remote_image(base, tag, digest, sources)
        pinned_base = base
    elif os.path.isfile(ref) and _ends_with_footer(ref):
        return None, ref
    else:
        image = oci_layout.open_image(ref)
        pinned_base = oci_layout.parse_reference(ref).path
    with image:
        return image.config, f"{pinned_base}@{image.manifest_descriptor.digest}"
