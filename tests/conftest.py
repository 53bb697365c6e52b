"""Fixtures shared by all tests."""

from __future__ import annotations

import pytest

from tests.servers import NginxServer, nginx_missing_reason
from tests.testimage import image  # noqa: F401  (the session's multi-layer test image)


@pytest.fixture
def nginx(tmp_path):
    """An nginx serving the empty directory `nginx.root` (tmp_path/www) at `nginx.url`;
    skips when nginx is not installed."""
    reason = nginx_missing_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path / "www"
    root.mkdir()
    with NginxServer(root) as server:
        yield server
