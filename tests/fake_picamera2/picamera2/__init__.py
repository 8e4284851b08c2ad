"""Test double for the Pi-only picamera2 package, shaped like its real API (the subset edge.sources uses).

It delivers synthetic frames of the configured size: a reddish scene whose bytes are stored B,G,R like the real
"RGB888" format (B=10, G=20, R=200), with the frame counter in pixel (0, 0) channel 0, flipped as the
configuration's libcamera ``Transform`` asks (as the ISP would). Like the real one:

* ``Picamera2.global_camera_info()`` lists the attached cameras without opening one;
* ``Picamera2(n)`` opens a pipe before looking camera ``n`` up and leaks it when there is none (upstream's
  descriptor leak on a failed open);
* ``capture_array(name, wait=seconds)`` raises TimeoutError when no frame comes within ``wait``.

Knobs for tests (module-level, reset with reset(); the FAKE_PICAMERA2_* environment variables set the same for a
daemon subprocess): CAMERAS (cameras attached), FAIL_AFTER (capture_array raises after this many frames per
camera object, None = never), STALL_AFTER (after this many frames no more frames come: a capture honours
``wait`` and times out), HANG_AFTER (after this many frames capture_array blocks inside the "driver" and ignores
``wait``, until RELEASE is set), HANGING (set while a capture is hung), INSTANCES (every Picamera2 object made,
with its .calls log).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np


def _env_int(name: str):
    value = os.environ.get(name, "")
    return int(value) if value.strip() else None


CAMERAS = 1
FAIL_AFTER: int | None = None
STALL_AFTER: int | None = None
HANG_AFTER: int | None = None
RELEASE = threading.Event()
HANGING = threading.Event()
INSTANCES: list["Picamera2"] = []
LEAKED_FDS: list[int] = []


def reset() -> None:
    global CAMERAS, FAIL_AFTER, STALL_AFTER, HANG_AFTER
    env_cameras = _env_int("FAKE_PICAMERA2_CAMERAS")
    CAMERAS = 1 if env_cameras is None else env_cameras
    FAIL_AFTER = None
    STALL_AFTER = _env_int("FAKE_PICAMERA2_STALL_AFTER")
    HANG_AFTER = _env_int("FAKE_PICAMERA2_HANG_AFTER")
    RELEASE.set()  # free any capture still hung from a previous test
    RELEASE.clear()
    HANGING.clear()
    INSTANCES.clear()
    while LEAKED_FDS:
        os.close(LEAKED_FDS.pop())


reset()


class Picamera2:
    def __init__(self, camera_num: int = 0):
        # Upstream creates its notification pipe before it looks the camera up, and a failed lookup leaves it open.
        r, w = os.pipe()
        if camera_num >= CAMERAS:
            LEAKED_FDS.extend((r, w))
            raise IndexError("list index out of range")  # what the real one raises with no camera attached
        self._pipe = (r, w)
        self.camera_num = camera_num
        self.calls: list[str] = []
        self.config: dict | None = None
        self.started = False
        self.closed = False
        self.count = 0
        self.control_log: list[dict] = []  # set_controls() calls while running
        INSTANCES.append(self)

    @staticmethod
    def global_camera_info() -> list[dict]:
        return [{"Model": "imx708", "Location": 2, "Rotation": 180, "Id": f"/base/fake/imx708@{i}", "Num": i}
                for i in range(CAMERAS)]

    def create_video_configuration(self, main=None, lores=None, raw=None, transform=None, colour_space=None,
                                   buffer_count=6, controls=None, display="main", encode="main", queue=True):
        self.calls.append("create_video_configuration")
        main = dict(main or {})
        main.setdefault("size", (1280, 720))
        main.setdefault("format", "XBGR8888")
        return {"use_case": "video", "main": main, "controls": dict(controls or {}), "buffer_count": buffer_count,
                "transform": transform, "queue": queue}

    def configure(self, config) -> None:
        self.calls.append("configure")
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        self.config = config

    def start(self) -> None:
        self.calls.append("start")
        if self.config is None:
            raise RuntimeError("Camera has not been configured")
        self.started = True

    def set_controls(self, controls: dict) -> None:
        self.calls.append("set_controls")
        self.config["controls"].update(controls)
        self.control_log.append(dict(controls))

    def _frame_interval(self) -> float:
        limits = self.config["controls"].get("FrameDurationLimits")
        return limits[0] / 1e6 if limits else 1 / 30.0

    def capture_array(self, name: str = "main", wait=None) -> np.ndarray:
        if not self.started:
            raise RuntimeError("Camera is not running")
        if FAIL_AFTER is not None and self.count >= FAIL_AFTER:
            raise RuntimeError("Camera frontend has timed out!")
        if HANG_AFTER is not None and self.count >= HANG_AFTER:
            HANGING.set()  # stuck in the kernel: no timeout helps
            RELEASE.wait()
            raise RuntimeError("camera released")
        if STALL_AFTER is not None and self.count >= STALL_AFTER:
            if wait is None or wait is True:
                RELEASE.wait()
                raise RuntimeError("camera released")
            time.sleep(min(float(wait), 5.0))
            raise TimeoutError("Timed out waiting for job result")  # what Job.get_result(timeout) raises
        stream = self.config[name]
        w, h = stream["size"]
        time.sleep(min(self._frame_interval(), 0.05))  # tests need not wait for real frame times
        channels = 3 if stream["format"] in ("RGB888", "BGR888") else 4
        img = np.empty((h, w, channels), np.uint8)
        img[..., 0], img[..., 1], img[..., 2] = 10, 20, 200  # memory order B, G, R for "RGB888"
        if channels == 4:
            img[..., 3] = 255
        img[0, 0, 0] = self.count % 256
        t = self.config.get("transform")
        if t is not None:
            if t.hflip:
                img = img[:, ::-1]
            if t.vflip:
                img = img[::-1]
            img = np.ascontiguousarray(img)
        self.count += 1
        return img

    def stop(self) -> None:
        self.calls.append("stop")
        self.started = False

    def close(self) -> None:
        self.calls.append("close")
        self.started = False
        if not self.closed:
            for fd in self._pipe:
                os.close(fd)
        self.closed = True
