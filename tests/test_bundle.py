"""Model bundles: format 2, Ed25519 signatures over exact bytes, the strict tar reader (sparse, links, pax,
oversized claims refused by their headers, without expanding anything), keys, and the offline
`fer-edge model keygen|sign|verify` commands."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="cryptography not installed (pip install cryptography)")

from edge.bundle import (DOMAIN, MAGIC, Bundle, BundleError, bundle_from_model, generate_keypair,  # noqa: E402
                         key_id, load_private_key, load_public_keys, load_verified, parse_public_key,
                         public_key_text, read_bundle, read_tar, sha256_hex, sign_bundle, signing_message,
                         verify_bundle, write_bundle)
from edge.classify import DEFAULT_MODEL  # noqa: E402
from edge.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs on disk: 'op' (trusted) and 'other'."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("op", "other"):
        pem, raw = generate_keypair()
        (d / f"{name}.key").write_bytes(pem)
        (d / f"{name}.pub").write_text(public_key_text(raw))
        out[name] = {"key": d / f"{name}.key", "pub": d / f"{name}.pub", "raw": raw, "id": key_id(raw)}
    return out


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """The bundled model and its manifest, version bumped, in a temp dir."""
    man = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    man["version"] = "9000.0.1"
    dst = tmp_path / "m.tflite"
    dst.write_bytes(DEFAULT_MODEL.read_bytes())
    dst.with_suffix(".json").write_text(json.dumps(man))
    return dst


def signed(model_copy: Path, keys, who: str = "op") -> Bundle:
    return sign_bundle(bundle_from_model(model_copy), load_private_key(keys[who]["key"]))


def test_sign_verify_round_trip_through_bytes(model_copy, keys):
    b = signed(model_copy, keys)
    data = write_bundle(b)
    assert data == write_bundle(b), "serialisation must be deterministic"
    back = read_bundle(data)
    assert back.manifest_bytes == b.manifest_bytes and back.model_bytes == DEFAULT_MODEL.read_bytes()
    assert back.version == "9000.0.1" and back.model_sha256 == sha256_hex(DEFAULT_MODEL.read_bytes())
    trusted = load_public_keys([str(keys["op"]["pub"])])
    assert verify_bundle(back, trusted) == keys["op"]["id"]
    assert len(keys["op"]["id"]) == 16 and back.signature["alg"] == "ed25519"
    assert data.startswith(MAGIC)
    with tarfile.open(fileobj=io.BytesIO(back.payload)) as tar:
        assert tar.getnames() == ["model.json", "model.tflite"]
    assert load_verified(data, trusted) == (back, keys["op"]["id"])


def test_signature_covers_manifest_and_model(model_copy, keys):
    b = signed(model_copy, keys)
    trusted = load_public_keys([str(keys["op"]["pub"])])
    man = json.loads(b.manifest_bytes)
    man["labels"] = list(reversed(man["labels"]))  # same weights, different meaning: must not verify
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(Bundle(json.dumps(man).encode(), b.model_bytes, b.signature), trusted)
    model = bytearray(b.model_bytes)
    model[-1] ^= 1
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(Bundle(b.manifest_bytes, bytes(model), b.signature), trusted)
    # ... and once serialised, an altered model no longer matches the manifest's sha256 either.
    with pytest.raises(BundleError, match="does not match model.tflite"):
        read_bundle(write_bundle(Bundle(b.manifest_bytes, bytes(model), b.signature)))


def test_signature_is_domain_separated(model_copy, keys):
    """A signature over the same bytes without the domain tag (e.g. made for something else) is refused."""
    b = bundle_from_model(model_copy)
    priv = load_private_key(keys["op"]["key"])
    msg = signing_message(b.payload)
    assert msg.startswith(DOMAIN)
    bare = priv.sign(msg[len(DOMAIN):])
    forged = Bundle(b.manifest_bytes, b.model_bytes,
                    {"alg": "ed25519", "key_id": keys["op"]["id"], "signature": base64.b64encode(bare).decode()})
    with pytest.raises(BundleError, match="does not verify"):
        verify_bundle(forged, load_public_keys([str(keys["op"]["pub"])]))


def test_unknown_key_unsigned_and_bad_signature_fields(model_copy, keys):
    trusted = load_public_keys([str(keys["op"]["pub"])])
    other = signed(model_copy, keys, "other")
    with pytest.raises(BundleError, match=f"unknown key {keys['other']['id']}.*trusts: {keys['op']['id']}"):
        verify_bundle(other, trusted)
    with pytest.raises(BundleError, match="none \\(set update.public_keys\\)"):
        verify_bundle(other, {})
    unsigned = bundle_from_model(model_copy)
    with pytest.raises(BundleError, match="not signed"):
        verify_bundle(unsigned, trusted)
    assert verify_bundle(unsigned, trusted, allow_unsigned=True) == "unsigned"
    # A signature that is present must verify even when unsigned bundles are allowed.
    with pytest.raises(BundleError, match="unknown key"):
        verify_bundle(other, trusted, allow_unsigned=True)
    good = signed(model_copy, keys)
    for sig, msg in ((dict(good.signature, alg="rsa"), "unsupported signature algorithm"),
                     (dict(good.signature, signature="!!not base64!!"), "not valid base64"),
                     (dict(good.signature, signature=base64.b64encode(b"x" * 64).decode()), "does not verify")):
        with pytest.raises(BundleError, match=msg):
            verify_bundle(Bundle(good.manifest_bytes, good.model_bytes, sig), trusted)


def _tar(members: list[tuple[str, bytes]], **kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=kw.pop("mode", "w:"), format=kw.pop("format", tarfile.USTAR_FORMAT)) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _env(payload: bytes, sig: dict | None = None) -> bytes:
    return MAGIC + json.dumps(sig or {}).encode() + b"\n" + payload


def gnu_sparse(name: bytes, realsize: int, stored: bytes = b"x" * 512) -> bytes:
    """A GNU sparse tar member: ``stored`` bytes on disk that tarfile expands to ``realsize`` on read."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136], h[136:148] = b"%011o\0" % len(stored), b"%011o\0" % 0
    h[156:157], h[257:263], h[263:265] = b"S", b"ustar ", b" \0"
    h[386:398], h[398:410] = b"%011o\0" % (realsize - len(stored)), b"%011o\0" % len(stored)
    h[483:495] = b"%011o\0" % realsize
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + stored + bytes(-len(stored) % 512)


