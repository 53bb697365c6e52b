"""One image reference syntax for every command: what the user named, and where its bytes are.

    PATH[:TAG|@sha256:...]        an OCI image layout directory or an oci-archive
    PATH                          a lone seekable blob (a file that ends with a footer)
    file:///PATH                  the same as PATH
    http(s)://HOST/DIR/layout:TAG   an OCI layout published on a static web server or CDN
    http(s)://HOST/DIR/layout@sha256:...   (index.json, manifests and blobs over plain GETs);
    http(s)://HOST/DIR/layout/      a trailing slash names the layout's only image
    http(s)://HOST/DIR/blob       anything else is a lone blob
    s3://BUCKET/PREFIX/...        the same shapes in an S3 bucket (lazyfs.s3)
    oci://REGISTRY/REPO:TAG       a repository of an OCI registry (lazyfs.registry)
    oci://REGISTRY/REPO@sha256:...

An image comes back as an `oci_layout.ImageSource` whatever its store: the same
index -> manifest -> config resolution (platform choice, nested indexes, digests checked
before use) runs for all of them. Remote stores only have to say how to fetch a document,
how to open a blob for ranged reads, and what index to start from (`RemoteStore`).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Protocol

from lazyfs import oci_layout
from lazyfs.errors import FetchError, FormatError, VerificationError
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor, Platform
from lazyfs.oci_layout import MAX_JSON_BYTES, ImageSource, Reference
from lazyfs.source import copy_to_file

@dataclass
class SourceOptions:
    """How to reach remote stores: passed down from the command line."""

    headers: dict[str, str] | None = None
    ca_cert: str | None = None
    timeout: float | tuple[float, float] = 30.0  # seconds, or (connect, read) seconds
    s3_endpoint: str | None = None   # S3-compatible stores; None: AWS or $AWS_ENDPOINT_URL

    def open(self, location: str):
        """A BlobSource for a lone blob's path or URL."""
        from lazyfs.source import open_source

        return open_source(location, headers=self.headers, ca_cert=self.ca_cert,
                           timeout=self.timeout, s3_endpoint=self.s3_endpoint)


@dataclass(frozen=True)
class LoneBlob:
    """A reference to a single seekable blob, not an image: nothing pins its TOC."""

    location: str


class RemoteStore(Protocol):
    """Where a remote image's documents and blobs are: a layout on a web server or in a bucket,
    or a registry repository. Nothing a store returns is trusted: callers check digests."""

    name: str  # for messages and pinned references; never contains credentials

    def index(self, reference: Reference) -> oci.Index:
        """The index to resolve `reference` in: a layout's index.json, or for a registry an
        index synthesized from the manifest the tag or digest names."""
        ...

    def fetch(self, desc: Descriptor, max_bytes: int) -> bytes:
        """The whole content of a small blob or manifest (unverified); at most max_bytes."""
        ...

    def open_blob(self, desc: Descriptor):
        """A BlobSource for ranged reads of a blob (unverified: the caller checks chunks)."""
        ...

    def close(self) -> None:
        ...


