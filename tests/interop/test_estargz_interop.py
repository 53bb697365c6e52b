"""Interoperability with the Go reference eStargz implementation.

Direction A: blobs written by `lazyfs convert` are opened, TOC-verified and
read (every chunk digest-checked) by the Go reader, and what it reads must
match the input tar. Direction B: blobs written by Go's estargz.Build must
pass `lazyfs verify` and `lazyfs inspect`, and a tampered one must fail.

Inputs are generated here with tarfile so they cover the awkward cases real
layers contain (chunked files, empty files, links, devices, xattrs, long
names, setuid), plus a tar of a real stdlib directory.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import posixpath
import random
import subprocess
import sys
import struct
import sysconfig
import tarfile
from pathlib import Path

import pytest
import zstandard

pytestmark = pytest.mark.interop

# Our --format name -> the checker's -format name (the reference zstdchunked package).
GO_FORMAT = {"estargz": "gzip", "zstd:chunked": "zstd"}

REPO = Path(__file__).resolve().parents[2]
CHUNK = 1 << 20  # 1 MiB, so the 3 MiB file below is split into chunks
BIG_SIZE = 3 * CHUNK + 123  # not a multiple of CHUNK: the last chunk is short
LANDMARKS = {".prefetch.landmark", ".no.prefetch.landmark"}
TOC_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink", tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}
XATTR_PREFIX = "SCHILY.xattr."


# ---------------------------------------------------------------- helpers


def clean(name: str) -> str:
    """Normalize a tar/TOC name the way the Go reader does (cleanEntryName)."""
    return posixpath.normpath("/" + name).lstrip("/")


def run(cmd: list, timeout: float = 600) -> subprocess.CompletedProcess:
    # The CLI runs from the source tree; lazyfs need not be pip-installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          env=env, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def lazyfs(*args) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "lazyfs", *args])


def lazyfs_convert(src: Path, dst: Path, *opts) -> str:
    """Convert with our CLI; return the TOC digest (last stdout line)."""
    out = ok(lazyfs("convert", src, dst, *opts)).stdout.strip().splitlines()
    assert out and out[-1].startswith("sha256:"), f"no TOC digest on stdout: {out!r}"
    return out[-1].strip()


def go_build(esgzcheck: Path, src: Path, dst: Path, *opts) -> str:
    """Build with the Go reference; return the TOC digest (line 1)."""
    toc_digest, diff_id = ok(run([esgzcheck, "build", src, dst, *opts])).stdout.split()
    assert toc_digest.startswith("sha256:") and diff_id.startswith("sha256:")
    return toc_digest


def go_check(esgzcheck: Path, blob: Path, toc_digest: str) -> dict[str, dict]:
    """Read the whole blob with the Go reader; records keyed by path."""
    proc = ok(run([esgzcheck, "check", blob, toc_digest]))
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    return {r["name"]: r for r in records}


def read_toc(blob: bytes) -> tuple[int, dict]:
    """Parse a blob's footer and TOC independently of lazyfs.

    eStargz: the 51-byte footer is an empty gzip member whose extra field is
    "SG" + len(22) + 16 hex digits of the TOC offset + "STARGZ"; the TOC is a
    gzip member holding a tar with stargz.index.json.
    zstd:chunked: the last 40 bytes are the footer's data (TOC offset and
    compressed length, little-endian uint64s, ..., magic); the TOC is a zstd
    frame of JSON.
    """
    if blob.endswith(b"GnUlInUx"):
        toc_off, toc_len = struct.unpack_from("<QQ", blob, len(blob) - 40)
        return toc_off, json.loads(zstandard.ZstdDecompressor().decompress(
            blob[toc_off:toc_off + toc_len], max_output_size=1 << 28))
    footer = blob[-51:]
    assert footer[12:14] == b"SG" and footer[32:38] == b"STARGZ", "not an eStargz footer"
    toc_off = int(footer[16:32], 16)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob[toc_off:-51]))) as tf:
        return toc_off, json.load(tf.extractfile("stargz.index.json"))


def expected_entries(tar_path: Path) -> dict[str, dict]:
    """What a reader of the converted blob must see, taken from the input tar."""
    exp = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            e = {
                "type": TOC_TYPES[m.type], "mode": m.mode, "uid": m.uid, "gid": m.gid,
                "linkName": m.linkname, "devMajor": m.devmajor, "devMinor": m.devminor,
                "xattrs": {k[len(XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
                           for k, v in m.pax_headers.items() if k.startswith(XATTR_PREFIX)},
            }
            if m.isreg() or m.islnk():  # extractfile follows hardlinks to their target
                data = tf.extractfile(m).read()
                e["size"] = len(data)
                e["sha256"] = hashlib.sha256(data).hexdigest()
            exp[clean(m.name)] = e
    return exp


def assert_matches_tar(records: dict[str, dict], tar_path: Path) -> None:
    """Compare the Go reader's view of a blob with the input tar."""
    exp = expected_entries(tar_path)
    missing = sorted(set(exp) - set(records))
    assert not missing, f"entries missing from the blob: {missing[:20]}"
    # Anything else must be an implicit parent directory or a prefetch landmark.
    parents = {posixpath.dirname(n) for n in exp} | {posixpath.dirname(n) for n in records}
    extra = sorted(set(records) - set(exp) - parents - LANDMARKS)
    assert not extra, f"unexpected entries in the blob: {extra[:20]}"

    problems = []
    for name, e in sorted(exp.items()):
        r = records[name]
        if e["type"] == "hardlink":
            # The Go reader resolves a hardlink to its target's entry.
            got = {"type": r["type"], "sha256": r["sha256"], "size": r["size"],
                   "target": r["tocName"], "linked": r["numLink"] >= 2}
            want = {"type": "reg", "sha256": e["sha256"], "size": e["size"],
                    "target": clean(e["linkName"]), "linked": True}
        else:
            got = {k: r[k] for k in ("type", "mode", "uid", "gid")}
            got["xattrs"] = {k: base64.b64decode(v) for k, v in r["xattrs"].items()}
            want = {k: e[k] for k in ("type", "mode", "uid", "gid", "xattrs")}
            got["mode"], want["mode"] = oct(got["mode"]), oct(want["mode"])  # readable diffs
            if e["type"] == "reg":
                got.update(size=r["size"], sha256=r["sha256"])
                want.update(size=e["size"], sha256=e["sha256"])
            elif e["type"] == "symlink":
                got["linkName"], want["linkName"] = r["linkName"], e["linkName"]
            elif e["type"] in ("char", "block"):
                got.update(dev=(r["devMajor"], r["devMinor"]))
                want.update(dev=(e["devMajor"], e["devMinor"]))
        if got != want:
            problems.append(f"{name}: got {got}, want {want}")
    assert not problems, "blob differs from input tar:\n" + "\n".join(problems[:20])


