"""A blob in an S3 bucket or an S3-compatible store (MinIO, Ceph RGW, ...), read with ranged
GetObject calls.

Signing, credentials and endpoints are botocore's: the standard AWS chain (environment
variables, ~/.aws/credentials and ~/.aws/config, AWS_PROFILE, SSO, web identity, container and
instance metadata), `$AWS_ENDPOINT_URL_S3` / `$AWS_ENDPOINT_URL` or `--s3-endpoint`, and the
region from the usual places. Nothing here parses a credential or computes a signature.

botocore's own retries are off (one attempt per call): the fetcher owns retries and must see
every failure, so a source only maps each error to NotFound or a FetchError that says whether
a retry could help. Clients are thread-safe, so one client per source serves all the fetcher's
worker threads; its connection pool is sized to the fetcher's connections (`set_pool_size`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence

from lazyfs.errors import FetchError, LazyfsError, NotFound, RangeNotSupported
from lazyfs.source import CONTENT_RANGE, check_content_range, check_range
from lazyfs.source.http import POOL_CONNECTIONS, redact_url

# botocore logs every request's headers at DEBUG, session tokens included, and `lazyfs --debug`
# turns on DEBUG for every logger: a debug log must never hold a secret. (Its INFO lines, such
# as where credentials were found, would only clutter a command's one-line error.)
for _name in ("botocore", "boto3", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.WARNING)

log = logging.getLogger(__name__)


_READ_BLOCK_BYTES = 256 * 1024  # body pieces handed to the fetcher as they arrive

# S3 error codes, by what they mean for the caller. Codes a HEAD reply cannot carry (it has no
# body) arrive as the bare HTTP status instead ("403", "404").
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                               "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId",
                               "AuthorizationHeaderMalformed"})
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"})
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                              "RequestThrottled", "TooManyRequests", "InternalError",
                              "ServiceUnavailable"})

_session_lock = threading.Lock()
# One session per process: credentials are resolved once, not once per blob.
_sessions: tuple | None = None  # (botocore session, boto3 session over it)


def parse_s3_url(url: str, *, key_required: bool = True) -> tuple[str, str]:
    """(bucket, key) of "s3://bucket/key"; the key may be a prefix when not required."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket or "@" in bucket or ":" in bucket:
        raise FetchError(f"{redact_url(url)}: not an s3://BUCKET/KEY URL")
    if key_required and (not key or key.endswith("/")):
        raise FetchError(f"{url}: names no object (expected s3://BUCKET/KEY)")
    return bucket, key


def make_client(endpoint_url: str | None, timeout: float | tuple[float, float],
                max_connections: int, *, attempts: int = 1):
    """A boto3 S3 client: thread-safe, `max_connections` pooled connections, `attempts` tries
    per call (1 for the fetcher's sources, which retry themselves).

    `timeout` is in seconds: one number for both, or (connect, read); the read timeout bounds
    each wait for bytes, not the whole transfer.
    """
    import botocore.config
    import botocore.exceptions

    connect_s, read_s = (tuple(timeout) if isinstance(timeout, (tuple, list))
                         else (timeout, timeout))
    try:
        # Reading the profile here turns a missing AWS_PROFILE or a broken config file into
        # one clear error, before any request.
        core_session, session = _shared_sessions()
        core_session.get_scoped_config()
    except botocore.exceptions.BotoCoreError as exc:
        raise FetchError(f"S3: AWS configuration: {exc}") from exc
    config = botocore.config.Config(
        connect_timeout=connect_s, read_timeout=read_s,
        max_pool_connections=max(1, max_connections),
        retries={"total_max_attempts": attempts, "mode": "standard"},
        # Newer botocore adds CRC checksums to every upload and asks for them on downloads,
        # which several S3-compatible stores reject; blobs are content-addressed and every
        # byte lazyfs uses is checked against its digest anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="lazyfs")
    try:
        with _session_lock:  # botocore sessions are not thread-safe; the clients they make are
            return session.client("s3", endpoint_url=endpoint_url or None, config=config)
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise FetchError(f"S3 endpoint {redact_url(endpoint_url or '')}: {exc}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise FetchError(f"S3: cannot make a client: {exc}") from exc


def _shared_sessions():
    global _sessions
    with _session_lock:
        if _sessions is None:
            import boto3.session
            import botocore.session

            core_session = botocore.session.Session()
            _sessions = core_session, boto3.session.Session(botocore_session=core_session)
        return _sessions


def map_error(exc: BaseException, where: str, what: str) -> LazyfsError:
    """The lazyfs error for a botocore failure of `what` on `where` (s3://bucket/key).

    Messages are built from the error code, the HTTP status and S3's own short message; never
    from the request, whose headers carry the signature and a session token.
    """
    import botocore.exceptions as bx

    if isinstance(exc, bx.ClientError):
        return _client_error(exc, where, what)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return FetchError(f"{where}: {what}: no usable AWS credentials ({_brief(exc)}); set "
                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                          "~/.aws/credentials")
    if isinstance(exc, (bx.ProfileNotFound, bx.InvalidConfigError)):
        return FetchError(f"{where}: {what}: AWS configuration: {_brief(exc)}")
    if isinstance(exc, bx.CredentialRetrievalError):
        # A credential provider (SSO, assume-role, metadata) failed: often a network blip.
        return FetchError(f"{where}: {what}: cannot get AWS credentials: {_brief(exc)}",
                          retriable=True)
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return FetchError(f"{where}: {what} timed out", retriable=True)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError,
                        bx.ResponseStreamingError, bx.IncompleteReadError,
                        bx.HTTPClientError, OSError)):
        return FetchError(f"{where}: {what} failed: {_brief(exc)}", retriable=True)
    if isinstance(exc, bx.BotoCoreError):
        return FetchError(f"{where}: {what}: {_brief(exc)}")
    return FetchError(f"{where}: {what}: {type(exc).__name__}")