class RemoteBlobs:
    """oci_layout.LocalBlobs' interface over a RemoteStore.

    Documents are fetched whole and verified; `path` copies a blob into a private temporary
    directory (verified while it streams) for the commands that need a local file: verify,
    inspect, convert and push. Mounts use `open_source` and verify chunk by chunk instead.
    """

    def __init__(self, store: RemoteStore, tmp_dir: str | None = None):
        self.store = store
        self._tmp_parent = tmp_dir
        self._tmp: str | None = None
        self._paths: dict[str, str] = {}

    def read(self, desc: Descriptor, max_size: int = MAX_JSON_BYTES) -> bytes:
        if desc.size > max_size:
            raise FormatError(f"{self.store.name}: blob {desc.digest}: {desc.size} bytes is over"
                              f" the {max_size} byte limit for a JSON document")
        data = self.store.fetch(desc, max_size)
        if len(data) != desc.size or oci.sha256_digest(data) != desc.digest:
            raise VerificationError(f"{self.store.name}: blob {desc.digest} does not match its "
                                    f"descriptor ({len(data)} bytes, {desc.size} expected)")
        return data

    def path(self, desc: Descriptor) -> str:
        oci.check_digest(desc.digest, "blob")
        path = self._paths.get(desc.digest)
        if path is None:
            path = self._download(desc)
            self._paths[desc.digest] = path
        return path

    def unverified_path(self, desc: Descriptor) -> str:
        return self.path(desc)

    def open_source(self, desc: Descriptor):
        oci.check_digest(desc.digest, "blob")
        return self.store.open_blob(desc)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._paths.clear()
        self.store.close()

    def _download(self, desc: Descriptor) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="lazyfs-blobs-", dir=self._tmp_parent)
        path = os.path.join(self._tmp, desc.digest.split(":", 1)[1])
        source = self.store.open_blob(desc)
        try:
            digest = copy_to_file(source, path, desc.size)
        finally:
            source.close()
        if digest != desc.digest:
            os.unlink(path)
            raise VerificationError(f"{self.store.name}: blob {desc.digest} does not match its "
                                    "digest")
        return path


# --- Stores by scheme ----------------------------------------------------------------------------

# scheme -> "module:function" taking (ref, SourceOptions) and returning (RemoteStore, Reference)
# or a LoneBlob. Imported on first use, so local-only commands never import HTTP or S3 code.
_OPENERS = {
    "http": "lazyfs.imageref:open_http_store",
    "https": "lazyfs.imageref:open_http_store",
    "s3": "lazyfs.s3:open_s3_store",
    "oci": "lazyfs.registry:open_registry_store",
}


# RFC 3986: a letter, then letters, digits, "+", "-" or "." (s3, oci, git+ssh, ...).
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def scheme_of(ref: str) -> str | None:
    """The URL scheme of ref (lower case), or None for a plain path."""
    head, sep, _ = ref.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(head):
        return None
    return head.lower()


def open_reference(ref: str, *, sources: SourceOptions | None = None,
                   platform: Platform | None = None, tmp_dir: str | None = None,
                   defer_config: bool = False) -> ImageSource | LoneBlob:
    """Resolve any reference to an image (manifest and config read and verified) or a lone blob.
    `defer_config`: a remote image's config is read at its first use, not now (a round trip
    less before a mount: see lazyfs.run).

    Close the ImageSource when done: it may hold temporary files and connections.
    """
    sources = sources or SourceOptions()
    scheme = scheme_of(ref)
    if scheme == "file":
        from lazyfs.source import file_url_path

        ref = file_url_path(ref)
        scheme = None
    if scheme is None:
        if os.path.isfile(ref) and ends_with_footer(ref):
            return LoneBlob(ref)
        return oci_layout.open_image(ref, platform=platform, tmp_dir=tmp_dir)
    remote = open_remote(ref, sources, tmp_dir=tmp_dir)
    if isinstance(remote, LoneBlob):
        return remote
    blobs, index, reference = remote
    return oci_layout.resolve_in_index(blobs, index, reference, platform,
                                       defer_config=defer_config)


def open_remote(ref: str, sources: SourceOptions, *,
                tmp_dir: str | None = None) -> tuple[RemoteBlobs, oci.Index, Reference] | LoneBlob:
    """A remote reference's store (as RemoteBlobs, which closes it), the index to resolve the
    reference in, and the reference; or a LoneBlob. For callers that need more than the one
    image open_reference resolves (`lazyfs push` copies whole indexes and signature tags)."""
    target = _opener(scheme_of(ref), ref)(ref, sources)
    if isinstance(target, LoneBlob):
        return target
    store, reference = target
    blobs = RemoteBlobs(store, tmp_dir)
    try:
        index = store.index(reference)
    except BaseException:
        blobs.close()
        raise
    return blobs, index, reference


def _opener(scheme: str, ref: str):
    target = _OPENERS.get(scheme)
    if target is None:
        raise FetchError(f"{ref}: unsupported scheme {scheme}:// (expected a path, file://, "
                         f"{', '.join(s + '://' for s in _OPENERS)})")
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


