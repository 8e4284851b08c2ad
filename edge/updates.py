"""Model updates on the device: MQTT commands (inline bundle or URL), a watched drop-in directory,
checks, atomic install, hot swap between two frames, probation with automatic rollback, status topic.

Commands arrive as JSON on ``<prefix>/<device_id>/cmd/model`` and ``<prefix>/group/<group>/cmd/model``.
``install`` and ``rollback`` must be signed commands (format 2, see edge.commands: the signature covers
the target, the issue time, the bundle's sha256 and size, its version and ``force``)::

    {"id": "a1b2", "command": "<signed body>", "signature": {...}, "bundle": "<base64 bundle>"}
    {"id": "a1b2", "command": "<signed body naming a url>", "signature": {...}}
    {"id": "e5f6", "action": "status"}                  (no signature needed; answered with its own id)

Unsigned (format 1) ``{"action": "install", "bundle"|"url", "sha256", "force"}`` is obeyed only with
``update.allow_unsigned`` and ``{"action": "rollback"}`` only with ``update.allow_unsigned_rollback``.

Checks, in order: payload size and JSON depth (before parsing), command signature, target and freshness
(issued after the last accepted command, persisted; within ``update.command_max_age_s``), then for the
bundle: size limit, sha256 and size named by the command, the bundle signature over its exact bytes
(before the tar is read), the tar members by their headers, then validation (loads in the interpreter,
output size vs labels, labels equal to the pipeline's, self-test on labelled reference faces), then
version newer than the active one unless ``force``. One update at a time: commands arriving while one is
being installed (or a new model is on probation) are refused, and not remembered, so the same command can
be sent again later.

The result is published retained on ``<prefix>/<device_id>/model/status`` (see :meth:`UpdateManager.status`).

Threads: MQTT callbacks only parse and queue; a single worker thread fetches, validates and installs,
and owns every write to the model store. The frame loop calls :meth:`take_pending` at the top of each
frame (swapping in a new classifier that is already loaded and self-tested) and :meth:`frame_result`
after each classification, which drives probation.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import http.client
import json
import logging
import os
import queue
import re
import secrets
import shutil
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.bundle import BundleError, load_public_keys, load_verified
from edge.classify import DEFAULT_MODEL, Classifier, ModelError, load_classifier, read_manifest, sha256_file
from edge.commands import MAX_FUTURE_S, CommandError, loads_bounded, verify_command
from edge.model_store import (ModelEntry, ModelStore, StoreError, atomic_write, compare_versions,
                              describe_self_test, utc_now, validate_model, verify_installed)
from edge.update_config import UpdateConfig  # noqa: F401 (its home before it moved out to break the import circle)

if TYPE_CHECKING:
    from edge.config import Config
    from edge.mqtt import MqttPublisher

log = logging.getLogger(__name__)

CMD_SUFFIX = "cmd/model"
STATUS_SUFFIX = "model/status"
ACTIONS = ("install", "rollback", "status")
_ID_RE = re.compile(rb'"id"\s*:\s*"([^"\\]{1,128})"')
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_TICK_S = 0.25
HANDLED_FILE = "requests.json"
REPLAY_FILE = "commands.json"  # issued_at of the last accepted signed command: the replay floor


class Refused(Exception):
    """A command or bundle refused for a reason the operator can fix (the message says which)."""


class Cancelled(Refused):
    """A download stopped because the daemon is stopping."""


@dataclass
class Request:
    """One update request, whatever its channel."""

    id: str
    action: str
    origin: str  # "mqtt", "group:<name>", "inbox:<file>"
    bundle: bytes | None = None  # inline (already base64-decoded)
    bundle_b64: str | None = None
    url: str | None = None
    sha256: str | None = None
    force: bool = False
    path: Path | None = None  # drop-in file
    signed_by: str | None = None  # key id of a verified signed command; None = unsigned (format 1)
    target: dict | None = None
    issued_at: float = 0.0
    size: int | None = None  # bundle bytes, as signed
    version: str | None = None  # model version, as signed
    staging: Path | None = None  # journal of an accepted request (an "interrupted" report if we die)


@dataclass
class _Probation:
    sha256: str
    version: str
    started: float = field(default_factory=time.monotonic)
    swapped: bool = False  # the frame loop is running the new model
    frames_ok: int = 0
    done: bool = False  # passed or failed; a job is queued


@dataclass
class _Active:
    version: str
    sha256: str
    installed_at: str | None
    origin: str
    entry: ModelEntry | None = None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_command(payload: bytes, max_bytes: int, origin: str, public_keys: dict[str, bytes] | None = None) -> Request:
    """Decode a command message into a Request; Refused with a clear reason if it is malformed.

    Size and nesting depth are checked before the JSON parser sees the payload. A signed command
    (format 2) is verified here; what it may do on this device (target, freshness) is the manager's call.
    """
    # Inline bundles are base64 (4/3) inside JSON: refuse oversized messages before parsing them.
    if len(payload) > max_bytes * 4 // 3 + 65536:
        raise Refused(f"command of {len(payload)} bytes exceeds the limit for a "
                      f"{max_bytes / 1048576:g} MiB bundle (update.max_bundle_mb)")
    try:
        cmd = loads_bounded(payload)
    except CommandError as e:
        raise Refused(f"malformed command: {e}; expected e.g. "
                      '{"id": "...", "command": "...", "signature": {...}} (made by `fer-edge model push`)') from None
    if not isinstance(cmd, dict):
        raise Refused(f"malformed command: expected a JSON object, got {type(cmd).__name__}")
    if "command" in cmd or "signature" in cmd:
        return _parse_signed(cmd, public_keys or {}, origin)
    rid = cmd.get("id", secrets.token_hex(6))
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
        raise Refused("malformed command: id must be a string of 1..128 characters")
    action = cmd.get("action", "install")
    if action not in ACTIONS:
        raise Refused(f"malformed command: unknown action {str(action)[:40]!r} (expected {', '.join(ACTIONS)})")
    req = Request(id=rid, action=action, origin=origin)
    if action != "install":
        return req
    bundle, url, sha = cmd.get("bundle"), cmd.get("url"), cmd.get("sha256")
    if (bundle is None) == (url is None):
        raise Refused("malformed command: install needs exactly one of \"bundle\" (base64) or \"url\"")
    if bundle is not None and not isinstance(bundle, str):
        raise Refused("malformed command: bundle must be a base64 string")
    if url is not None:
        if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise Refused(f"malformed command: url must be an http:// or https:// URL (got {str(url)[:100]!r})")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise Refused("malformed command: sha256 (64 hex digits of the bundle file) is required")
    force = cmd.get("force", False)
    if not isinstance(force, bool):
        raise Refused("malformed command: force must be true or false")
    req.bundle_b64, req.url, req.sha256, req.force = bundle, url, sha.lower(), force
    return req


def _parse_signed(cmd: dict, public_keys: dict[str, bytes], origin: str) -> Request:
    try:
        body, kid = verify_command(cmd, public_keys)
    except CommandError as e:
        raise Refused(f"signed command refused: {e}") from None
    outer = cmd.get("id")
    if outer is not None and outer != body["id"]:
        raise Refused(f"signed command refused: id {str(outer)[:40]!r} is not the signed id {body['id']!r}")
    req = Request(id=body["id"], action=body["action"], origin=origin, signed_by=kid, target=body["target"],
                  issued_at=float(body["issued_at"]))
    if req.action == "install":
        bundle, url = cmd.get("bundle"), body.get("url")
        if (bundle is None) == (url is None):
            raise Refused("malformed command: a signed install carries \"bundle\" (base64) or signs a url, not both")
        if bundle is not None and not isinstance(bundle, str):
            raise Refused("malformed command: bundle must be a base64 string")
        req.bundle_b64, req.url, req.sha256, req.force = bundle, url, body["sha256"], body["force"]
        req.size, req.version = body["size"], body["version"]
    return req


_REDIRECTS = (301, 302, 303, 307, 308)


def _connection(parts: urllib.parse.SplitResult, per_op: float, ctx: ssl.SSLContext
                ) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """The connection for one request to ``parts``, the request target and extra headers: direct, or through
    the proxy the environment names (http_proxy / https_proxy, skipped for no_proxy hosts), as urlopen does.

    https goes through a CONNECT tunnel, so TLS and its certificate check are end to end with the real host;
    plain http sends the absolute URL to the proxy. Credentials in the proxy URL become Proxy-Authorization.
    """
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=per_op, context=ctx), path, {}
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=per_op), path, {}
    via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        via_port = via.port
    except ValueError:
        via_port = -1
    if via.scheme not in ("http", "https") or not via.hostname or via_port == -1:
        shown = via._replace(netloc=via.netloc.rpartition("@")[2]).geturl()  # never log its password
        raise Refused(f"{parts.scheme}_proxy {shown}: only http:// proxies are supported (host:port)")
    auth = {}
    if via.username is not None:
        pair = f"{urllib.parse.unquote(via.username)}:{urllib.parse.unquote(via.password or '')}"
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(via.hostname, via_port, timeout=per_op, context=ctx)
        conn.set_tunnel(parts.hostname, parts.port or 443, headers=auth)
        return conn, path, {}
    # An https:// proxy for http targets is spoken to over TLS, as urlopen does.
    cls = http.client.HTTPSConnection if via.scheme == "https" else http.client.HTTPConnection
    conn = cls(via.hostname, via_port, timeout=per_op, **({"context": ctx} if via.scheme == "https" else {}))
    return conn, parts._replace(fragment="").geturl(), auth


def fetch(url: str, dest: Path, *, max_bytes: int, timeout_s: float, ca_file: str = "",
          cancel: threading.Event | None = None) -> bytes:
    """Download ``url`` into ``dest`` within ``timeout_s`` in total and ``max_bytes``; returns the bytes.

    The deadline covers everything (connect, headers, redirects, body): a watchdog shuts the socket down
    when it passes or when ``cancel`` is set, so a server dripping a byte at a time cannot hold the
    worker. Proxies come from the environment as for urlopen (see :func:`_connection`). Refused (Cancelled
    for ``cancel``) on any failure.
    """
    deadline = time.monotonic() + timeout_s
    where = urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()
    ctx = ssl.create_default_context(cafile=ca_file or None)
    live: list[http.client.HTTPConnection] = []
    fired: list[str] = []
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.05):
            if cancel is not None and cancel.is_set():
                fired.append("cancel")
            elif time.monotonic() >= deadline:
                fired.append("deadline")
            else:
                continue
            for conn in live:
                sock = conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            return

    def check_fired() -> None:
        if fired and fired[0] == "cancel":
            raise Cancelled(f"download {where} stopped: the daemon is stopping")
        if fired or time.monotonic() >= deadline:
            raise Refused(f"download {where} took longer than {timeout_s:g} s in total (update.http_timeout_s)")

    threading.Thread(target=watchdog, name="fetch-watchdog", daemon=True).start()
    try:
        for _ in range(len(_REDIRECTS) + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise Refused(f"download {where}: redirected to a non-http(s) URL")
            per_op = max(0.1, min(15.0, deadline - time.monotonic()))
            conn, target, extra = _connection(parts, per_op, ctx)
            conn._create_connection = lambda address, timeout, source_address=None: _connect_bounded(
                address, timeout, source_address, lambda: bool(fired) or time.monotonic() >= deadline)
            live[:] = [conn]
            try:
                conn.request("GET", target, headers={"User-Agent": "fer-edge model update", "Connection": "close",
                                                     **extra})
                resp = conn.getresponse()
                if resp.status in _REDIRECTS and resp.getheader("Location"):
                    url = urllib.parse.urljoin(url, resp.getheader("Location"))
                    continue
                if resp.status != 200:
                    raise Refused(f"download {where} failed: HTTP {resp.status} {resp.reason}")
                return _read_body(resp, dest, where, max_bytes, check_fired)
            finally:
                conn.close()
        raise Refused(f"download {where}: more than {len(_REDIRECTS)} redirects")
    except Refused:
        if fired:
            check_fired()
        raise
    except (http.client.HTTPException, OSError, ValueError) as e:
        check_fired()
        if isinstance(e, http.client.IncompleteRead):
            raise Refused(f"download {where} ended after {len(e.partial)} bytes (connection closed early)") from None
        if isinstance(e, TimeoutError) or "timed out" in str(e):
            raise Refused(f"download {where} timed out (update.http_timeout_s {timeout_s:g} s)") from None
        raise Refused(f"download {where} failed: {type(e).__name__}: {e}") from None
    finally:
        done.set()


def _connect_bounded(address: tuple[str, int], timeout, source_address, should_stop) -> socket.socket:
    """socket.create_connection with the name lookup in a thread of its own, abandoned once ``should_stop()``:
    getaddrinfo cannot be interrupted, and glibc's resolver may wait 5 s per server and attempt."""
    host, port = address
    found: list = []
    looked_up = threading.Event()

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except Exception as e:  # gaierror, or UnicodeError for a name IDNA refuses: the caller raises it
            found.append(e)
        looked_up.set()

    threading.Thread(target=lookup, name="fetch-resolve", daemon=True).start()
    while not looked_up.wait(0.05):
        if should_stop():
            raise TimeoutError(f"looking up {host} took too long")
    if isinstance(found[0], Exception):
        raise found[0]
    error: OSError = OSError(f"{host}: no address")
    for *_, sockaddr in found[0]:
        try:
            return socket.create_connection(sockaddr[:2], timeout, source_address)
        except OSError as e:
            error = e
    raise error


