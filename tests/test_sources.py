"""Frame sources with real OpenCV capture (demo clip, video files, image folders) and a fake picamera2 module."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.sources import (DEMO_CLIP, Frame, NoCamera, Source, SourceConfig, SourceError, _Picamera2Backend,
                          open_source, redact)

FAKE_PICAMERA2 = Path(__file__).resolve().parent / "fake_picamera2"


def read_all(src, limit: int = 1000, timeout: float = 2.0) -> list[Frame]:
    frames = []
    while not src.finished and len(frames) < limit:
        f = src.read(timeout)
        if f is not None:
            frames.append(f)
    return frames


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def write_video(path: Path, n: int, fps: float = 10.0, size=(160, 120)) -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert vw.isOpened()
    for i in range(n):
        vw.write(np.full((size[1], size[0], 3), (i * 4) % 256, np.uint8))
    vw.release()
    return path


def first_demo_frame() -> np.ndarray:
    cap = cv2.VideoCapture(str(DEMO_CLIP))
    for _ in range(20):  # the clip starts with an empty background; frame 19 has a face: asymmetric content
        ok, img = cap.read()
    cap.release()
    assert ok
    return img


def demo_frame_19(**kw) -> Frame:
    with open_source(SourceConfig(kind="demo", realtime=False, **kw)) as src:
        frames = [src.read(2.0) for _ in range(20)]
    assert all(f is not None for f in frames)
    assert [f.index for f in frames] == list(range(20))  # lossless: nothing dropped
    return frames[19]


def test_demo_source_yields_640x480_frames_at_clip_rate():
    with open_source(SourceConfig(kind="demo")) as src:
        assert src.name == "demo"
        t0 = time.monotonic()
        frames = [src.read(2.0) for _ in range(6)]
        elapsed = time.monotonic() - t0
        assert src.connected and not src.finished
    assert all(f is not None for f in frames)
    for f in frames:
        assert f.image.shape == (480, 640, 3) and f.image.dtype == np.uint8
        assert abs(f.timestamp - time.time()) < 10
    assert [f.index for f in frames] == sorted({f.index for f in frames})
    assert 0.35 < elapsed < 2.0  # paced at the clip's 10 fps, not as fast as decoding


def test_rotate_90_swaps_dims_clockwise():
    ref = first_demo_frame()
    f = demo_frame_19(rotate=90)
    assert f.image.shape == (640, 480, 3)
    expected = cv2.rotate(ref, cv2.ROTATE_90_CLOCKWISE)
    assert np.abs(f.image.astype(int) - expected).mean() < 1.0
    assert np.abs(f.image.astype(int) - cv2.rotate(ref, cv2.ROTATE_90_COUNTERCLOCKWISE)).mean() > 5.0


@pytest.mark.parametrize("flip,code", [("horizontal", 1), ("vertical", 0), ("both", -1)])
def test_flip(flip, code):
    ref = first_demo_frame()
    f = demo_frame_19(flip=flip)
    assert f.image.shape == (480, 640, 3)
    assert np.abs(f.image.astype(int) - cv2.flip(ref, code)).mean() < 1.0
    assert np.abs(f.image.astype(int) - ref).mean() > 5.0


def test_images_folder_survives_a_corrupt_file(tmp_path, caplog):
    for name, value in (("a.png", 50), ("b.jpg", 100), ("z.png", 200)):
        cv2.imwrite(str(tmp_path / name), np.full((60, 80, 3), value, np.uint8))
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    caplog.set_level(logging.WARNING, logger="edge.sources")
    with open_source(SourceConfig(kind="images", uri=str(tmp_path), realtime=False)) as src:
        frames = read_all(src)
        assert src.finished
    assert [int(f.image.mean()) for f in frames] == [50, 100, 200]  # sorted order, x.jpg skipped
    assert src.bad_images == 1
    assert any(str(tmp_path / "x.jpg") in r.getMessage() for r in caplog.records)


def test_images_glob_paced(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((40, 40), 60 * i, np.uint8))  # gray -> BGR
    with open_source(SourceConfig(kind="images", uri=str(tmp_path / "*.png"), fps=20)) as src:
        t0 = time.monotonic()
        frames = read_all(src)
    assert len(frames) == 3 and frames[0].image.shape == (40, 40, 3)
    assert time.monotonic() - t0 >= 0.09  # 3 frames at 20 fps


def test_video_file_finishes_and_loops(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", 20)
    with open_source(SourceConfig(kind="opencv", uri=str(clip), realtime=False)) as src:
        assert src.name == f"file:{clip}"
        frames = read_all(src)
        assert src.finished and src.read(0.1) is None
    assert [f.index for f in frames] == list(range(20)) and src.dropped == 0
    with open_source(SourceConfig(kind="opencv", uri=str(clip), realtime=False, loop=True)) as src:
        frames = read_all(src, limit=45)
        assert not src.finished
    assert [f.index for f in frames] == list(range(45))
    assert abs(frames[20].image.mean() - frames[0].image.mean()) < 3  # replayed from the start


def test_slow_reader_gets_newest_frames_and_drops_are_counted(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", 40)
    with open_source(SourceConfig(kind="opencv", uri=str(clip), fps=100)) as src:
        frames = []
        while not src.finished:
            f = src.read(1.0)
            if f is not None:
                frames.append(f)
                time.sleep(0.05)  # a pipeline 5x slower than the source
    idx = [f.index for f in frames]
    assert idx == sorted(set(idx))
    assert src.dropped > 10
    assert len(frames) + src.dropped == src.frames == 40  # every frame either read or counted as dropped
    assert idx[-1] == 39  # the newest frame is never lost


def test_missing_video_file_fails_at_start(tmp_path):
    """A file source that is not there at start is a config error (exit 2), not a source "online" at 0 fps."""
    with pytest.raises(SourceError, match="video file not found: .*nope.mp4; fix source.uri"):
        open_source(SourceConfig(kind="opencv", uri=str(tmp_path / "nope.mp4")))


def test_vanished_file_retries_then_recovers(tmp_path, caplog):
    clip = write_video(tmp_path / "clip.mp4", 10)
    data = clip.read_bytes()
    caplog.set_level(logging.WARNING, logger="edge.sources")
    cfg = SourceConfig(kind="opencv", uri=str(clip), realtime=False, reconnect_min_s=0.05, reconnect_max_s=0.1)
    src = open_source(cfg)
    clip.unlink()  # gone after start (an unmounted USB stick): retried like a camera, reported down
    with src:
        assert wait_for(lambda: src.reconnects >= 3)
        assert not src.connected and not src.finished
        assert src.status == "down" and "not found" in src.last_error
        assert src.read(0.1) is None
        warnings = [r for r in caplog.records if "not found" in r.getMessage()]
        assert len(warnings) == 1  # logged once, not per retry
        clip.write_bytes(data)
        frames = read_all(src)
    assert len(frames) == 10 and src.finished


def test_missing_camera_reports_disconnected_without_raising():
    cfg = SourceConfig(kind="opencv", uri="/dev/video97", reconnect_min_s=0.05, reconnect_max_s=0.2)
    src = open_source(cfg)
    assert src.name == "camera:/dev/video97"
    src.start()
    try:
        assert wait_for(lambda: src.reconnects >= 2)
        assert not src.connected and not src.finished
        assert src.read(0.05) is None
        assert src.status == "no camera" and src.last_error == "no camera connected: /dev/video97 does not exist"
    finally:
        t0 = time.monotonic()
        src.stop()
    assert time.monotonic() - t0 < 1.0  # backoff waits are interruptible
    assert src.read(5.0) is None  # stopped: returns at once


@pytest.fixture
def picamera2(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_PICAMERA2))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    import picamera2 as fake

    fake.reset()
    yield fake
    fake.reset()
    sys.modules.pop("picamera2", None)


def test_picamera2_adapter(picamera2):
    cfg = SourceConfig(kind="picamera2", width=320, height=240, fps=50, rotate=180, flip="horizontal")
    with open_source(cfg) as src:
        frames = [src.read(2.0) for _ in range(5)]
        assert src.connected and src.name == "picamera2:0"
    cam = picamera2.INSTANCES[0]
    assert cam.config["main"] == {"size": (320, 240), "format": "RGB888"}
    assert cam.config["controls"] == {"FrameDurationLimits": (20000, 20000)}  # 50 fps, fixed
    assert cam.config["buffer_count"] == 3 and cam.config["queue"] is False  # newest frame, little memory
    t = cam.config["transform"]  # rotate 180 (= both flips) then flip horizontally = vertical flip, in libcamera
    assert (t.hflip, t.vflip, t.transpose) == (0, 1, 0)
    assert cam.calls[:3] == ["create_video_configuration", "configure", "start"]
    assert cam.calls[-2:] == ["stop", "close"] and cam.closed
    for f in frames:
        assert f.image.shape == (240, 320, 3)
        assert tuple(f.image[100, 100]) == (10, 20, 200)  # RGB888 bytes are already B, G, R: no swap
    # rotate 180 then flip horizontally = flip vertically: the camera's counter pixel (0, 0) lands at the bottom-left
    counters = [int(f.image[239, 0, 0]) for f in frames]
    assert counters == sorted(set(counters)) and counters[-1] < 10
    assert all(f.image[0, 0, 0] == 10 for f in frames)


def test_picamera2_failure_reconnects_with_a_new_camera_object(picamera2, caplog):
    picamera2.FAIL_AFTER = 3
    caplog.set_level(logging.INFO, logger="edge.sources")
    cfg = SourceConfig(kind="picamera2", reconnect_min_s=0.05, reconnect_max_s=0.1)
    with open_source(cfg) as src:
        # failed after 3 frames and was released
        assert wait_for(lambda: picamera2.INSTANCES and picamera2.INSTANCES[0].closed)
        picamera2.CAMERAS = 0  # ... and the camera is gone for a while
        assert wait_for(lambda: src.reconnects >= 3)
        assert not src.connected and src.read(0.05) is not None  # the newest pre-failure frame is still handed over
        assert src.read(0.05) is None
        picamera2.CAMERAS, picamera2.FAIL_AFTER = 1, None  # camera back
        got = [src.read(1.0) for _ in range(3)]
        assert src.connected
    assert all(f is not None for f in got)
    assert all(c.closed for c in picamera2.INSTANCES)  # every camera object released
    messages = [r.getMessage() for r in caplog.records]
    assert sum("stopped delivering" in m for m in messages) == 1  # one warning, not one per retry
    assert any("receiving frames again" in m for m in messages)


def test_picamera2_absent_camera_retries(picamera2):
    picamera2.CAMERAS = 0
    with open_source(SourceConfig(kind="picamera2", reconnect_min_s=0.05, reconnect_max_s=0.1)) as src:
        assert wait_for(lambda: src.reconnects >= 2)
        assert not src.connected and src.read(0.05) is None
        assert src.status == "no camera" and src.last_error.startswith("no camera connected: libcamera lists none")
    assert picamera2.INSTANCES == []  # never opened: discovery came first


def open_fds() -> set[tuple[int, str]]:
    """This process's descriptors with what each points to. Other tests' sockets and threads may close
    theirs at any moment (the garbage collector), so a bare count is not a measure of this test's leaks."""
    gc.collect()
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except OSError:  # the listing's own descriptor, already closed
            pass
    return out


