"""`fer-edge snapshot` on the bundled demo clip: an annotated image is written, faces are boxed and labelled,
rotation from the config applies, and bad output paths / dead sources end in one clear error line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.config import load_config
from edge.snapshot import GREEN, SnapshotError, annotate, take_snapshot, write_image
from edge.sources import DEMO_CLIP

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not DEMO_CLIP.is_file(), reason=f"demo clip missing: {DEMO_CLIP} "
                                "(it ships in git: git checkout -- edge/data)")


def demo_cfg(**extra: str):
    # realtime=false: the clip is read as fast as it decodes (frames are not paced at 10 fps).
    return load_config(None, {"source.kind": "demo", "source.realtime": "false", "device.id": "cam-1", **extra},
                       env={})


def first_frames(n: int) -> np.ndarray:
    cap = cv2.VideoCapture(str(DEMO_CLIP))
    frame = None
    for _ in range(n):
        ok, frame = cap.read()
        assert ok
    cap.release()
    return frame


def green_pixels(img: np.ndarray) -> np.ndarray:
    b, g, r = (img[..., i].astype(int) for i in range(3))
    return (g > 150) & (r < 90) & (b < 90)


def test_snapshot_of_the_demo_clip(tmp_path):
    frame = first_frames(25)
    out = tmp_path / "aim.jpg"
    summary = take_snapshot(demo_cfg(), str(out), image=frame)
    assert summary["output"] == str(out) and summary["device_id"] == "cam-1"
    assert (summary["width"], summary["height"]) == (640, 480)
    assert len(summary["faces"]) >= 1
    face = summary["faces"][0]
    labels = {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
    assert face["emotion"] in labels and 0 < face["confidence"] <= 1
    assert set(face["scores"]) == labels and abs(sum(face["scores"].values()) - 1) < 0.01
    img = cv2.imread(str(out))
    assert img is not None and img.shape == (480, 640, 3)
    # The face box is drawn in green along its left and bottom edges (the label covers the top-left corner);
    # the raw frame has no such green.
    b = face["bbox"]
    green = green_pixels(img)
    left = green[b["y"] + b["h"] // 3:b["y"] + b["h"], max(0, b["x"] - 1):b["x"] + 3].any(axis=1)
    bottom = green[b["y"] + b["h"] - 4:b["y"] + b["h"] + 1, b["x"]:b["x"] + b["w"]].any(axis=0)
    assert left.mean() > 0.95 and bottom.mean() > 0.95, (left.mean(), bottom.mean())
    assert green_pixels(frame).mean() < 0.001


def test_snapshot_captures_from_the_configured_source(tmp_path):
    out = tmp_path / "aim.png"
    summary = take_snapshot(demo_cfg(), str(out), warmup_s=0.5, timeout_s=10)
    assert out.is_file() and summary["source"] == "demo"
    assert cv2.imread(str(out)).shape == (480, 640, 3)


def test_rotation_from_the_config_applies(tmp_path):
    out = tmp_path / "rot.jpg"
    summary = take_snapshot(demo_cfg(**{"source.rotate": "90"}), str(out), warmup_s=0.0)
    assert (summary["width"], summary["height"]) == (480, 640) and summary["rotate"] == 90
    assert cv2.imread(str(out)).shape == (640, 480, 3)


def test_annotate_marks_boxes_and_keeps_the_input():
    img = np.full((240, 320, 3), 90, np.uint8)
    faces = [{"bbox": {"x": 100, "y": 60, "w": 80, "h": 80}, "emotion": "happy", "confidence": 0.9}]
    out = annotate(img, faces, ["header"], min_face=48)
    assert (img == 90).all()  # input untouched
    assert tuple(out[100, 100]) == GREEN  # left edge of the box
    assert (out[:12, :40] != 90).any()  # header drawn


def test_bad_output_paths(tmp_path):
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(SnapshotError, match="no such directory"):
        write_image(tmp_path / "missing" / "x.jpg", img)
    with pytest.raises(SnapshotError, match="unsupported extension"):
        take_snapshot(demo_cfg(), str(tmp_path / "x.gif"), image=img)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FER_EDGE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "edge.cli", "snapshot", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_cli(tmp_path):
    from test_cli import cli_here  # in-process: the subprocess is not the point here (see the next test)

    out = tmp_path / "aim.jpg"
    # Played at its own 10 fps, like a camera: after 2.5 s of warm-up two faces are in view (edge/data/demo.json).
    res = cli_here("snapshot", "--set", "source.kind=demo", "-o", str(out), "--warmup", "2.5")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["output"] == str(out) and out.is_file() and len(summary["faces"]) >= 1
    assert f"wrote {out}" in res.stderr and "Traceback" not in res.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli_here("snapshot", "--set", "source.kind=images", "--set", f"source.uri={empty}",
                   "-o", str(tmp_path / "x.jpg"), "--timeout", "1")
    assert res.returncode == 1 and res.stderr.strip().endswith("fer-edge doctor checks the camera and says what to fix)")
    assert "no frame" in res.stderr and "Traceback" not in res.stderr and res.stdout == ""

    res = cli_here("snapshot", "-o", str(tmp_path / "nodir" / "x.jpg"), "--set", "source.kind=demo")
    assert res.returncode == 1 and "no such directory" in res.stderr and "Traceback" not in res.stderr


def test_cli_logging_ignores_handlers_left_by_the_embedding_process(tmp_path):
    """A root handler bound to a stream that is closed by now (left by an earlier in-process caller) must not get
    the source thread's retry warnings: CI once printed a 'Logging error' traceback into snapshot's stderr so."""
    import io
    import logging

    from test_cli import cli_here

    stale = io.StringIO()
    handler = logging.StreamHandler(stale)
    stale.close()
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        empty = tmp_path / "empty"
        empty.mkdir()
        res = cli_here("snapshot", "--set", "source.kind=images", "--set", f"source.uri={empty}",
                       "-o", str(tmp_path / "x.jpg"), "--timeout", "1")
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    assert res.returncode == 1 and "no frame" in res.stderr
    assert "Logging error" not in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_cli_video_file_missing_or_not_a_video_is_said_at_once(tmp_path):
    """A missing video file is "not found" at once (it used to wait --timeout and say "no frame"), and a file
    that is not a video says so in one line, without FFmpeg's raw "[mov,mp4,… @ 0x…]" lines."""
    import time

    t0 = time.monotonic()
    res = run_cli("--set", "source.kind=opencv", "--set", f"source.uri={tmp_path / 'gone.mp4'}",
                  "-o", str(tmp_path / "x.jpg"), "--timeout", "30", cwd=tmp_path)
    assert res.returncode == 1 and f"{tmp_path / 'gone.mp4'}: video file not found" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 25, "waited for the frame timeout"  # a bound far from the 30 s timeout
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video\n")
    res = run_cli("--set", "source.kind=opencv", "--set", f"source.uri={fake}", "-o", str(tmp_path / "x.jpg"),
                  cwd=tmp_path)
    assert res.returncode == 1 and f"{fake}: not a readable video file" in res.stderr, res.stderr
    assert " @ 0x" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "XNNPACK" not in res.stderr and res.stdout == ""
