"""Signed images: `lazyfs keygen`, `lazyfs sign`, and the `--verify-key` policy of mount, run and
verify, each refusal with the message that says which check failed.

Signatures are checked with the real openssl binary too (the format is cosign's, so existing
tools read it). Alterations are made as an attacker would, on a copy of the shared test image:
a new manifest blob with index.json pointed at it, a TOC rewritten to the same length, a
flipped byte in a chunk.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from converter.image import convert_image
from converter.layer import LayerOptions
from lazyfs import signing
from lazyfs.blobfile import LocalBlob, SeekableLayer
from lazyfs.errors import FormatError, VerificationError
from lazyfs.format import oci
from lazyfs.oci_layout import open_image
from tests.imagebuild import write_layout
from tests.mounting import lazyfs_cmd, mounted, require_fuse
from tests.tarbuild import dir_, file_, symlink
from tests.testimage import BIG, TAG

BUSYBOX = Path("/bin/busybox")
UNSIGNED = re.compile(r"unsigned image \(no signature for manifest sha256:[0-9a-f]{64}\)")
# The shared test image, once, in one format: the signature covers the manifest whatever the
# layers' format, and both formats' chunk and TOC checks are tested elsewhere.
ESTARGZ_ONLY = pytest.mark.parametrize("image", ["estargz"], indirect=True)


def lazyfs(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(lazyfs_cmd(*args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    """A small converted layout tagged "small": busybox in it when the host has one (for run)."""
    root = tmp_path_factory.mktemp("small")
    members = [dir_("etc/"), file_("etc/hello", b"hello from a signed image\n")]
    if BUSYBOX.is_file():
        members += [dir_("bin/"), file_("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
                    symlink("bin/echo", "busybox")]
    source = write_layout(root / "source", [members], "small")
    convert_image(f"{source}:small", str(root / "converted"), archive=False,
                  options=LayerOptions())
    return root / "converted"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """key type (and "other", an ECDSA key that signs nothing) -> (private path, public path)"""
    root = tmp_path_factory.mktemp("keys")
    return {name: signing.keygen(str(root / name), key_type)
            for name, key_type in (("ecdsa-p256", "ecdsa-p256"), ("ed25519", "ed25519"),
                                   ("other", "ecdsa-p256"))}


@pytest.fixture
def small_layout(small_image, tmp_path) -> Path:
    layout = tmp_path / "layout"
    shutil.copytree(small_image, layout)
    return layout


@pytest.fixture
def signed_image(image, keys, tmp_path) -> tuple[Path, str]:
    """(a copy of the shared test image signed with the ECDSA key, its manifest digest)"""
    _, converted, _ = image
    layout = tmp_path / "signed"
    shutil.copytree(converted, layout)
    result = signing.sign_image(f"{layout}:{TAG}", keys["ecdsa-p256"][0])
    return layout, result.manifest_digest


def signature_manifest(layout: Path, digest: str) -> dict:
    with open_image(f"{layout}:{signing.signature_tag(digest)}") as sigs:
        return sigs.manifest_json


def refused_mount(ref, tmp_path: Path, *extra) -> subprocess.CompletedProcess:
    """`lazyfs mount` (daemonizing, as a user runs it) that must fail; never left mounted."""
    require_fuse()
    mountpoint = tmp_path / "refused"
    mountpoint.mkdir(exist_ok=True)
    try:
        result = lazyfs("mount", "--cache-dir", tmp_path / "cache", *extra, ref, mountpoint)
        assert result.returncode == VerificationError.exit_code, result.stderr
        assert not os.path.ismount(mountpoint)
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    return result


def layer_holding(layout: Path, path: str):
    """(blob path, the TOC entry) of the layer whose TOC lists `path`."""
    with open_image(f"{layout}:{TAG}") as img:
        for desc in img.layers:
            blob_path = img.blobs.unverified_path(desc)
            with LocalBlob(blob_path) as blob:
                entries = {item.path: item for item in SeekableLayer.open(blob).entries}
            if path in entries:
                return Path(blob_path), entries[path]
    raise AssertionError(f"no layer holds {path}")


# --- keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", signing.KEY_TYPES)
def test_keygen_writes_a_private_pkcs8_key_and_a_public_key_openssl_reads(key_type, tmp_path):
    result = lazyfs("keygen", tmp_path / "k", "--type", key_type)
    assert result.returncode == 0, result.stderr
    key, pub = tmp_path / "k.key", tmp_path / "k.pub"
    assert result.stdout.strip() == str(pub)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    derived = subprocess.run(["openssl", "pkey", "-in", key, "-pubout"], capture_output=True,
                             text=True, check=True).stdout
    assert derived == pub.read_text()
    algorithm = subprocess.run(["openssl", "pkey", "-pubin", "-in", pub, "-text", "-noout"],
                               capture_output=True, text=True, check=True).stdout
    assert ("ED25519" if key_type == "ed25519" else "prime256v1") in algorithm
    again = lazyfs("keygen", tmp_path / "k")
    assert again.returncode != 0 and "exists: not overwriting" in again.stderr
    assert derived == pub.read_text()   # nothing was lost


def test_keygen_encrypts_with_the_password_from_the_environment(small_layout, tmp_path):
    env = {signing.PASSWORD_ENV: "correct horse"}
    assert lazyfs("keygen", tmp_path / "k", env=env).returncode == 0
    key = tmp_path / "k.key"
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    decrypted = subprocess.run(["openssl", "pkey", "-in", key, "-passin",
                                f"env:{signing.PASSWORD_ENV}", "-pubout"],
                               capture_output=True, text=True, env={**os.environ, **env})
    assert decrypted.stdout == (tmp_path / "k.pub").read_text()
    no_password = lazyfs("sign", small_layout, "--key", key, env={signing.PASSWORD_ENV: ""})
    assert no_password.returncode == 2
    assert f"is encrypted: set {signing.PASSWORD_ENV}" in no_password.stderr
    wrong = lazyfs("sign", small_layout, "--key", key, env={signing.PASSWORD_ENV: "wrong"})
    assert wrong.returncode == 2 and "password is wrong" in wrong.stderr
    assert lazyfs("sign", small_layout, "--key", key, env=env).returncode == 0
    assert lazyfs("verify", small_layout, "--verify-key", tmp_path / "k.pub").returncode == 0


# --- sign, then verify ---------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", signing.KEY_TYPES)
def test_sign_then_verify(key_type, keys, small_layout):
    key, pub = keys[key_type]
    signed = lazyfs("sign", f"{small_layout}:small", "--key", key)
    assert signed.returncode == 0, signed.stderr
    with open_image(f"{small_layout}:small") as img:
        digest = img.manifest_descriptor.digest
    assert signed.stdout.strip() == digest
    # The layout now holds two tags, but "the layout's only image" still means the image.
    verified = lazyfs("verify", small_layout, "--verify-key", pub)
    assert verified.returncode == 0, verified.stderr
    assert f"ok signature of manifest {digest}: {pub}" in verified.stdout
    assert verified.stdout.rstrip().endswith(f"manifest {digest}")
    wrong = lazyfs("verify", small_layout, "--verify-key", keys["other"][1])
    assert wrong.returncode == VerificationError.exit_code
    assert (f"signature does not verify with any of the given keys ({keys['other'][1]})"
            in wrong.stderr)
    either = lazyfs("verify", small_layout, "--verify-key", keys["other"][1], "--verify-key", pub)
    assert either.returncode == 0, either.stderr


def test_the_stored_signature_is_cosigns_format(keys, small_layout):
    result = signing.sign_image(str(small_layout), keys["ecdsa-p256"][0], identity="example/app")
    index = json.loads((small_layout / "index.json").read_text())
    tags = [m["annotations"][oci.ANNOTATION_REF_NAME] for m in index["manifests"]]
    assert tags == ["small", f"sha256-{result.manifest_digest.split(':')[1]}.sig"]
    manifest = signature_manifest(small_layout, result.manifest_digest)
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload = (small_layout / oci.blob_relpath(layer["digest"])).read_bytes()
    assert payload == (b'{"critical":{"identity":{"docker-reference":"example/app"},'
                       b'"image":{"docker-manifest-digest":"' + result.manifest_digest.encode()
                       + b'"},"type":"cosign container image signature"},"optional":null}')
    config = json.loads((small_layout / oci.blob_relpath(manifest["config"]["digest"])).read_text())
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]


def store_as_cosign_does(layout: Path, manifest_digest: str, key_path: str) -> None:
    """A signature manifest shaped as cosign writes one: its config has an empty os and
    architecture, a zero creation time and one history entry."""
    payload = signing.simple_signing_payload(manifest_digest, "registry.example/app")
    signature = signing.sign_payload(signing.load_private_key(key_path), payload)

    def put(data: bytes) -> dict:
        (layout / oci.blob_relpath(oci.sha256_digest(data))).write_bytes(data)
        return {"digest": oci.sha256_digest(data), "size": len(data)}

    zero = "0001-01-01T00:00:00Z"
    config = {"architecture": "", "created": zero, "history": [{"created": zero}], "os": "",
              "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(payload)]},
              "config": {}}
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                "config": {"mediaType": oci.OCI_CONFIG, **put(oci.encode_json(config))},
                "layers": [{"mediaType": signing.SIMPLE_SIGNING_MEDIA_TYPE, **put(payload),
                            "annotations": {signing.SIGNATURE_ANNOTATION:
                                            base64.b64encode(signature).decode()}}]}
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append({"mediaType": oci.OCI_MANIFEST, **put(oci.encode_json(manifest)),
                               "annotations": {oci.ANNOTATION_REF_NAME:
                                               signing.signature_tag(manifest_digest)}})
    (layout / "index.json").write_bytes(oci.encode_json(index))


def test_a_signature_stored_by_cosign_verifies_and_takes_more(keys, small_layout):
    with open_image(str(small_layout)) as img:
        digest = img.manifest_descriptor.digest
    store_as_cosign_does(small_layout, digest, keys["ecdsa-p256"][0])
    with open_image(str(small_layout)) as img:
        assert signing.check_signed(img, [keys["ecdsa-p256"][1]]) == keys["ecdsa-p256"][1]
    assert signing.sign_image(str(small_layout), keys["ed25519"][0]).signature_count == 2
    with open_image(str(small_layout)) as img:
        for key_type in ("ecdsa-p256", "ed25519"):
            assert signing.check_signed(img, [keys[key_type][1]]) == keys[key_type][1]


def test_openssl_checks_the_signatures(keys, small_layout, tmp_path):
    ecdsa = signing.sign_image(str(small_layout), keys["ecdsa-p256"][0])
    both = signing.sign_image(str(small_layout), keys["ed25519"][0])
    assert (ecdsa.signature_count, both.signature_count) == (1, 2)   # a second key adds a layer
    layers = signature_manifest(small_layout, ecdsa.manifest_digest)["layers"]
    checks = []
    for number, layer in enumerate(layers):
        payload, signature = tmp_path / f"payload{number}", tmp_path / f"sig{number}.der"
        payload.write_bytes((small_layout / oci.blob_relpath(layer["digest"])).read_bytes())
        signature.write_bytes(base64.b64decode(layer["annotations"][signing.SIGNATURE_ANNOTATION]))
        checks.append((payload, signature))
    (ecdsa_payload, ecdsa_sig), (ed_payload, ed_sig) = checks
    openssl_ecdsa = ["openssl", "dgst", "-sha256", "-verify", keys["ecdsa-p256"][1], "-signature"]
    ok = subprocess.run([*openssl_ecdsa, ecdsa_sig, ecdsa_payload], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "Verified OK"
    ed = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", keys["ed25519"][1],
                         "-rawin", "-in", ed_payload, "-sigfile", ed_sig],
                        capture_output=True, text=True)
    assert ed.returncode == 0 and "Signature Verified Successfully" in ed.stdout
    # openssl also notices a payload naming another manifest.
    ecdsa_payload.write_bytes(ecdsa_payload.read_bytes().replace(b"sha256:", b"sha256:0"))
    bad = subprocess.run([*openssl_ecdsa, ecdsa_sig, ecdsa_payload], capture_output=True, text=True)
    assert bad.returncode != 0 and "Verification failure" in bad.stdout


def test_the_signature_travels_in_an_oci_archive(keys, small_layout, tmp_path):
    signing.sign_image(str(small_layout), keys["ed25519"][0])
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(small_layout / name, arcname=name)
    verified = lazyfs("verify", f"{archive}:small", "--verify-key", keys["ed25519"][1])
    assert verified.returncode == 0, verified.stderr
    assert "ok signature of manifest" in verified.stdout
    with pytest.raises(FormatError, match="is an oci-archive: sign the layout directory"):
        signing.sign_image(str(archive), keys["ed25519"][0])


def test_what_cannot_be_signed_or_verified(keys, small_layout, tmp_path):
    key, pub = keys["ecdsa-p256"]
    with open_image(str(small_layout)) as img:
        blob = img.blobs.unverified_path(img.layers[0])
    lone = lazyfs("verify", blob, "--verify-key", pub)
    assert lone.returncode == VerificationError.exit_code
    assert "is a lone blob: it has no image manifest, so nothing is signed" in lone.stderr
    with pytest.raises(FormatError, match="lone blob: there is no image manifest to sign"):
        signing.sign_image(blob, key)
    with pytest.raises(FormatError, match="writes into a local OCI layout"):
        signing.sign_image("http://127.0.0.1:9/layout:small", key)
    not_a_key = lazyfs("verify", small_layout, "--verify-key", key)
    assert not_a_key.returncode == 2 and "not a PEM public key" in not_a_key.stderr


def test_a_garbled_signature_verifies_with_no_key(keys, small_layout):
    result = signing.sign_image(str(small_layout), keys["ecdsa-p256"][0])
    tag = signing.signature_tag(result.manifest_digest)
    index = json.loads((small_layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"][oci.ANNOTATION_REF_NAME] == tag)
    manifest = json.loads((small_layout / oci.blob_relpath(entry["digest"])).read_bytes())
    manifest["layers"][0]["annotations"][signing.SIGNATURE_ANNOTATION] = "not base64!"
    data = oci.encode_json(manifest)
    (small_layout / oci.blob_relpath(oci.sha256_digest(data))).write_bytes(data)
    entry.update(digest=oci.sha256_digest(data), size=len(data))
    (small_layout / "index.json").write_bytes(oci.encode_json(index))
    with open_image(str(small_layout)) as img, pytest.raises(
            VerificationError, match="signature does not verify with any of the given keys"):
        signing.check_signed(img, [keys["ecdsa-p256"][1]])


def test_an_unreadable_signature_manifest_is_named(keys, small_layout):
    result = signing.sign_image(str(small_layout), keys["ecdsa-p256"][0])
    tag = signing.signature_tag(result.manifest_digest)
    index = json.loads((small_layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"][oci.ANNOTATION_REF_NAME] == tag)
    with open(small_layout / oci.blob_relpath(entry["digest"]), "r+b") as f:
        f.write(b"[")   # a different manifest than index.json pins
    with open_image(str(small_layout)) as img, pytest.raises(
            VerificationError, match=rf":{tag}: unreadable signature manifest: .*hashes to"):
        signing.check_signed(img, [keys["ecdsa-p256"][1]])


# --- the policy on real mounts -------------------------------------------------------------------

@ESTARGZ_ONLY
def test_mount_of_a_signed_image_with_its_key(signed_image, keys, tmp_path):
    layout, digest = signed_image
    mount_dir = tmp_path / "mnt"
    with mounted(f"{layout}:{TAG}", mount_dir, "--verify-key", keys["other"][1],
                 "--verify-key", keys["ecdsa-p256"][1], cache_dir=tmp_path / "cache"):
        assert (mount_dir / "etc/passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
        report = json.loads(os.getxattr(mount_dir, "user.lazyfs.stats"))
        assert report["manifest"] == digest
        assert report["signed_by"] == keys["ecdsa-p256"][1]


@ESTARGZ_ONLY
def test_mount_refuses_an_unsigned_image_and_a_wrong_key(image, signed_image, keys, tmp_path):
    _, converted, _ = image
    unsigned = refused_mount(f"{converted}:{TAG}", tmp_path, "--verify-key", keys["ecdsa-p256"][1])
    assert UNSIGNED.search(unsigned.stderr), unsigned.stderr
    layout, _ = signed_image
    wrong = refused_mount(f"{layout}:{TAG}", tmp_path, "--verify-key", keys["other"][1])
    assert (f"signature does not verify with any of the given keys ({keys['other'][1]})"
            in wrong.stderr)


@ESTARGZ_ONLY
def test_mount_refuses_an_altered_manifest(signed_image, keys, tmp_path):
    layout, digest = signed_image
    # The attacker writes a manifest of their own and points the tag at it.
    manifest = json.loads((layout / oci.blob_relpath(digest)).read_bytes())
    manifest["annotations"] = {"org.example.altered": "yes"}
    altered = oci.encode_json(manifest)
    altered_digest = oci.sha256_digest(altered)
    (layout / oci.blob_relpath(altered_digest)).write_bytes(altered)
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"][oci.ANNOTATION_REF_NAME] == TAG)
    entry.update(digest=altered_digest, size=len(altered))
    (layout / "index.json").write_bytes(oci.encode_json(index))
    pub = keys["ecdsa-p256"][1]
    no_signature = refused_mount(f"{layout}:{TAG}", tmp_path, "--verify-key", pub)
    assert f"unsigned image (no signature for manifest {altered_digest})" in no_signature.stderr
    # ... and then copies the real signature to the altered manifest's signature tag.
    signature_entry = next(m for m in index["manifests"]
                           if m["annotations"][oci.ANNOTATION_REF_NAME].endswith(".sig"))
    index["manifests"].append({**signature_entry, "annotations": {
        oci.ANNOTATION_REF_NAME: signing.signature_tag(altered_digest)}})
    (layout / "index.json").write_bytes(oci.encode_json(index))
    moved = refused_mount(f"{layout}:{TAG}", tmp_path, "--verify-key", pub)
    assert (f"signed payload names manifest {digest} but the image is {altered_digest}"
            in moved.stderr)


def rewrite_estargz_toc(blob_path: Path, change) -> None:
    """Replace the TOC member of an eStargz blob with one whose JSON is change(JSON), keeping
    the blob's size (the signed manifest pins it): the new gzip member is padded to the old
    length in its header's extra field, which every gzip reader skips."""
    with LocalBlob(str(blob_path)) as blob:
        region = SeekableLayer.open(blob).region
        member = blob.read_at(region.toc_start, region.toc_end - region.toc_start)
    tar = zlib.decompressobj(31).decompress(member)
    altered = change(tar)
    assert len(altered) == len(tar) and altered != tar
    for level in range(9, 0, -1):
        deflater = zlib.compressobj(level, zlib.DEFLATED, -15)
        deflated = deflater.compress(altered) + deflater.flush()
        # header 10 + XLEN 2 + extra + deflate + CRC32 4 + ISIZE 4
        extra_size = len(member) - 12 - len(deflated) - 8
        if extra_size >= 4:
            break
    else:
        raise AssertionError("the altered TOC does not fit in the old one's place")
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x00\xff" + struct.pack("<H", extra_size)
    extra = b"LZ" + struct.pack("<H", extra_size - 4) + b"\0" * (extra_size - 4)
    trailer = struct.pack("<II", zlib.crc32(altered), len(altered) & 0xFFFFFFFF)
    new_member = header + extra + deflated + trailer
    assert len(new_member) == len(member)
    with open(blob_path, "r+b") as f:
        f.seek(region.toc_start)
        f.write(new_member)


