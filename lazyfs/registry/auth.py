"""Registry credentials and the distribution API's authentication dance.

Credentials come from the files docker, podman and skopeo write at login, first match wins:

    $REGISTRY_AUTH_FILE                       containers-auth.json (podman, skopeo, buildah)
    $XDG_RUNTIME_DIR/containers/auth.json     podman's default
    ~/.config/containers/auth.json            podman's fallback
    $DOCKER_CONFIG/config.json, else ~/.docker/config.json

All share one shape: `{"auths": {"REGISTRY": {"auth": base64("user:password")}}}`. Credential
helpers (`credsStore`, `credHelpers`) and identity tokens are not supported: they run programs
or speak OAuth, and a read-only mount should not.

The dance (`RegistryAuth`, a requests auth hook, so HttpSource's ranged blob GETs use it too):
a request goes out with the best Authorization we have (none at first). A 401 from the registry
carries a challenge: `Basic realm=...` (send the credentials), or `Bearer realm=URL,
service=S,scope=repository:REPO:pull` (ask URL for a token for that scope, with the credentials
if we have some, and send the token). The request is retried once with the new Authorization;
a second 401 means the credentials were refused (or the token does not grant the scope), and
is an AuthError. Tokens are cached per scope; a token the registry stops accepting (expired,
revoked) gets a 401 like any other, so it is replaced and the request retried once.

Secrets never reach a message: Credentials hides its password from repr, errors name the user
and the file, and URLs are shown without their query.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
import requests.auth
import urllib3
from requests.utils import rewind_body

from lazyfs.errors import AuthError, FormatError, NotFound
from lazyfs.source.http import redact_url

# Token responses are a few KiB of JSON; anything bigger is not one.
MAX_TOKEN_RESPONSE_BYTES = 1 << 20
# The distribution spec's default lifetime when a token response does not say.
DEFAULT_TOKEN_LIFETIME_S = 60
# A token this close to its announced expiry is not sent: a request that would race the expiry
# costs a 401 round trip, asking for a new token costs the same and then works.
_EXPIRY_MARGIN_S = 5
# A 401's body is an error document; read this much so the connection can be reused.
_DRAIN_BYTES = 64 * 1024

_CHALLENGE_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')


# --- Credentials ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    source: str  # the file they came from, for messages

    def basic_header(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def auth_files() -> list[tuple[str, bool]]:
    """(path, named explicitly) of every credentials file to look in, in order."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append((os.environ["REGISTRY_AUTH_FILE"], True))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append((os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"),
                      False))
    home = os.path.expanduser("~")
    files.append((os.path.join(home, ".config", "containers", "auth.json"), False))
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    files.append((os.path.join(docker_dir, "config.json"), False))
    return files


def find_credentials(registry: str, repository: str) -> Credentials | None:
    """The credentials for `registry` (host[:port]) from the first file that has some."""
    for path, explicit in auth_files():
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_TOKEN_RESPONSE_BYTES + 1)
        except FileNotFoundError:
            if explicit:
                raise NotFound(f"$REGISTRY_AUTH_FILE names {path}, which does not exist") from None
            continue
        except OSError as exc:
            raise AuthError(f"cannot read credentials file {path}: {exc.strerror}") from None
        found = _credentials_in(data, path, registry, repository)
        if found is not None:
            return found
    return None


def _credentials_in(data: bytes, path: str, registry: str,
                    repository: str) -> Credentials | None:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{path}: not a JSON credentials file") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        return None
    # Keys are "host[:port]", perhaps with a scheme and a /v1/ or /v2/ suffix (docker's
    # "https://index.docker.io/v1/"), or with a repository path (podman: the longest match).
    best_key, best_length = None, -1
    for key in auths:
        host, _, namespace = _auth_key_name(key).partition("/")
        if not _same_registry(host, registry):
            continue
        if namespace and not f"{repository}/".startswith(f"{namespace}/"):
            continue
        if len(namespace) > best_length:
            best_key, best_length = key, len(namespace)
    if best_key is None:
        return None
    entry = auths[best_key]
    where = f"{path}: auths.{best_key}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: not an object")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, sep, password = base64.b64decode(entry["auth"], validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise FormatError(f"{where}.auth: not base64 of user:password") from None
        if not sep:
            raise FormatError(f"{where}.auth: not base64 of user:password")
        return Credentials(username, password, path)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], path)
    if entry.get("identitytoken"):
        raise AuthError(f"{where}: identity tokens (OAuth refresh tokens) are not supported; "
                        "log in with a user name and password or token")
    return None


