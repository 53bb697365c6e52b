"""Real registries on loopback for tests: Debian's docker-registry (the distribution project's
reference registry), an image pushed into it by Debian's skopeo, and what real deployments put
around registries: a token service and storage that blob GETs are redirected to.

    with RegistryServer(tmp) as registry:                      # anonymous pull and push
        push_layout(layout, TAG, f"{registry.host}/repo:{TAG}")
    with TokenService({"alice": "pw"}) as tokens, \\
         RegistryServer(tmp, auth=tokens.registry_auth(tmp)) as registry: ...
    with RegistryServer(tmp, auth=htpasswd_auth(tmp, {"alice": "pw"})) as registry: ...
    with RedirectingProxy(registry.url, uses_per_url=2) as proxy: ...   # blobs -> 307 -> storage

The registry's config is JSON (YAML's subset) in its own temp dir, storage on the filesystem.
Tokens are JWTs built here with `cryptography` (ES256, the signing certificate in the x5c
header, chained to a CA the registry trusts): no JWT library needed.
"""

from __future__ import annotations

import atexit
import base64
import datetime
import hashlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.servers import ThreadedHttpServer, free_port

DOCKER_REGISTRY = "/usr/bin/docker-registry"
SKOPEO = "/usr/bin/skopeo"
_START_TIMEOUT_S = 15.0
SERVICE = "lazyfs-test-registry"
ISSUER = "lazyfs-test-token-service"


def registry_missing_reason() -> str | None:
    """Why registry tests must skip, or None when they can run."""
    if not os.access(DOCKER_REGISTRY, os.X_OK):
        return f"{DOCKER_REGISTRY} not found (apt-get install -y docker-registry)"
    if not os.access(SKOPEO, os.X_OK):
        return f"{SKOPEO} not found (apt-get install -y skopeo)"
    return None