def new_pipes(before: set[tuple[int, str]]) -> int:
    return sum(target.startswith("pipe:") for _, target in open_fds() - before)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc/self/fd to count descriptors")
def test_picamera2_no_descriptor_growth_over_1000_failed_opens(picamera2):
    picamera2.CAMERAS = 0
    before = open_fds()
    for _ in range(10):  # the leak this guards against, as upstream has it: two descriptors per failed Picamera2()
        with pytest.raises(IndexError):
            picamera2.Picamera2(0)
    assert new_pipes(before) == 20
    picamera2.reset()
    picamera2.CAMERAS = 0
    before = open_fds()
    backend = _Picamera2Backend(SourceConfig(kind="picamera2"), picamera2.Picamera2)
    for _ in range(1000):
        with pytest.raises(NoCamera):
            backend.open()
    assert new_pipes(before) == 0


def test_picamera2_defaults_and_python_side_turns(picamera2):
    cfg = SourceConfig(kind="picamera2", width=64, height=48, rotate=90)
    with open_source(cfg) as src:
        f = src.read(2.0)
    cam = picamera2.INSTANCES[0]
    assert cam.config["controls"] == {"FrameDurationLimits": (66667, 66667)}  # fps 0: 15 fps, not the sensor's 30
    assert cam.config["transform"] is None  # libcamera on a Pi cannot transpose: 90 degrees are turned in Python
    assert f.image.shape == (64, 48, 3)