def _auth_key_name(key: str) -> str:
    name = key.split("://", 1)[-1].rstrip("/")
    for suffix in ("/v1", "/v2"):
        name = name.removesuffix(suffix)
    return name


# Docker Hub is written several ways; its credentials are conventionally under the first.
_DOCKER_HUB = ("index.docker.io", "docker.io", "registry-1.docker.io")


def _same_registry(key_host: str, registry: str) -> bool:
    if key_host == registry:
        return True
    return key_host in _DOCKER_HUB and registry in _DOCKER_HUB


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: where plain http cannot be sniffed off a network."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the defaults filled in: what "the same server" means."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


# --- Challenges ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    scheme: str               # "basic" or "bearer" (lower case), "" when there was none
    params: dict[str, str]    # realm, service, scope, error...


def parse_challenge(header: str) -> Challenge:
    """The first challenge of a WWW-Authenticate header (registries send one)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        value = match[2]
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match[1].lower()] = value
    return Challenge(scheme.lower(), params)


@dataclass
class _Token:
    header: str
    expires_at: float  # time.monotonic() seconds

    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at - _EXPIRY_MARGIN_S


# --- The requests hook ---------------------------------------------------------------------------

class RegistryAuth(requests.auth.AuthBase):
    """Authorization for one registry's requests; shared by every session that talks to it
    (the store's and each blob source's), so a token fetched by one serves all. Thread-safe."""

    def __init__(self, registry: str, api_url: str, credentials: Credentials | None):
        self.registry = registry     # as the user named it, for messages
        # Where the API is: only requests there get credentials, only its 401s are answered.
        self.origin = origin_of(api_url)
        self.credentials = credentials
        self.token_requests = 0      # for tests: how many tokens were asked for
        self._lock = threading.Lock()
        self._basic = False          # the registry asked for Basic: send it up front
        self._tokens: dict[str, _Token] = {}
        self._scope: str | None = None  # the scope of the last token obtained

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        # Only the registry gets credentials. HttpSource sends later reads of a redirected blob
        # straight to the storage URL it remembered, through this same session.
        if origin_of(request.url) != self.origin:
            return request
        header = self._current_header()
        if header is not None:
            request.headers["Authorization"] = header
        request.register_hook("response", self._on_response)
        return request

    def _current_header(self) -> str | None:
        with self._lock:
            if self._basic and self.credentials is not None:
                return self.credentials.basic_header()
            token = self._tokens.get(self._scope) if self._scope is not None else None
            return token.header if token is not None and token.fresh() else None

    def _on_response(self, resp: requests.Response, **send_kwargs) -> requests.Response:
        # Redirect targets (blob storage) keep this hook when requests follows a redirect; their
        # refusals are theirs (HttpSource re-resolves an expired redirect), not a challenge.
        if resp.status_code != 401 or origin_of(resp.url) != self.origin:
            return resp
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        sent = resp.request.headers.get("Authorization")
        _drain(resp)
        header = self._answer(challenge, sent, resp.connection, send_kwargs)
        retry = resp.request.copy()
        if getattr(retry, "_body_position", None) is not None:
            rewind_body(retry)   # a streamed upload body is sent again from its start
        retry.headers["Authorization"] = header
        again = resp.connection.send(retry, **send_kwargs)
        if again.status_code == 401 and origin_of(again.url) == self.origin:
            detail = _registry_error_detail(again)
            _drain(again)
            raise AuthError(self._refused(detail))
        return again

    def _answer(self, challenge: Challenge, sent: str | None, adapter,
                send_kwargs: dict) -> str:
        """The Authorization header to retry with; AuthError when there is none to give."""
        if challenge.scheme == "basic":
            if self.credentials is None:
                raise AuthError(self._missing())
            if sent is not None and sent.lower().startswith("basic "):
                raise AuthError(self._refused(""))
            with self._lock:
                self._basic = True
            return self.credentials.basic_header()
        if challenge.scheme != "bearer" or not challenge.params.get("realm"):
            raise AuthError(f"{self.registry}: HTTP 401 without a Basic or Bearer challenge "
                            "this client can answer")
        scope = challenge.params.get("scope", "")
        with self._lock:
            token = self._tokens.get(scope)
            if token is not None and token.header != sent and token.fresh():
                self._scope = scope     # another thread already renewed it
                return token.header
            token = self._fetch_token(challenge, adapter, send_kwargs)
            self._tokens[scope] = token
            self._scope = scope
            return token.header

    def _fetch_token(self, challenge: Challenge, adapter, send_kwargs: dict) -> _Token:
        realm = challenge.params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AuthError(f"{self.registry}: token realm {redact_url(realm)} is not an "
                            "http(s) URL")
        params = [(key, challenge.params[key]) for key in ("service", "scope")
                  if challenge.params.get(key)]
        request = requests.Request("GET", realm, params=params,
                                   headers={"User-Agent": "lazyfs",
                                            "Accept-Encoding": "identity"})
        if self.credentials is not None:
            if parts.scheme == "http" and not is_loopback(parts.hostname):
                raise AuthError(f"{self.registry}: refusing to send credentials over plain "
                                f"http to the token service {redact_url(realm)}")
            request.auth = requests.auth.HTTPBasicAuth(self.credentials.username,
                                                       self.credentials.password)
        self.token_requests += 1
        where = f"{self.registry}: token service {redact_url(realm)}"
        try:
            resp = adapter.send(request.prepare(), **dict(send_kwargs, stream=True))
        except requests.exceptions.RequestException as exc:
            raise AuthError(f"{where}: request failed ({type(exc).__name__})") from None
        with resp:
            if resp.status_code in (401, 403):
                raise AuthError(self._refused(f"the token service answered HTTP "
                                              f"{resp.status_code}"))
            if resp.status_code != 200:
                raise AuthError(f"{where}: HTTP {resp.status_code}")
            body = resp.raw.read(MAX_TOKEN_RESPONSE_BYTES + 1, decode_content=True)
        return _parse_token_response(body, where)

    def _missing(self) -> str:
        files = ", ".join(path for path, _ in auth_files())
        return (f"{self.registry}: the registry requires authentication and no credentials "
                f"for it were found (looked in {files}); log in with `docker login` or "
                "`podman login`, or point $REGISTRY_AUTH_FILE at a credentials file")

    def _refused(self, detail: str) -> str:
        detail = f" ({detail})" if detail else ""
        if self.credentials is None:
            return (f"{self.registry}: anonymous access denied{detail}; log in with "
                    "`docker login` or `podman login`, or set $REGISTRY_AUTH_FILE")
        return (f"{self.registry}: access denied for user {self.credentials.username!r} "
                f"(credentials from {self.credentials.source}){detail}")


def _parse_token_response(body: bytes, where: str) -> _Token:
    if len(body) > MAX_TOKEN_RESPONSE_BYTES:
        raise AuthError(f"{where}: token response larger than {MAX_TOKEN_RESPONSE_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AuthError(f"{where}: token response is not JSON") from None
    if not isinstance(document, dict):
        raise AuthError(f"{where}: token response is not a JSON object")
    # "token" is the distribution spec's name, "access_token" OAuth2's; servers send either.
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n "):
        raise AuthError(f"{where}: token response without a usable token")
    lifetime_s = document.get("expires_in")
    if not isinstance(lifetime_s, (int, float)) or isinstance(lifetime_s, bool) or lifetime_s <= 0:
        lifetime_s = DEFAULT_TOKEN_LIFETIME_S
    return _Token(f"Bearer {token}", time.monotonic() + lifetime_s)


def _registry_error_detail(resp: requests.Response) -> str:
    """The first error code of a registry's JSON error body ("UNAUTHORIZED: ..."), or ""."""
    try:
        body = resp.raw.read(_DRAIN_BYTES, decode_content=True)
        error = json.loads(body)["errors"][0]
        return f"{error['code']}: {error.get('message', '')}".strip(": ")[:200]
    except (ValueError, KeyError, IndexError, TypeError, OSError,
            urllib3.exceptions.HTTPError, requests.exceptions.RequestException):
        return ""


def _drain(resp: requests.Response) -> None:
    """Read a small error body and release the connection (closing unread would drop it)."""
    try:
        resp.raw.read(_DRAIN_BYTES, decode_content=False)
    except (OSError, urllib3.exceptions.HTTPError, requests.exceptions.RequestException):
        pass  # the connection is dropped instead of reused: nothing else is lost
    resp.close()
