"""The web server: one thread per connection (ThreadingHTTPServer), a socket timeout on each, a cap on how
many there are, and nothing that waits for the frame loop. Routes:

``/`` the page (static files in edge/web/static), ``/api/state``, ``/api/events`` (face events exactly as
published on MQTT), ``/healthz``, ``/metrics`` (Prometheus), ``/api/preview.jpg`` and ``/api/preview.mjpeg``
(only with ``[web] preview = true``; otherwise 404: no image ever leaves the device through this server).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qs, urlsplit

import cv2

from edge.config import ConfigError
from edge.web.auth import BasicAuth
from edge.web.config import WebConfig
from edge.web.feed import Feed, face_dict
from edge.web.metrics import CONTENT_TYPE as METRICS_TYPE, Metrics

log = logging.getLogger(__name__)

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8"), "/favicon.svg": ("favicon.svg", "image/svg+xml")}
# Everything the page needs comes from this server; the browser is told so (no CDN, no inline script).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
UPDATE_STATUS_CACHE_S = 2.0
MJPEG_BOUNDARY = "fer-edge-frame"
MJPEG_SNDBUF = 64 * 1024


class WebServer:
    """Owns the Feed (loop side), the metrics and the HTTP server thread."""

    def __init__(self, cfg, stages: Sequence[str], update_status: Optional[Callable[[], dict]] = None):
        self.cfg = cfg  # the whole Config: the preview header reads device/source/detect settings
        self.web: WebConfig = cfg.web
        w = self.web
        self.feed = Feed(w.preview, w.preview_fps, w.events, w.stale_s)
        self.metrics = Metrics(stages, self._metrics_snapshot)
        self.auth = BasicAuth(w.username, w.password_hash) if w.auth else None
        self._update_status = update_status
        self._update_cache: tuple[float, Optional[dict]] = (0.0, None)
        self._update_lock = threading.Lock()
        self._jpeg_lock = threading.Lock()
        self._jpeg: tuple[int, bytes] = (0, b"")
        self._streams = threading.BoundedSemaphore(w.max_streams) if w.max_streams else None
        self._hosts = {h.lower().rstrip(".") for h in w.hosts}
        self.static = {path: (resources.files("edge.web").joinpath("static", name).read_bytes(), ctype)
                        for path, (name, ctype) in STATIC.items()}
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        w = self.web
        try:
            self._httpd = _Server((w.bind, w.port), self)
        except OSError as e:
            raise ConfigError("web.port", f"cannot listen on {w.bind}:{w.port}: {e.strerror or e} "
                                          "(another program on that port? choose another web.port)") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="web", daemon=True)
        self._thread.start()
        host = f"[{w.bind}]" if ":" in w.bind else w.bind
        log.info("web page on http://%s:%d/ (preview %s, %s)", host, self.port, "on" if w.preview else "off",
                 "password required" if w.auth else "no password")
        if not w.loopback and not w.auth:
            log.warning("web: listening on %s without a password: anyone on the network can see %s; set "
                        "web.password_hash (python3 -m edge.web.auth) or bind 127.0.0.1 and use an SSH tunnel",
                        w.bind, "the camera picture" if w.preview else "faces and events")

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd is not None else self.web.port

    def stop(self, reason: str = "stopping") -> None:
        self.feed.stopping(reason)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # --- data for handlers ---------------------------------------------------------------------------

    def update_status(self) -> Optional[dict]:
        """The model update manager's status, at most every 2 s (it reads the store's pointer file)."""
        if self._update_status is None:
            return None
        with self._update_lock:
            at, value = self._update_cache
            now = time.monotonic()
            if value is None or now - at > UPDATE_STATUS_CACHE_S:
                try:
                    value = self._update_status()
                except Exception as e:  # the page must keep working whatever the update manager does
                    value = {"state": "unknown", "error": f"{type(e).__name__}: {e}"}
                self._update_cache = (now, value)
            return value

    def _metrics_snapshot(self) -> dict:
        ok, _ = self.feed.health()
        return {"stats": self.feed.stats(), "healthy": ok, "last_frame_age_s": self.feed.last_frame_age(),
                "faces_classified": self.feed.faces_classified, "update": self.update_status()}

    def state(self) -> dict:
        ok, reason = self.feed.health()
        c = self.cfg
        return {
            "device_id": c.device.id,
            "health": {"ok": ok, "reason": reason},
            "faces": self.feed.faces(),
            "stats": self.feed.stats(),
            "update": self.update_status(),
            "preview": {"enabled": self.web.preview, "fps": self.web.preview_fps,
                        "url": "api/preview.jpg" if self.web.preview else None},
            "source": {"kind": c.source.kind, "rotate": c.source.rotate, "flip": c.source.flip},
            "auth": self.web.auth,
        }

    def preview_jpeg(self, frame: tuple) -> tuple[int, bytes]:
        """(seq, JPEG bytes) of a preview frame; encoded once however many viewers there are."""
        from edge.snapshot import annotate

        seq, image, faces, labels, epoch = frame
        with self._jpeg_lock:
            if self._jpeg[0] == seq:
                return self._jpeg
            c, w = self.cfg, self.web
            dicts = [face_dict(fid, box, row, labels) for fid, box, row in faces]
            for d in dicts:
                d["label"] = f"{d['face_id']} {d['emotion']} {d['confidence']:.0%}" if d["emotion"] else d["face_id"]
            h, wd = image.shape[:2]
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
            header = [f"{c.device.id}  {c.source.kind}  {wd}x{h}  rotate {c.source.rotate}  flip {c.source.flip}",
                      f"{stamp}  {len(dicts)} face{'s' if len(dicts) != 1 else ''}"]
            img = annotate(image, dicts, header, c.detect.min_face)
            if w.preview_width and wd > w.preview_width:
                img = cv2.resize(img, (w.preview_width, round(h * w.preview_width / wd)), interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, w.jpeg_quality])
            if not ok:
                raise RuntimeError("JPEG encoding failed")
            self._jpeg = (seq, buf.tobytes())
            return self._jpeg

    def host_allowed(self, host: Optional[str]) -> bool:
        """Host header names an IP, localhost or one of web.hosts (absent: HTTP/1.0 clients such as curl -0)."""
        if not host:
            return True
        name = host.strip().lower()
        if name.startswith("["):  # [v6]:port
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":")[0]
        name = name.rstrip(".")
        if name == "localhost" or name.endswith(".localhost") or name in self._hosts:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False

    def acquire_stream(self) -> bool:
        return self._streams is not None and self._streams.acquire(blocking=False)

    def release_stream(self) -> None:
        if self._streams is not None:
            self._streams.release()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client never holds up shutdown
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, app: WebServer):
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(app.web.max_clients)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        # Runs in the accept thread: refuse at once rather than queue behind stalled connections.
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        log.debug("web: connection from %s ended with an error", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the page polls over one connection
    server_version = "fer-edge"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.app.web.timeout_s  # StreamRequestHandler applies it to the socket
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("web %s " + format, self.client_address[0], *args)

    # --- routing ---------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        app = self.server.app
        if app.auth is None and not app.host_allowed(self.headers.get("Host")):
            self._send(HTTPStatus.FORBIDDEN, b"this device answers requests for its IP address or localhost only; "
                       b"add the name to web.hosts, or set web.password_hash\n", "text/plain; charset=utf-8", head)
            return
        if app.auth is not None and not app.auth.check(self.headers.get("Authorization")):
            time.sleep(0.2)  # blunt password guessing a little without holding any lock
            self._send(HTTPStatus.UNAUTHORIZED, b"authentication required\n", "text/plain; charset=utf-8", head,
                       {"WWW-Authenticate": 'Basic realm="fer-edge", charset="UTF-8"'})
            return
        url = urlsplit(self.path)
        path = url.path
        try:
            query = parse_qs(url.query, max_num_fields=8)
        except ValueError:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "too many query parameters"}, head)
            return
        if path in app.static:
            body, ctype = app.static[path]
            self._send(HTTPStatus.OK, body, ctype, head, {"Cache-Control": "no-cache"})
        elif path == "/healthz":
            ok, reason = app.feed.health()
            self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                       f"{'ok' if ok else 'unhealthy'}: {reason}\n".encode(), "text/plain; charset=utf-8", head)
        elif path == "/metrics":
            self._send(HTTPStatus.OK, app.metrics.render(), METRICS_TYPE, head)
        elif path == "/api/state":
            self._send_json(HTTPStatus.OK, app.state(), head)
        elif path == "/api/events":
            self._events(query, head)
        elif path in ("/api/preview.jpg", "/api/preview.mjpeg"):
            if not app.web.preview:
                self._send_json(HTTPStatus.NOT_FOUND, {"error": "preview is off ([web] preview = false): "
                                                                "no image leaves the device"}, head)
            elif path.endswith(".jpg"):
                self._preview_jpg(head)
            else:
                self._preview_mjpeg(head)
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path[:100]}"}, head)

    # --- handlers --------------------------------------------------------------------------------

    def _events(self, query: dict, head: bool) -> None:
        app = self.server.app
        try:
            limit = int(query.get("limit", [str(app.web.events)])[0])
            after = float(query.get("after", ["0"])[0])
            if not 0 <= limit <= app.web.events or not 0 <= after < 1e11:  # NaN fails both comparisons
                raise ValueError
        except ValueError:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"limit must be 0..{app.web.events} and after an "
                                                              "epoch in seconds"}, head)
            return
        self._send_json(HTTPStatus.OK, app.feed.events(limit, after), head)

    def _preview_jpg(self, head: bool) -> None:
        app = self.server.app
        frame = app.feed.latest_frame()
        if frame is None:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no frame yet"}, head)
            return
        seq, jpeg = app.preview_jpeg(frame)
        self._send(HTTPStatus.OK, jpeg, "image/jpeg", head, {"X-Frame-Seq": str(seq)})

    def _preview_mjpeg(self, head: bool) -> None:
        app = self.server.app
        ctype = f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}"
        if head:
            self._send(HTTPStatus.OK, b"", ctype, head)
            return
        if not app.acquire_stream():
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE,
                            {"error": f"at most {app.web.max_streams} preview streams at a time"}, head)
            return
        try:
            # About a second of stream in flight: a slow viewer gets the newest frame when it catches up, not an
            # ever older backlog, and a stalled one fills the buffer and hits the socket timeout.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MJPEG_SNDBUF)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.close_connection = True
            seq = 0
            while True:
                frame = app.feed.wait_frame(seq, timeout=app.web.timeout_s)
                if frame is None:
                    break  # the loop stopped or stalled: end the stream, the client reconnects
                seq, jpeg = app.preview_jpeg(frame)
                # A client that stops reading makes this raise after timeout_s (socket timeout), freeing the thread.
                self.wfile.write(f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}"
                                 "\r\n\r\n".encode("ascii") + jpeg + b"\r\n")
                self.wfile.flush()
        except OSError:
            pass
        finally:
            app.release_stream()

    # --- responses ---------------------------------------------------------------------------------

    def _send_json(self, status: HTTPStatus, obj: Any, head: bool) -> None:
        body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json", head, {"Cache-Control": "no-store"})

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, head: bool, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)
