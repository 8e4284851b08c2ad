"""Model updates on the device: MQTT commands (inline bundle or URL), a watched drop-in directory,
checks, atomic install, hot swap between two frames, probation with automatic rollback, status topic.

Commands arrive as JSON on ``<prefix>/<device_id>/cmd/model`` and ``<prefix>/group/<group>/cmd/model``::

    {"id": "a1b2", "action": "install", "bundle": "<base64 bundle>", "sha256": "<hex of the bundle>",
     "force": false}
    {"id": "a1b2", "action": "install", "url": "https://host/m.bundle", "sha256": "<hex>"}
    {"id": "c3d4", "action": "rollback"}
    {"id": "e5f6", "action": "status"}

Checks, in order: size limit, sha256 of the bundle, Ed25519 signature against ``update.public_keys``,
then validation (loads in the interpreter, output size vs labels, labels equal to the pipeline's,
self-test on reference faces), then version newer than the active one unless ``force``. One update at a
time: commands arriving while one is being installed (or a new model is on probation) are refused.

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
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.bundle import BundleError, load_public_keys, read_bundle, verify_bundle
from edge.classify import DEFAULT_MODEL, Classifier, ModelError, load_classifier, read_manifest, sha256_file
from edge.model_store import (ModelEntry, ModelStore, StoreError, atomic_write, compare_versions, utc_now,
                              validate_model)

if TYPE_CHECKING:
    from edge.config import Config
    from edge.mqtt import MqttPublisher

log = logging.getLogger(__name__)

CMD_SUFFIX = "cmd/model"
STATUS_SUFFIX = "model/status"
ACTIONS = ("install", "rollback", "status")
_BAD_LEVEL = re.compile(r"[/+#\s\x00]")
_ID_RE = re.compile(rb'"id"\s*:\s*"([^"\\]{1,128})"')
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_TICK_S = 0.25
HANDLED_FILE = "requests.json"


@dataclass
class UpdateConfig:
    """Model updates: trusted keys, limits, fleet groups, the drop-in directory, probation."""

    enabled: bool = True  # accept updates (MQTT commands and the drop-in directory)
    public_keys: list[str] = field(default_factory=list)  # base64 Ed25519 keys or paths of .pub/PEM files
    allow_unsigned: bool = False  # accept bundles without a signature (never on a reachable device)
    groups: list[str] = field(default_factory=list)  # also obey <prefix>/group/<name>/cmd/model
    max_bundle_mb: float = 16.0  # larger bundles are refused (an inline one briefly needs ~5x this in RAM)
    http_timeout_s: float = 60.0  # whole download of a bundle given by URL
    ca_file: str = ""  # CA bundle for https URLs ("" = system CAs)
    watch_dir: str = ""  # drop-in directory for bundles ("" = <device.state_dir>/models/inbox)
    watch_interval_s: float = 2.0  # how often the drop-in directory is scanned (0 = not watched)
    keep_previous: int = 1  # installed models kept for rollback besides the active one
    probation_frames: int = 20  # a new model is accepted after classifying this many frames without error
    probation_s: float = 300.0  # ... or after this many seconds without an error (few faces in view)

    def validate(self) -> None:
        for i, entry in enumerate(self.public_keys):
            if not entry.strip():
                raise ValueError(f"public_keys: entry {i} is empty")
        for g in self.groups:
            if not g or _BAD_LEVEL.search(g) or len(g) > 64:
                raise ValueError(f"groups: {g!r} is not a valid group name (1..64 characters, no '/', '+', "
                                 "'#' or whitespace)")
        if not 0.001 <= self.max_bundle_mb <= 1024:
            raise ValueError(f"max_bundle_mb: must be 0.001..1024 (got {self.max_bundle_mb})")
        if not 1 <= self.http_timeout_s <= 3600:
            raise ValueError(f"http_timeout_s: must be 1..3600 (got {self.http_timeout_s})")
        if self.ca_file and not Path(self.ca_file).expanduser().is_file():
            raise ValueError(f"ca_file: {self.ca_file} does not exist")
        if self.watch_interval_s < 0:
            raise ValueError(f"watch_interval_s: must be >= 0 (got {self.watch_interval_s})")
        if not 0 <= self.keep_previous <= 10:
            raise ValueError(f"keep_previous: must be 0..10 (got {self.keep_previous})")
        if not 1 <= self.probation_frames <= 100_000:
            raise ValueError(f"probation_frames: must be 1..100000 (got {self.probation_frames})")
        if self.probation_s <= 0:
            raise ValueError(f"probation_s: must be > 0 (got {self.probation_s})")

    @property
    def max_bytes(self) -> int:
        return int(self.max_bundle_mb * 1024 * 1024)


class Refused(Exception):
    """A command or bundle refused for a reason the operator can fix (the message says which)."""


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


def parse_command(payload: bytes, max_bytes: int, origin: str) -> Request:
    """Decode a command message into a Request; Refused with a clear reason if it is malformed."""
    # Inline bundles are base64 (4/3) inside JSON: refuse oversized messages before parsing them.
    if len(payload) > max_bytes * 4 // 3 + 65536:
        raise Refused(f"command of {len(payload)} bytes exceeds the limit for a "
                      f"{max_bytes / 1048576:g} MiB bundle (update.max_bundle_mb)")
    try:
        cmd = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(f"malformed command: not JSON ({e}); expected e.g. "
                      '{"id": "...", "action": "install", "url": "...", "sha256": "..."}') from None
    if not isinstance(cmd, dict):
        raise Refused(f"malformed command: expected a JSON object, got {type(cmd).__name__}")
    rid = cmd.get("id", secrets.token_hex(6))
    if not isinstance(rid, str) or not 1 <= len(rid) <= 128:
        raise Refused("malformed command: id must be a string of 1..128 characters")
    action = cmd.get("action", "install")
    if action not in ACTIONS:
        raise Refused(f"malformed command: unknown action {action!r} (expected {', '.join(ACTIONS)})")
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


def fetch(url: str, dest: Path, *, max_bytes: int, timeout_s: float, ca_file: str = "") -> bytes:
    """Download ``url`` into ``dest`` within ``timeout_s`` and ``max_bytes``; returns the bytes (Refused on failure)."""
    deadline = time.monotonic() + timeout_s
    ctx = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https:") else None
    req = urllib.request.Request(url, headers={"User-Agent": "fer-edge model update"})
    where = urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()
    try:
        # Per-operation socket timeout; the loop below enforces the overall deadline.
        with urllib.request.urlopen(req, timeout=min(timeout_s, 15.0), context=ctx) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise Refused(f"download {where} is {int(length)} bytes, over the "
                              f"{max_bytes / 1048576:g} MiB limit (update.max_bundle_mb)")
            total = 0
            with open(dest, "xb") as fh:
                while True:
                    chunk = resp.read(65536)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > max_bytes:
                        raise Refused(f"download {where} exceeds the {max_bytes / 1048576:g} MiB limit "
                                      "(update.max_bundle_mb)")
                    fh.write(chunk)
                    if time.monotonic() > deadline:
                        raise Refused(f"download {where} took longer than {timeout_s:g} s (update.http_timeout_s)")
            if length and length.isdigit() and total != int(length):
                raise Refused(f"download {where} ended after {total} of {length} bytes")
    except urllib.error.HTTPError as e:
        raise Refused(f"download {where} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise Refused(f"download {where} failed: {e.reason}") from None
    except http.client.IncompleteRead as e:
        raise Refused(f"download {where} ended after {len(e.partial)} bytes (connection closed early)") from None
    except http.client.HTTPException as e:
        raise Refused(f"download {where} failed: {type(e).__name__}: {e}") from None
    except (TimeoutError, OSError) as e:
        if isinstance(e, TimeoutError) or "timed out" in str(e):
            raise Refused(f"download {where} timed out (update.http_timeout_s {timeout_s:g} s)") from None
        raise Refused(f"download {where} failed: {e}") from None
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
                    clf = load_classifier(self.store.model_path(ptr.active), threads=threads)
                    e = ptr.active
                    self._active = _Active(e.version, e.sha256, e.installed_at, e.origin, e)
                    self._labels = list(clf.labels)
                    return clf
                except ModelError as e:
                    log.error("installed model does not load (%s); using the base model", e)
            return self._use_base()
        try:
            for req in self.store.cleanup(keep=(self.watch_dir,)):
                self._set_last(req.get("id"), req.get("action", "install"), "failed",
                               f"install from {req.get('origin', '?')} was interrupted (daemon stopped or "
                               "crashed during it); the previous model stayed active")
            self._load_handled()
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
                clf = load_classifier(self.store.model_path(entry), threads=threads)
            except ModelError as e:
                msg = f"installed model {entry.version} does not load ({e}); rolled back"
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
            log.info("using installed model %s (%s…) from %s", entry.version, entry.sha256[:12], self.store.root)
            return clf
        return self._use_base()

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
        """Stop the worker (an install in progress is abandoned; cleanup() removes its leftovers)."""
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

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
        """MQTT callback (network thread): parse, check busy, queue; never blocks for long."""
        try:
            req = parse_command(payload, self.ucfg.max_bytes, origin)
        except Refused as e:
            m = _ID_RE.search(payload[:1024])
            self._refuse(m.group(1).decode("utf-8", "replace") if m else None, "install", str(e), origin)
            return
        if req.id in self._handled:
            log.info("model update request %s from %s already handled; ignored (repeated delivery)", req.id, origin)
            return
        self._remember(req.id)
        if req.action == "status":
            self._publish_status()
            return
        with self._lock:
            busy = self._busy
            p = self._probation
            if busy is None and req.action == "install" and p is not None and not p.done:
                busy = (f"model {p.version} is on probation ({p.frames_ok} of {self.ucfg.probation_frames} "
                        "frames)")
            if busy is None:
                self._busy = f"{req.action} {req.id} from {origin}"
        if busy is not None:
            self._refuse(req.id, req.action, f"busy: {busy}; one update at a time, retry when model/status "
                                             "says idle", origin)
            return
        self._jobs.put(("request", req))

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
            ids = json.loads((self.store.root / HANDLED_FILE).read_text())
            self._handled.extend(str(i) for i in ids if isinstance(i, str))
        except (OSError, ValueError, TypeError):
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
        self._set_last(req.id, "install", "accepted", None)
        self._publish_status()
        staging = None
        try:
            data, staging = self._obtain(req)
            if req.sha256 is not None:
                got = hashlib.sha256(data).hexdigest()
                if got != req.sha256:
                    raise Refused(f"sha256 mismatch: the bundle received hashes to {got[:12]}…, the command "
                                  f"says {req.sha256[:12]}… (corrupted or truncated in transit, or wrong file)")
            bundle = read_bundle(data)
            try:
                keys = load_public_keys(self.ucfg.public_keys)
            except BundleError as e:
                raise Refused(f"update.public_keys: {e}") from None
            signer = verify_bundle(bundle, keys, allow_unsigned=self.ucfg.allow_unsigned)
            if staging is None:
                staging = self.store.new_staging({"id": req.id, "action": "install", "origin": req.origin})
            model_path = self.store.write_model(staging, bundle.manifest_bytes, bundle.model_bytes)
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
        detail = (f"installed {entry.version} signed by {signer}; self-test agreement {summary['agreement']:.0%} "
                  f"on {summary['faces']} reference faces; on probation for {self.ucfg.probation_frames} frames")
        log.info("model update request %s: %s", req.id, detail)
        self._set_last(req.id, "install", "installed", None, detail)

    def _fail(self, req: Request, result: str, msg: str) -> None:
        log.warning("model update request %s from %s %s: %s", req.id, req.origin, result, msg)
        self._set_last(req.id, "install", result, msg)

    def _obtain(self, req: Request) -> tuple[bytes, Path | None]:
        """The bundle bytes of a request (size-limited), plus the staging directory if one was needed."""
        limit = self.ucfg.max_bytes
        if req.path is not None:
            data = req.path.read_bytes()
        elif req.url is not None:
            staging = self.store.new_staging({"id": req.id, "action": "install", "origin": req.origin,
                                              "url": req.url})
            try:
                return fetch(req.url, staging / "bundle.part", max_bytes=limit,
                             timeout_s=self.ucfg.http_timeout_s, ca_file=self.ucfg.ca_file), staging
            except BaseException:
                self.store.discard(staging)
                raise
        else:
            try:
                data = base64.b64decode(req.bundle_b64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise Refused("bundle is not valid base64") from None
        if len(data) > limit:
            raise Refused(f"bundle of {len(data)} bytes exceeds the {limit / 1048576:g} MiB limit "
                          "(update.max_bundle_mb)")
        return data, None

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
            with self._lock:
                if self._busy is not None or (self._probation is not None and not self._probation.done):
                    return
                self._busy = f"install of drop-in {p.name}"
            req = Request(id=f"inbox-{p.name}-{secrets.token_hex(3)}", action="install", origin=f"inbox:{p.name}",
                          path=p)
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
