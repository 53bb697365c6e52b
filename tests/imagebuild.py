"""Build real OCI image layouts for tests: gzip layers made with tarfile, tagged in index.json."""

from __future__ import annotations

from pathlib import Path

from lazyfs.oci_layout import write_gzip_layout
from tests.tarbuild import tar_bytes


def write_layout(layout: Path, layers: list[list], tag: str = "test",
                 config: dict | None = None) -> Path:
    """An OCI image layout at `layout` whose layers are the given member lists (lowest first).

    `config` is the image config's runtime part (Env, Cmd, Entrypoint, WorkingDir, User...).
    """
    write_gzip_layout(str(layout), [tar_bytes(*members) for members in layers], tag,
                      runtime_config=config, architecture="amd64")
    return layout
