"""A real S3-compatible server on 127.0.0.1 for tests: moto's, in a child process, with an
access log like nginx's.

    with MotoS3Server(log_dir) as s3:
        s3.client().create_bucket(Bucket="b")
        ...                              # lazyfs ... --s3-endpoint s3.url
        [record] = s3.requests()         # method, bucket, key, Range header, status, ...
        s3.clear_log()

The child is `python -m tests.s3server LOG`: moto's WSGI application behind a middleware that
appends one JSON line per request to LOG before the reply is sent, so a request the client has
seen answered is always in the log. A child process (rather than moto in a thread) keeps
moto's global state, its warnings and the GIL out of the test process.

`enforce_auth()` makes moto check signatures and IAM policies (off by default: any key works),
for the tests of denied access and bad credentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

_START_TIMEOUT_S = 30.0
REGION = "us-east-1"
# moto accepts any key while auth is not enforced; these never leave the loopback.
ACCESS_KEY_ID = "testing-key-id"
SECRET_ACCESS_KEY = "testing-secret"


def moto_missing_reason() -> str | None:
    try:
        import boto3  # noqa: F401
        import moto.moto_server.werkzeug_app  # noqa: F401
    except ImportError as exc:
        return f"moto's server is missing (pip install 'moto[server]'): {exc}"
    return None


@dataclass(frozen=True)
class S3Request:
    method: str
    bucket: str
    key: str                # "" for bucket-level requests
    query: str
    range: str              # the Range header, "" when absent
    status: int
    access_key_id: str      # from the Authorization header; "" for unsigned requests


class MotoS3Server:
    def __init__(self, log_dir: str | os.PathLike):
        self.log_path = Path(log_dir) / "s3-access.log"
        self.stderr_path = Path(log_dir) / "s3-server.log"
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MotoS3Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.touch()
        with open(self.stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.s3server", str(self.log_path)],
                stdout=subprocess.PIPE, stderr=stderr, cwd=Path(__file__).resolve().parent.parent)
        line = _read_line_with_deadline(self._proc.stdout, _START_TIMEOUT_S)
        if not line.startswith(b"port "):
            self.stop()
            raise RuntimeError("moto server did not start: "
                               + self.stderr_path.read_text(errors="replace")[-2000:])
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()
            self._proc = None

    # -- clients --------------------------------------------------------------------------

    def client(self, service: str = "s3", access_key_id: str = ACCESS_KEY_ID,
               secret_access_key: str = SECRET_ACCESS_KEY):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=access_key_id,
                            aws_secret_access_key=secret_access_key)

    # -- auth -----------------------------------------------------------------------------

    def set_auth(self, enforced: bool) -> None:
        import requests

        # moto's switch: after this many more requests, signatures and IAM policies count.
        reply = requests.post(f"{self.url}/moto-api/reset-auth",
                              data=b"0" if enforced else b"inf", timeout=10)
        reply.raise_for_status()

    @contextlib.contextmanager
    def enforce_auth(self):
        self.set_auth(True)
        try:
            yield
        finally:
            self.set_auth(False)

    # -- access log -----------------------------------------------------------------------

    def requests(self) -> list[S3Request]:
        records = []
        for line in self.log_path.read_text().splitlines():
            fields = json.loads(line)
            if fields["path"].startswith("/moto-api/"):
                continue
            bucket, _, key = fields.pop("path").lstrip("/").partition("/")
            records.append(S3Request(bucket=bucket, key=key, **fields))
        return records

    def clear_log(self) -> None:
        self.log_path.write_text("")


def _read_line_with_deadline(stream, timeout_s: float) -> bytes:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0] if result else b""


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto server for the whole session (it starts in about a second); tests keep apart
    by using buckets of their own (`s3` fixture)."""
    reason = moto_missing_reason()
    if reason:
        pytest.skip(reason)
    with MotoS3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


_bucket_serial = iter(range(1, 1_000_000))


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """(server, a fresh empty bucket's name), with the environment set for lazyfs (in this
    process and its children): test credentials and region, and no shared AWS files or
    instance metadata of the machine running the tests."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"lazyfs-test-{os.getpid()}-{next(_bucket_serial)}"
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.clear_log()
    return s3_server, bucket


# --- the child: moto with an access log -------------------------------------------------------

def _serve(log_path: str) -> None:
    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                               create_backend_app)
    from werkzeug.serving import make_server

    moto_app = DomainDispatcherApplication(create_backend_app)
    log_file = open(log_path, "a", buffering=1)
    log_lock = threading.Lock()

    def logged_app(environ, start_response):
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        access_key_id = authorization.partition("Credential=")[2].partition("/")[0]

        def logging_start_response(status, headers, exc_info=None):
            record = {"method": environ["REQUEST_METHOD"],
                      "path": unquote(environ.get("PATH_INFO", "")),
                      "query": environ.get("QUERY_STRING", ""),
                      "range": environ.get("HTTP_RANGE", ""),
                      "status": int(status.split()[0]),
                      "access_key_id": access_key_id}
            with log_lock:
                log_file.write(json.dumps(record) + "\n")
            return start_response(status, headers, exc_info)

        return moto_app(environ, logging_start_response)

    server = make_server("127.0.0.1", 0, logged_app, threaded=True,
                         request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print("port", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    _serve(sys.argv[1])