def test_picamera2_silent_camera_times_out_and_reconnects(picamera2, caplog):
    """A camera that stops delivering: capture_array(wait=) times out, which is a failed read -> reconnect."""
    picamera2.STALL_AFTER = 0
    caplog.set_level(logging.INFO, logger="edge.sources")
    cfg = SourceConfig(kind="picamera2", frame_timeout_s=0.1, stall_timeout_s=30, reconnect_min_s=0.05,
                       reconnect_max_s=0.1)
    with open_source(cfg) as src:
        assert wait_for(lambda: src.reconnects >= 2, timeout=30)
        assert src.status == "down" and src.last_error.startswith("stopped delivering frames (TimeoutError: ")
        assert len(picamera2.INSTANCES) >= 2 and picamera2.INSTANCES[0].closed  # released, reopened
        assert not src.stalled()
        picamera2.STALL_AFTER = None  # frames again
        assert wait_for(lambda: src.status == "up", timeout=30)
        assert src.read(2.0) is not None
    assert any("stopped delivering frames (TimeoutError: " in r.getMessage() for r in caplog.records)


def test_picamera2_hung_driver_call_is_reported_stalled(picamera2):
    """A capture that never returns (no timeout helps) cannot be interrupted: the source says it is stalled."""
    picamera2.HANG_AFTER = 2
    cfg = SourceConfig(kind="picamera2", frame_timeout_s=0.1, stall_timeout_s=0.3)
    src = open_source(cfg).start()
    try:
        assert picamera2.HANGING.wait(30)
        assert wait_for(src.stalled, timeout=30)
        assert src.status == "stalled"
        health = src.health()
        assert health["status"] == "stalled" and health["error"].startswith("read() has not returned for")
        assert src.stalled_for() >= 0.3
    finally:
        picamera2.RELEASE.set()
        src.stop()
    assert not src.stalled()