# ---------------------------------------------------------------- inputs


def _text(rng: random.Random, size: int) -> bytes:
    """Compressible pseudo-text, so deflate emits real Huffman blocks."""
    words = [b"layer", b"chunk", b"gzip", b"toc", b"digest", b"lazy", b"mount", b"fuse",
             b"prefetch", b"registry", b"snapshot", b"overlay", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


def write_synthetic_tar(path: Path, fmt: int) -> None:
    rng = random.Random(1234)
    long_name = "deep/" + "d" * 70 + "/" + "f" * 90 + ".txt"
    assert len(long_name) > 100

    def add(name, type=tarfile.REGTYPE, data=b"", mode=0o644, **attrs):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = type, mode, 1_700_000_000
        ti.uid, ti.gid, ti.uname, ti.gname = 1000, 1000, "user", "user"
        for k, v in attrs.items():
            setattr(ti, k, v)
        if type == tarfile.REGTYPE:
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        else:
            tf.addfile(ti)

    with tarfile.open(path, "w", format=fmt) as tf:
        add("etc", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0, uname="root", gname="root")
        add("etc/hostname", data=b"lazyfs\n")
        add("etc/motd", data=_text(rng, 200_000))
        add("empty")
        add("big.bin", data=rng.randbytes(BIG_SIZE))  # incompressible, chunked
        add("exact.bin", data=rng.randbytes(CHUNK))  # exactly one chunk
        add("usr/bin/su", data=b"\x7fELF" + rng.randbytes(5000), mode=0o4755,
            uid=0, gid=0, uname="root", gname="root")  # setuid; parent dirs implicit
        add("link-to-hostname", tarfile.SYMTYPE, linkname="etc/hostname", mode=0o777)
        add("etc/hostname.hard", tarfile.LNKTYPE, linkname="etc/hostname")
        add("big.hard", tarfile.LNKTYPE, linkname="big.bin")  # hardlink to a chunked file
        add("xattr.txt", data=b"has an xattr\n",
            pax_headers={XATTR_PREFIX + "user.foo": "bar"})
        add(long_name, data=b"long name\n")
        add("run/fifo", tarfile.FIFOTYPE)
        add("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        add("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6)


def write_stdlib_tar(path: Path) -> None:
    """A few hundred real files (.py and __pycache__) from this machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for sub in ("json", "email", "xml"):
            tf.add(stdlib / sub, arcname=f"usr/lib/python3/{sub}")


@pytest.fixture(scope="session", params=["synthetic-pax", "synthetic-gnu", "stdlib"])
def input_tar(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tars") / f"{request.param}.tar"
    if request.param == "stdlib":
        write_stdlib_tar(path)
    else:
        # GNU format stores long names as 'L' records and cannot carry the
        # xattr (tarfile drops it); PAX uses "path" and SCHILY.xattr records.
        write_synthetic_tar(path, tarfile.PAX_FORMAT if request.param.endswith("pax")
                            else tarfile.GNU_FORMAT)
    return path


@pytest.fixture(scope="session")
def synthetic_tar(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tars") / "synthetic.tar"
    write_synthetic_tar(path, tarfile.PAX_FORMAT)
    return path


# ---------------------------------------------------------------- the Go side alone


def test_go_reference_roundtrip(esgzcheck, input_tar, layer_format, tmp_path):
    """Harness sanity: Go build -> Go check matches the tar, so a failure in the
    tests below points at lazyfs, not at the checker or the expectations."""
    blob = tmp_path / "go.blob"
    digest = go_build(esgzcheck, input_tar, blob, "-chunk-size", CHUNK, "-format", GO_FORMAT[layer_format])
    assert_matches_tar(go_check(esgzcheck, blob, digest), input_tar)
    # A wrong digest must be rejected by the checker itself.
    bad = "sha256:" + "0" * 64
    assert run([esgzcheck, "check", blob, bad]).returncode != 0


# ---------------------------------------------------------------- A: ours -> Go


@pytest.mark.parametrize("chunk_size", [CHUNK, None], ids=["chunk1M", "default-chunk"])
def test_our_blob_read_by_go(esgzcheck, input_tar, chunk_size, layer_format, tmp_path):
    blob = tmp_path / "ours.blob"
    opts = ["--format", layer_format] + (["--chunk-size", chunk_size] if chunk_size else [])
    digest = lazyfs_convert(input_tar, blob, *opts)
    assert_matches_tar(go_check(esgzcheck, blob, digest), input_tar)
    if chunk_size and "synthetic" in input_tar.name:
        # Make sure the Go reader's multi-chunk path was actually exercised.
        _, toc = read_toc(blob.read_bytes())
        big = [e for e in toc["entries"] if clean(e["name"]) == "big.bin"]
        assert len(big) > 1, f"big.bin ({BIG_SIZE} bytes) was not chunked: {big}"


def test_our_prioritized_blob_read_by_go(esgzcheck, synthetic_tar, tmp_path):
    prio = tmp_path / "prio.txt"
    prio.write_text("etc/motd\nbig.bin\n")
    blob = tmp_path / "ours.esgz"
    digest = lazyfs_convert(synthetic_tar, blob, "--chunk-size", CHUNK,
                            "--compression-level", 1, "--prioritize", prio)
    records = go_check(esgzcheck, blob, digest)
    assert_matches_tar(records, synthetic_tar)
    # The eStargz spec marks the end of the prioritized files with
    # .prefetch.landmark; stargz-snapshotter prefetches up to it.
    assert ".prefetch.landmark" in records


# ---------------------------------------------------------------- B: Go -> ours


@pytest.fixture
def go_blob(esgzcheck, input_tar, layer_format, tmp_path) -> tuple[Path, str]:
    blob = tmp_path / "go.blob"
    return blob, go_build(esgzcheck, input_tar, blob, "-chunk-size", CHUNK,
                          "-format", GO_FORMAT[layer_format])


def assert_rejected(proc: subprocess.CompletedProcess) -> None:
    """A clean refusal: non-zero exit and a one-line error, not a crash."""
    assert proc.returncode != 0, f"lazyfs accepted a bad blob:\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr, f"lazyfs crashed instead:\n{proc.stderr[-3000:]}"


def test_go_blob_verified_by_us(go_blob):
    blob, digest = go_blob
    ok(lazyfs("verify", blob, "--toc-digest", digest))
    # Only meaningful after the success above (a missing CLI also exits 1).
    assert_rejected(lazyfs("verify", blob, "--toc-digest",
                           "sha256:" + hashlib.sha256(b"not the toc").hexdigest()))


def test_go_blob_inspected_by_us(go_blob, input_tar):
    blob, _ = go_blob
    doc = json.loads(ok(lazyfs("inspect", blob, "--json")).stdout)
    entries = [e for layer in doc["layers"] for e in layer["entries"]]
    names = {clean(e["name"]) for e in entries}
    exp = expected_entries(input_tar)
    missing = sorted(set(exp) - names)
    assert not missing, f"inspect lost entries: {missing[:20]}"
    # A missing size means 0, as in the TOC JSON itself (omitempty).
    sizes = {clean(e["name"]): e.get("size", 0) for e in entries if e["type"] == "reg"}
    wrong = {n: (sizes.get(n), e["size"]) for n, e in exp.items()
             if e["type"] == "reg" and sizes.get(n) != e["size"]}
    assert not wrong, f"inspect sizes (got, want) differ: {wrong}"


@pytest.mark.parametrize("target", ["big.bin", "etc/motd"])
def test_tampered_go_blob_fails_verify(esgzcheck, synthetic_tar, target, layer_format, tmp_path):
    """Flip one byte in the middle of a file chunk's gzip member.

    big.bin is random, so deflate stores it raw and the flip yields valid
    gzip with wrong content (only a digest/CRC check can catch it); etc/motd
    is text, so the flip corrupts a Huffman-coded stream.
    """
    blob = tmp_path / "go.blob"
    digest = go_build(esgzcheck, synthetic_tar, blob, "-chunk-size", CHUNK, "-format", GO_FORMAT[layer_format])
    data = bytearray(blob.read_bytes())
    toc_off, toc = read_toc(bytes(data))
    offsets = sorted({e["offset"] for e in toc["entries"] if e.get("offset")} | {toc_off})
    chunks = [e for e in toc["entries"] if clean(e["name"]) == target and e.get("offset")]
    start = chunks[len(chunks) // 2]["offset"]  # a middle chunk when there are several
    end = next(o for o in offsets if o > start)
    assert end - start > 1000, "chunk too small to tamper with safely"
    data[start + (end - start) // 2] ^= 0xFF
    tampered = tmp_path / "tampered.esgz"
    tampered.write_bytes(bytes(data))

    # The Go reader must reject it too, otherwise the tamper missed the data.
    assert run([esgzcheck, "check", tampered, digest]).returncode != 0
    # Positive control first: the failure below must be due to the tamper.
    ok(lazyfs("verify", blob, "--toc-digest", digest))
    assert_rejected(lazyfs("verify", tampered, "--toc-digest", digest))
