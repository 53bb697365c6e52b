"""OCI layouts in S3 buckets (and S3-compatible stores): the `s3://` opener of lazyfs.imageref,
and the store `lazyfs push` writes a layout through.

    s3://BUCKET/PREFIX/layout:TAG          the image tagged TAG in the layout under PREFIX/layout/
    s3://BUCKET/PREFIX/layout@sha256:...   the manifest with that digest
    s3://BUCKET/PREFIX/layout/             the layout's only image
    s3://BUCKET/KEY                        anything else: a lone blob (lazyfs.source.s3.S3Source)

A layout in a bucket is the same files as on disk, one object each: `PREFIX/layout/oci-layout`,
`PREFIX/layout/index.json`, `PREFIX/layout/blobs/sha256/<hex>`. Reading one needs s3:GetObject
on those keys, nothing else (no listing).

Documents and uploads are one-shot calls outside the fetcher, so botocore's standard retries
(a few attempts with backoff) cover their transient failures; the blob sources given to mounts
make one attempt per call and leave retries to the fetcher.
"""

from __future__ import annotations

from typing import Callable

from lazyfs.errors import FormatError, NotFound
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor
from lazyfs.imageref import LoneBlob, SourceOptions, split_layout_url
from lazyfs.oci_layout import MAX_JSON_BYTES, Reference
from lazyfs.source.http import POOL_CONNECTIONS
from lazyfs.source.s3 import S3Source, is_missing_key, make_client, map_error, parse_s3_url

# Attempts per call for documents and uploads (botocore's standard mode: exponential backoff,
# throttling and 5xx retried, other 4xx not).
STORE_ATTEMPTS = 3


class S3Layout:
    """An OCI layout under an S3 prefix: a RemoteStore for reading (lazyfs.imageref) and a
    LayoutStore for writing (lazyfs push). Keys are relative to the layout: "index.json",
    "blobs/sha256/<hex>". Thread-safe."""

    def __init__(self, base_url: str, sources: SourceOptions | None = None,
                 max_connections: int = POOL_CONNECTIONS):
        sources = sources or SourceOptions()
        base_url = base_url.rstrip("/")
        self.name = base_url
        self.bucket, self.prefix = parse_s3_url(base_url, key_required=False)
        self._endpoint_url = sources.s3_endpoint
        self._timeout = sources.timeout
        self._max_connections = max_connections
        self._client = make_client(self._endpoint_url, self._timeout, max_connections,
                                   attempts=STORE_ATTEMPTS)

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    # -- RemoteStore: reading an image ------------------------------------------------------

    def index(self, reference: Reference) -> oci.Index:
        data = self.get("index.json", MAX_JSON_BYTES)
        if data is None:
            raise NotFound(f"{self.name}: no index.json there (not an OCI layout, or not "
                           "uploaded yet)")
        return oci.parse_index(data, self.url("index.json"))

    def fetch(self, desc: Descriptor, max_bytes: int) -> bytes:
        key = oci.blob_relpath(desc.digest)
        data = self.get(key, max_bytes)
        if data is None:
            raise NotFound(f"{self.url(key)}: blob {desc.digest} is missing from the layout")
        return data

    def open_blob(self, desc: Descriptor) -> S3Source:
        return S3Source(self.url(oci.blob_relpath(desc.digest)), endpoint_url=self._endpoint_url,
                        timeout=self._timeout)

    # -- LayoutStore: a layout's flat key space -------------------------------------------------

    def exists(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is none."""
        try:
            reply = self._client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as exc:
            if is_missing_key(exc):  # HEAD replies have no body: 404 is all they say
                return None
            raise map_error(exc, self.url(key), "HEAD") from exc
        return int(reply["ContentLength"])

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """The whole object, or None when there is no such key; FormatError beyond
        `max_bytes` (a document that big is not one lazyfs wrote)."""
        where = self.url(key)
        try:
            reply = self._client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except Exception as exc:
            if is_missing_key(exc):
                return None
            raise map_error(exc, where, "GET") from exc
        body = reply["Body"]
        try:
            if int(reply.get("ContentLength", 0)) > max_bytes:
                raise FormatError(f"{where}: {reply['ContentLength']} bytes, more than the "
                                  f"{max_bytes} bytes allowed")
            try:
                data = body.read(max_bytes + 1)
            except Exception as exc:
                raise map_error(exc, where, "reading the body") from exc
        finally:
            body.close()
        if len(data) > max_bytes:
            raise FormatError(f"{where}: more than the {max_bytes} bytes allowed")
        return data

    def put_file(self, key: str, path: str, progress: Callable[[int], None]) -> None:
        """Upload a file with boto3's managed transfer (multipart above 8 MiB, parts in
        parallel). S3 makes an object visible only once it is whole, multipart included.
        `progress(n)` gets the bytes sent since its last call; n is negative when a part is
        sent again after a failure."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(max_concurrency=self._max_connections)
        try:
            self._client.upload_file(path, self.bucket, self.object_key(key), Callback=progress,
                                     Config=config)
        except Exception as exc:
            raise map_error(_unwrap_upload_error(exc), self.url(key), "upload") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data)
        except Exception as exc:
            raise map_error(exc, self.url(key), "PUT") from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "S3Layout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unwrap_upload_error(exc: BaseException) -> BaseException:
    """boto3 turns a ClientError of an upload into an S3UploadFailedError that only quotes it;
    the ClientError (its context) has the code and status to map."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        return exc.__context__
    return exc


# The name lazyfs.push imports: the same class, constructed as S3PushStore(base_url, sources).
S3PushStore = S3Layout


def open_s3_store(ref: str, sources: SourceOptions) -> tuple[S3Layout, Reference] | LoneBlob:
    """The imageref opener for s3:// references (see the module docstring for the shapes)."""
    base, tag, digest = split_layout_url(ref)
    if base is None:
        return LoneBlob(ref)
    return S3Layout(base, sources), Reference(base, tag, digest)
