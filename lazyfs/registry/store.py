"""A registry repository as a place to read images from (RegistryStore, an imageref
RemoteStore) and to push them to (RegistryDestination, a push Destination).

Reading: the tag or digest is resolved with one manifest GET; the manifest (or index) becomes
the only entry of a synthesized index, so oci_layout.resolve_in_index chooses the platform and
descends nested indexes exactly as it does for a layout. Manifests and indexes are fetched from
/manifests/DIGEST, other blobs from /blobs/DIGEST; a mount reads layers through HttpSource on
the blob URL (ranged GETs, redirects to storage followed and re-resolved when they expire,
HEAD refused by storage answered with a one-byte ranged GET), authenticated by the same
RegistryAuth.

Pushing: blobs are uploaded with POST /blobs/uploads/ then one PUT ?digest= with the body
(monolithic), or for big blobs PATCHes of `chunk_bytes` each and an empty closing PUT (some
proxies in front of registries cap request bodies); manifests are PUT by digest, then by tag.
"""

from __future__ import annotations

import os
from typing import Callable
from urllib.parse import urlencode, urljoin

from lazyfs.errors import FetchError, FormatError, NotFound, VerificationError
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor
from lazyfs.oci_layout import MAX_JSON_BYTES, Reference
from lazyfs.registry.client import (MANIFEST_ACCEPT, RegistryClient, RegistryName,
                                    parse_registry_reference)
from lazyfs.source.http import HttpSource, redact_url

_DOCUMENT_TYPES = oci.INDEX_MEDIA_TYPES | oci.MANIFEST_MEDIA_TYPES
# Blobs up to this size go up in one PUT; bigger ones in PATCHes of this size. 64 MiB stays
# under the request body limits proxies in front of registries commonly set (100 MiB and up).
DEFAULT_CHUNK_BYTES = 64 << 20
_BODY_PIECE_BYTES = 1 << 20


class RegistryStore:
    """Read side: the RemoteStore interface of lazyfs.imageref over one repository."""

    def __init__(self, name: RegistryName, sources):
        self.name = name.base
        self.client = RegistryClient(name, headers=sources.headers, ca_cert=sources.ca_cert,
                                     timeout=sources.timeout)
        # Manifests already fetched by index(), by digest: resolving fetches them again.
        self._documents: dict[str, bytes] = {}

    def index(self, reference: Reference) -> oci.Index:
        wanted = reference.digest or reference.tag
        try:
            body, content_type = self.client.get_document(self.client.manifest_url(wanted),
                                                          MAX_JSON_BYTES, MANIFEST_ACCEPT)
        except NotFound as exc:
            what = f"manifest {wanted}" if reference.digest else f"tag {wanted!r}"
            raise NotFound(f"{self.name}: no {what} ({exc})") from None
        digest = oci.sha256_digest(body)
        if reference.digest is not None and digest != reference.digest:
            raise VerificationError(f"{self.name}@{reference.digest}: the registry sent a "
                                    f"manifest that hashes to {digest}")
        where = f"{self.name}:{wanted}" if reference.digest is None else f"{self.name}@{wanted}"
        media_type = document_media_type(body, content_type, where)
        self._documents[digest] = body
        annotations = {oci.ANNOTATION_REF_NAME: reference.tag} if reference.tag else {}
        return oci.Index((Descriptor(media_type, digest, len(body), annotations),))

    def fetch(self, desc: Descriptor, max_bytes: int) -> bytes:
        cached = self._documents.get(desc.digest)
        if cached is not None:
            return cached
        if desc.media_type in _DOCUMENT_TYPES:
            url, accept = self.client.manifest_url(oci.check_digest(desc.digest, "manifest")), \
                MANIFEST_ACCEPT
        else:
            url, accept = self.client.blob_url(desc.digest), None
        body, _ = self.client.get_document(url, max_bytes, accept)
        return body

    def open_blob(self, desc: Descriptor) -> HttpSource:
        return HttpSource(self.client.blob_url(desc.digest), **self.client.source_args)

    def close(self) -> None:
        self.client.close()


def document_media_type(body: bytes, content_type: str, where: str) -> str:
    """A manifest's media type: its own mediaType field, else the Content-Type, else what its
    shape says (an OCI manifest may omit mediaType, and some registries send
    application/json)."""
    document = oci.parse_json_object(body, where)
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if content_type in _DOCUMENT_TYPES:
        return content_type
    if "manifests" in document:
        return oci.OCI_INDEX
    if "layers" in document and "config" in document:
        return oci.OCI_MANIFEST
    raise FormatError(f"{where}: neither an image manifest nor an index "
                      f"(Content-Type {content_type!r})")


def open_registry_store(ref: str, sources) -> tuple[RegistryStore, Reference]:
    """The imageref opener for oci:// references."""
    name = parse_registry_reference(ref)
    return RegistryStore(name, sources), Reference(name.base, name.tag, name.digest)


# --- Pushing -------------------------------------------------------------------------------------

