"""Model bundles: one file carrying a model, its manifest and an Ed25519 signature.

A bundle is an uncompressed POSIX tar (so member sizes are real bytes, bounded by the bundle size) with
exactly these regular-file members::

    model.json       the manifest (edge.classify.read_manifest format; must include "sha256" of model.tflite)
    model.tflite     the TFLite model
    signature.json   {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>", "signed_at": "..."}
                     (absent in an unsigned bundle)

The signature covers both files through a domain-separated message (see :func:`signing_message`), so a
signature can never be replayed for another purpose, and neither the manifest (labels, version,
normalisation) nor the weights can be changed without invalidating it. Keys are raw 32-byte Ed25519
keys; a key id is the first 16 hex digits of the SHA-256 of the public key. ``cryptography`` is imported
only when keys are used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

DOMAIN = b"fer-edge model bundle v1\x00"
MANIFEST = "model.json"
MODEL = "model.tflite"
SIGNATURE = "signature.json"
MEMBERS = (MANIFEST, MODEL, SIGNATURE)
ALG = "ed25519"
BUNDLE_SUFFIX = ".bundle"


class BundleError(Exception):
    """A bundle or key is unusable; the message says why and what to do."""


@dataclass
class Bundle:
    """The parsed contents of a bundle."""

    manifest_bytes: bytes
    model_bytes: bytes
    signature: dict | None = None

    @property
    def manifest(self) -> dict:
        return json.loads(self.manifest_bytes)

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "?"))

    @property
    def model_sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()


def signing_message(manifest_bytes: bytes, model_bytes: bytes) -> bytes:
    """The bytes an Ed25519 signature covers: domain tag + SHA-256 of the manifest + SHA-256 of the model."""
    return DOMAIN + hashlib.sha256(manifest_bytes).digest() + hashlib.sha256(model_bytes).digest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- reading and writing ---------------------------------------------------------------------------------

def read_bundle(data: bytes) -> Bundle:
    """Parse and check a bundle's structure and manifest (not its signature); BundleError if unusable."""
    if len(data) < 512:
        raise BundleError(f"not a model bundle: only {len(data)} bytes (truncated?)")
    files: dict[str, bytes] = {}
    end = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if member.name not in MEMBERS:
                    raise BundleError(f"unexpected member {member.name!r} in the bundle (allowed: "
                                      f"{', '.join(MEMBERS)})")
                if not member.isreg():
                    raise BundleError(f"bundle member {member.name} is not a regular file")
                if member.name in files:
                    raise BundleError(f"bundle member {member.name} appears twice")
                fh = tar.extractfile(member)
                content = fh.read() if fh is not None else b""
                if len(content) != member.size:
                    raise BundleError(f"bundle member {member.name} is truncated")
                files[member.name] = content
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"not a model bundle, or truncated ({e})") from None
    # tarfile takes a header cut short for the end of the archive: insist on the end-of-archive marker.
    if data[end:end + 2 * tarfile.BLOCKSIZE] != bytes(2 * tarfile.BLOCKSIZE):
        raise BundleError("bundle is truncated (it does not end with the end-of-archive marker)")
    for name in (MANIFEST, MODEL):
        if name not in files:
            raise BundleError(f"bundle lacks {name} (truncated, or not made by `fer-edge model sign`?)")
    signature = None
    if SIGNATURE in files:
        try:
            signature = json.loads(files[SIGNATURE])
        except ValueError as e:
            raise BundleError(f"{SIGNATURE} is not JSON ({e})") from None
        if not isinstance(signature, dict):
            raise BundleError(f"{SIGNATURE} must be a JSON object")
    bundle = Bundle(files[MANIFEST], files[MODEL], signature)
    check_manifest(bundle.manifest_bytes, bundle.model_bytes)
    return bundle


def check_manifest(manifest_bytes: bytes, model_bytes: bytes) -> dict:
    """Parse a manifest and check the fields an update needs, including its sha256 of the model."""
    try:
        man = json.loads(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"{MANIFEST} is not JSON ({e})") from None
    if not isinstance(man, dict):
        raise BundleError(f"{MANIFEST} must be a JSON object")
    missing = [k for k in ("version", "labels", "input", "sha256") if k not in man]
    if missing:
        raise BundleError(f"{MANIFEST} lacks {', '.join(missing)}")
    if not isinstance(man["version"], str) or not man["version"].strip():
        raise BundleError(f"{MANIFEST} version must be a non-empty string")
    if man["sha256"] != sha256_hex(model_bytes):
        raise BundleError(f"{MANIFEST} sha256 {str(man['sha256'])[:12]}… does not match {MODEL} "
                          f"({sha256_hex(model_bytes)[:12]}…): bundle corrupt or manifest of another model")
    return man


