"""Model bundles: one file carrying a model, its manifest and an Ed25519 signature over its exact bytes.

Format 2 (``fer-edge model sign`` writes it; devices accept nothing else)::

    fer-edge-bundle/2\n                          magic line
    {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>", "signed_at": "..."}\n
                                                 the signature line ({} in an unsigned bundle), <= 4 KiB
    <payload>                                    an uncompressed POSIX (ustar) tar with exactly two regular
                                                 files: model.json (the manifest, with "sha256" of the model)
                                                 and model.tflite

The signature covers the payload's exact bytes (domain tag + SHA-256 of the payload, see
:func:`signing_message`), so a device checks it before it parses or unpacks anything: only the magic line
and the one bounded signature line are read first. The payload is then read by a strict ustar reader that
refuses sparse, linked, special, long-name and pax members by their headers, and any member claiming more
bytes than the file holds, without reading or expanding a member (members are slices of the payload).

Format 1 (a plain tar with signature.json inside, signed over the two members) is refused by devices: its
signature could only be checked after unpacking. ``fer-edge model sign OLD.bundle --key KEY`` re-signs one
into format 2. Keys are raw 32-byte Ed25519 keys; a key id is the first 16 hex digits of the SHA-256 of
the public key. ``cryptography`` is imported only when keys are used.
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

FORMAT = "fer-edge-bundle/2"
MAGIC = FORMAT.encode() + b"\n"
DOMAIN = b"fer-edge model bundle v2\x00"
MANIFEST = "model.json"
MODEL = "model.tflite"
SIGNATURE = "signature.json"  # format 1 only
MEMBERS = (MANIFEST, MODEL)
ALG = "ed25519"
BUNDLE_SUFFIX = ".bundle"
MAX_SIGNATURE_LINE = 4096
_BLOCK = 512
# Refused tar member types, by their typeflag, with what they are (for the error message).
_TAR_TYPES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
              b"5": "a directory", b"6": "a FIFO", b"7": "a contiguous file", b"S": "a GNU sparse file",
              b"x": "a pax extended header", b"g": "a pax global header", b"L": "a GNU long name",
              b"K": "a GNU long link name", b"D": "a GNU dump directory", b"M": "a GNU multi-volume part",
              b"V": "a GNU volume label"}


class BundleError(Exception):
    """A bundle or key is unusable; the message says why and what to do."""


@dataclass
class Bundle:
    """The parsed contents of a bundle; ``payload`` is the exact tar the signature covers."""

    manifest_bytes: bytes
    model_bytes: bytes
    signature: dict | None = None
    payload: bytes | None = None

    def __post_init__(self) -> None:
        if self.payload is None:
            self.payload = write_payload(self.manifest_bytes, self.model_bytes)

    @property
    def manifest(self) -> dict:
        return json.loads(self.manifest_bytes)

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "?"))

    @property
    def model_sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()


def signing_message(payload: bytes) -> bytes:
    """The bytes an Ed25519 signature covers: domain tag + SHA-256 of the payload (the tar)."""
    return DOMAIN + hashlib.sha256(payload).digest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- reading and writing ---------------------------------------------------------------------------------

def split_bundle(data: bytes) -> tuple[dict | None, bytes]:
    """(signature or None, payload) of a format 2 bundle, reading only the magic and the signature line."""
    if not data.startswith(MAGIC):
        if len(data) >= 263 and data[257:262] == b"ustar":
            raise BundleError("format 1 bundle (signature inside the tar, checkable only after unpacking): "
                              "devices accept format 2 only; re-sign it with `fer-edge model sign BUNDLE --key KEY`")
        raise BundleError(f"not a model bundle (it does not start with {FORMAT!r}; truncated, or not made by "
                          "`fer-edge model sign`?)")
    nl = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_SIGNATURE_LINE + 1)
    if nl < 0:
        raise BundleError(f"bundle signature line missing or over {MAX_SIGNATURE_LINE} bytes (truncated?)")
    line = data[len(MAGIC):nl]
    try:
        sig = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle signature line is not JSON ({e})") from None
    if not isinstance(sig, dict) or not all(isinstance(v, str) for v in sig.values()):
        raise BundleError("bundle signature line must be a JSON object of strings")
    return (sig or None), data[nl + 1:]


def read_tar(payload: bytes, allowed: tuple[str, ...] = MEMBERS) -> dict[str, bytes]:
    """The regular-file members of an uncompressed ustar archive, judged by their headers alone.

    Refuses (BundleError) sparse, linked, special, pax and GNU extension members, names outside
    ``allowed``, duplicates, bad header checksums, and members claiming more bytes than the archive
    holds; never expands anything: each member is a slice of ``payload``.
    """
    files: dict[str, bytes] = {}
    pos = 0
    while True:
        block = payload[pos:pos + _BLOCK]
        if len(block) < _BLOCK:
            raise BundleError("bundle is truncated (it does not end with the end-of-archive marker)")
        if block == bytes(_BLOCK):
            if payload[pos + _BLOCK:pos + 2 * _BLOCK] != bytes(_BLOCK):
                raise BundleError("bundle is truncated (it does not end with the end-of-archive marker)")
            break
        try:
            stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        except ValueError:
            stored = -1
        if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise BundleError(f"not a model bundle, or corrupt (bad tar header checksum at byte {pos})")
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        kind = block[156:157]
        if kind not in (b"0", b"\0"):
            what = _TAR_TYPES.get(kind, f"of tar type {kind!r}")
            raise BundleError(f"bundle member {name!r} is {what}, not a regular file: refused unread")
        if block[345:500].strip(b"\0"):
            raise BundleError(f"bundle member {name!r} has a ustar name prefix: refused (names are short)")
        if name not in allowed:
            raise BundleError(f"unexpected member {name!r} in the bundle (allowed: {', '.join(allowed)})")
        if name in files:
            raise BundleError(f"bundle member {name} appears twice")
        field = block[124:136]
        if field[:1] and field[0] & 0x80:
            raise BundleError(f"bundle member {name} has a base-256 size (over 8 GiB): refused unread")
        try:
            size = int(field.replace(b"\0", b" ").strip() or b"0", 8)
        except ValueError:
            raise BundleError(f"bundle member {name} has an unreadable size field") from None
        start = pos + _BLOCK
        if start + size > len(payload):
            raise BundleError(f"bundle member {name} claims {size} bytes but the bundle holds "
                              f"{max(0, len(payload) - start)} after its header: truncated or forged; refused unread")
        files[name] = payload[start:start + size]
        pos = start + -(-size // _BLOCK) * _BLOCK
    return files


def read_payload(payload: bytes, signature: dict | None = None) -> Bundle:
    """A Bundle from a payload (the tar); checks structure and manifest, not the signature."""
    files = read_tar(payload)
    for name in MEMBERS:
        if name not in files:
            raise BundleError(f"bundle lacks {name} (truncated, or not made by `fer-edge model sign`?)")
    bundle = Bundle(files[MANIFEST], files[MODEL], signature, payload)
    check_manifest(bundle.manifest_bytes, bundle.model_bytes)
    return bundle


def read_bundle(data: bytes) -> Bundle:
    """Parse and check a format 2 bundle's structure and manifest (NOT its signature: see load_verified)."""
    sig, payload = split_bundle(data)
    return read_payload(payload, sig)


