"""Image signatures in cosign's format, and the policy that `--verify-key` enforces.

What is signed is the digest of the image manifest: the manifest pins every layer's TOC digest
(the stargz annotation), each TOC pins every chunk's digest, so one signature covers every byte
a mount serves. The format is cosign's, so that existing tools check our signatures and we
check theirs:

    payload    cosign's "simple signing" JSON, exactly these keys in this order:
               {"critical":{"identity":{"docker-reference":NAME},
                            "image":{"docker-manifest-digest":"sha256:<hex>"},
                            "type":"cosign container image signature"},"optional":null}
    signature  ECDSA P-256 over sha256(payload), ASN.1 DER (what `openssl dgst -sha256 -sign`
               makes); or Ed25519 over the payload itself. Stored base64-encoded.
    storage    an OCI image manifest tagged sha256-<hex of the signed manifest digest>.sig in the
               image's own store (a layout's index.json, a registry's tags), one layer per
               signature: the payload blob (media type SIMPLE_SIGNING_MEDIA_TYPE) with the
               signature in its SIGNATURE_ANNOTATION. Its config is a valid image config whose
               diff_ids are the payloads' digests, so every resolver (ours included) reads it.

Signatures are looked up with `open_reference(f"{image.name}:sha256-<hex>.sig")`, so they are
found wherever the image is: a layout directory or oci-archive, a layout on a web server or in
a bucket, a registry repository.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from lazyfs.errors import FormatError, LazyfsError, NotFound, VerificationError
from lazyfs.format import oci
from lazyfs.format.oci import Descriptor

SIMPLE_SIGNING_MEDIA_TYPE = oci.COSIGN_SIMPLE_SIGNING
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
KEY_TYPES = ("ecdsa-p256", "ed25519")
PASSWORD_ENV = "LAZYFS_KEY_PASSWORD"

# A payload is a few hundred bytes; anything far larger is not one (and is not read whole).
MAX_PAYLOAD_BYTES = 64 << 10
# Each signature costs a blob read (a request, remotely) and a check: a hostile signature
# manifest with thousands of layers must not turn a mount into a long loop.
MAX_SIGNATURES = 64


class KeyFileError(LazyfsError):
    """A key file that cannot be used: missing, unreadable, encrypted without a password, or of
    a type we do not sign with."""

    exit_code = 2


# --- Keys ----------------------------------------------------------------------------------------

def keygen(prefix: str, key_type: str = "ecdsa-p256",
           password: str | None = None) -> tuple[str, str]:
    """Write PREFIX.key (PKCS#8 PEM, mode 0600, encrypted when a password is given) and
    PREFIX.pub (SubjectPublicKeyInfo PEM). Existing files are never overwritten."""
    if key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise KeyFileError(f"unknown key type {key_type!r} (one of: {', '.join(KEY_TYPES)})")
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    encryption)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path, pub_path = f"{prefix}.key", f"{prefix}.pub"
    for path in (key_path, pub_path):
        if os.path.lexists(path):
            raise KeyFileError(f"{path} exists: not overwriting a key (choose another prefix)")
    _write_new_file(key_path, private_pem, 0o600)
    try:
        _write_new_file(pub_path, public_pem, 0o644)
    except BaseException:
        os.unlink(key_path)
        raise
    return key_path, pub_path


def _write_new_file(path: str, data: bytes, mode: int) -> None:
    # O_EXCL: a file that appeared since the check is not overwritten either; the mode is set
    # at creation, so the private key is never readable by others, not even for a moment.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PAYLOAD_BYTES)
    except FileNotFoundError:
        raise NotFound(f"key {path}: no such file") from None
    except OSError as exc:
        raise KeyFileError(f"key {path}: {exc.strerror}") from None


def load_private_key(path: str, password: str | None = None):
    """An ECDSA P-256 or Ed25519 private key from a PEM file (PKCS#8, or SEC1 for EC)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except TypeError:
        # cryptography says TypeError for both "encrypted, no password" and the reverse.
        if password:
            raise KeyFileError(f"key {path} is not encrypted: unset {PASSWORD_ENV}") from None
        raise KeyFileError(f"key {path} is encrypted: set {PASSWORD_ENV} to its password") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " or the password is wrong" if password else ""
        raise KeyFileError(f"key {path} is not a PEM private key{hint}") from None
    _check_key_type(key.public_key(), path)
    return key


def load_public_key(path: str):
    """An ECDSA P-256 or Ed25519 public key from a SubjectPublicKeyInfo PEM file (`*.pub`, as
    `lazyfs keygen`, `cosign generate-key-pair` and `openssl pkey -pubout` write)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"key {path} is not a PEM public key (give the .pub file)") from None
    _check_key_type(key, path)
    return key


def _check_key_type(public_key, path: str) -> None:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve,
                                                                        ec.SECP256R1):
        return
    raise KeyFileError(f"key {path}: only ECDSA P-256 and Ed25519 keys are supported")


def sign_payload(private_key, payload: bytes) -> bytes:
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(payload)
    return private_key.sign(payload, ec.ECDSA(hashes.SHA256()))


def signature_verifies(public_key, payload: bytes, signature: bytes) -> bool:
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, payload)
        else:
            public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# --- Payload -------------------------------------------------------------------------------------

def signature_tag(manifest_digest: str) -> str:
    """cosign's tag for the signatures of a manifest: sha256:<hex> -> sha256-<hex>.sig"""
    algorithm, hex_digest = oci.check_digest(manifest_digest, "manifest digest").split(":")
    return f"{algorithm}-{hex_digest}.sig"


def simple_signing_payload(manifest_digest: str, identity: str) -> bytes:
    payload = {"critical": {"identity": {"docker-reference": identity},
                            "image": {"docker-manifest-digest": manifest_digest},
                            "type": PAYLOAD_TYPE},
               "optional": None}
    return json.dumps(payload, separators=(",", ":")).encode()


def signed_manifest_digest(payload: bytes) -> str:
    """The manifest digest a (verified) simple-signing payload names."""
    try:
        critical = json.loads(payload)["critical"]
        digest = critical["image"]["docker-manifest-digest"]
        payload_type = critical["type"]
    except (ValueError, TypeError, KeyError):
        raise VerificationError("the signed payload is not a cosign simple-signing payload") from None
    if payload_type != PAYLOAD_TYPE or not isinstance(digest, str):
        raise VerificationError(f"the signed payload is of type {payload_type!r}, not "
                                f"{PAYLOAD_TYPE!r}")
    return digest


# --- Signing a layout ----------------------------------------------------------------------------

@dataclass
class SignResult:
    manifest_digest: str   # what was signed
    layout: str
    tag: str               # where the signatures are: sha256-<hex>.sig in the layout
    signature_count: int   # signatures under that tag now, this one included


def sign_image(ref: str, key_path: str, *, identity: str | None = None,
               password: str | None = None) -> SignResult:
    """Sign the manifest `ref` (LAYOUT[:TAG|@DIGEST]) resolves to, adding the signature to the
    layout under the manifest's signature tag (next to any earlier ones)."""
    from lazyfs.imageref import LoneBlob, open_reference, scheme_of

    if scheme_of(ref) not in (None, "file"):
        raise FormatError(f"{ref}: lazyfs sign writes into a local OCI layout directory; sign "
                          "the layout, then publish it (the signature travels with it)")
    private_key = load_private_key(key_path, password)
    target = open_reference(ref)
    if isinstance(target, LoneBlob):
        raise FormatError(f"{ref} is a lone blob: there is no image manifest to sign (convert "
                          "an image with `lazyfs convert` into an OCI layout)")
    with target as image:
        layout, digest = image.name, image.manifest_descriptor.digest
        if not os.path.isdir(layout):
            raise FormatError(f"{layout} is an oci-archive: sign the layout directory it was "
                              "made from (lazyfs convert without --archive)")
        platform = (image.config.get("os"), image.config.get("architecture"))
    payload = simple_signing_payload(digest, identity or layout)
    signature = base64.b64encode(sign_payload(private_key, payload)).decode()
    try:
        count = _store_signature(layout, digest, payload, signature, platform)
    except OSError as exc:
        raise LazyfsError(f"cannot store the signature in {layout}: {exc}") from None
    return SignResult(digest, layout, signature_tag(digest), count)


def _store_signature(layout: str, digest: str, payload: bytes, signature: str,
                     platform: tuple[str, str]) -> int:
    """Add one signature layer to the layout's signature manifest for `digest`; the count."""
    tag = signature_tag(digest)
    index_path = os.path.join(layout, "index.json")
    with open(index_path, "rb") as f:
        index_bytes = f.read()
    oci.parse_index(index_bytes, index_path)   # validated; edited as JSON to keep its other fields
    index = json.loads(index_bytes)
    layers = _existing_signature_layers(layout, index, tag)
    layer = oci.descriptor_of(SIMPLE_SIGNING_MEDIA_TYPE, payload, {SIGNATURE_ANNOTATION: signature})
    if layer not in layers:   # Ed25519 is deterministic: the same key again adds nothing
        layers.append(layer)
    _put_blob(layout, payload)
    os_name, architecture = platform
    # cosign leaves os and architecture empty; ours repeat the signed image's, so that image
    # resolvers that insist on a platform in every config (older lazyfs, some others) read it.
    config = {"architecture": architecture or "unknown", "os": os_name or "unknown",
              "config": {},
              "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]}}
    config_descriptor = oci.descriptor_of(oci.OCI_CONFIG, oci.encode_json(config))
    _put_blob(layout, oci.encode_json(config))
    manifest_bytes = oci.encode_json(oci.build_manifest(config_descriptor, layers))
    _put_blob(layout, manifest_bytes)
    entry = oci.descriptor_of(oci.OCI_MANIFEST, manifest_bytes, {oci.ANNOTATION_REF_NAME: tag})
    index["manifests"] = [m for m in index["manifests"] if _ref_name(m) != tag] + [entry.to_json()]
    _write_atomically(index_path, oci.encode_json(index))
    return len(layers)


def _ref_name(entry: Any) -> str | None:
    return (entry.get("annotations") or {}).get(oci.ANNOTATION_REF_NAME)


def _existing_signature_layers(layout: str, index: dict, tag: str) -> list[Descriptor]:
    """The signature layers already stored under tag (by lazyfs or by cosign), verified."""
    from lazyfs.oci_layout import Reference, open_oci_layout

    if not any(_ref_name(m) == tag for m in index["manifests"]):
        return []
    with open_oci_layout(Reference(layout, tag=tag)) as signatures:
        return [d for d in signatures.layers if d.media_type == SIMPLE_SIGNING_MEDIA_TYPE]


def _put_blob(layout: str, data: bytes) -> None:
    _write_atomically(os.path.join(layout, oci.blob_relpath(oci.sha256_digest(data))), data)


def _write_atomically(path: str, data: bytes) -> None:
    """A reader (a mount, a web server) sees the old file or the new one, never a part."""
    directory = os.path.dirname(path) or "."
    fd, temp_path = tempfile.mkstemp(prefix=".lazyfs-sign-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


# --- Verifying: the --verify-key policy ----------------------------------------------------------

def check_signed(image, key_paths: Iterable[str], sources=None) -> str:
    """Prove that `image` (an oci_layout.ImageSource) is signed by one of the keys.

    Returns the path of the key whose signature verified; raises VerificationError saying
    which check failed: no signature at all, none verifying with the keys, or a valid
    signature of another manifest (the manifest was altered and the signature moved along).
    """
    key_paths = list(key_paths)
    keys = [(path, load_public_key(path)) for path in key_paths]   # bad keys fail first
    digest = image.manifest_descriptor.digest
    signatures = _read_signatures(image, sources)
    if not signatures:
        raise VerificationError(f"{image.name}: unsigned image (no signature for manifest "
                                f"{digest})")
    other_manifest = None
    for payload, signature in signatures:
        key_path = next((path for path, key in keys
                         if signature_verifies(key, payload, signature)), None)
        if key_path is None:
            continue
        signed_digest = signed_manifest_digest(payload)
        if signed_digest == digest:
            return key_path
        other_manifest = signed_digest
    if other_manifest is not None:
        raise VerificationError(f"{image.name}: signed payload names manifest {other_manifest} "
                                f"but the image is {digest}")
    raise VerificationError(f"{image.name}: signature does not verify with any of the given keys "
                            f"({', '.join(key_paths)})")


def _read_signatures(image, sources) -> list[tuple[bytes, bytes]]:
    """(payload, signature) pairs stored for image's manifest; [] when there are none."""
    from lazyfs.imageref import LoneBlob, SourceOptions, open_reference

    ref = f"{image.name}:{signature_tag(image.manifest_descriptor.digest)}"
    try:
        target = open_reference(ref, sources=sources or SourceOptions())
    except NotFound:   # no such tag: unsigned. Network errors propagate as they are.
        return []
    except FormatError as exc:
        raise VerificationError(f"{ref}: unreadable signature manifest: {exc}") from None
    if isinstance(target, LoneBlob):
        return []
    pairs = []
    with target as signatures:
        layers = [d for d in signatures.layers if d.media_type == SIMPLE_SIGNING_MEDIA_TYPE]
        for layer in layers[:MAX_SIGNATURES]:
            # A garbled or oversized entry is still a signature, one that verifies with no key.
            try:
                signature = base64.b64decode(layer.annotations.get(SIGNATURE_ANNOTATION, ""),
                                             validate=True)
            except binascii.Error:
                signature = b""
            if not signature or layer.size > MAX_PAYLOAD_BYTES:
                pairs.append((b"", b""))
                continue
            pairs.append((signatures.read_blob(layer, MAX_PAYLOAD_BYTES), signature))
    return pairs


def require_image_for_keys(location: str) -> VerificationError:
    """The refusal for --verify-key on a lone blob."""
    return VerificationError(f"{location} is a lone blob: it has no image manifest, so nothing "
                             "is signed (--verify-key needs an OCI image; use --toc-digest to "
                             "pin a lone blob)")