def test_slow_opencv_stream_read_counts_as_failed_and_reconnects(monkeypatch, caplog):
    """cv2.VideoCapture.read has no timeout: a camera or stream read that returns after source.frame_timeout_s is
    a failed read (close, reconnect), as picamera2's wait= timeout is; frames in time bring the source back up."""
    import edge.sources as sources

    delay = {"s": 0.3}
    opened = []

    class SlowCapture:
        def __init__(self, uri):
            opened.append(uri)

        def isOpened(self):
            return True

        def set(self, prop, value):
            return True

        def get(self, prop):
            return 10.0

        def read(self):
            time.sleep(delay["s"])
            return True, np.zeros((48, 64, 3), np.uint8)

        def release(self):
            pass

    monkeypatch.setattr(sources.cv2, "VideoCapture", SlowCapture)
    caplog.set_level(logging.INFO, logger="edge.sources")
    cfg = SourceConfig(kind="opencv", uri="rtsp://camera.local/stream", frame_timeout_s=0.1, stall_timeout_s=30,
                       reconnect_min_s=0.05, reconnect_max_s=0.1)
    with open_source(cfg) as src:
        assert wait_for(lambda: src.reconnects >= 2, timeout=30)
        assert src.status == "down" and "over source.frame_timeout_s (0.1 s)" in src.last_error, src.last_error
        assert src.frames == 0 and len(opened) >= 2  # late frames are not delivered; the stream is reopened
        delay["s"] = 0.0
        assert wait_for(lambda: src.status == "up", timeout=30)
        assert src.read(2.0) is not None
    assert any("stopped delivering frames (TimeoutError: read took" in r.getMessage() for r in caplog.records)


