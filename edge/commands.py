"""Signed model-update commands (format 2): what an operator's key authorises, and the device's checks.

On the wire (JSON on ``.../cmd/model``)::

    {"id": "a1b2", "command": "<the signed body, a JSON text>",
     "signature": {"alg": "ed25519", "key_id": "<16 hex>", "sig": "<base64>"},
     "bundle": "<base64 bundle>"}                       (inline installs only)

The signature covers the body's exact UTF-8 bytes after a domain tag, so nothing in it can be changed,
re-serialised or reused for another purpose. The body names everything that decides what a device does
(TUF's ideas, small: who it is for, when it was issued, what exactly to install)::

    {"format": "fer-edge-command/2", "id": "a1b2", "action": "install" | "rollback",
     "target": {"device": "<id>"} | {"group": "<name>"}, "issued_at": <unix seconds>,
     "sha256": "<bundle hex>", "size": <bundle bytes>, "version": "<model version>", "force": false,
     "url": "https://..." | null}                       (install only: sha256 .. url)

A device obeys a command only if the signature verifies with a key in ``update.public_keys``, the target
is itself (or a group it is in, on that group's topic), and ``issued_at`` is later than that of the last
command it accepted (persisted: a restart reopens no replays), not older than ``update.command_max_age_s``
and not more than :data:`MAX_FUTURE_S` ahead of its clock. ``status`` needs no signature.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

from edge.bundle import ALG, BundleError, _crypto, key_id, verify_ed25519

FORMAT = "fer-edge-command/2"
DOMAIN = b"fer-edge command v2\x00"
MAX_BODY = 4096
MAX_DEPTH = 8
# A command dated this far ahead of the device clock is refused: accepting it would block every later
# command until the clock caught up (its issued_at becomes the replay floor).
MAX_FUTURE_S = 300.0
SIGNED_ACTIONS = ("install", "rollback")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CommandError(ValueError):
    """A command that must not be obeyed; the message says why."""


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text, ignoring brackets inside strings (no parsing)."""
    import numpy as np

    stripped = re.sub(rb'"[^"\\]*(?:\\.[^"\\]*)*"', b'""', data)
    b = np.frombuffer(stripped, dtype=np.uint8)
    steps = np.zeros(len(b), dtype=np.int32)
    steps[(b == ord("[")) | (b == ord("{"))] = 1
    steps[(b == ord("]")) | (b == ord("}"))] = -1
    return int(np.cumsum(steps).max()) if len(b) else 0


def loads_bounded(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads after a nesting-depth check, so hostile input never reaches the recursive parser."""
    depth = json_depth(data)
    if depth > max_depth:
        raise CommandError(f"JSON nested {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CommandError(f"not JSON ({e})") from None


def sign_command(body: dict, private_key) -> dict:
    """The wire fields ``command`` and ``signature`` for a body (a dict of JSON values)."""
    _, serialization, _ = _crypto()
    text = json.dumps({"format": FORMAT, **body}, sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > MAX_BODY:
        raise BundleError(f"command body over {MAX_BODY} bytes (URL too long?)")
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = private_key.sign(DOMAIN + text.encode())
    return {"command": text, "signature": {"alg": ALG, "key_id": key_id(raw), "sig": base64.b64encode(sig).decode()}}


def verify_command(msg: dict, public_keys: dict[str, bytes]) -> tuple[dict, str]:
    """(body, key id) of a signed command whose signature verifies; CommandError otherwise.

    Checks the shape of the body too; freshness and target are the device's (see edge.updates).
    """
    text, sig = msg.get("command"), msg.get("signature")
    if not isinstance(text, str) or len(text.encode()) > MAX_BODY:
        raise CommandError(f"command must be a JSON text of at most {MAX_BODY} bytes")
    if not isinstance(sig, dict) or sig.get("alg") != ALG:
        raise CommandError(f"signature must be {{\"alg\": \"{ALG}\", \"key_id\": ..., \"sig\": ...}}")
    try:
        kid = verify_ed25519(public_keys, str(sig.get("key_id", "")), sig.get("sig", ""),
                             DOMAIN + text.encode(), "command")
    except BundleError as e:
        raise CommandError(str(e)) from None
    body = loads_bounded(text.encode())
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CommandError(f"signed body is not a {FORMAT} command")
    check_body(body)
    return body, kid


def check_body(body: dict) -> None:
    """The fields a signed body must have, with their types (CommandError naming the first bad one)."""
    rid, action, target, issued = body.get("id"), body.get("action"), body.get("target"), body.get("issued_at")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
        raise CommandError("signed id must be a string of 1..128 characters")
    if action not in SIGNED_ACTIONS:
        raise CommandError(f"signed action must be one of {', '.join(SIGNED_ACTIONS)} (got {action!r})")
    if not (isinstance(target, dict) and len(target) == 1 and set(target) <= {"device", "group"}
            and isinstance(next(iter(target.values())), str)):
        raise CommandError('signed target must be {"device": "<id>"} or {"group": "<name>"}')
    if isinstance(issued, bool) or not isinstance(issued, (int, float)) or not math.isfinite(issued) or issued <= 0:
        raise CommandError("signed issued_at must be a positive number of seconds since 1970")
    if action == "install":
        sha, size, force, url, version = (body.get(k) for k in ("sha256", "size", "force", "url", "version"))
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise CommandError("signed sha256 must be 64 lowercase hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise CommandError("signed size must be a positive integer")
        if not isinstance(force, bool):
            raise CommandError("signed force must be true or false")
        if url is not None and not (isinstance(url, str) and url.split(":", 1)[0] in ("http", "https")):
            raise CommandError("signed url must be an http(s) URL or null")
        if not isinstance(version, str) or not version:
            raise CommandError("signed version must be the bundle's model version")
