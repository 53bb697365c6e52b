"""Fixtures shared by all tests."""

from __future__ import annotations

import pytest

from lazyfs.format.seekable import FORMATS

from tests.servers import NginxServer, nginx_missing_reason
from tests.testimage import image, source_image  # noqa: F401  (the session's test image fixtures)
from tests.s3server import s3, s3_server  # noqa: F401  (the session's S3 server, a bucket per test)


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


@pytest.fixture(params=FORMATS)
def layer_format(request):
    """Each seekable format in turn: the conversion, verification, cache and mount tests run
    for both from this one parametrization."""
    return request.param