def load_verified(data: bytes, public_keys: dict[str, bytes], *, allow_unsigned: bool = False) -> tuple[Bundle, str]:
    """(bundle, signing key id) of a bundle whose signature is checked BEFORE its payload is parsed."""
    sig, payload = split_bundle(data)
    kid = verify_signature(sig, payload, public_keys, allow_unsigned=allow_unsigned)
    return read_payload(payload, sig), kid


def _read_v1(data: bytes) -> Bundle:
    """A format 1 bundle's model and manifest (its old signature dropped), for re-signing on the operator side."""
    files = read_tar(data, (MANIFEST, MODEL, SIGNATURE))
    for name in MEMBERS:
        if name not in files:
            raise BundleError(f"bundle lacks {name}")
    check_manifest(files[MANIFEST], files[MODEL])
    return Bundle(files[MANIFEST], files[MODEL])


def check_manifest(manifest_bytes: bytes, model_bytes: bytes) -> dict:
    """Parse a manifest and check the fields an update needs, including its sha256 of the model."""
    try:
        man = json.loads(manifest_bytes)
    except (ValueError, RecursionError) as e:
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


def write_payload(manifest_bytes: bytes, model_bytes: bytes) -> bytes:
    """The payload tar (deterministic: fixed order, mtime, owner and mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in ((MANIFEST, manifest_bytes), (MODEL, model_bytes)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def write_bundle(bundle: Bundle) -> bytes:
    """Serialise a bundle: magic line, signature line ({} when unsigned), payload."""
    line = json.dumps(bundle.signature or {}, separators=(",", ":")).encode()
    return MAGIC + line + b"\n" + bundle.payload


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


def load_bundle_file(path: str | Path, *, allow_v1: bool = False) -> Bundle:
    """A bundle file, or a .tflite with its manifest beside it (made into an unsigned bundle).

    ``allow_v1``: also read a format 1 bundle (for re-signing it; its old signature is dropped).
    """
    path = Path(path)
    if path.suffix == ".tflite":
        return bundle_from_model(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: {e.strerror}") from None
    if allow_v1 and not data.startswith(MAGIC) and data[257:262] == b"ustar":
        return _read_v1(data)
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
    sig = private_key.sign(signing_message(bundle.payload))
    return Bundle(bundle.manifest_bytes, bundle.model_bytes,
                  {"alg": ALG, "key_id": key_id(raw_pub), "signature": base64.b64encode(sig).decode(),
                   "signed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, bundle.payload)


def verify_ed25519(public_keys: dict[str, bytes], kid: str, signature_b64: str, message: bytes, what: str) -> str:
    """Check one Ed25519 signature by a trusted key id; returns the key id, BundleError naming ``what``."""
    if kid not in public_keys:
        trusted = ", ".join(sorted(public_keys)) or "none (set update.public_keys)"
        raise BundleError(f"{what} signed with unknown key {kid or '?'}; this device trusts: {trusted}")
    try:
        signature = base64.b64decode(str(signature_b64), validate=True)
    except (binascii.Error, ValueError):
        raise BundleError(f"{what} signature is not valid base64") from None
    ed25519, _, InvalidSignature = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_keys[kid]).verify(signature, message)
    except InvalidSignature:
        raise BundleError(f"{what} signature does not verify with key {kid}: altered after signing, or the "
                          "signature is corrupt") from None
    return kid


def verify_signature(sig: dict | None, payload: bytes, public_keys: dict[str, bytes], *,
                     allow_unsigned: bool = False) -> str:
    """Check a bundle signature over the payload's exact bytes; the key id ("unsigned" if allowed).

    A signature that is present must verify, even when unsigned bundles are allowed.
    """
    if sig is None:
        if allow_unsigned:
            return "unsigned"
        raise BundleError("bundle is not signed: sign it with `fer-edge model sign BUNDLE --key KEY` "
                          "(or set update.allow_unsigned = true on the device, not recommended)")
    if sig.get("alg") != ALG:
        raise BundleError(f"unsupported signature algorithm {sig.get('alg')!r} (expected {ALG})")
    return verify_ed25519(public_keys, str(sig.get("key_id", "")), sig.get("signature", ""),
                          signing_message(payload), "bundle")


def verify_bundle(bundle: Bundle, public_keys: dict[str, bytes], *, allow_unsigned: bool = False) -> str:
    """Check a parsed bundle's signature (operator side; devices use :func:`load_verified`)."""
    return verify_signature(bundle.signature, bundle.payload, public_keys, allow_unsigned=allow_unsigned)