@ESTARGZ_ONLY
def test_an_altered_toc_is_refused_at_mount(signed_image, keys, tmp_path):
    layout, _ = signed_image
    blob_path, _ = layer_holding(layout, "etc/shadow")
    os.chmod(blob_path, 0o644)

    def world_readable_shadow(tar: bytes) -> bytes:   # 0600 -> 0644, same length
        return re.sub(rb'("name":"etc/shadow"[^}]*?"mode":)384\b', rb"\g<1>420", tar, count=1)

    rewrite_estargz_toc(blob_path, world_readable_shadow)
    refused = refused_mount(f"{layout}:{TAG}", tmp_path, "--verify-key", keys["ecdsa-p256"][1])
    assert re.search(r"TOC digest is sha256:[0-9a-f]{64}, but sha256:[0-9a-f]{64} is pinned",
                     refused.stderr), refused.stderr
    verify = lazyfs("verify", f"{layout}:{TAG}", "--verify-key", keys["ecdsa-p256"][1])
    assert verify.returncode == VerificationError.exit_code
    assert "ok signature of manifest" in verify.stdout   # the manifest is the signed one
    assert "TOC digest is" in verify.stderr and "is pinned" in verify.stderr


@ESTARGZ_ONLY
def test_an_altered_chunk_fails_its_read_and_verify_names_it(signed_image, keys, tmp_path):
    layout, _ = signed_image
    blob_path, big = layer_holding(layout, "data/big.bin")
    chunk = big.chunks[1]
    os.chmod(blob_path, 0o644)
    with open(blob_path, "r+b") as f:   # random data is stored, so the flip inflates fine
        f.seek((chunk.blob_offset + chunk.blob_end) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    pub = keys["ecdsa-p256"][1]
    mount_dir = tmp_path / "mnt"
    with mounted(f"{layout}:{TAG}", mount_dir, "--verify-key", pub, "--no-background-fetch",
                 cache_dir=tmp_path / "cache"):
        fd = os.open(mount_dir / "data/big.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == BIG[:4096]
            with pytest.raises(OSError) as failed:
                os.pread(fd, 4096, chunk.file_offset + 10)
            assert failed.value.errno == errno.EIO
        finally:
            os.close(fd)
    verify = lazyfs("verify", f"{layout}:{TAG}", "--verify-key", pub)
    assert verify.returncode in (FormatError.exit_code, VerificationError.exit_code)
    assert f"'data/big.bin', chunk at file offset {chunk.file_offset}" in verify.stderr


@ESTARGZ_ONLY
def test_a_signed_layout_on_a_web_server(signed_image, keys, nginx, tmp_path):
    layout, digest = signed_image
    shutil.copytree(layout, Path(nginx.root) / "layout")
    url = f"{nginx.url}/layout:{TAG}"
    mount_dir = tmp_path / "mnt"
    with mounted(url, mount_dir, "--verify-key", keys["ecdsa-p256"][1],
                 cache_dir=tmp_path / "cache"):
        assert (mount_dir / "etc/passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"
    fetched = {r.uri for r in nginx.requests()}
    assert f"/layout/blobs/sha256/{digest.split(':')[1]}" in fetched
    wrong = refused_mount(url, tmp_path, "--verify-key", keys["other"][1])
    assert "signature does not verify with any of the given keys" in wrong.stderr
    shutil.rmtree(Path(nginx.root) / "layout")
    shutil.copytree(image_without_signatures(layout, tmp_path), Path(nginx.root) / "layout")
    unsigned = refused_mount(url, tmp_path, "--verify-key", keys["ecdsa-p256"][1])
    assert f"unsigned image (no signature for manifest {digest})" in unsigned.stderr


def image_without_signatures(layout: Path, tmp_path: Path) -> Path:
    """A copy of layout whose index.json lists no signature tag (the blobs stay)."""
    copy = tmp_path / "stripped"
    shutil.copytree(layout, copy)
    index = json.loads((copy / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"]
                          if not m["annotations"][oci.ANNOTATION_REF_NAME].endswith(".sig")]
    (copy / "index.json").write_bytes(oci.encode_json(index))
    return copy


def test_run_refuses_an_unsigned_image_before_mounting(keys, small_layout, tmp_path):
    require_fuse()
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is missing (apt-get install busybox-static)")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {"LAZYFS_RUN_DIR": str(scratch)}
    pub = keys["ecdsa-p256"][1]
    run = ("run", "--cache-dir", tmp_path / "cache", "--verify-key", pub, small_layout,
           "--", "/bin/echo", "ran")
    refused = lazyfs(*run, env=env)
    assert refused.returncode == VerificationError.exit_code
    # Refused by `run` itself, from the config's resolution: no mount daemon was started (its
    # refusals read "lazyfs mount: error").
    assert refused.stderr.startswith("lazyfs run: error: ")
    assert UNSIGNED.search(refused.stderr) and refused.stdout == ""
    assert list(scratch.iterdir()) == []
    signing.sign_image(str(small_layout), keys["ecdsa-p256"][0])
    ran = lazyfs(*run, env=env)
    assert (ran.returncode, ran.stdout) == (0, "ran\n"), ran.stderr
    assert list(scratch.iterdir()) == [] and str(scratch) not in Path("/proc/mounts").read_text()
