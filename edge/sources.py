"""Frame sources: demo clip, OpenCV camera/stream/file, image folder, Raspberry Pi camera (picamera2).

Every source captures in its own daemon thread into a one-slot buffer that keeps only the newest frame, so a slow
pipeline always works on the present instead of a growing backlog; frames overwritten before being read are counted
as ``dropped``. Rotation and flip are applied in the capture thread (by libcamera for picamera2 where it can). A
camera or stream that fails to open or stops delivering is reopened with exponential backoff; nothing raises into
the pipeline.

A camera can also hang inside a driver call. Every read has a timeout where the driver offers one (picamera2's
``wait=``): a read that times out is a failed read and goes down the reconnect path. A call that never returns
(a driver stuck in the kernel, no timeout) cannot be interrupted from Python, so the source records which call is
running since when: ``stalled`` turns true once one call has run ``stall_timeout_s``, and the daemon then stops
feeding the systemd watchdog, which restarts it. ``status`` says what state the source is in ("up", "no camera",
"down", "stalled", ...), ``last_error`` why.

``fps`` and ``realtime`` by kind:

* cameras (opencv index or /dev/video*, picamera2): ``fps`` > 0 is requested from the driver; frames come as the
  camera delivers them.
* streams (rtsp/http URLs): frames come as the server sends them; ``fps`` is ignored.
* finite sources (video files, the demo clip, image folders) with ``realtime=True`` are paced like a camera at
  ``fps`` if > 0, else the file's own frame rate (image folders: 1 frame/s). With ``realtime=False`` they are
  lossless: the capture thread waits until the pipeline has read each frame (offline processing, no drops).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

log = logging.getLogger(__name__)

DEMO_CLIP = Path(__file__).resolve().parent / "data" / "demo.mp4"
KINDS = ("demo", "opencv", "images", "picamera2")
FLIPS = {"none": None, "horizontal": 1, "vertical": 0, "both": -1}
ROTATIONS = {0: None, 90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
IMAGES_DEFAULT_FPS = 1.0
PICAMERA2_MISSING = ("picamera2 is not installed: sudo apt install python3-picamera2 and create the venv with "
                     "--system-site-packages")


class SourceError(RuntimeError):
    """A source that can never work as configured (e.g. picamera2 missing); the message says what to do."""


class NoCamera(OSError):
    """No camera is attached where the source looks (libcamera lists none, no /dev/videoN): status "no camera"."""


@dataclass
class SourceConfig:
    """Where frames come from ([source] section). See the module docstring for fps/realtime per kind."""

    kind: str = "demo"  # "demo" | "opencv" | "images" | "picamera2"
    uri: str = ""  # opencv: "0", /dev/videoN, rtsp/http URL or video file; images: folder or glob; picamera2: camera number
    width: int = 640  # requested from cameras (the driver may pick the nearest mode)
    height: int = 480
    # cameras: requested rate (0 = driver default; picamera2: follow the pipeline); files: pacing (0 = native)
    fps: float = 0.0
    rotate: int = 0  # clockwise degrees: 0, 90, 180, 270
    flip: str = "none"  # "none" | "horizontal" | "vertical" | "both" (applied after rotation)
    loop: bool = False  # replay files, folders and the demo clip forever
    realtime: bool = True  # finite sources: pace like a camera (True) or hand over every frame losslessly (False)
    reconnect_min_s: float = 0.5  # first retry delay after a camera/stream failure
    reconnect_max_s: float = 30.0  # retry delay cap (doubles each failure)
    frame_timeout_s: float = 10.0  # cameras: a read with no frame for this long fails (reconnect)
    stall_timeout_s: float = 30.0  # one driver call running this long = stuck: the daemon stops the watchdog pings

    def validate(self) -> None:
        """Raise ValueError("<field>: ...") for bad values."""
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in ("opencv", "images") and not self.uri.strip():
            what = "a device index, /dev/videoN, URL or video file" if self.kind == "opencv" else "a folder or glob"
            raise ValueError(f"uri: required for kind {self.kind!r}; set it to {what}")
        if self.kind == "picamera2" and self.uri and not self.uri.isdigit():
            raise ValueError(f"uri: {self.uri!r} for picamera2 must be a camera number such as 0 (or empty)")
        if self.width < 16:
            raise ValueError(f"width: {self.width}x{self.height} is too small; use at least 16x16")
        if self.height < 16:
            raise ValueError(f"height: {self.width}x{self.height} is too small; use at least 16x16")
        # 8192 covers every Pi camera (HQ: 4056x3040) and 8K; beyond that a request is a typo, not a mode.
        if self.width > 8192:
            raise ValueError(f"width: {self.width} is too large; use 16..8192")
        if self.height > 8192:
            raise ValueError(f"height: {self.height} is too large; use 16..8192")
        if not 0 <= self.fps <= 1000:
            raise ValueError(f"fps: {self.fps} must be 0..1000 (0 = native)")
        if self.rotate not in ROTATIONS:
            raise ValueError(f"rotate: {self.rotate} must be one of 0, 90, 180, 270")
        if self.flip not in FLIPS:
            raise ValueError(f"flip: {self.flip!r} must be one of {', '.join(FLIPS)}")
        if not 0.01 <= self.reconnect_min_s <= 3600:
            raise ValueError(f"reconnect_min_s: {self.reconnect_min_s} must be 0.01..3600 s")
        if not self.reconnect_min_s <= self.reconnect_max_s <= 3600:
            raise ValueError(f"reconnect_max_s: {self.reconnect_max_s} must be reconnect_min_s "
                             f"({self.reconnect_min_s})..3600 s")
        if not 0.05 <= self.frame_timeout_s <= 600:
            raise ValueError(f"frame_timeout_s: {self.frame_timeout_s} must be 0.05..600 seconds")
        if not self.frame_timeout_s <= self.stall_timeout_s <= 3600:
            raise ValueError(f"stall_timeout_s: {self.stall_timeout_s} must be >= frame_timeout_s "
                             f"({self.frame_timeout_s}) and <= 3600 seconds")


@dataclass
class Frame:
    """One captured frame: BGR uint8 HxWx3, already rotated/flipped."""

    image: np.ndarray
    index: int  # capture sequence number of this source (gaps = dropped frames)
    timestamp: float  # time.time() at capture
    monotonic: float  # time.monotonic() at capture


def redact(uri: str) -> str:
    """Hide credentials in URLs (rtsp://user:pass@host -> rtsp://***@host) before they reach logs or events."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", uri)


# --- backends: open() raises on failure; read() returns an image, or None at end of a finite source / on failure ---

class _Backend:
    live = True  # camera/stream: a failed read means reconnect; finite: it means the end
    native_fps = 0.0
    transforms = False  # True: the device already applied cfg.rotate/cfg.flip

    def open(self) -> None:
        raise NotImplementedError

    def read(self, timeout: float) -> Optional[np.ndarray]:
        """The next image; ``timeout`` bounds the wait where the driver can (cameras)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _OpenCVBackend(_Backend):
    def __init__(self, cfg: SourceConfig, uri: str):
        self.cfg = cfg
        self.uri = uri
        self.camera = uri.isdigit() or uri.startswith("/dev/")
        self.live = self.camera or "://" in uri
        self.cap: Optional[cv2.VideoCapture] = None

    def open(self) -> None:
        if not self.live and not os.path.isfile(self.uri):
            raise OSError(f"video file not found: {self.uri}")
        dev = f"/dev/video{self.uri}" if self.uri.isdigit() else self.uri
        if self.camera and os.path.isdir("/dev") and not os.path.exists(dev):
            raise NoCamera(f"no camera connected: {dev} does not exist")
        cap = cv2.VideoCapture(int(self.uri) if self.uri.isdigit() else self.uri)
        if not cap.isOpened():
            cap.release()
            raise OSError(f"cannot open {redact(self.uri)}")
        if self.camera:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
            if self.cfg.fps > 0:
                cap.set(cv2.CAP_PROP_FPS, self.cfg.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep the driver queue short: we want the newest frame
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.native_fps = fps if 0 < fps < 1000 else 25.0
        self.cap = cap

    def read(self, timeout: float) -> Optional[np.ndarray]:
        # No per-call timeout in cv2.VideoCapture.read (V4L2 gives up after its own 10 s select, FFmpeg streams
        # after 30 s), and it cannot be interrupted from outside: a camera or stream read is timed here instead,
        # so one that returns late counts as failed (reconnect) like picamera2's wait=; one that never returns
        # is caught by the stall check.
        t0 = time.monotonic()
        ok, img = self.cap.read()
        took = time.monotonic() - t0
        if self.live and took > timeout:
            raise TimeoutError(f"read took {took:.1f} s, over source.frame_timeout_s ({timeout:g} s)")
        return img if ok and img is not None and img.size else None

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class _ImagesBackend(_Backend):
    live = False

    def __init__(self, cfg: SourceConfig):
        self.uri = cfg.uri
        self.native_fps = IMAGES_DEFAULT_FPS
        self.on_bad = lambda path: None  # set by Source to count and log
        self.paths: list[str] = []
        self.pos = 0

    def open(self) -> None:
        p = Path(self.uri).expanduser()
        if p.is_dir():
            paths = [str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
        else:
            paths = [f for f in glob.glob(os.path.expanduser(self.uri)) if os.path.isfile(f)]
        if not paths:
            raise OSError(f"no images match {self.uri}")
        self.paths = sorted(paths)
        self.pos = 0

    def read(self, timeout: float) -> Optional[np.ndarray]:
        while self.pos < len(self.paths):
            path = self.paths[self.pos]
            self.pos += 1
            img = cv2.imread(path, cv2.IMREAD_COLOR)
            if img is not None and img.size:
                return img
            self.on_bad(path)
        return None


class _Picamera2Backend(_Backend):
    """Thin adapter over picamera2 (the real API: Picamera2.global_camera_info, create_video_configuration,
    capture_array(wait=seconds) which raises TimeoutError, libcamera.Transform)."""

    BUFFERS = 3  # picamera2's video default is 6; we only ever want the newest frame
    DEFAULT_FPS = 15.0  # fps = 0: the rate to start at, then follow_rate matches the pipeline
    AUTO_MIN_FPS, AUTO_MAX_FPS = 2.0, 30.0

    def __init__(self, cfg: SourceConfig, picamera2_cls, transform_cls=None):
        self.cfg = cfg
        self.cls = picamera2_cls
        self.transform_cls = transform_cls
        self.cam = None
        # libcamera flips in the ISP for free; 90/270 degree turns need a transpose it cannot do on a Pi.
        self.transforms = transform_cls is not None and cfg.rotate in (0, 180)

    def _transform(self):
        turn = self.cfg.rotate == 180  # = hflip + vflip
        h = turn ^ (self.cfg.flip in ("horizontal", "both"))
        v = turn ^ (self.cfg.flip in ("vertical", "both"))
        return self.transform_cls(hflip=int(h), vflip=int(v))

    def open(self) -> None:
        num = int(self.cfg.uri or 0)
        # Ask libcamera first: a Picamera2() that finds no camera leaks a descriptor each time (upstream opens
        # a pipe before looking the camera up), and we retry for as long as the daemon runs.
        cameras = self.cls.global_camera_info()
        if num >= len(cameras):
            listed = ", ".join(str(c.get("Model", "?")) for c in cameras) or "none"
            raise NoCamera(f"no camera connected: libcamera lists {listed}, camera {num} wanted "
                           "(check the ribbon cable; rpicam-hello --list-cameras)")
        cam = self.cls(num)
        try:
            fps = self.cfg.fps or self.DEFAULT_FPS
            frame_us = int(round(1e6 / fps))
            # "RGB888" is libcamera's name for 24-bit pixels stored B,G,R in memory: exactly OpenCV's BGR order.
            kwargs = {"main": {"size": (self.cfg.width, self.cfg.height), "format": "RGB888"},
                      "controls": {"FrameDurationLimits": (frame_us, frame_us)},
                      "buffer_count": self.BUFFERS,
                      # queue=False: a capture waits for the next frame instead of returning a queued, older one.
                      "queue": False}
            if self.transforms:
                kwargs["transform"] = self._transform()
            cam.configure(cam.create_video_configuration(**kwargs))
            cam.start()
        except Exception:
            cam.close()
            raise
        self.cam = cam
        self.native_fps = fps

    def follow_rate(self, used_fps: float) -> None:
        """fps = 0: run the sensor a little above the rate the pipeline takes frames (a Pi 4 uses ~8 of the
        sensor's default 30 fps; every frame beyond that costs ISP, copies and wake-ups for nothing)."""
        target = min(self.AUTO_MAX_FPS, max(self.AUTO_MIN_FPS, 1.25 * used_fps))
        if self.cam is None or abs(target - self.native_fps) <= 0.15 * self.native_fps:
            return
        frame_us = int(round(1e6 / target))
        try:
            self.cam.set_controls({"FrameDurationLimits": (frame_us, frame_us)})
        except Exception as e:  # a camera that refuses keeps its rate; capturing goes on
            log.warning("picamera2: cannot set %.1f fps: %s", target, e)
            return
        log.info("picamera2: %.1f fps (the pipeline uses %.1f)", target, used_fps)
        self.native_fps = target

    def read(self, timeout: float) -> Optional[np.ndarray]:
        img = self.cam.capture_array("main", wait=timeout)  # raises TimeoutError when no frame comes in time
        return img if img is not None and img.size else None

    def close(self) -> None:
        if self.cam is not None:
            cam, self.cam = self.cam, None
            for step in (cam.stop, cam.close):
                try:
                    step()
                except Exception as e:  # closing must not stop the reconnect loop
                    log.warning("picamera2 %s failed: %s", step.__name__, e)


def _import_picamera2():
    """(Picamera2, libcamera.Transform or None)."""
    try:
        from picamera2 import Picamera2  # Pi-only; imported lazily so the rest runs anywhere
    except ImportError:
        raise SourceError(PICAMERA2_MISSING) from None
    try:
        from libcamera import Transform
    except ImportError:  # flips then happen per frame in Python
        Transform = None
    return Picamera2, Transform


class Source:
    """A running frame source; see open_source()."""

    RATE_WINDOW_S = 5.0  # fps = 0 (picamera2): how often the camera's rate is matched to the pipeline's

    def __init__(self, cfg: SourceConfig, backend: _Backend, name: str):
        self.cfg = cfg
        self.name = name
        self._backend = backend
        self._cond = threading.Condition()
        self._slot: Optional[Frame] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._exhausted = False
        self._connected = False
        self._state = "starting"
        self.last_error = ""  # why the source is down / last failure, "" when none yet
        self._busy: Optional[tuple[str, float]] = None  # (driver call, monotonic start) while one runs
        self.dropped = 0
        self.reconnects = 0  # reopen attempts after a failure
        self.frames = 0  # frames captured
        self.used = 0  # frames the pipeline read (the rest were dropped)
        self.bad_images = 0  # unreadable image files skipped (images kind)
        if isinstance(backend, _ImagesBackend):
            backend.on_bad = self._on_bad_image

    # -- pipeline side --

    @property
    def connected(self) -> bool:
        """True while the device/stream/file is open and delivering."""
        return self._connected

    def stalled_for(self, now: Optional[float] = None) -> float:
        """Seconds the capture thread has been inside its current driver call (0 when not in one)."""
        busy = self._busy
        if busy is None:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - busy[1])

    def stalled(self, now: Optional[float] = None) -> bool:
        """True when one driver call has run stall_timeout_s: the thread is stuck and only a restart helps."""
        return self.stalled_for(now) >= self.cfg.stall_timeout_s

    @property
    def status(self) -> str:
        """"starting", "up", "no camera", "down", "stalled" or "finished" (see last_error for why)."""
        if self.stalled():
            return "stalled"
        return self._state

    def health(self, now: Optional[float] = None) -> dict:
        """status, last_error and, when stuck, which call for how long: for stats and doctor."""
        out = {"status": self.status, "error": self.last_error or None}
        busy = self._busy
        if busy is not None and self.stalled(now):
            out["error"] = f"{busy[0]}() has not returned for {self.stalled_for(now):.0f} s"
        return out

    @property
    def finished(self) -> bool:
        """True once a finite source is exhausted and its last frame has been read."""
        with self._cond:
            return self._exhausted and self._slot is None

    def start(self) -> "Source":
        """Start the capture thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"capture-{self.cfg.kind}", daemon=True)
            self._thread.start()
        return self

    def read(self, timeout: float = 1.0) -> Optional[Frame]:
        """Newest frame not yet returned, waiting up to ``timeout`` s; None on timeout, when finished or stopped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._slot is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._exhausted or self._stop.is_set():
                    return None
                self._cond.wait(remaining)
            frame, self._slot = self._slot, None
            self.used += 1
            self._cond.notify_all()  # a lossless producer waits for the slot to empty
            return frame

    def stop(self, timeout: float = 3.0) -> None:
        """Stop capturing and release the device; safe to call twice."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("source %s: capture thread did not stop within %.1f s (blocked in the driver)",
                            self.name, timeout)

    def __enter__(self) -> "Source":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- capture thread --

    def _call(self, name: str, fn):
        """Run one driver call, recording it for the stall check."""
        self._busy = (name, time.monotonic())
        try:
            return fn()
        finally:
            self._busy = None

    def _failed(self, e: object) -> None:
        self._connected = False
        self._state = "no camera" if isinstance(e, NoCamera) else "down"
        self.last_error = str(e) or type(e).__name__

    def _on_bad_image(self, path: str) -> None:
        self.bad_images += 1
        log.warning("source %s: skipping unreadable image %s", self.name, path)

    def _put(self, img: np.ndarray) -> None:
        img = _to_bgr(img)
        if not self._backend.transforms:
            rot = ROTATIONS[self.cfg.rotate]
            if rot is not None:
                img = cv2.rotate(img, rot)
            flip = FLIPS[self.cfg.flip]
            if flip is not None:
                img = cv2.flip(img, flip)
        lossless = not self._backend.live and not self.cfg.realtime
        with self._cond:
            while lossless and self._slot is not None and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._slot is not None:
                self.dropped += 1
            self._slot = Frame(img, self.frames, time.time(), time.monotonic())
            self.frames += 1
            self._cond.notify_all()

    def _run(self) -> None:
        backend = self._backend
        delay = self.cfg.reconnect_min_s
        failing = False  # log a failure once, then quietly retry until it recovers
        pass_frames = 0
        opened = False
        pace_t: Optional[float] = None
        # fps = 0 on a camera that can change its rate while running: follow what the pipeline uses.
        follow = self.cfg.fps == 0 and hasattr(backend, "follow_rate")
        rate_t, rate_used = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                if not opened:
                    try:
                        self._call("open", backend.open)
                    except SourceError:
                        raise
                    except Exception as e:
                        if not failing:
                            log.warning("source %s: %s; retrying every %.1f-%.0f s", self.name, e,
                                        self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
                        failing = True
                        self._failed(e)
                        if self._stop.wait(delay):
                            break
                        delay = min(delay * 2, self.cfg.reconnect_max_s)
                        self.reconnects += 1
                        continue
                    opened = True
                    pass_frames = 0
                    self._connected = True
                err: object = "no frame"
                try:
                    img = self._call("read", lambda: backend.read(self.cfg.frame_timeout_s))
                except Exception as e:
                    if not backend.live:
                        raise
                    img, err = None, e
                if img is None:
                    self._call("close", backend.close)
                    opened = False
                    self._connected = False
                    if backend.live:
                        why = f"{type(err).__name__}: {err}" if isinstance(err, Exception) else err
                        if not failing:
                            log.warning("source %s: stopped delivering frames (%s); reconnecting", self.name, why)
                        failing = True
                        self._failed(f"stopped delivering frames ({why})")
                        if self._stop.wait(delay):
                            break
                        delay = min(delay * 2, self.cfg.reconnect_max_s)
                        self.reconnects += 1
                        continue
                    if not self.cfg.loop:
                        log.info("source %s: end after %d frames", self.name, self.frames)
                        self._end()
                        break
                    if pass_frames == 0:  # a looped source with nothing readable must not spin
                        self._failed(f"no frame could be read from {self.name}")
                        if self._stop.wait(delay):
                            break
                        delay = min(delay * 2, self.cfg.reconnect_max_s)
                    continue
                if failing:  # only a delivered frame proves recovery (some cameras open, then fail every read)
                    log.info("source %s: receiving frames again", self.name)
                    failing = False
                self._state = "up"
                delay = self.cfg.reconnect_min_s
                pass_frames += 1
                if not backend.live and self.cfg.realtime:
                    pace_t = self._pace(pace_t, self.cfg.fps or backend.native_fps)
                self._put(img)
                if follow and time.monotonic() - rate_t >= self.RATE_WINDOW_S:
                    now = time.monotonic()
                    self._call("set_controls", lambda: backend.follow_rate((self.used - rate_used) / (now - rate_t)))
                    rate_t, rate_used = now, self.used
        except Exception as e:  # a bug or a source that can never work: end it (finished=True), never the process
            log.error("source %s: capture stopped: %s: %s", self.name, type(e).__name__, e)
            self._end()
        finally:
            backend.close()
            self._connected = False

    def _end(self) -> None:
        self._state = "finished"
        with self._cond:
            self._exhausted = True
            self._cond.notify_all()

    def _pace(self, due: Optional[float], fps: float) -> float:
        """Sleep until ``due``; return the next due time (resynchronised if we fell behind)."""
        now = time.monotonic()
        if due is None:
            due = now
        if due > now:
            self._stop.wait(due - now)
            now = due
        return max(due, now - 1.0 / fps) + 1.0 / fps


def _to_bgr(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:  # e.g. picamera2 XRGB8888
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img


def open_source(cfg: SourceConfig) -> Source:
    """Build (not start) the source described by ``cfg``.

    Raises ValueError for an invalid config and SourceError for a source that can never work (picamera2 not
    installed, demo clip missing from the install). Runtime failures never raise: they show in ``connected``.
    """
    cfg.validate()
    if cfg.kind == "demo":
        if not DEMO_CLIP.is_file():
            raise SourceError(f"demo clip missing: {DEMO_CLIP}; reinstall fer-edge")
        return Source(cfg, _OpenCVBackend(cfg, str(DEMO_CLIP)), "demo")
    if cfg.kind == "opencv":
        backend = _OpenCVBackend(cfg, cfg.uri)
        kind = "camera" if backend.camera else "stream" if backend.live else "file"
        if kind == "file" and not os.path.exists(os.path.expanduser(cfg.uri)):
            # A file that is not there at start is a typo or a missing mount, not a camera that may come back:
            # fail now (exit 2, which systemd does not restart) instead of running "online" at 0 fps forever.
            # A file that disappears while running is retried like a camera.
            raise SourceError(f"video file not found: {cfg.uri}; fix source.uri (a camera is \"0\" or /dev/videoN)")
        return Source(cfg, backend, f"{kind}:{redact(cfg.uri)}")
    if cfg.kind == "images":
        return Source(cfg, _ImagesBackend(cfg), f"images:{cfg.uri}")
    return Source(cfg, _Picamera2Backend(cfg, *_import_picamera2()), f"picamera2:{cfg.uri or 0}")