class RegistryServer:
    """docker-registry on 127.0.0.1:<free port>, filesystem storage under a temp dir, with an
    `auth` section (None: anonymous pull and push). Its log (JSON lines) is `log_text()`."""

    def __init__(self, auth: dict | None = None):
        self.auth = auth
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> "RegistryServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        reason = registry_missing_reason()
        if reason:
            raise RuntimeError(reason)
        self._dir = Path(tempfile.mkdtemp(prefix="lazyfs-registry-"))
        for _ in range(3):
            self.port = free_port()
            if self._try_start():
                return
        raise RuntimeError(f"docker-registry could not bind a free port:\n{self.log_text()}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def log_text(self) -> str:
        path = self._dir / "registry.log" if self._dir else None
        return path.read_text(errors="replace") if path and path.exists() else "(no log)"

    def _config(self) -> dict:
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json"},
            "storage": {"filesystem": {"rootdirectory": str(self._dir / "storage")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if self.auth:
            config["auth"] = self.auth
        return config

    def _try_start(self) -> bool:
        config = self._dir / "config.yml"
        config.write_text(json.dumps(self._config()))
        log = self._dir / "registry.log"
        with open(log, "wb") as log_file:
            # A clean environment: REGISTRY_* variables would override the config.
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            self._proc = subprocess.Popen([DOCKER_REGISTRY, "serve", str(config)],
                                          stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                if "address already in use" in self.log_text():
                    return False
                raise RuntimeError(f"docker-registry exited at start:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError:
                return True   # 401: up, and demanding auth
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer within {_START_TIMEOUT_S} s")


def push_layout(layout: str | os.PathLike, tag: str, destination: str,
                creds: str | None = None) -> None:
    """skopeo copy of the layout's image to docker://DESTINATION (plain http, loopback)."""
    command = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
               f"docker://{destination}"]
    if creds:
        command[2:2] = ["--dest-creds", creds]
    with tempfile.TemporaryDirectory() as empty:
        # No credentials but the ones given: the machine's own login files stay out of tests.
        auth_file = Path(empty) / "auth.json"
        auth_file.write_text("{}")
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "REGISTRY_AUTH_FILE": str(auth_file)})
    if done.returncode != 0:
        raise AssertionError(f"skopeo copy failed: {done.stderr}")


# --- Basic auth ------------------------------------------------------------------------------

def htpasswd_auth(directory: str | os.PathLike, users: dict[str, str]) -> dict:
    """The registry's `auth` section for Basic auth with these users (bcrypt hashes, the only
    kind docker-registry's htpasswd reads, from the system's crypt(3))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt   # removed in Python 3.13; bookworm's Python is 3.11
    lines = [f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"
             for user, password in users.items()]
    path = Path(directory) / "htpasswd"
    path.write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": "lazyfs-test", "path": str(path)}}


# --- Token auth ------------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenService(ThreadedHttpServer):
    """The registry's token endpoint (GET /token?service=&scope=): users with the right
    password get the actions they ask for, anonymous callers get `anonymous_actions` (none by
    default: anonymous pull denied), wrong passwords a 401.

    `next_token_lifetime_s` makes the next token expire that soon: its signing certificate's
    validity ends then, which the registry checks on every request (its `exp` check allows a
    minute of clock skew, too long for a test). `issued` counts tokens handed out."""

    def __init__(self, users: dict[str, str], anonymous_actions: tuple[str, ...] = ()):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = users
        self.anonymous_actions = anonymous_actions
        self.issued = 0
        self.refused = 0
        self.next_token_lifetime_s: float | None = None
        self._lock = threading.Lock()
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazyfs test token CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._ca_name = ca_name
        self._ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                         .public_key(self._ca_key.public_key())
                         .serial_number(x509.random_serial_number())
                         .not_valid_before(now - datetime.timedelta(minutes=5))
                         .not_valid_after(now + datetime.timedelta(days=1))
                         .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
                         .add_extension(x509.KeyUsage(False, False, False, False, False, True,
                                                      True, False, False), critical=True)
                         .sign(self._ca_key, hashes.SHA256()))
        self._listen_routing({"GET": self._handle})

    def registry_auth(self, directory: str | os.PathLike) -> dict:
        """The registry's `auth` section trusting this service."""
        from cryptography.hazmat.primitives import serialization

        bundle = Path(directory) / "token-ca.pem"
        bundle.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        return {"token": {"realm": f"{self.url}/token", "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(bundle)}}

    def _handle(self, handler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        user = self._authenticated_user(handler.headers.get("Authorization", ""))
        if user is False:
            with self._lock:
                self.refused += 1
            body = b'{"details":"bad credentials"}'
            handler.send_response(401)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = actions.split(",") if user else [a for a in actions.split(",")
                                                       if a in self.anonymous_actions]
            access.append({"type": kind, "name": name, "actions": granted})
        with self._lock:
            lifetime_s, self.next_token_lifetime_s = self.next_token_lifetime_s, None
            self.issued += 1
        token = self._token(user or "", access, lifetime_s)
        # expires_in is the default hour even for a short-lived token: the client must notice
        # the expiry from the registry's 401, as it would for a revoked token.
        body = json.dumps({"token": token, "expires_in": 3600}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _authenticated_user(self, header: str) -> str | None | bool:
        """The user name, None for anonymous, False for wrong credentials."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        user, _, password = base64.b64decode(value).decode().partition(":")
        if self.users.get(user) != password:
            return False
        return user

    def _token(self, subject: str, access: list, lifetime_s: float | None) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        ends = now + datetime.timedelta(seconds=lifetime_s or 3600)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer")]))
                .issuer_name(self._ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(ends)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self._ca_key, hashes.SHA256()))
        header = {"typ": "JWT", "alg": "ES256",
                  "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER))
                          .decode("ascii")]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "iat": int(now.timestamp()),
                  "nbf": int(now.timestamp()) - 60, "exp": int(ends.timestamp()),
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def write_auth_file(path: str | os.PathLike, registry: str, user: str, password: str) -> str:
    """A containers-auth.json / docker config.json with one registry's credentials."""
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    Path(path).write_text(json.dumps({"auths": {registry: {"auth": pair}}}))
    return str(path)


# --- Redirects to expiring storage URLs --------------------------------------------------------

_BLOB_PATH = re.compile(r"/v2/.+/blobs/(sha256:[0-9a-f]{64})")


class RedirectingProxy(ThreadedHttpServer):
    """Stands in front of a registry as its storage backend would: every request is forwarded,
    except blob GETs and HEADs, answered with a 307 to a "signed" storage URL on another port
    that works for `uses_per_url` requests and then answers 403, as an expired presigned URL
    does. Storage refuses HEAD (403), as S3 does for URLs presigned for GET.

    `redirects` counts the 307s, `expired` the refusals of used-up URLs, `heads_refused` the
    HEADs storage refused, `storage_saw_authorization` requests to storage that carried an
    Authorization header (the registry's credentials must not leave the registry)."""

    def __init__(self, upstream_url: str, uses_per_url: int):
        self.upstream = urlsplit(upstream_url).netloc
        self.uses_per_url = uses_per_url
        self.redirects = 0
        self.expired = 0
        self.heads_refused = 0
        self.storage_saw_authorization = 0
        self._authorization: dict[str, str | None] = {}
        self._uses: dict[str, int] = {}
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.storage = _Storage(self)
        self._listen_routing({"GET": self._handle, "HEAD": self._handle})

    def __enter__(self):
        self.storage.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.storage.__exit__(*exc)

    def _handle(self, handler) -> None:
        match = _BLOB_PATH.fullmatch(urlsplit(handler.path).path)
        if match:
            signature = secrets.token_hex(8)
            with self._lock:
                self._uses[signature] = self.uses_per_url
                # What the registry would use to fetch the blob on the client's behalf.
                self._authorization[signature] = handler.headers.get("Authorization")
                self.redirects += 1
            location = f"{self.storage.url}/{signature}{match[0]}?X-Signature={signature}"
            _reply(handler, 307, b"", {"Location": location})
            return
        status, headers, body = _forward(self.upstream, handler)
        _reply(handler, status, body, headers, head=handler.command == "HEAD")

    def blob(self, blob_path: str, signature: str) -> bytes:
        """The blob's bytes, fetched whole from the registry once (test blobs are small)."""
        with self._lock:
            data = self._blobs.get(blob_path)
            authorization = self._authorization.get(signature)
        if data is None:
            conn = http.client.HTTPConnection(self.upstream, timeout=30)
            try:
                conn.request("GET", blob_path,
                             headers={"Authorization": authorization} if authorization else {})
                resp = conn.getresponse()
                data = resp.read()
                assert resp.status == 200, (resp.status, data[:200])
            finally:
                conn.close()
            with self._lock:
                self._blobs[blob_path] = data
        return data

    def take_use(self, signature: str) -> bool:
        with self._lock:
            left = self._uses.get(signature, 0)
            if left <= 0:
                self.expired += 1
                return False
            self._uses[signature] = left - 1
            return True


class _Storage(ThreadedHttpServer):
    """The storage side of RedirectingProxy: serves blob bytes by signed URL, with Range."""

    def __init__(self, proxy: RedirectingProxy):
        self.proxy = proxy
        self._listen_routing({"GET": self._handle, "HEAD": self._refuse_head})

    def _refuse_head(self, request) -> None:
        with self.proxy._lock:
            self.proxy.heads_refused += 1
        _reply(request, 403, b"", {}, head=True)

    def _handle(self, handler) -> None:
        _, signature, blob_path = urlsplit(handler.path).path.split("/", 2)
        if handler.headers.get("Authorization"):
            with self.proxy._lock:
                self.proxy.storage_saw_authorization += 1
        if not self.proxy.take_use(signature):
            _reply(handler, 403, b"<Error><Code>AccessDenied</Code>"
                                 b"<Message>Request has expired</Message></Error>", {})
            return
        data = self.proxy.blob(f"/{blob_path}", signature)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", handler.headers.get("Range", ""))
        if match is None:
            _reply(handler, 200, data, {})
            return
        first, last = int(match[1]), min(int(match[2]), len(data) - 1)
        _reply(handler, 206, data[first:last + 1],
               {"Content-Range": f"bytes {first}-{last}/{len(data)}"})


def _forward(upstream: str, handler) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(upstream, timeout=30)
    try:
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in ("host", "connection", "keep-alive")}
        conn.request(handler.command, handler.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        relayed = {k: v for k, v in resp.getheaders()
                   if k.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                        "content-length")}
        if handler.command == "HEAD" and resp.getheader("Content-Length"):
            relayed["Content-Length"] = resp.getheader("Content-Length")
        return resp.status, relayed, body
    finally:
        conn.close()


def _reply(handler, status: int, body: bytes, headers: dict, head: bool = False) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    if "Content-Length" not in headers:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if not head:
        handler.wfile.write(body)


# --- A registry source for the source conformance suite ---------------------------------------

_shared: RegistryServer | None = None
_shared_lock = threading.Lock()


def _shared_registry() -> RegistryServer:
    """One anonymous registry for every factory call of the session, stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = RegistryServer()
            _shared.start()
            atexit.register(_shared.stop)
        return _shared


def make_registry_source(blob_bytes: bytes):
    """(BlobSource over `blob_bytes` stored in a real docker-registry, cleanup): the factory of
    tests/test_source_conformance.py. The blob is uploaded with lazyfs' own RegistryDestination
    and read back through RegistryStore.open_blob, the path a mount takes."""
    import pytest

    from lazyfs.format.oci import Descriptor
    from lazyfs.imageref import SourceOptions
    from lazyfs.registry import RegistryDestination, RegistryStore, parse_registry_reference

    reason = registry_missing_reason()
    if reason:
        pytest.skip(reason)
    registry = _shared_registry()
    ref = f"oci://{registry.host}/conformance:blob"
    desc = Descriptor("application/octet-stream",
                      "sha256:" + hashlib.sha256(blob_bytes).hexdigest(), len(blob_bytes))
    with tempfile.NamedTemporaryFile() as f:
        f.write(blob_bytes)
        f.flush()
        destination = RegistryDestination(ref, SourceOptions())
        try:
            if not destination.has_blob(desc):
                destination.put_blob(desc, f.name, lambda n: None)
        finally:
            destination.close()
    store = RegistryStore(parse_registry_reference(ref), SourceOptions())
    source = store.open_blob(desc)

    def cleanup() -> None:
        source.close()
        store.close()

    return source, cleanup
