"""The `lazyfs` command as users run it: output, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.tarbuild import dir_, file_, symlink, tar_of


def lazyfs(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lazyfs", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


@pytest.fixture
def layer_tar(tmp_path):
    return tar_of(tmp_path, dir_("bin/"), file_("bin/tool", os.urandom(300_000), mode=0o755),
                  symlink("bin/alias", "tool"), file_("etc/conf", b"k=v\n"))


def test_convert_prints_the_toc_digest_and_inspect_and_verify_agree(tmp_path, layer_tar):
    out = tmp_path / "layer.esgz"
    converted = lazyfs("convert", layer_tar, out, "--chunk-size", "65536", "--workers", "2")
    assert converted.returncode == 0, converted.stderr
    digest = converted.stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71

    inspected = lazyfs("inspect", out, "--json")
    assert inspected.returncode == 0, inspected.stderr
    layer = json.loads(inspected.stdout)["layers"][0]
    assert layer["toc_digest"] == digest
    entries = {e["name"]: e for e in layer["entries"]}
    assert len(entries["bin/tool"]["chunks"]) == 5 and entries["bin/alias"]["linkName"] == "tool"

    human = lazyfs("inspect", out)
    assert human.returncode == 0 and "bin/tool" in human.stdout and digest in human.stdout

    verified = lazyfs("verify", out, "--toc-digest", digest)
    assert verified.returncode == 0, verified.stderr
    assert "pinned" in verified.stdout and "NOT pinned" not in verified.stdout


def test_verify_fails_with_one_precise_line_on_a_wrong_pin(tmp_path, layer_tar):
    out = tmp_path / "layer.esgz"
    lazyfs("convert", layer_tar, out)
    wrong = "sha256:" + "0" * 64
    result = lazyfs("verify", out, "--toc-digest", wrong)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and wrong in result.stderr and "Traceback" not in result.stderr


def test_verify_fails_on_a_flipped_byte(tmp_path, layer_tar):
    out = tmp_path / "layer.esgz"
    lazyfs("convert", layer_tar, out)
    data = bytearray(out.read_bytes())
    data[len(data) // 3] ^= 0xFF
    out.write_bytes(bytes(data))
    result = lazyfs("verify", out)
    assert result.returncode in (2, 3) and result.stderr.startswith("lazyfs verify: error: ")


@pytest.mark.parametrize("content, code, message", [
    (b"garbage" * 300, 2, "not an OCI layout, an image archive or a layer"),
    (None, 4, "no such file"),
])
def test_convert_errors_are_one_line_and_leave_nothing(tmp_path, content, code, message):
    src = tmp_path / "input.tar"
    if content is not None:
        src.write_bytes(content)
    result = lazyfs("convert", src, tmp_path / "out.esgz")
    assert result.returncode == code, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.esgz").exists()
    assert [p.name for p in tmp_path.iterdir()] == (["input.tar"] if content else [])


def test_missing_prioritized_file(tmp_path, layer_tar):
    listing = tmp_path / "list.txt"
    listing.write_text("bin/tool\n# a comment\n\nnot/there\n")
    result = lazyfs("convert", layer_tar, tmp_path / "out.esgz", "--prioritize", listing)
    assert result.returncode == 4 and "not/there" in result.stderr
    assert not (tmp_path / "out.esgz").exists()


def test_startup_compression_level_shrinks_the_prioritized_files_and_is_checked(tmp_path):
    words = [os.urandom(6).hex() for _ in range(300)]
    text = " ".join(words[(i * 7919) % 300] for i in range(40_000)).encode()
    src = tar_of(tmp_path, file_("hot", text), file_("cold", os.urandom(1000)))
    listing = tmp_path / "list.txt"
    listing.write_text("hot\n")
    sizes = {}
    for level in ("1", "19"):
        out = tmp_path / f"out-{level}"
        result = lazyfs("convert", src, out, "--format", "zstd:chunked", "--prioritize", listing,
                        "--compression-level", "1", "--startup-compression-level", level)
        assert result.returncode == 0, result.stderr
        sizes[level] = out.stat().st_size
    assert sizes["19"] < sizes["1"]
    result = lazyfs("convert", src, tmp_path / "bad", "--startup-compression-level", "19")
    assert result.returncode == 2
    assert "--startup-compression-level for estargz must be 0..9, not 19" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = lazyfs("--debug", "inspect", tmp_path / "nothing")
    assert result.returncode == 4 and "Traceback" in result.stderr
