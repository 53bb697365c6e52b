"""Build the Go reference checker (tests/interop/esgzcheck) once and cache it.

The Go side comes from Debian packages (golang-go and
golang-github-containerd-stargz-snapshotter-dev), so it is built in GOPATH
mode against /usr/share/gocode with no network. The binary is cached under
tests/.gobuild/ keyed by the sha256 of main.go, so a test session and the
benchmark only pay the compile once until the checker's source changes.

Used by tests/interop/conftest.py and bench/convert.py.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
SRC_DIR = REPO / "tests" / "interop" / "esgzcheck"
CACHE_DIR = REPO / "tests" / ".gobuild"
SYSTEM_GOPATH = pathlib.Path("/usr/share/gocode")
ESTARGZ_SRC = SYSTEM_GOPATH / "src/github.com/containerd/stargz-snapshotter/estargz"


class GoUnavailable(RuntimeError):
    """The Go toolchain or the Debian estargz sources are missing."""


def missing_go_reason() -> str | None:
    """Why the checker cannot be built here, or None when it can."""
    if shutil.which("go") is None:
        return "`go` not on PATH (apt-get install golang-go)"
    if not (ESTARGZ_SRC / "estargz.go").is_file():
        return (f"Go estargz sources not found at {ESTARGZ_SRC} "
                "(apt-get install golang-github-containerd-stargz-snapshotter-dev)")
    return None


def require_go() -> None:
    """pytest.skip (with the reason) when the Go side cannot be built."""
    reason = missing_go_reason()
    if reason is not None:
        import pytest  # imported here so bench/ can use this module without pytest

        pytest.skip(f"Go reference implementation unavailable: {reason}")


def go_env() -> dict[str, str]:
    """Environment for an offline GOPATH-mode build against the Debian sources."""
    env = dict(os.environ)
    # GOFLAGS=-mod=mod (or any module flag) breaks GOPATH mode; drop it.
    env.pop("GOFLAGS", None)
    env.update(
        GO111MODULE="off",
        # First entry is ours (writable, empty); the second holds the packages.
        GOPATH=f"{CACHE_DIR / 'gopath'}:{SYSTEM_GOPATH}",
        # Persistent so a rebuild after editing main.go only recompiles main.
        GOCACHE=str(CACHE_DIR / "gocache"),
        GOPROXY="off",
        # Pure Go: no C compiler needed, and a static binary.
        CGO_ENABLED="0",
    )
    return env


def build_esgzcheck() -> pathlib.Path:
    """Return the path of a compiled esgzcheck, building it if main.go changed."""
    reason = missing_go_reason()
    if reason is not None:
        raise GoUnavailable(reason)
    key = hashlib.sha256((SRC_DIR / "main.go").read_bytes()).hexdigest()[:16]
    binary = CACHE_DIR / f"esgzcheck-{key}"
    if binary.is_file():
        return binary
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename: concurrent builders (pytest-xdist,
    # a benchmark next to a test run) never see a half-written binary.
    fd, tmp = tempfile.mkstemp(prefix=".esgzcheck-", dir=CACHE_DIR)
    os.close(fd)
    try:
        proc = subprocess.run(
            ["go", "build", "-o", tmp, "."],
            cwd=SRC_DIR, env=go_env(), capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"go build of {SRC_DIR} failed:\n{proc.stderr}")
        os.replace(tmp, binary)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # Drop binaries built from older versions of main.go.
    for old in CACHE_DIR.glob("esgzcheck-*"):
        if old != binary:
            old.unlink(missing_ok=True)
    return binary


if __name__ == "__main__":
    print(build_esgzcheck())