def test_picamera2_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # makes `import picamera2` raise ImportError
    with pytest.raises(SourceError, match="sudo apt install python3-picamera2.*--system-site-packages"):
        open_source(SourceConfig(kind="picamera2"))


@pytest.mark.parametrize("kw,field", [
    ({"kind": "webcam"}, "kind"), ({"kind": "opencv"}, "uri"), ({"kind": "images", "uri": " "}, "uri"),
    ({"rotate": 45}, "rotate"), ({"flip": "sideways"}, "flip"), ({"fps": -1}, "fps"), ({"width": 0}, "width"),
    ({"reconnect_min_s": 0}, "reconnect_min_s"), ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_max_s"),
])
def test_validate_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SourceConfig(**kw).validate()
    with pytest.raises(ValueError, match=f"^{field}: "):
        open_source(SourceConfig(**kw))


def test_stream_names_hide_credentials():
    assert redact("rtsp://admin:secret@10.0.0.5:554/stream1") == "rtsp://***@10.0.0.5:554/stream1"
    src = open_source(SourceConfig(kind="opencv", uri="rtsp://admin:secret@10.0.0.5/s"))
    assert "secret" not in src.name and src.name.startswith("stream:")


def test_picamera2_rate_follows_the_pipeline(picamera2, monkeypatch):
    """fps = 0: a pipeline that takes ~5 frames/s brings the camera down from its 15 fps start (2..30 fps)."""
    monkeypatch.setattr(Source, "RATE_WINDOW_S", 0.3)
    with open_source(SourceConfig(kind="picamera2", width=64, height=48)) as src:
        end = time.monotonic() + 60
        while time.monotonic() < end and not (picamera2.INSTANCES and picamera2.INSTANCES[0].control_log):
            src.read(1.0)
            time.sleep(0.2)  # a slow pipeline
    cam = picamera2.INSTANCES[0]
    assert cam.control_log, "the frame rate was never adjusted"
    first = cam.control_log[0]["FrameDurationLimits"]
    assert first[0] == first[1] and 1e6 / 15 < first[0] <= 1e6 / 2  # slower than the start, never below 2 fps


def test_picamera2_fixed_fps_is_left_alone(picamera2, monkeypatch):
    monkeypatch.setattr(Source, "RATE_WINDOW_S", 0.1)
    with open_source(SourceConfig(kind="picamera2", width=64, height=48, fps=25)) as src:
        for _ in range(10):
            src.read(1.0)
            time.sleep(0.05)
    assert picamera2.INSTANCES[0].control_log == []


def test_daemon_with_a_missing_video_file_exits_2_with_one_line(tmp_path):
    """What a systemd user gets: exit 2 (RestartPreventExitStatus=2: no restart loop) and the line to fix."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FER_EDGE_", "NOTIFY_", "WATCHDOG_"))}
    res = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--set", "source.kind=opencv", "--set",
                          f"source.uri={tmp_path / 'missing.mp4'}", "--set", "mqtt.enabled=false"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "video file not found" in res.stderr and "fix source.uri" in res.stderr
    assert "Traceback" not in res.stderr


def test_unreadable_video_file_is_reported_down(tmp_path):
    """A file that exists but never yields a frame: retried with backoff and reported down, not "up" at 0 fps."""
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    cfg = SourceConfig(kind="opencv", uri=str(bad), loop=True, reconnect_min_s=0.05, reconnect_max_s=0.1)
    with open_source(cfg) as src:
        assert wait_for(lambda: src.status == "down", timeout=30)
        assert src.last_error and src.read(0.05) is None and not src.finished
