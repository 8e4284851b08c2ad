"""Helpers shared by the model-update tests: keys, good models, bundles and signed commands.

Good test models are the shipped model with zero bytes appended (the TFLite loader ignores trailing
bytes): each is a distinct file with its own sha256 that reads faces exactly like the shipped model, so it
passes the labelled self-test without TensorFlow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

from edge.bundle import Bundle, generate_keypair, key_id, load_private_key, public_key_text, sign_bundle, write_bundle
from edge.classify import DEFAULT_MODEL
from edge.commands import sign_command

BASE_MANIFEST = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
LABELS = list(BASE_MANIFEST["labels"])
BASE_BYTES = DEFAULT_MODEL.read_bytes()
BASE_SHA = hashlib.sha256(BASE_BYTES).hexdigest()


def good_model(n: int) -> bytes:
    """The shipped model plus ``n`` (>= 1) zero bytes: same answers, different sha256."""
    return BASE_BYTES + bytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_keys(d) -> dict[str, dict]:
    out = {}
    for name in ("op", "other"):
        pem, raw = generate_keypair()
        (d / f"{name}.key").write_bytes(pem)
        (d / f"{name}.pub").write_text(public_key_text(raw))
        out[name] = {"key": load_private_key(d / f"{name}.key"), "key_path": d / f"{name}.key",
                     "pub": d / f"{name}.pub", "id": key_id(raw), "b64": base64.b64encode(raw).decode()}
    return out


def manifest_for(model: bytes, version: str, labels=None) -> bytes:
    man = {**BASE_MANIFEST, "version": version, "sha256": sha(model), "size_bytes": len(model),
           "labels": labels or LABELS}
    return json.dumps(man, indent=1).encode()


def make_bundle(model: bytes, version: str, key=None, labels=None) -> bytes:
    b = Bundle(manifest_for(model, version, labels), model)
    return write_bundle(sign_bundle(b, key) if key is not None else b)


def bundle_version(bundle: bytes) -> str:
    from edge.bundle import read_bundle

    return read_bundle(bundle).version


def signed_install(key, rid: str, bundle: bytes, *, device: str | None = None, group: str | None = None,
                   url: str | None = None, force: bool = False, issued_at: float | None = None,
                   version: str | None = None, **body_extra) -> dict:
    """A signed (format 2) install command as `fer-edge model push` makes it."""
    target = {"device": device} if device is not None else {"group": group}
    body = {"id": rid, "action": "install", "target": target,
            "issued_at": time.time() if issued_at is None else issued_at, "sha256": sha(bundle), "size": len(bundle),
            "version": version or bundle_version(bundle), "force": force, "url": url, **body_extra}
    msg = {"id": rid, **sign_command(body, key)}
    if url is None:
        msg["bundle"] = base64.b64encode(bundle).decode()
    return msg


def signed_rollback(key, rid: str, *, device: str, issued_at: float | None = None) -> dict:
    body = {"id": rid, "action": "rollback", "target": {"device": device},
            "issued_at": time.time() if issued_at is None else issued_at}
    return {"id": rid, **sign_command(body, key)}


def install_into(store, model: bytes, version: str, key=None):
    """Install a model into a ModelStore directly, with its bundle (signed with ``key``) beside it."""
    data = make_bundle(model, version, key)
    st = store.new_staging({"id": version, "origin": "test"})
    store.write_model(st, manifest_for(model, version), model, data)
    return store.commit(st, version=version, sha256=sha(model), origin="test")