def pinned_reference(image: ImageSource) -> str:
    """A reference to the very manifest `image` resolved to (its store's name is where it was
    found), so that a second resolution (the mount daemon's, after `lazyfs run` read the
    config) finds the same manifest even if the tag moved in between."""
    return f"{image.name}@{image.manifest_descriptor.digest}"


def ends_with_footer(path: str) -> bool:
    """A lone seekable blob (either format) rather than an image layout or archive."""
    from lazyfs.format.seekable import MAX_FOOTER_SIZE, has_footer

    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - MAX_FOOTER_SIZE))
        tail = f.read()
    return has_footer(tail)


# --- Layouts on a web server ---------------------------------------------------------------------

def split_layout_url(url: str) -> tuple[str | None, str | None, str | None]:
    """(layout base URL, tag, digest) for a layout reference, or (None, None, None) for a blob.

    A layout is named with a tag or digest on its last path segment (`.../layout:TAG`,
    `.../layout@sha256:...`) or by a trailing slash (`.../layout/`, its only image).
    Shared by every store that publishes a layout under a URL (http(s)://, s3://).
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


class HttpLayoutStore:
    """An OCI layout on any static web server: plain GETs of index.json and blobs/sha256/...

    The documents come over one kept-alive connection: a LightConnection when it can (see
    lazyfs/source/light.py), which the first blob opened then takes over; else requests."""

    def __init__(self, base_url: str, sources: SourceOptions):
        self.name = base_url
        self.base_url = base_url
        self.sources = sources
        self._light = None  # the documents' LightConnection, until a blob takes it over
        self._client = None  # the documents' requests client, when the light one cannot do

    def url(self, digest: str) -> str:
        return f"{self.base_url}/{oci.blob_relpath(oci.check_digest(digest, 'blob'))}"

    def index(self, reference: Reference) -> oci.Index:
        url = f"{self.base_url}/index.json"
        return oci.parse_index(self._get(url, MAX_JSON_BYTES), url)

    def fetch(self, desc: Descriptor, max_bytes: int) -> bytes:
        return self._get(self.url(desc.digest), max_bytes)

    def open_blob(self, desc: Descriptor):
        light, self._light = self._light, None
        client, self._client = self._client, None
        if light is None and client is None:
            return self.sources.open(self.url(desc.digest))
        # The first blob opened takes over the documents' connection, already open: its first
        # read (a layer's TOC) saves a connection's round trip.
        from lazyfs.source.http import HttpSource

        sources = self.sources
        if light is not None:
            return HttpSource(self.url(desc.digest), headers=sources.headers,
                              ca_cert=sources.ca_cert, timeout=sources.timeout, bootstrap=light)
        return HttpSource(self.url(desc.digest), client=client)

    def close(self) -> None:
        for connection in (self._light, self._client):
            if connection is not None:
                connection.close()
        self._light = self._client = None

    def _get(self, url: str, max_bytes: int) -> bytes:
        from lazyfs.source import light
        from lazyfs.source.http import HttpClient, fetch_document, redact_url

        where = redact_url(url)
        if self._client is None and light.usable(url):
            if self._light is None:
                self._light = light.LightConnection(url, headers=self.sources.headers,
                                                    ca_cert=self.sources.ca_cert,
                                                    timeout=self.sources.timeout)
            resp = self._light.try_send("GET", url, where)
            if resp is not None:
                return fetch_document(resp, where, max_bytes)
            if self._light.stepped_aside:  # redirected: requests fetches the documents now
                self._light = None
        if self._client is None:
            self._client = HttpClient(self.sources.headers, self.sources.ca_cert,
                                      self.sources.timeout)
        return self._client.fetch_document(url, max_bytes)


def open_http_store(ref: str, sources: SourceOptions) -> tuple[HttpLayoutStore, Reference] | LoneBlob:
    base, tag, digest = split_layout_url(ref)
    if base is None:
        return LoneBlob(ref)
    return HttpLayoutStore(base, sources), Reference(base, tag, digest)
