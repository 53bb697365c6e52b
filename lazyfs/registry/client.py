"""Registry references and the HTTP side of the OCI distribution API.

    oci://REGISTRY/REPO:TAG          REPO may have several path components (org/team/app)
    oci://REGISTRY/REPO@sha256:...   a digest pins the manifest (a tag before it is ignored)
    oci://REGISTRY/REPO              the tag "latest", as docker and podman read it

REGISTRY is host[:port] ([v6addr]:port for IPv6). The API is reached over https with TLS
verification (--ca-cert for a private CA), except on loopback (localhost, 127.0.0.0/8, ::1),
where docker also talks plain http to a registry: a registry a test or a developer starts on
their own machine rarely has a certificate, and loopback traffic never leaves the host.
`docker.io` means Docker Hub (registry-1.docker.io, one-component names under library/).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import requests
import urllib3

from lazyfs.errors import AuthError, FetchError, FormatError, NotFound
from lazyfs.format import oci
from lazyfs.registry.auth import RegistryAuth, find_credentials, is_loopback
from lazyfs.source.http import HttpClient, read_body, redact_url

# What a manifest GET accepts: without the list, a registry may down-convert or refuse.
MANIFEST_ACCEPT = ", ".join((oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST_LIST,
                             oci.DOCKER_MANIFEST))
# An error body worth quoting is short; read no more of it.
_ERROR_BODY_BYTES = 64 * 1024

# The distribution spec's grammar for repository path components and tags.
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                         r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REGISTRY = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class RegistryName:
    registry: str            # host[:port] as written
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def base(self) -> str:
        """oci://REGISTRY/REPO: the store's name in messages and pinned references."""
        return f"oci://{self.registry}/{self.repository}"


def parse_registry_reference(ref: str) -> RegistryName:
    """Split oci://REGISTRY/REPO[:TAG][@sha256:...]; FormatError for anything malformed."""
    scheme, sep, rest = ref.partition("://")
    if not sep or scheme.lower() != "oci":
        raise FormatError(f"{ref}: not an oci:// reference")
    registry, slash, path = rest.partition("/")
    if not slash or not _REGISTRY.fullmatch(registry):
        raise FormatError(f"{ref}: expected oci://REGISTRY/REPOSITORY[:TAG|@sha256:...]")
    path, at, digest = path.partition("@")
    head, _, last = path.rpartition("/")
    name, colon, tag = last.partition(":")
    repository = f"{head}/{name}" if head else name
    if at:
        oci.check_digest(digest, ref)
        tag = None          # a digest pins the manifest; the tag beside it is only a label
    elif not colon:
        tag = DEFAULT_TAG
    if not _REPOSITORY.fullmatch(repository):
        raise FormatError(f"{ref}: bad repository name {repository!r} (lower-case letters, "
                          "digits and separators, components joined by '/')")
    if tag is not None and not _TAG.fullmatch(tag):
        raise FormatError(f"{ref}: bad tag {tag!r}")
    if registry.lower() in ("docker.io", "index.docker.io") and "/" not in repository:
        repository = f"library/{repository}"
    return RegistryName(registry, repository, tag, digest or None)


def api_netloc(registry: str) -> str:
    return _DOCKER_HUB_API if registry.lower() in ("docker.io", "index.docker.io") else registry


def api_scheme(registry: str) -> str:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    return "http" if is_loopback(host) else "https"


class RegistryClient:
    """One repository's API: URLs, authenticated requests, error bodies made into messages."""

    def __init__(self, name: RegistryName, *, headers: dict[str, str] | None = None,
                 ca_cert: str | None = None, timeout: float | tuple[float, float] = 30.0):
        self.name = name
        api_url = f"{api_scheme(name.registry)}://{api_netloc(name.registry)}"
        self.repo_url = f"{api_url}/v2/{name.repository}"
        self.auth = RegistryAuth(name.registry, api_url,
                                 find_credentials(name.registry, name.repository))
        # What every blob source of this repository is opened with (HttpSource's arguments).
        self.source_args = {"headers": headers, "ca_cert": ca_cert, "timeout": timeout,
                            "auth": self.auth}
        self.http = HttpClient(headers, ca_cert, timeout, auth=self.auth)

    def manifest_url(self, reference: str) -> str:
        return f"{self.repo_url}/manifests/{reference}"

    def blob_url(self, digest: str) -> str:
        return f"{self.repo_url}/blobs/{oci.check_digest(digest, 'blob')}"

    @contextmanager
    def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                data=None) -> Iterator[requests.Response]:
        with self.http.send(method, url, redact_url(url), headers, data) as resp:
            yield resp

    def get_document(self, url: str, max_bytes: int,
                     accept: str | None = None) -> tuple[bytes, str]:
        """(body, media type from Content-Type) of a manifest or a small blob."""
        with self.request("GET", url, {"Accept": accept} if accept else None) as resp:
            if resp.status_code != 200:
                raise self.error(resp, "GET")
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"{redact_url(url)}: {declared} bytes, more than the "
                                 f"{max_bytes} bytes allowed for a document")
            body = read_body(resp, max_bytes + 1, redact_url(url))
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if len(body) > max_bytes:
            raise FetchError(f"{redact_url(url)}: more than the {max_bytes} bytes allowed for "
                             "a document")
        return body, content_type

    def error(self, resp: requests.Response, what: str) -> Exception:
        """The exception for a registry's error answer, quoting its error code and message."""
        where = f"{redact_url(resp.url)}: {what}: HTTP {resp.status_code}"
        detail = _error_detail(resp)
        message = f"{where} ({detail})" if detail else where
        if resp.status_code in (404, 410):
            return NotFound(message)
        if resp.status_code in (401, 403):
            return AuthError(message)
        return FetchError(message, retriable=resp.status_code >= 500
                          or resp.status_code in (408, 429))

    def close(self) -> None:
        self.http.close()


def _error_detail(resp: requests.Response) -> str:
    """ "CODE: message" of the first error in a registry's JSON error body, or ""."""
    try:
        body = resp.raw.read(_ERROR_BODY_BYTES, decode_content=True)
        errors = json.loads(body)["errors"]
        return "; ".join(f"{e['code']}: {e.get('message', '')}".strip(": ")
                         for e in errors[:3])[:300]
    except (ValueError, KeyError, IndexError, TypeError, OSError,
            urllib3.exceptions.HTTPError, requests.exceptions.RequestException):
        return ""