def _read_body(resp, dest: Path, where: str, max_bytes: int, check_fired) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise Refused(f"download {where} is {int(length)} bytes, over the "
                      f"{max_bytes / 1048576:g} MiB limit (update.max_bundle_mb)")
    total = 0
    with open(dest, "xb") as fh:
        while True:
            check_fired()
            chunk = resp.read1(65536)  # whatever arrived: never waits for a full 64 KiB
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise Refused(f"download {where} exceeds the {max_bytes / 1048576:g} MiB limit (update.max_bundle_mb)")
            fh.write(chunk)
    check_fired()
    if length and length.isdigit() and total != int(length):
        raise Refused(f"download {where} ended after {total} of {length} bytes")
    return dest.read_bytes()


class UpdateManager:
    """The device side of model updates; one per daemon. See the module docstring."""

    def __init__(self, cfg: "Config"):
        self.cfg = cfg
        self.ucfg: UpdateConfig = cfg.update
        self.store = ModelStore(Path(cfg.device.state_dir).expanduser() / "models", self.ucfg.keep_previous)
        self.watch_dir = Path(self.ucfg.watch_dir).expanduser() if self.ucfg.watch_dir else self.store.root / "inbox"
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publisher: "MqttPublisher | None" = None
        self._pending: Classifier | None = None
        self._standby: Classifier | None = None  # the model a new one replaced, kept loaded during probation
        self._probation: _Probation | None = None
        self._busy: str | None = None
        self._busy_req: tuple[str | None, str] = (None, "install")  # (request id, action) of what is busy
        self._active: _Active | None = None
        self._labels: list[str] = []
        self._last: dict[str, Any] = {"request_id": None, "action": None, "result": None, "error": None,
                                      "detail": None}
        self._status_dirty = True
        self._handled: collections.deque = collections.deque(maxlen=200)
        self._inbox_seen: dict[str, tuple[int, int]] = {}
        self._inbox_stuck: set[tuple[str, tuple[int, int]]] = set()  # could not be moved out of the inbox
        self._base: dict[str, Any] | None = None
        self._next_scan = 0.0
        self.installs = 0
        self.rollbacks = 0
        self.read_only = False  # another user's store (see load_initial): no commands, no drop-ins
        self._last_issued = 0.0  # replay floor: issued_at of the last accepted signed command
        try:
            self.keys = load_public_keys(self.ucfg.public_keys)  # parsed once (the config checked them)
        except BundleError as e:
            log.error("update.public_keys: %s; signed updates are refused", e)
            self.keys = {}

    # --- start-up --------------------------------------------------------------------------------

    def load_initial(self) -> Classifier:
        """The model to start with: the store's active one (after crash checks), else the base model.

        A broken store never stops the daemon: problems are logged, reported on the status topic, and the
        next older model is used. Only a broken base model raises (ModelError), as without updates.
        """
        threads = self.cfg.model.threads
        if not self._owns_state():
            # e.g. `fer-edge demo` run by another user on an installed device: use the store, never change it.
            self.read_only = True
            log.info("model store %s belongs to another user: using it read-only (no updates from this process)",
                     self.store.root)
            ptr = self._read_pointer_or_none()
            if ptr is not None and ptr.active is not None:
                try:
                    self._verify(ptr.active)
                    clf = load_classifier(self.store.model_path(ptr.active), threads=threads)
                    e = ptr.active
                    self._active = _Active(e.version, e.sha256, e.installed_at, e.origin, e)
                    self._labels = list(clf.labels)
                    return clf
                except (ModelError, StoreError) as e:
                    log.error("installed model not used (%s); using the base model", e)
            return self._use_base()
        try:
            for req in self.store.cleanup(keep=(self.watch_dir,)):
                self._set_last(req.get("id"), req.get("action", "install"), "failed",
                               f"{req.get('action', 'install')} from {req.get('origin', '?')} was interrupted "
                               "(daemon stopped or crashed during it); the previous model stayed active")
            self._load_handled()
            self._load_replay_floor()
            ptr = self.store.count_start()
        except StoreError as e:
            log.error("model store unusable, starting with the base model: %s", e)
            self._set_last(None, "start", "failed", str(e))
            return self._use_base()
        if ptr.probation is not None and ptr.active is not None and int(ptr.probation.get("starts", 0)) >= 2:
            msg = (f"model {ptr.active.version} did not finish its probation in two daemon runs "
                   "(crash or restarts with a new model): rolled back")
            log.error("%s", msg)
            self._set_last(None, "rollback", "rolled_back", msg)
            self._drop_active_in_store()
            ptr = self._read_pointer_or_none()
        while ptr is not None and ptr.active is not None:
            entry = ptr.active
            try:
                signer = self._verify(entry)
                clf = load_classifier(self.store.model_path(entry), threads=threads)
            except (ModelError, StoreError) as e:
                what = "fails its signature check" if isinstance(e, StoreError) else "does not load"
                msg = f"installed model {entry.version} {what} ({e}); rolled back"
                log.error("%s", msg)
                self._set_last(None, "rollback", "rolled_back", msg)
                self._drop_active_in_store()
                ptr = self._read_pointer_or_none()
                continue
            self._active = _Active(entry.version, entry.sha256, entry.installed_at, entry.origin, entry)
            self._labels = list(clf.labels)
            if ptr.probation is not None:
                # Finish the probation this model started before the restart.
                self._probation = _Probation(entry.sha256, entry.version, swapped=True)
            log.info("using installed model %s (%s…, signed by %s) from %s", entry.version, entry.sha256[:12],
                     signer, self.store.root)
            return clf
        return self._use_base()

    def _verify(self, entry: ModelEntry) -> str:
        return verify_installed(self.store, entry, self.keys, allow_unsigned=self.ucfg.allow_unsigned,
                                max_bytes=self.ucfg.max_bytes)

    def _owns_state(self) -> bool:
        """True unless device.state_dir exists and belongs to another user than this process's."""
        try:
            return Path(self.cfg.device.state_dir).expanduser().stat().st_uid == os.geteuid()
        except OSError:
            return True  # missing: created by whoever installs first

    def _use_base(self) -> Classifier:
        clf = load_classifier(self.cfg.model.path or None, threads=self.cfg.model.threads)
        self._active = _Active(clf.version, clf.sha256, None, "config" if self.cfg.model.path else "bundled")
        self._labels = list(clf.labels)
        return clf

    def _read_pointer_or_none(self):
        try:
            return self.store.read_pointer()
        except StoreError as e:
            log.error("%s", e)
            return None

    def _drop_active_in_store(self) -> None:
        try:
            self.store.rollback()
        except StoreError as e:
            log.error("model store: %s", e)

    def start(self, publisher: "MqttPublisher | None") -> None:
        """Subscribe to the command topics and start the worker (drop-in scanning, status publishing)."""
        self._publisher = publisher
        if self.read_only:
            pass
        elif not self.ucfg.enabled:
            log.info("model updates disabled (update.enabled = false)")
        elif publisher is not None:
            prefix = self.cfg.mqtt.prefix
            publisher.subscribe(publisher.topic(CMD_SUFFIX), self._on_command)  # "a/b" counts as a full topic
            for g in self.ucfg.groups:
                publisher.subscribe(f"{prefix}/group/{g}/{CMD_SUFFIX}",
                                    lambda topic, payload, g=g: self._on_command(topic, payload, f"group:{g}"))
            log.info("model updates: commands on %s%s; %d trusted key(s)%s", publisher.topic(CMD_SUFFIX),
                     "".join(f", {prefix}/group/{g}/{CMD_SUFFIX}" for g in self.ucfg.groups),
                     len(self.ucfg.public_keys), ", unsigned bundles ALLOWED" if self.ucfg.allow_unsigned else "")
        if self.ucfg.enabled and self.ucfg.watch_interval_s > 0 and not self.read_only:
            try:
                # Only where the state directory exists (the installer creates it): never make /var/lib/... here.
                if self.watch_dir.parent.is_dir() or self.store.root.parent.is_dir():
                    self.watch_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.warning("model updates: cannot create drop-in directory %s: %s", self.watch_dir, e)
            if self.watch_dir.is_dir():
                log.info("model updates: watching %s for *.bundle files", self.watch_dir)
            else:
                log.info("model updates: drop-in directory %s does not exist; create it to use it", self.watch_dir)
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (a download is cut off at once; an install in progress is abandoned and
        cleanup() removes its leftovers) and leave a retained status that is not "updating"."""
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            busy, self._busy = self._busy, None
        if busy is not None:
            rid, action = self._busy_req
            self._set_last(rid, action, "failed", f"interrupted: the daemon stopped during {busy}; the previous "
                           "model stayed active (push it again)")
        if busy is not None or self._status_dirty:
            self._publish_status()

    # --- frame loop side (called from the loop thread; must be cheap) ---------------------------------

    def take_pending(self, current: Classifier) -> Classifier | None:
        """A classifier to use from this frame on, or None. ``current`` is the one in use until now."""
        if self._pending is None:
            return None
        with self._lock:
            clf, self._pending = self._pending, None
            if clf is None or clf is current:
                return None
            p = self._probation
            if p is not None and not p.swapped and p.sha256 == clf.sha256:
                p.swapped, p.started = True, time.monotonic()
                self._standby = current
            elif clf is not self._standby:  # (the standby itself: a fast rollback the worker has yet to record)
                self._standby = None
        log.info("model swapped between frames: %s (%s…) -> %s (%s…)", current.version, current.sha256[:12],
                 clf.version, clf.sha256[:12])
        return clf

    def frame_result(self, ok: bool) -> None:
        """Report whether the classifier worked on a frame with faces (drives probation)."""
        p = self._probation
        if p is None or not p.swapped or p.done:
            return
        with self._lock:
            if p.done:
                return
            if not ok:
                p.done = True
                if self._standby is not None:
                    self._pending = self._standby  # back on the next frame; the worker fixes the store
                self._jobs.put(("auto_rollback", p.sha256,
                                f"model {p.version} failed on a live frame during its probation "
                                f"(after {p.frames_ok} good frames): rolled back"))
            else:
                p.frames_ok += 1
                if p.frames_ok >= self.ucfg.probation_frames:
                    p.done = True
                    self._jobs.put(("probation_passed", p.sha256, f"{p.frames_ok} frames"))

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The model/status payload: active model, what a rollback would restore, the last request's result."""
        with self._lock:
            a = self._active
            p = self._probation
            state = "updating" if self._busy else ("probation" if p is not None and not p.done else "idle")
            prev = None
            try:
                ptr = self.store.read_pointer() if self.store.pointer_path.exists() else None
            except StoreError:
                ptr = None
            if ptr is not None and ptr.active is not None and a is not None and a.entry is not None:
                if ptr.previous:
                    prev = ptr.previous[0].brief()
                else:
                    prev = {**self._base_info(), "base": True}
            return {
                "device_id": self.cfg.device.id,
                "timestamp": utc_now(),
                "state": state,
                "busy": self._busy,
                "version": a.version if a else None,
                "sha256": a.sha256 if a else None,
                "installed_at": a.installed_at if a else None,
                "origin": a.origin if a else None,
                "previous": prev,
                "probation": {"frames": p.frames_ok, "of": self.ucfg.probation_frames}
                if p is not None and not p.done else None,
                **self._last,
            }

    def _set_last(self, rid: str | None, action: str, result: str, error: str | None,
                  detail: str | None = None) -> None:
        with self._lock:
            self._last = {"request_id": rid, "action": action, "result": result, "error": error,
                          "detail": detail}
            self._status_dirty = True

    def _publish_status(self) -> None:
        self._status_dirty = True
        if self._publisher is None:
            return
        payload = self.status()
        if self._publisher.publish(STATUS_SUFFIX, payload, qos=1, retain=True):
            self._status_dirty = False

    # --- commands -------------------------------------------------------------------------------

    def _on_command(self, topic: str, payload: bytes, origin: str = "mqtt") -> None:
        """MQTT callback (network thread): parse, authorise, check busy, journal, queue; never blocks for long."""
        try:
            req = parse_command(payload, self.ucfg.max_bytes, origin, self.keys)
        except Refused as e:
            m = _ID_RE.search(payload[:1024])
            self._refuse(m.group(1).decode("utf-8", "replace") if m else None, "install", str(e), origin)
            return
        if req.id in self._handled:
            log.info("model update request %s from %s already handled; ignored (repeated delivery)", req.id, origin)
            return
        if req.action == "status":
            self._reply_status(req.id)
            return
        try:
            self._authorise(req, origin)
        except Refused as e:
            self._refuse(req.id, req.action, str(e), origin)
            return
        with self._lock:
            busy = self._busy
            p = self._probation
            if busy is None and req.action == "install" and p is not None and not p.done:
                busy = (f"model {p.version} is on probation ({p.frames_ok} of {self.ucfg.probation_frames} "
                        "frames)")
            if busy is None:
                self._busy = f"{req.action} {req.id} from {origin}"
                self._busy_req = (req.id, req.action)
        if busy is not None:
            # Not remembered: the same request may be sent again once the device is idle.
            self._refuse(req.id, req.action, f"busy: {busy}; one update at a time, retry when model/status "
                                             "says idle", origin)
            return
        try:
            # Journal first, so that a kill from here on leaves an "interrupted" report at the next start; the
            # replay floor after it, so that a kill before the journal leaves the command usable, not spent.
            req.staging = self.store.new_staging({"id": req.id, "action": req.action, "origin": req.origin,
                                                  **({"url": req.url} if req.url else {})})
            if req.signed_by is not None:
                self._record_replay_floor(req)
        except (StoreError, OSError) as e:
            self.store.discard(req.staging)
            with self._lock:
                self._busy = None
            self._refuse(req.id, req.action, f"cannot record the request in {self.store.root}: {e}", origin)
            return
        self._remember(req.id)
        self._jobs.put(("request", req))

    def _authorise(self, req: Request, origin: str) -> None:
        """Refused unless this device may obey ``req``: signed (or unsigned allowed), for us, fresh."""
        if req.signed_by is None:
            if req.action == "install" and not self.ucfg.allow_unsigned:
                raise Refused("unsigned install command refused: push with `fer-edge model push BUNDLE --key KEY` "
                              "(signed format 2 commands); unsigned ones need update.allow_unsigned = true")
            if req.action == "rollback" and not self.ucfg.allow_unsigned_rollback:
                raise Refused("unsigned rollback command refused: use `fer-edge model rollback --key KEY`, or set "
                              "update.allow_unsigned_rollback = true to let any broker client roll back")
            return
        mine = {"device": self.cfg.device.id} if origin == "mqtt" else {"group": origin.split(":", 1)[1]}
        if req.target != mine:
            (kind, name), = req.target.items()
            raise Refused(f"signed command is for {kind} {name!r} but arrived on the topic of "
                          f"{next(iter(mine))} {next(iter(mine.values()))!r}")
        now = time.time()
        if req.issued_at > now + MAX_FUTURE_S:
            raise Refused(f"signed command issued {req.issued_at - now:.0f} s in the future by this device's clock "
                          "(device or operator clock wrong? check NTP)")
        age = self.ucfg.command_max_age_s
        if age and now - req.issued_at > age:
            raise Refused(f"signed command expired: issued {now - req.issued_at:.0f} s ago, more than "
                          f"update.command_max_age_s ({age:g} s); push it again (or check the device clock)")
        if req.issued_at <= self._last_issued:
            raise Refused(f"signed command replayed or out of order: issued at {_iso(req.issued_at)}, not after "
                          f"the last command this device accepted ({_iso(self._last_issued)})")

    def _record_replay_floor(self, req: Request) -> None:
        """Persist the accepted command's issue time before acting on it: a restart reopens no replays."""
        self.store.ensure()
        atomic_write(self.store.root / REPLAY_FILE,
                     json.dumps({"last_issued_at": req.issued_at, "last_id": req.id, "at": utc_now()}).encode())
        self._last_issued = req.issued_at

    def _load_replay_floor(self) -> None:
        path = self.store.root / REPLAY_FILE
        try:
            value = json.loads(path.read_bytes()[:4096])["last_issued_at"]
            if isinstance(value, (int, float)) and value == value:
                self._last_issued = float(value)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Unreadable floor: refuse everything issued before now rather than reopen every replay.
            self._last_issued = time.time()
            log.error("model updates: %s unreadable (%s); only commands issued from now on are accepted", path, e)

    def _reply_status(self, rid: str) -> None:
        """Answer a status request with its own id (not retained: the retained status keeps the last result)."""
        if self._publisher is None:
            return
        payload = self.status()
        payload["last"] = {k: payload[k] for k in ("request_id", "action", "result", "error", "detail")}
        payload.update(request_id=rid, action="status", result="status", error=None, detail=None)
        self._publisher.publish(STATUS_SUFFIX, payload, qos=1, retain=False)

    def _refuse(self, rid: str | None, action: str, msg: str, origin: str) -> None:
        log.warning("model update request %s from %s refused: %s", rid or "?", origin, msg)
        self._set_last(rid, action, "refused", msg)
        self._publish_status()

    def _remember(self, rid: str) -> None:
        self._handled.append(rid)
        try:
            if self.store.root.is_dir():
                atomic_write(self.store.root / HANDLED_FILE, json.dumps(list(self._handled)).encode())
        except OSError as e:
            log.debug("cannot record handled request ids: %s", e)

    def _load_handled(self) -> None:
        try:
            ids = json.loads((self.store.root / HANDLED_FILE).read_bytes()[:65536])
            self._handled.extend(str(i) for i in ids if isinstance(i, str))
        except (OSError, ValueError, TypeError, RecursionError):
            pass

    # --- worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=_TICK_S)
            except queue.Empty:
                job = None
            if self._stop.is_set():
                break
            try:
                if job is not None:
                    self._handle(job)
                self._tick()
            except Exception as e:  # the worker must survive anything one job does
                log.error("model update worker: unexpected %s: %s", type(e).__name__, e)
                with self._lock:
                    self._busy = None
                self._set_last(None, "install", "failed", f"internal error: {type(e).__name__}: {e}")
                self._publish_status()

    def _handle(self, job: tuple) -> None:
        kind = job[0]
        if kind == "request":
            req: Request = job[1]
            try:
                if req.action == "rollback":
                    self._rollback(req.id, "rollback", None)
                else:
                    self._install(req)
            finally:
                if req.action == "rollback":
                    self.store.discard(req.staging)
                with self._lock:
                    self._busy = None
                self._publish_status()
        elif kind == "auto_rollback":
            _, sha, reason = job
            if self._active is not None and self._active.sha256 == sha:
                log.error("%s", reason)
                self._rollback(self._last.get("request_id"), "auto_rollback", reason)
                self._publish_status()
        elif kind == "probation_passed":
            _, sha, how = job
            try:
                self.store.end_probation(sha)
            except (StoreError, OSError) as e:
                log.error("model store: cannot record the end of probation: %s", e)
            with self._lock:
                if self._probation is not None and self._probation.sha256 == sha:
                    self._probation = None
                self._standby = None
            log.info("model %s passed probation (%s)", self._active.version if self._active else "?", how)
            self._publish_status()

    def _tick(self) -> None:
        p = self._probation
        if p is not None and p.swapped and not p.done and time.monotonic() - p.started >= self.ucfg.probation_s:
            with self._lock:
                p.done = True
            self._handle(("probation_passed", p.sha256, f"{self.ucfg.probation_s:g} s without an error"))
        if self._status_dirty:
            self._publish_status()
        if self.ucfg.enabled and self.ucfg.watch_interval_s > 0 and not self.read_only \
                and time.monotonic() >= self._next_scan:
            self._next_scan = time.monotonic() + self.ucfg.watch_interval_s
            self._scan_inbox()

    # --- install ---------------------------------------------------------------------------------

    def _install(self, req: Request) -> None:
        """Run one install request to its end: installed (and handed to the loop), refused or failed."""
        log.info("model update request %s from %s: %s", req.id, req.origin,
                 f"download {req.url}" if req.url else ("drop-in file" if req.path else "inline bundle"))
        staging = req.staging
        try:
            if staging is None:
                staging = self.store.new_staging({"id": req.id, "action": "install", "origin": req.origin})
        except StoreError as e:
            self._fail(req, "failed", str(e))
            return
        self._set_last(req.id, "install", "accepted", None)
        self._publish_status()
        try:
            data = self._obtain(req, staging)
            if req.size is not None and len(data) != req.size:
                raise Refused(f"size mismatch: the bundle received is {len(data)} bytes, the signed command says "
                              f"{req.size} (truncated in transit, or another file)")
            if req.sha256 is not None:
                got = hashlib.sha256(data).hexdigest()
                if got != req.sha256:
                    raise Refused(f"sha256 mismatch: the bundle received hashes to {got[:12]}…, the command "
                                  f"says {req.sha256[:12]}… (corrupted or truncated in transit, or wrong file)")
            # The signature is checked over the exact bytes before the tar inside is read.
            bundle, signer = load_verified(data, self.keys, allow_unsigned=self.ucfg.allow_unsigned)
            if req.version is not None and bundle.version != req.version:
                raise Refused(f"the bundle holds model version {bundle.version}, the signed command names "
                              f"{req.version}")
            model_path = self.store.write_model(staging, bundle.manifest_bytes, bundle.model_bytes, data)
            del data, bundle
            clf, summary = validate_model(model_path, threads=self.cfg.model.threads, expect_labels=self._labels)
            active = self._active
            if active is not None and clf.sha256 == active.sha256:
                raise Refused(f"model {clf.version} ({clf.sha256[:12]}…) is already the active model")
            if active is not None and not req.force and compare_versions(clf.version, active.version) <= 0:
                raise Refused(f"version {clf.version} is not newer than the active {active.version}; "
                              "push with --force (\"force\": true) to install it anyway")
            entry = self.store.commit(staging, version=clf.version, sha256=clf.sha256, origin=req.origin)
            staging = None
            clf.path = self.store.model_path(entry)  # same file, renamed into place with its directory
        except Cancelled as e:
            self._fail(req, "failed", f"interrupted: {e}; the previous model stayed active (push it again)")
            return
        except (Refused, BundleError, ModelError) as e:
            msg = str(e)
            if staging is not None:  # the temporary path means nothing to the operator
                msg = msg.replace(f"{staging}{os.sep}", "")
            self._fail(req, "refused", msg)
            return
        except StoreError as e:
            self._fail(req, "failed", str(e))
            return
        finally:
            if staging is not None:
                self.store.discard(staging)
        with self._lock:
            self._active = _Active(entry.version, entry.sha256, entry.installed_at, entry.origin, entry)
            self._probation = _Probation(entry.sha256, entry.version)
            self._pending = clf
        self.installs += 1
        detail = (f"installed {entry.version} signed by {signer}; {describe_self_test(summary)}; "
                  f"on probation for {self.ucfg.probation_frames} frames")
        log.info("model update request %s: %s", req.id, detail)
        self._set_last(req.id, "install", "installed", None, detail)

    def _fail(self, req: Request, result: str, msg: str) -> None:
        log.warning("model update request %s from %s %s: %s", req.id, req.origin, result, msg)
        self._set_last(req.id, "install", result, msg)

    def _obtain(self, req: Request, staging: Path) -> bytes:
        """The bundle bytes of a request, never more than update.max_bundle_mb read."""
        limit = self.ucfg.max_bytes
        if req.path is not None:
            with open(req.path, "rb") as fh:  # the file may have grown since it was measured
                data = fh.read(limit + 1)
        elif req.url is not None:
            return fetch(req.url, staging / "bundle.part", max_bytes=limit, timeout_s=self.ucfg.http_timeout_s,
                         ca_file=self.ucfg.ca_file, cancel=self._stop)
        else:
            try:
                data = base64.b64decode(req.bundle_b64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise Refused("bundle is not valid base64") from None
        if len(data) > limit:
            raise Refused(f"bundle of {len(data) if req.path is None else 'over ' + str(limit)} bytes exceeds the "
                          f"{limit / 1048576:g} MiB limit (update.max_bundle_mb)")
        return data

    # --- rollback --------------------------------------------------------------------------------

    def _rollback(self, rid: str | None, action: str, reason: str | None) -> None:
        """Go back to the previous model (the base model when none is left) and hand it to the loop."""
        try:
            ptr = self.store.read_pointer()
        except StoreError as e:
            self._set_last(rid, action, "failed", str(e))
            return
        if ptr.active is None:
            self._set_last(rid, action, "refused", "the base model is active: nothing to roll back to")
            log.warning("model rollback %s refused: the base model is active", rid or "")
            return
        bad = ptr.active
        while True:
            try:
                new, _ = self.store.rollback()
            except StoreError as e:
                self._set_last(rid, action, "failed", str(e))
                return
            target_sha = new.sha256 if new is not None else self._base_info()["sha256"]
            standby = self._standby
            if standby is not None and standby.sha256 == target_sha:
                clf = standby  # still loaded: no interpreter start needed
                break
            try:
                clf = load_classifier(self.store.model_path(new) if new is not None else (self.cfg.model.path or None),
                                      threads=self.cfg.model.threads)
                break
            except ModelError as e:
                if new is None:
                    self._set_last(rid, action, "failed", f"the base model does not load: {e}")
                    return
                log.error("rollback target %s does not load (%s); going further back", new.version, e)
        with self._lock:
            self._standby = None
            if new is None:
                self._active = _Active(clf.version, clf.sha256, None, "config" if self.cfg.model.path else "bundled")
            else:
                self._active = _Active(new.version, new.sha256, new.installed_at, new.origin, new)
            self._probation = None
            self._pending = clf
        self.rollbacks += 1
        detail = f"rolled back from {bad.version} ({bad.sha256[:12]}…) to {clf.version} ({clf.sha256[:12]}…)"
        log.info("model %s: %s", action.replace("_", " "), detail)
        self._set_last(rid, action, "rolled_back", reason, detail)

    def _base_info(self) -> dict[str, Any]:
        """Version and sha256 of the base model (model.path, else the bundled one), read once."""
        if self._base is None:
            path = Path(self.cfg.model.path).expanduser() if self.cfg.model.path else DEFAULT_MODEL
            try:
                self._base = {"version": str(read_manifest(path)["version"]), "sha256": sha256_file(path),
                              "installed_at": None}
            except (ModelError, OSError):
                self._base = {"version": "?", "sha256": None, "installed_at": None}
        return self._base

    # --- drop-in directory ------------------------------------------------------------------------

    def _scan_inbox(self) -> None:
        """Install *.bundle files that stopped changing; keep refused ones in rejected/ with the reason."""
        try:
            files = sorted(p for p in self.watch_dir.glob("*.bundle") if p.is_file() and not p.name.startswith("."))
        except OSError:
            return
        seen = {}
        for p in files:
            try:
                st = p.stat()
            except OSError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            seen[p.name] = sig
            # Still being copied (scp/rsync): wait until size and mtime hold still for one scan.
            if self._inbox_seen.get(p.name) != sig or time.time() - st.st_mtime < 1.0 \
                    or (p.name, sig) in self._inbox_stuck:
                continue
            req = Request(id=f"inbox-{p.name}-{secrets.token_hex(3)}", action="install", origin=f"inbox:{p.name}",
                          path=p)
            with self._lock:
                if self._busy is not None or (self._probation is not None and not self._probation.done):
                    return
                self._busy = f"install of drop-in {p.name}"
                self._busy_req = (req.id, "install")
            try:
                if st.st_size > self.ucfg.max_bytes:
                    self._fail(req, "refused", f"{p.name} is {st.st_size} bytes, over the "
                                               f"{self.ucfg.max_bundle_mb:g} MiB limit (update.max_bundle_mb)")
                else:
                    self._install(req)
                if not self._finish_dropin(p, self._last):
                    self._inbox_stuck.add((p.name, sig))
            finally:
                with self._lock:
                    self._busy = None
                self._publish_status()
            seen.pop(p.name, None)
        self._inbox_seen = seen

    def _finish_dropin(self, path: Path, last: dict) -> bool:
        try:
            if last.get("result") == "installed":
                path.unlink()
            else:
                rejected = self.watch_dir / "rejected"
                rejected.mkdir(exist_ok=True)
                shutil.move(str(path), rejected / path.name)
                (rejected / f"{path.name}.error.txt").write_text(f"{utc_now()} {last.get('error')}\n")
        except OSError as e:
            log.error("drop-in %s: cannot move it out of %s (%s); remove it by hand", path.name, self.watch_dir, e)
            return False
        return True