def write_bundle(bundle: Bundle) -> bytes:
    """Serialise a bundle (deterministic: fixed order, mtime, owner and mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        members = [(MANIFEST, bundle.manifest_bytes), (MODEL, bundle.model_bytes)]
        if bundle.signature is not None:
            members.append((SIGNATURE, json.dumps(bundle.signature, indent=1).encode()))
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def bundle_from_model(model_path: str | Path) -> Bundle:
    """An unsigned bundle from a .tflite and the .json manifest beside it (adds the manifest's sha256
    when missing; refuses a manifest whose sha256 names another file)."""
    model_path = Path(model_path)
    manifest_path = model_path.with_suffix(".json")
    try:
        model_bytes = model_path.read_bytes()
        manifest_bytes = manifest_path.read_bytes()
    except OSError as e:
        raise BundleError(f"{e.filename}: {e.strerror}") from None
    try:
        man = json.loads(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"{manifest_path}: not JSON ({e})") from None
    if not isinstance(man, dict):
        raise BundleError(f"{manifest_path}: must be a JSON object")
    digest = sha256_hex(model_bytes)
    if not man.get("sha256"):
        man["sha256"] = digest
        man.setdefault("size_bytes", len(model_bytes))
        manifest_bytes = (json.dumps(man, indent=2) + "\n").encode()
    check_manifest(manifest_bytes, model_bytes)
    return Bundle(manifest_bytes, model_bytes)


def load_bundle_file(path: str | Path) -> Bundle:
    """A bundle file, or a .tflite with its manifest beside it (made into an unsigned bundle)."""
    path = Path(path)
    if path.suffix == ".tflite":
        return bundle_from_model(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: {e.strerror}") from None
    return read_bundle(data)


# --- keys --------------------------------------------------------------------------------------------------

def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("the cryptography package is needed for signatures: pip install cryptography "
                          "(Raspberry Pi OS: apt install python3-cryptography)") from None
    return ed25519, serialization, InvalidSignature


def key_id(public_raw: bytes) -> str:
    """Short id of a public key: 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private key PKCS#8 PEM, raw 32-byte public key)."""
    ed25519, serialization, _ = _crypto()
    priv = ed25519.Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, raw


def public_key_text(public_raw: bytes) -> str:
    """Contents of a .pub file: a comment with the key id and the base64 raw key."""
    return (f"# fer-edge model signing public key, id {key_id(public_raw)}\n"
            f"{base64.b64encode(public_raw).decode()}\n")


def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM file written by `fer-edge model keygen`."""
    ed25519, serialization, _ = _crypto()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 key (make one with `fer-edge model keygen`)")
    return key


def _decode_b64_key(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def parse_public_key(entry: str) -> bytes:
    """Raw public key from a config entry: a base64 key, or a file (.pub from keygen, or PEM)."""
    entry = entry.strip()
    raw = _decode_b64_key(entry)
    if raw is not None and not os.path.exists(entry):
        return raw
    path = Path(entry).expanduser()
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not a text file"
        raise BundleError(f"public key {entry!r}: neither a base64 Ed25519 key nor a readable key file ({why})") \
            from None
    if "-----BEGIN" in text:
        ed25519, serialization, _ = _crypto()
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as e:
            raise BundleError(f"{path}: unreadable PEM public key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise BundleError(f"{path}: not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    raw = _decode_b64_key(lines[0]) if len(lines) == 1 else None
    if raw is None:
        raise BundleError(f"{path}: expected one base64 Ed25519 public key line (as written by "
                          "`fer-edge model keygen`)")
    return raw


def load_public_keys(entries: list[str]) -> dict[str, bytes]:
    """{key id: raw public key} for config entries; BundleError naming the first bad one."""
    return {key_id(raw): raw for raw in (parse_public_key(e) for e in entries)}


# --- sign and verify ----------------------------------------------------------------------------------------

def sign_bundle(bundle: Bundle, private_key) -> Bundle:
    """A copy of ``bundle`` signed with an Ed25519 private key (any earlier signature replaced)."""
    _, serialization, _ = _crypto()
    raw_pub = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = private_key.sign(signing_message(bundle.manifest_bytes, bundle.model_bytes))
    return Bundle(bundle.manifest_bytes, bundle.model_bytes,
                  {"alg": ALG, "key_id": key_id(raw_pub), "signature": base64.b64encode(sig).decode(),
                   "signed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def verify_bundle(bundle: Bundle, public_keys: dict[str, bytes], *, allow_unsigned: bool = False) -> str:
    """Check the signature against trusted keys; returns the signing key id ("unsigned" if allowed).

    A signature that is present must verify, even when unsigned bundles are allowed.
    """
    sig = bundle.signature
    if sig is None:
        if allow_unsigned:
            return "unsigned"
        raise BundleError("bundle is not signed: sign it with `fer-edge model sign BUNDLE --key KEY` "
                          "(or set update.allow_unsigned = true on the device, not recommended)")
    if sig.get("alg") != ALG:
        raise BundleError(f"unsupported signature algorithm {sig.get('alg')!r} (expected {ALG})")
    kid = str(sig.get("key_id", ""))
    if kid not in public_keys:
        trusted = ", ".join(sorted(public_keys)) or "none (set update.public_keys)"
        raise BundleError(f"signed with unknown key {kid or '?'}; this device trusts: {trusted}")
    try:
        signature = base64.b64decode(str(sig.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise BundleError("signature is not valid base64") from None
    ed25519, _, InvalidSignature = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_keys[kid]).verify(
            signature, signing_message(bundle.manifest_bytes, bundle.model_bytes))
    except InvalidSignature:
        raise BundleError(f"signature does not verify with key {kid}: the bundle was altered after signing "
                          "or the signature is corrupt") from None
    return kid