def test_sparse_member_is_refused_by_its_header_without_expanding(model_copy, keys):
    """Issue 20 item 1: a 2 KiB bundle holding a sparse member that expands to 3 GiB in tarfile."""
    payload = _tar([("model.json", b"{}")])[:1024] + gnu_sparse(b"model.tflite", 3 << 30) + bytes(1024)
    assert len(payload) == 3072
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:  # what the old reader did with it
        assert tar.getmember("model.tflite").issparse() and tar.getmember("model.tflite").size == 3 << 30
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="GNU sparse file, not a regular file: refused unread"):
            read_bundle(_env(payload))
        # Signed by a trusted key or not, it is refused; unsigned, before the tar is even looked at.
        with pytest.raises(BundleError, match="not signed"):
            load_verified(_env(payload), load_public_keys([str(keys["op"]["pub"])]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1e6, f"peak {peak} bytes while refusing a {len(payload)}-byte bundle"


def test_signature_is_checked_before_the_payload_is_parsed(model_copy, keys, monkeypatch):
    import edge.bundle

    trusted = load_public_keys([str(keys["op"]["pub"])])
    good = write_bundle(signed(model_copy, keys))
    calls = []
    monkeypatch.setattr(edge.bundle, "read_tar", lambda *a, **k: calls.append(1) or {})
    for data in (write_bundle(signed(model_copy, keys, "other")),
                 good[:-600] + b"x" * 600,  # payload altered after signing
                 write_bundle(bundle_from_model(model_copy))):
        with pytest.raises(BundleError, match="unknown key|does not verify|not signed"):
            load_verified(data, trusted)
    assert calls == [], "the tar was read before the signature was checked"


def test_malformed_bundles_give_clear_errors(model_copy, keys):
    b = signed(model_copy, keys)
    data = write_bundle(b)
    head = len(data) - len(b.payload)
    # Truncated anywhere before the end-of-archive marker: always a BundleError, never another exception
    # (cutting the zero padding after the marker is harmless).
    def padded(n):
        return -(-n // 512) * 512

    marker_end = head + 2 * 512 + padded(len(b.manifest_bytes)) + padded(len(b.model_bytes)) + 1024
    for cut in list(range(0, marker_end, 97)) + [marker_end - 1]:
        with pytest.raises(BundleError, match="truncated|lacks|not a model bundle|claims|signature line"):
            read_bundle(data[:cut])
    assert read_bundle(data[:marker_end]).signature == b.signature
    with pytest.raises(BundleError, match="not a model bundle"):
        read_bundle(b"\x00garbage" * 200)
    with pytest.raises(BundleError, match="format 1 bundle.*re-sign it"):
        read_bundle(_tar([("model.json", b.manifest_bytes), ("model.tflite", b.model_bytes)]))
    with pytest.raises(BundleError, match="signature line missing or over 4096 bytes"):
        read_bundle(MAGIC + b"{" * 5000)
    with pytest.raises(BundleError, match="signature line is not JSON"):
        read_bundle(MAGIC + b"[[[\n" + b.payload)
    with pytest.raises(BundleError, match="unexpected member '../evil'"):
        read_bundle(_env(_tar([("model.json", b.manifest_bytes), ("../evil", b"x")])))
    with pytest.raises(BundleError, match="appears twice"):
        read_bundle(_env(_tar([("model.json", b.manifest_bytes), ("model.json", b.manifest_bytes),
                               ("model.tflite", b.model_bytes)])))
    with pytest.raises(BundleError, match="not a model bundle"):  # compressed tars are not payloads
        read_bundle(_env(_tar([("model.json", b.manifest_bytes), ("model.tflite", b.model_bytes)], mode="w:gz")))
    for kind, what in ((tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"),
                       (tarfile.DIRTYPE, "directory"), (tarfile.FIFOTYPE, "FIFO"), (tarfile.CHRTYPE, "character")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
            link = tarfile.TarInfo("model.tflite")
            link.type, link.linkname = kind, "/etc/passwd"
            tar.addfile(link)
        with pytest.raises(BundleError, match=f"{what}.*not a regular file"):
            read_bundle(_env(buf.getvalue()))
    # pax headers (which can restate a member's size) and GNU long names are refused by their headers too.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("model.json")
        info.size, info.pax_headers = 2, {"size": "99999999999"}
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(BundleError, match="pax extended header"):
        read_bundle(_env(buf.getvalue()))
    with pytest.raises(BundleError, match="GNU long name"):
        read_bundle(_env(_tar([("m" * 120, b"x")], format=tarfile.GNU_FORMAT)))
    # A header claiming more bytes than the bundle holds: refused without reading.
    one = bytearray(_tar([("model.tflite", b"x" * 10)]))
    one[124:136] = b"%011o\0" % (1 << 32)
    one[148:156] = b" " * 8
    one[148:156] = b"%06o\0 " % sum(one[:512])
    with pytest.raises(BundleError, match="claims 4294967296 bytes.*refused unread"):
        read_tar(bytes(one))
    one[150] ^= 1
    with pytest.raises(BundleError, match="bad tar header checksum"):
        read_tar(bytes(one))
    man = json.loads(b.manifest_bytes)
    del man["sha256"]
    with pytest.raises(BundleError, match="lacks sha256"):
        read_bundle(_env(_tar([("model.json", json.dumps(man).encode()), ("model.tflite", b.model_bytes)])))
    with pytest.raises(BundleError, match="model.json is not JSON"):
        read_bundle(_env(_tar([("model.json", b"{nope"), ("model.tflite", b.model_bytes)])))


def test_bundle_from_model_adds_missing_sha_and_refuses_a_foreign_one(model_copy):
    man = json.loads(model_copy.with_suffix(".json").read_text())
    del man["sha256"]
    model_copy.with_suffix(".json").write_text(json.dumps(man))
    b = bundle_from_model(model_copy)
    assert b.manifest["sha256"] == sha256_hex(model_copy.read_bytes())
    man["sha256"] = "0" * 64
    model_copy.with_suffix(".json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="does not match"):
        bundle_from_model(model_copy)
    model_copy.with_suffix(".json").unlink()
    with pytest.raises(BundleError, match="No such file"):
        bundle_from_model(model_copy)


def test_public_key_formats(keys, tmp_path):
    raw = keys["op"]["raw"]
    b64 = base64.b64encode(raw).decode()
    assert parse_public_key(b64) == raw
    assert parse_public_key(str(keys["op"]["pub"])) == raw
    from cryptography.hazmat.primitives import serialization

    pem = load_private_key(keys["op"]["key"]).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "op.pem").write_bytes(pem)
    assert parse_public_key(str(tmp_path / "op.pem")) == raw
    assert load_public_keys([b64, str(keys["other"]["pub"])]) == {keys["op"]["id"]: raw,
                                                                   keys["other"]["id"]: keys["other"]["raw"]}
    (tmp_path / "bad.pub").write_text("hello\n")
    for entry, msg in ((str(tmp_path / "missing.pub"), "neither a base64 Ed25519 key nor a readable key file"),
                       (base64.b64encode(b"short").decode(), "neither a base64"),
                       (str(tmp_path / "bad.pub"), "expected one base64 Ed25519 public key line")):
        with pytest.raises(BundleError, match=msg):
            parse_public_key(entry)
    with pytest.raises(BundleError, match="not an unencrypted PEM private key"):
        load_private_key(keys["op"]["pub"])


# --- the CLI, offline -------------------------------------------------------------------------------------

def test_cli_keygen_sign_verify(tmp_path, model_copy, capsys):
    prefix = tmp_path / "k" / "op"
    assert main(["model", "keygen", "--out", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert (prefix.with_suffix(".key").stat().st_mode & 0o777) == 0o600
    raw = parse_public_key(str(prefix.with_suffix(".pub")))
    assert key_id(raw) in out and base64.b64encode(raw).decode() in out
    assert main(["model", "keygen", "--out", str(prefix)]) == 2
    assert "exists; use --force" in capsys.readouterr().err

    assert main(["model", "sign", str(model_copy), "--key", str(prefix.with_suffix(".key"))]) == 0
    out = capsys.readouterr().out
    bundle = model_copy.with_name("m-9000.0.1.bundle")
    assert bundle.is_file() and "local check: loads" in out and "labelled FER-2013 test faces right" in out
    data = bundle.read_bytes()
    assert sha256_hex(data) in out

    assert main(["model", "verify", str(bundle), "--pub", str(prefix.with_suffix(".pub"))]) == 0
    assert "OK" in capsys.readouterr().out
    other = tmp_path / "other"
    assert main(["model", "keygen", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["model", "verify", str(bundle), "--pub", f"{other}.pub"]) == 1
    assert "unknown key" in capsys.readouterr().err
    # Re-signing a bundle in place with another key.
    assert main(["model", "sign", str(bundle), "--key", f"{other}.key", "--no-check"]) == 0
    capsys.readouterr()
    assert main(["model", "verify", str(bundle), "--pub", f"{other}.pub"]) == 0
    capsys.readouterr()
    # Migration: a format 1 bundle (plain tar, signature.json inside) is refused, and re-signed as format 2.
    old = tmp_path / "old.bundle"
    b = read_bundle(bundle.read_bytes())
    old.write_bytes(_tar([("model.json", b.manifest_bytes), ("model.tflite", b.model_bytes),
                          ("signature.json", b'{"alg": "ed25519"}')]))
    assert main(["model", "verify", str(old), "--pub", f"{other}.pub"]) == 1
    assert "format 1 bundle" in capsys.readouterr().err
    assert main(["model", "sign", str(old), "--key", f"{other}.key", "--no-check"]) == 0
    capsys.readouterr()
    assert old.read_bytes().startswith(MAGIC)
    assert main(["model", "verify", str(old), "--pub", f"{other}.pub"]) == 0


def test_cli_sign_refuses_a_model_the_device_would_refuse(tmp_path, model_copy, keys, capsys):
    model_copy.write_bytes(b"not a tflite model at all" * 50)
    man = json.loads(model_copy.with_suffix(".json").read_text())
    man["sha256"] = sha256_hex(model_copy.read_bytes())
    model_copy.with_suffix(".json").write_text(json.dumps(man))
    assert main(["model", "sign", str(model_copy), "--key", str(keys["op"]["key"])]) == 1
    err = capsys.readouterr().err
    assert "fails the device checks" in err and "not a loadable TFLite model" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.bundle"))
    assert main(["model", "sign", str(tmp_path / "missing.tflite"), "--key", str(keys["op"]["key"])]) == 1
    assert "No such file" in capsys.readouterr().err