def is_missing_key(exc: BaseException) -> bool:
    """A "no such key" reply (not a missing bucket, which is the user's mistake to report)."""
    import botocore.exceptions

    if not isinstance(exc, botocore.exceptions.ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("NoSuchKey", "404", "NotFound")


def _client_error(exc, where: str, what: str) -> LazyfsError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    server_says = str(error.get("Message") or "").strip()[:200]
    detail = (f"HTTP {status}" if code in ("", str(status)) else f"{code}, HTTP {status}") + (
        f": {server_says}" if server_says and server_says != code else "")
    if code in _MISSING_CODES or status == 404:
        what_is_missing = "no such bucket" if code == "NoSuchBucket" else "not found"
        return NotFound(f"{where}: {what}: {what_is_missing} ({detail})")
    if code in _CREDENTIAL_CODES:
        return FetchError(f"{where}: {what}: the store refused the AWS credentials ({detail}); "
                          "check AWS_PROFILE, AWS_ACCESS_KEY_ID or ~/.aws/credentials, and the "
                          "region (AWS_REGION)")
    if code in _DENIED_CODES or status == 403:
        return FetchError(f"{where}: {what}: access denied ({detail}); the credentials need "
                          "s3:GetObject on the bucket's objects (without s3:ListBucket, a "
                          "missing key is also reported as access denied)")
    if code in ("InvalidRange",) or status == 416:
        return FetchError(f"{where}: {what}: past the end of the blob ({detail})")
    if status in (301, 307) or code in ("PermanentRedirect", "TemporaryRedirect"):
        return FetchError(f"{where}: {what}: the bucket is in another region or behind "
                          f"another endpoint ({detail}); set AWS_REGION or --s3-endpoint")
    retriable = code in _TRANSIENT_CODES or status >= 500 or status in (408, 429)
    return FetchError(f"{where}: {what}: {detail}", retriable=retriable)


def _brief(exc: BaseException) -> str:
    """botocore's message, which names endpoints and providers but never a secret."""
    return str(exc)[:300] or type(exc).__name__


class S3Source:
    """One object, `s3://bucket/key`, read with ranged GETs; thread-safe."""

    def __init__(self, location: str, endpoint_url: str | None = None,
                 timeout: float | tuple[float, float] = 30,
                 max_connections: int = POOL_CONNECTIONS):
        self.url = location
        self.bucket, self.key = parse_s3_url(location)
        self.requests = 0
        self._endpoint_url = endpoint_url
        self._timeout = timeout
        self._pool_size = max_connections
        self._client = make_client(endpoint_url, timeout, max_connections)
        self._count_lock = threading.Lock()
        # Held while probing the size, so that threads asking at once cost one HEAD.
        self._size_lock = threading.Lock()
        self._blob_size: int | None = None

    def describe(self) -> str:
        return self.url

    def set_pool_size(self, max_connections: int) -> None:
        """Keep up to `max_connections` connections alive (the fetcher's per-source bound).

        botocore fixes a client's pool when the client is made, so this makes a new client
        (cheap: the session's models and credentials are shared); requests still running on
        the old one finish on it."""
        if max_connections != self._pool_size:
            self._pool_size = max_connections
            self._client = make_client(self._endpoint_url, self._timeout, max_connections)

    def size(self) -> int:
        with self._size_lock:
            if self._blob_size is None:
                self._blob_size = self._probe_size()
            return self._blob_size

    def read(self, blob_offset: int, length: int) -> bytes:
        check_range(blob_offset, length)
        if length == 0:
            return b""  # "bytes=a-(a-1)" is not a range; nothing to ask for
        return b"".join(self._range_pieces(blob_offset, length))

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """`(index, piece)` for each `(blob_offset, length)`, streamed as the bytes arrive.
        S3 has no multi-range GET, so each range is its own request."""
        for index, (blob_offset, length) in enumerate(ranges):
            check_range(blob_offset, length)
            if length:
                for piece in self._range_pieces(blob_offset, length):
                    yield index, piece

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "S3Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------

    def _call(self, operation: str, what: str, **params):
        with self._count_lock:
            self.requests += 1
        try:
            return getattr(self._client, operation)(Bucket=self.bucket, Key=self.key, **params)
        except Exception as exc:  # botocore raises many unrelated types; all are mapped
            raise map_error(exc, self.url, what) from exc

    def _range_pieces(self, blob_offset: int, length: int) -> Iterator[bytes]:
        blob_end = blob_offset + length - 1  # inclusive, as HTTP counts
        wanted = f"bytes={blob_offset}-{blob_end}"
        resp = self._call("get_object", f"GET {wanted}", Range=wanted)
        body = resp["Body"]
        try:
            if resp["ResponseMetadata"]["HTTPStatusCode"] != 206:
                raise RangeNotSupported(f"{self.url}: the store ignored the Range header "
                                        f"(HTTP {resp['ResponseMetadata']['HTTPStatusCode']} "
                                        f"for {wanted}); lazy reads need byte ranges")
            total = self._check_content_range(resp.get("ContentRange"), blob_offset, blob_end,
                                              wanted)
            got = 0
            while got < length:
                piece = self._read_body(body, min(_READ_BLOCK_BYTES, length - got), got)
                if not piece:
                    raise FetchError(f"{self.url}: body ended after {got} of {length} bytes "
                                     f"for {wanted}", retriable=True)
                got += len(piece)
                yield piece
            if self._read_body(body, 1, got):
                raise RangeNotSupported(f"{self.url}: body longer than the {length} bytes of "
                                        f"{wanted}")
        finally:
            body.close()
        if self._blob_size is None:
            self._blob_size = total  # a free size: saves the HEAD if size() is asked later

    def _read_body(self, body, limit_bytes: int, got: int) -> bytes:
        try:
            return body.read(limit_bytes)
        except Exception as exc:
            # Read timeouts and connections cut mid-body (botocore checks Content-Length at
            # the end) are worth retrying.
            raise map_error(exc, self.url, f"reading the body after {got} bytes") from exc

    def _check_content_range(self, header: str | None, blob_offset: int, blob_end: int,
                             wanted: str) -> int:
        """The object's size from a Content-Range that must be exactly the range asked for."""
        total = check_content_range(header or "", blob_offset, blob_end, where=self.url,
                                    wanted=wanted, known_size=self._blob_size)
        if total is None:
            raise RangeNotSupported(f"{self.url}: Content-Range {header!r} for {wanted} does "
                                    "not say the object's size")
        return total

    def _probe_size(self) -> int:
        try:
            return int(self._call("head_object", "HEAD")["ContentLength"])
        except NotFound:
            raise
        except FetchError as exc:
            if exc.retriable:
                raise
            # HEAD refused (a policy or proxy that allows only GET): a one-byte range tells
            # the size in its Content-Range.
            refused = exc
        log.info("%s: HEAD refused, asking for byte 0 instead: %s", self.url, refused)
        resp = self._call("get_object", "size probe (GET bytes=0-0 after a refused HEAD)",
                          Range="bytes=0-0")
        resp["Body"].close()
        match = CONTENT_RANGE.fullmatch((resp.get("ContentRange") or "").strip())
        if match is None or match[1] != "0" or match[3] == "*":
            raise RangeNotSupported(f"{self.url}: cannot learn the size: Content-Range "
                                    f"{resp.get('ContentRange')!r} for bytes=0-0")
        return int(match[3])