class RegistryDestination:
    """Write side: the Destination `lazyfs push` copies an image to (oci://REGISTRY/REPO[:TAG];
    the tag of each manifest is the one push passes)."""

    def __init__(self, ref: str, sources, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        name = parse_registry_reference(ref)
        self.name = name.base
        self.chunk_bytes = chunk_bytes
        self.client = RegistryClient(name, headers=sources.headers, ca_cert=sources.ca_cert,
                                     timeout=sources.timeout)

    def has_blob(self, desc: Descriptor) -> bool:
        url = (self.client.manifest_url(oci.check_digest(desc.digest, "manifest"))
               if desc.media_type in _DOCUMENT_TYPES else self.client.blob_url(desc.digest))
        headers = {"Accept": MANIFEST_ACCEPT} if desc.media_type in _DOCUMENT_TYPES else None
        with self.client.request("HEAD", url, headers) as resp:
            if resp.status_code == 404:
                return False
            if resp.status_code != 200:
                raise self.client.error(resp, "HEAD")
            declared = resp.headers.get("Content-Length", "")
            # A blob under our digest with another size is not ours (a broken store): upload.
            return not declared.isdigit() or int(declared) == desc.size

    def put_blob(self, desc: Descriptor, path: str, progress: Callable[[int], None]) -> None:
        oci.check_digest(desc.digest, "blob")
        size = os.path.getsize(path)
        if size != desc.size:
            raise VerificationError(f"{path}: {size} bytes, its descriptor says {desc.size}")
        location = self._start_upload()
        with open(path, "rb") as f:
            if size <= self.chunk_bytes:
                # No body object for an empty blob: requests would send a zero-length stream
                # chunked, beside our Content-Length: 0.
                body = _FileRegion(f, 0, size, progress) if size else None
                self._finish_upload(location, desc.digest, body, size)
                return
            for start in range(0, size, self.chunk_bytes):
                length = min(self.chunk_bytes, size - start)
                location = self._patch(location, _FileRegion(f, start, length, progress),
                                       start, length)
            self._finish_upload(location, desc.digest, None, 0)

    def put_manifest(self, desc: Descriptor, data: bytes, tag: str | None) -> None:
        if oci.sha256_digest(data) != desc.digest or len(data) != desc.size:
            raise VerificationError(f"{self.name}: manifest does not match its descriptor "
                                    f"{desc.digest}")
        references = [desc.digest] + ([tag] if tag else [])
        for reference in references:
            url = self.client.manifest_url(reference)
            with self.client.request("PUT", url, {"Content-Type": desc.media_type},
                                     data) as resp:
                if resp.status_code not in (200, 201):
                    raise self.client.error(resp, f"PUT manifest {reference}")
                stored = resp.headers.get("Docker-Content-Digest")
                if stored and stored != desc.digest:
                    raise VerificationError(f"{self.name}: the registry stored manifest "
                                            f"{reference} as {stored}, not {desc.digest}")

    def finish(self) -> None:
        return None

    def close(self) -> None:
        self.client.close()

    def _start_upload(self) -> str:
        url = f"{self.client.repo_url}/blobs/uploads/"
        with self.client.request("POST", url, {"Content-Length": "0"}) as resp:
            if resp.status_code != 202:
                raise self.client.error(resp, "POST blobs/uploads/")
            return self._location(resp, url)

    def _patch(self, location: str, body: "_FileRegion", start: int, length: int) -> str:
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Range": f"{start}-{start + length - 1}",
                   "Content-Length": str(length)}
        with self.client.request("PATCH", location, headers, body) as resp:
            if resp.status_code != 202:
                raise self.client.error(resp, f"PATCH upload at {start}")
            return self._location(resp, location)

    def _finish_upload(self, location: str, digest: str, body, length: int) -> None:
        separator = "&" if "?" in location else "?"
        url = f"{location}{separator}{urlencode({'digest': digest})}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        with self.client.request("PUT", url, headers, body) as resp:
            if resp.status_code not in (201, 204):
                raise self.client.error(resp, "PUT upload")
            stored = resp.headers.get("Docker-Content-Digest")
            if stored and stored != digest:
                raise VerificationError(f"{self.name}: the registry stored blob {digest} as "
                                        f"{stored}")

    def _location(self, resp, base_url: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise FetchError(f"{redact_url(base_url)}: upload answer without a Location")
        # Registries may answer a path ("/v2/repo/blobs/uploads/UUID?_state=..."): resolve it.
        return urljoin(base_url, location)


class _FileRegion:
    """`length` bytes of an open file from `start`, as a request body: requests learns the
    length from len(), streams it by read(), and rewinds it (seek/tell) to send it again after
    an auth challenge. `progress` hears of each byte once, however often it is sent."""

    def __init__(self, f, start: int, length: int, progress: Callable[[int], None]):
        self._f = f
        self._start = start
        self._length = length
        self._position = 0
        self._reported = 0
        self._progress = progress

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        # Iterable makes requests treat the body as a stream, which is what records the start
        # position that its rewind (and ours, in RegistryAuth) seeks back to.
        while piece := self.read(_BODY_PIECE_BYTES):
            yield piece

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = max(0, min(self._length, base + offset))
        return self._position

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._position
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        self._f.seek(self._start + self._position)
        data = self._f.read(size)
        if len(data) != size:
            raise FetchError(f"{self._f.name}: file shrank while it was uploaded")
        self._position += len(data)
        if self._position > self._reported:
            self._progress(self._position - self._reported)
            self._reported = self._position
        return data
