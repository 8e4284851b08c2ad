"""Test double for the Pi-only picamera2 package, shaped like its real API (the subset edge.sources uses).

It delivers synthetic frames of the configured size: a reddish scene whose bytes are stored B,G,R like the real
"RGB888" format (B=10, G=20, R=200), with the frame counter in pixel (0, 0) channel 0. Knobs for tests
(module-level, reset with reset()): CAMERAS (cameras attached), FAIL_AFTER (capture_array raises after this many
frames per camera object, None = never), INSTANCES (every Picamera2 object made, with its .calls log).
"""

from __future__ import annotations

import time

import numpy as np

CAMERAS = 1
FAIL_AFTER: int | None = None
INSTANCES: list["Picamera2"] = []


def reset() -> None:
    global CAMERAS, FAIL_AFTER
    CAMERAS, FAIL_AFTER = 1, None
    INSTANCES.clear()


class Picamera2:
    def __init__(self, camera_num: int = 0):
        if camera_num >= CAMERAS:
            raise IndexError("list index out of range")  # what the real one raises with no camera attached
        self.camera_num = camera_num
        self.calls: list[str] = []
        self.config: dict | None = None
        self.started = False
        self.closed = False
        self.count = 0
        INSTANCES.append(self)

    def create_video_configuration(self, main=None, lores=None, raw=None, transform=None, colour_space=None,
                                   buffer_count=6, controls=None, display="main", encode="main", queue=True):
        self.calls.append("create_video_configuration")
        main = dict(main or {})
        main.setdefault("size", (1280, 720))
        main.setdefault("format", "XBGR8888")
        return {"use_case": "video", "main": main, "controls": dict(controls or {}), "buffer_count": buffer_count}

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

    def capture_array(self, name: str = "main") -> np.ndarray:
        if not self.started:
            raise RuntimeError("Camera is not running")
        if FAIL_AFTER is not None and self.count >= FAIL_AFTER:
            raise RuntimeError("Camera frontend has timed out!")
        stream = self.config[name]
        w, h = stream["size"]
        fps = self.config["controls"].get("FrameRate", 100.0)
        time.sleep(1.0 / fps)
        channels = 3 if stream["format"] in ("RGB888", "BGR888") else 4
        img = np.empty((h, w, channels), np.uint8)
        img[..., 0], img[..., 1], img[..., 2] = 10, 20, 200  # memory order B, G, R for "RGB888"
        if channels == 4:
            img[..., 3] = 255
        img[0, 0, 0] = self.count % 256
        self.count += 1
        return img

    def stop(self) -> None:
        self.calls.append("stop")
        self.started = False

    def close(self) -> None:
        self.calls.append("close")
        self.started = False
        self.closed = True
